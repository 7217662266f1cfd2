"""The Llama family: RoPE (with the checkpoint's scaling), RMSNorm, SwiGLU, grouped-query attention.

Covers Llama, SmolLM2, Mistral-style and Qwen2 checkpoints, tied or untied embeddings. Follows transformers'
``modeling_llama.py`` numerically (the fidelity tests hold it to 1e-4 in float32); the differences are in
layout only: q/k/v and gate/up are fused into single matmuls, and attention runs over the paged KV cache.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from eoq.engine.model.attention import AttentionMetadata, paged_attention
from eoq.engine.model.base import DecoderModel, KVSpec, copy_into, take
from eoq.engine.model.decode_attention import PagedKernel
from eoq.engine.model.kernels.bindings import PROJECTIONS, LlamaLayersInt4, LlamaShape
from eoq.engine.model.linear import Int8Activations, Linear, LMHead
from eoq.engine.model.norms import RMSNorm
from eoq.engine.model.ops import TORCH_OPS, KernelRope, TorchOps, TorchRope
from eoq.errors import ConfigError

# RoPE types whose frequencies do not depend on the sequence length (a cached K must never change).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling of the checkpoint's RoPE (transformers computes them)."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConfigError(
            f"RoPE type {rope_type!r} changes with the sequence length, which a KV cache cannot follow; "
            f"supported: {', '.join(STATIC_ROPE_TYPES)}"
        )
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class LlamaLayer(nn.Module):
    def __init__(self, hidden: int, nh: int, nkv: int, hd: int, inter: int, eps: float, qkv_bias: bool,
                 o_bias: bool, mlp_bias: bool) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd, self.inter = nh, nkv, hd, inter
        self.input_norm = RMSNorm(hidden, eps)
        self.qkv = Linear(hidden, (nh + 2 * nkv) * hd, bias=qkv_bias)
        self.o_proj = Linear(nh * hd, hidden, bias=o_bias)
        self.post_norm = RMSNorm(hidden, eps)
        self.gate_up = Linear(hidden, 2 * inter, bias=mlp_bias)
        self.down = Linear(inter, hidden, bias=mlp_bias)
        self.ops: TorchOps = TORCH_OPS  # set by LlamaDecoder.prepare

    @property
    def projections(self) -> tuple[Linear, Linear, Linear, Linear]:
        """The layer's matmuls, in the order of ``bindings.PROJECTIONS`` (the one-call kernel's names)."""
        return self.qkv, self.o_proj, self.gate_up, self.down

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None, rope: TorchRope | KernelRope,
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x: (T, hidden) the float32 residual stream, still without ``pending`` (the previous layer's MLP output,
        added here by the norm, in place). Returns this layer's MLP output, for the next layer to add."""
        T = x.shape[0]
        nh, nkv, hd = self.nh, self.nkv, self.hd
        decode = meta.decode_only
        qkv = self.qkv(self.input_norm(x, pending), decode)  # (T, (nh + 2 nkv) hd)
        v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)  # (T, nkv, hd)
        qk = rope(qkv, kv[0], kv[1], meta.slot_mapping, nh, nkv, hd)  # (T, nh + nkv, hd), K/V in the cache
        attn = paged_attention(qk[:, :nh], qk[:, nh:], v, kv[0], kv[1], meta, stored=True)  # (T, nh hd)
        gate_up = self.gate_up(self.post_norm(x, self.o_proj(attn, decode)), decode)  # (T, 2 inter): [gate | up]
        return self.down(self.ops.silu_mul(gate_up), decode)


class LlamaDecoder(DecoderModel):
    architecture = "llama"
    one_call_tokens = 0  # set by prepare: decode steps of up to this many tokens run every layer in one kernel call
    row_tokens = 0  # set by prepare: the projections' row kernels run steps of up to this many tokens
    _small_layers: LlamaLayersInt4 | None = None

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        nh = config.num_attention_heads
        nkv = getattr(config, "num_key_value_heads", None) or nh
        hd = getattr(config, "head_dim", None) or hidden // nh
        if nh % nkv:
            raise ConfigError(f"num_attention_heads ({nh}) is not a multiple of num_key_value_heads ({nkv})")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported for {config.model_type} (only silu)")
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or config.model_type == "qwen2"
        self.tie_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.vocab_size = config.vocab_size
        self.max_positions = max_positions
        self.kv_spec = KVSpec(config.num_hidden_layers, nkv, hd)
        self.embed = nn.Embedding(config.vocab_size, hidden)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            LlamaLayer(hidden, nh, nkv, hd, config.intermediate_size, config.rms_norm_eps, qkv_bias,
                       attention_bias, bool(getattr(config, "mlp_bias", False)))
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps, float32_out=True)
        self.lm_head = LMHead(hidden, config.vocab_size, bias=False)
        inv_freq, scaling = rope_inv_freq(config, hd)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]  # (P, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        half = hd // 2
        sin = emb.sin() * scaling
        # rotate_half(x) * sin == flip_halves(x) * [-sin_1, sin_2]: one flip instead of slice/neg/cat.
        sin[:, :half] = -sin[:, :half]
        self.register_buffer("cos_table", emb.cos() * scaling, persistent=False)  # (P, hd)
        self.register_buffer("sin_table", sin, persistent=False)  # (P, hd)

    def prepare(self, dtype: torch.dtype, quantized_max_tokens: int = 0, ops: TorchOps = TORCH_OPS,
                int8_activations: Int8Activations = Int8Activations.OFF,
                decode_panels_max_tokens: int = sys.maxsize) -> None:
        super().prepare(dtype, quantized_max_tokens, ops, int8_activations, decode_panels_max_tokens)
        for layer in self.layers:
            layer.ops = ops
        # Decode steps run every layer in one call of eoq's CPU kernels (csrc/llama_small.cpp) when every projection
        # has a 4-bit copy for them and no bias (with int8 activations where the projections take them: all or
        # none, as prepare set them): steps of up to row_tokens tokens on the row kernels, and where every
        # projection's decodes beyond them run its exact copy in panels (a 4-bit checkpoint: in float32, or beside
        # oneDNN's bfloat16 weight with Int8Activations.DECODE_PANELS, up to its decode_panels_max_tokens) the
        # bigger ones too, as Linear runs them.
        projections = [p for la in self.layers for p in la.projections]
        self.one_call_tokens = self.row_tokens = 0
        self._small_layers = None
        if ops.kernels is None or any(p.bias is not None or p.int4_max_tokens < 0 for p in projections):
            return
        self.row_tokens = self.one_call_tokens = min(p.int4_max_tokens for p in projections)
        if all(p.decodes_run_panels() for p in projections):
            self.one_call_tokens = min(p.decode_panels_max_tokens for p in projections)

    def forward(self, input_ids, positions, kv_caches, meta, logits_indices):
        emb = self.embed(input_ids)  # (T, hidden), model dtype
        x = emb.float() if emb.dtype != torch.float32 else emb  # the residual stream stays float32; updated in place
        pending = None  # each layer's MLP output, added to x by the next norm
        decode = meta.decode
        # A step of decodes attended by the paged kernel runs all layers in one call, which runs that kernel itself
        # on the step's tables (a step padded for CUDA graphs attends otherwise: it runs layer by layer).
        if isinstance(decode, PagedKernel) and 0 < decode.num_seqs == x.shape[0] <= self.one_call_tokens:
            pending = torch.empty_like(emb)
            self.ops.kernels.llama_layers_int4(self._small_step_layers(kv_caches), x, pending, self.cos_table,
                                               self.sin_table, positions, meta.slot_mapping, decode.block_tables,
                                               decode.context_lens)
        else:
            rope = self.ops.rope(self.cos_table, self.sin_table, positions, emb.dtype)  # once a step
            for layer, kv in zip(self.layers, kv_caches):
                pending = layer(x, pending, rope, kv, meta)
        x = self.norm(x[logits_indices], None if pending is None else pending[logits_indices])  # (S, hidden)
        return self.lm_head(x, meta.decode_only)  # (S, vocab) float32

    def _small_step_layers(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> LlamaLayersInt4:
        """The layers' 4-bit weights (rows, and panels where there are), norms and caches by address, for
        ``CpuKernels.llama_layers_int4`` (made once per KV cache)."""
        k0 = kv_caches[0][0]  # (nkv, num_blocks, block_size, hd)
        layers = self._small_layers
        if layers is None or layers.array[0].k_cache != k0.data_ptr() or layers.shape.num_blocks != k0.shape[1]:
            first = self.layers[0]
            shape = LlamaShape(hidden=self.embed.embedding_dim, num_heads=first.nh, num_kv_heads=first.nkv,
                               head_dim=first.hd, inter=first.inter, block_size=k0.shape[2], num_blocks=k0.shape[1],
                               eps=first.input_norm.eps, scale=first.hd**-0.5)

            def projection(p: Linear) -> tuple:  # Int4Projection's fields: rows, then panels (or none)
                panels = (None, None) if p.lowbit_panels is None else (p.lowbit_panels.values, p.lowbit_panels.scales)
                return p.int4.values, p.int4.scales, *panels

            layers = self._small_layers = LlamaLayersInt4.of([
                dict(input_norm=la.input_norm.weight, post_norm=la.post_norm.weight, k_cache=k, v_cache=v,
                     **{name: projection(p) for name, p in zip(PROJECTIONS, la.projections)})
                for la, (k, v) in zip(self.layers, kv_caches)
            ], shape, row_tokens=self.row_tokens, int8_rows=first.qkv.runs_int8_activations(1, decode=True),
                int8_panels=first.qkv.runs_int8_activations(self.row_tokens + 1, decode=True))
        return layers

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("model."): t for k, t in state.items()}
        if "embed_tokens.weight" not in state and self.tie_embeddings and "lm_head.weight" in state:
            state["embed_tokens.weight"] = state.pop("lm_head.weight")  # a tied checkpoint saved under the head's name
        copy_into(self.embed.weight, take(state, "embed_tokens.weight"), "embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            for name in ("weight", "bias"):
                parts = [state.pop(f"{p}self_attn.{x}_proj.{name}", None) for x in "qkv"]
                target = getattr(layer.qkv, name)
                if target is not None:
                    if any(t is None for t in parts):
                        raise KeyError(f"checkpoint lacks {p}self_attn.q/k/v_proj.{name}")
                    copy_into(target, torch.cat(parts, 0), f"{p}self_attn.qkv.{name}")
            copy_into(layer.o_proj.weight, take(state, f"{p}self_attn.o_proj.weight"), f"{p}o_proj")
            if layer.o_proj.bias is not None:
                copy_into(layer.o_proj.bias, take(state, f"{p}self_attn.o_proj.bias"), f"{p}o_proj.bias")
            gate_up = torch.cat([take(state, f"{p}mlp.gate_proj.weight"), take(state, f"{p}mlp.up_proj.weight")], 0)
            copy_into(layer.gate_up.weight, gate_up, f"{p}mlp.gate_up")
            copy_into(layer.down.weight, take(state, f"{p}mlp.down_proj.weight"), f"{p}mlp.down_proj")
            if layer.gate_up.bias is not None:
                bias = torch.cat([take(state, f"{p}mlp.gate_proj.bias"), take(state, f"{p}mlp.up_proj.bias")], 0)
                copy_into(layer.gate_up.bias, bias, f"{p}mlp.gate_up.bias")
                copy_into(layer.down.bias, take(state, f"{p}mlp.down_proj.bias"), f"{p}mlp.down_proj.bias")
            copy_into(layer.input_norm.weight, take(state, f"{p}input_layernorm.weight"), f"{p}input_layernorm")
            copy_into(layer.post_norm.weight, take(state, f"{p}post_attention_layernorm.weight"),
                      f"{p}post_attention_layernorm")
        copy_into(self.norm.weight, take(state, "norm.weight"), "norm.weight")
        head = state.pop("lm_head.weight", None)
        if head is None or self.tie_embeddings:
            self.lm_head.tie(self.embed)
        else:
            copy_into(self.lm_head.weight, head, "lm_head.weight")
        state.pop("rotary_emb.inv_freq", None)
        leftovers = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise KeyError(f"checkpoint has tensors this Llama-family decoder does not use: {leftovers[:5]}")
