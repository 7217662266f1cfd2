"""What every decoder family provides to the runner."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from eoq.engine.model.attention import AttentionMetadata
from eoq.engine.model.linear import Int8Activations, Linear
from eoq.engine.model.norms import Norm
from eoq.engine.model.ops import TORCH_OPS, TorchOps


@dataclass(frozen=True, slots=True)
class KVSpec:
    """The shape of one token's K/V in one layer; the runner sizes the cache from it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


class DecoderModel(nn.Module):
    """A causal decoder over the paged KV cache. It knows nothing of scheduling.

    ``forward`` takes the step's flattened new tokens and returns float32 logits for the rows in
    ``logits_indices`` only (the last token of each sequence that samples), so a prefill chunk that doesn't end
    its prompt costs no LM-head work.
    """

    architecture: str
    kv_spec: KVSpec
    vocab_size: int
    max_positions: int
    ops: TorchOps = TORCH_OPS  # torch's ops or eoq's CPU kernels, chosen at load (set by prepare)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (num_blocks, bs, nkv, hd) x 2
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # (S,) int64
    ) -> torch.Tensor:  # (S, vocab) float32
        raise NotImplementedError

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a transformers-format state dict (names as in the checkpoint) into this model."""
        raise NotImplementedError

    def linears(self) -> Iterator[Linear]:
        return (m for m in self.modules() if isinstance(m, Linear))

    def quantize(self, mode: str) -> None:
        """Low-bit copies of the matmul weights for small steps (see ``Linear.quantize``): ``auto`` only where
        the checkpoint's weights are already 4- or 8-bit, ``int4`` every weight (rounded: lossy), ``never`` none.
        Call on the float32 CPU model, before the cast."""
        for lin in self.linears():
            lin.quantize(mode)

    def prepare(self, dtype: torch.dtype, quantized_max_tokens: int = 0, ops: TorchOps = TORCH_OPS,
                int8_activations: Int8Activations = Int8Activations.OFF,
                decode_panels_max_tokens: int = sys.maxsize) -> None:
        """Called once after the weights are loaded and moved, with the ops chosen at load (``ops.select_ops``):
        picks the matmul kernels, tells the norms which dtype the matmuls take and hands them the ops.
        ``int8_activations``, ``decode_panels_max_tokens``: which of the low-bit copies' steps take int8
        activations (``Linear.prepare``)."""
        self.ops = ops
        for lin in self.linears():
            lin.prepare(dtype, quantized_max_tokens, ops.kernels, int8_activations, decode_panels_max_tokens)
        for m in self.modules():
            if isinstance(m, Norm):
                m.prepare(dtype, ops)

    def float32_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers that stay float32 whatever the model's dtype: norm weights, RoPE tables."""
        keep = {}
        for mname, m in self.named_modules():
            if getattr(m, "keep_float32", False):
                for pname, p in m.named_parameters(recurse=False):
                    keep[f"{mname}.{pname}" if mname else pname] = p.detach().float().clone()
        for bname, b in self.named_buffers():
            if bname.endswith("_table"):
                keep[bname] = b.float().clone()
        return keep

    def restore_float32(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        for name, value in tensors.items():
            owner_name, _, attr = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            current = getattr(owner, attr)
            if isinstance(current, nn.Parameter):
                current.data = value.to(device)
            else:
                setattr(owner, attr, value.to(device))


def take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop a checkpoint tensor, with a message naming the missing one (a broken or foreign checkpoint)."""
    try:
        return state.pop(name)
    except KeyError:
        raise KeyError(f"checkpoint has no tensor {name!r}") from None


def copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)
