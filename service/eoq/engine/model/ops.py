"""The ops the decoders run where eoq has a CPU kernel of its own, chosen once at load: ``TorchOps`` (any device,
and the CPU without a compiler) or ``CpuKernelOps`` (eoq's C++ kernels, ``eoq.engine.model.kernels``).

The builder picks one (``select_ops``) and hands it to the model's ``prepare``, which hands it to the norms and
layers; the runner takes the sampler's argmax and the decode-attention backend from it. Past that choice nothing
asks whether the kernels are there: each holder calls its ops. ``Linear`` is the exception by design: it packs its
weight at load for whichever matmul serves it (``ops.kernels``, when there are kernels) and keeps only that copy.

A kernel with a torch equivalent is a method on both classes, with the same contract (``CpuKernelOps`` may fall
back to ``TorchOps``' method for inputs its kernel does not take).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eoq.engine.model.attention import store_kv
from eoq.engine.model.decode_attention import DecodeBackend, KernelDecode, TorchDecode
from eoq.engine.model.kernels.bindings import CpuKernels


class TorchOps:
    """torch's ops, on any device and dtype."""

    kernels: CpuKernels | None = None  # the library, for what calls it directly (Linear, Llama's one-call step)
    name = "torch's ops only"

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
        """``x += delta`` in place (x float32 (rows, dim); delta or None), then RMSNorm of x times ``weight``,
        returned in ``out_dtype``."""
        if delta is not None:
            x += delta
        return F.rms_norm(x, (x.shape[-1],), weight, eps).to(out_dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for ``gate_up`` (T, 2 inter) = [gate | up]; returns (T, inter)."""
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)  # (T, inter) x 2
        return F.silu(gate) * up

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """``x.argmax(-1)``: the same indices (the first of equal maxima), by ``max``: ~2.5x faster than ``argmax``
        on a CPU (0.45 ms vs 1.2 ms for 32 x 49152 logits)."""
        return x.max(dim=-1).indices

    def rope(self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
             dtype: torch.dtype) -> TorchRope:
        """A step's rotary embedding (tables float32 (P, hd), sin's first half negated; positions (T,))."""
        return TorchRope(cos_table[positions].to(dtype).unsqueeze(1), sin_table[positions].to(dtype).unsqueeze(1))

    def decode_attention(self, block_size: int, dtype: torch.dtype) -> DecodeBackend:
        """How decode steps attend (``decode_attention``), for blocks of ``block_size`` and queries in ``dtype``."""
        return TorchDecode(block_size, dtype)


class CpuKernelOps(TorchOps):
    """eoq's CPU kernels (float32 and bfloat16 tensors on the CPU)."""

    def __init__(self, kernels: CpuKernels) -> None:
        self.kernels = kernels
        self.name = f"eoq's CPU kernels ({kernels.isa})"

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
        """One call (``csrc/rms_norm.cpp``): in torch the add and the norm are seven dispatched ops, which at one
        token a step cost more than their arithmetic (~30 us a norm here vs ~3 us)."""
        if delta is not None and delta.dtype != out_dtype:  # the kernel takes delta in the out dtype
            delta = delta.to(out_dtype)
        return self.kernels.add_rms_norm(x, delta, weight, eps, out_dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul(gate_up)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel takes float32 rows (measured: 0.85 ms with torch for 32 x 49152 logits on 2 cores)."""
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[1]:
            return self.kernels.argmax(x)
        return super().argmax(x)

    def rope(self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
             dtype: torch.dtype) -> KernelRope:
        return KernelRope(self.kernels, cos_table, sin_table, positions)

    def decode_attention(self, block_size: int, dtype: torch.dtype) -> DecodeBackend:
        return KernelDecode(self.kernels)


TORCH_OPS = TorchOps()


def select_ops(kernels: CpuKernels | None) -> TorchOps:
    """The ops of a model that has eoq's CPU ``kernels`` (None: it has none)."""
    return CpuKernelOps(kernels) if kernels is not None else TORCH_OPS


class TorchRope:
    """A step's rotary embedding in torch: its rows of cos and sin (T, 1, hd) in the model's dtype."""

    __slots__ = ("cos", "sin")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin

    def __call__(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 nh: int, nkv: int, hd: int) -> torch.Tensor:
        """RoPE on the queries and keys of ``qkv`` (T, (nh + 2 nkv) hd), returned as (T, nh + nkv, hd); the rotated
        keys and the values written to ``slots`` of the caches."""
        T = qkv.shape[0]
        qk = qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd)  # q and k are adjacent: one set of ops rotates both
        qk = qk * self.cos + qk.view(T, nh + nkv, 2, hd // 2).flip(2).view(T, nh + nkv, hd) * self.sin
        store_kv(qk[:, nh:], qkv[:, (nh + nkv) * hd :].view(T, nkv, hd), k_cache, v_cache, slots)
        return qk


class KernelRope:
    """A step's rotary embedding by eoq's CPU kernel: rotation and cache writes in one call (``csrc/rope.cpp``)."""

    __slots__ = ("cos_table", "kernels", "positions", "sin_table")

    def __init__(self, kernels: CpuKernels, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.kernels, self.cos_table, self.sin_table, self.positions = kernels, cos_table, sin_table, positions

    def __call__(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 nh: int, nkv: int, hd: int) -> torch.Tensor:
        return self.kernels.rope_and_store(qkv, self.cos_table, self.sin_table, self.positions, slots, k_cache,
                                           v_cache, nh, nkv, hd)
