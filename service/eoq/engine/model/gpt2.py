"""The GPT-2 family: learned positions, LayerNorm, GELU, fused QKV, tied LM head.

Follows transformers' ``modeling_gpt2.py`` (whose Conv1D weights are stored (in, out): transposed on load).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from eoq.engine.model.attention import AttentionMetadata, paged_attention
from eoq.engine.model.base import DecoderModel, KVSpec, copy_into, take
from eoq.engine.model.linear import Linear, LMHead
from eoq.engine.model.norms import LayerNorm
from eoq.errors import ConfigError

ACTIVATIONS = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class GPT2Layer(nn.Module):
    def __init__(self, hidden: int, nh: int, inner: int, eps: float, act) -> None:
        super().__init__()
        self.nh, self.hd = nh, hidden // nh
        self.ln_1 = LayerNorm(hidden, eps)
        self.c_attn = Linear(hidden, 3 * hidden, bias=True)
        self.c_proj = Linear(hidden, hidden, bias=True)
        self.ln_2 = LayerNorm(hidden, eps)
        self.c_fc = Linear(hidden, inner, bias=True)
        self.mlp_proj = Linear(inner, hidden, bias=True)
        self.act = act

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        T, decode = x.shape[0], meta.decode_only
        q, k, v = self.c_attn(self.ln_1(x), decode).view(T, 3, self.nh, self.hd).unbind(1)  # (T, nh, hd) x 3
        x = x + self.c_proj(paged_attention(q, k, v, kv[0], kv[1], meta), decode)
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x), decode)), decode)


class GPT2Decoder(DecoderModel):
    architecture = "gpt2"

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        hidden, nh = config.n_embd, config.n_head
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ConfigError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx are not supported")
        if getattr(config, "add_cross_attention", False):
            raise ConfigError("GPT-2 checkpoints with cross-attention are not supported")
        if not getattr(config, "scale_attn_weights", True):
            raise ConfigError("GPT-2 checkpoints without scale_attn_weights are not supported")
        act_name = config.activation_function
        if act_name not in ACTIVATIONS:
            raise ConfigError(f"activation {act_name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.vocab_size = config.vocab_size
        self.max_positions = max_positions
        self.kv_spec = KVSpec(config.n_layer, nh, hidden // nh)
        self.wte = nn.Embedding(config.vocab_size, hidden)
        self.wpe = nn.Embedding(config.n_positions, hidden)
        self.wte.weight.requires_grad_(False)
        self.wpe.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            GPT2Layer(hidden, nh, inner, config.layer_norm_epsilon, ACTIVATIONS[act_name]) for _ in range(config.n_layer)
        )
        self.ln_f = LayerNorm(hidden, config.layer_norm_epsilon, float32_out=True)
        self.lm_head = LMHead(hidden, config.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, meta, logits_indices):
        x = self.wte(input_ids).float() + self.wpe(positions).float()  # (T, hidden) float32 residual stream
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, kv, meta)
        return self.lm_head(self.ln_f(x[logits_indices]), meta.decode_only)  # (S, vocab) float32

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("transformer."): t for k, t in state.items()}
        copy_into(self.wte.weight, take(state, "wte.weight"), "wte.weight")
        copy_into(self.wpe.weight, take(state, "wpe.weight"), "wpe.weight")
        for i, layer in enumerate(self.layers):
            p = f"h.{i}."
            for ours, theirs, conv1d in (
                (layer.ln_1, "ln_1", False),
                (layer.c_attn, "attn.c_attn", True),
                (layer.c_proj, "attn.c_proj", True),
                (layer.ln_2, "ln_2", False),
                (layer.c_fc, "mlp.c_fc", True),
                (layer.mlp_proj, "mlp.c_proj", True),
            ):
                w = take(state, f"{p}{theirs}.weight")
                copy_into(ours.weight, w.t() if conv1d else w, f"{p}{theirs}.weight")
                copy_into(ours.bias, take(state, f"{p}{theirs}.bias"), f"{p}{theirs}.bias")
            state.pop(f"{p}attn.bias", None)  # old checkpoints store the causal mask as a buffer
            state.pop(f"{p}attn.masked_bias", None)
        copy_into(self.ln_f.weight, take(state, "ln_f.weight"), "ln_f.weight")
        copy_into(self.ln_f.bias, take(state, "ln_f.bias"), "ln_f.bias")
        state.pop("lm_head.weight", None)  # GPT-2 ties the head to the token embedding
        self.lm_head.tie(self.wte)
        if state:
            raise KeyError(f"checkpoint has tensors this GPT-2 decoder does not use: {list(state)[:5]}")
