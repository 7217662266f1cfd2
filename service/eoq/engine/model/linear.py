"""Linear layers and norms shared by the decoder families.

``Linear.prepare`` chooses the matmul once, at load: on a CPU in bfloat16 the weight is re-laid out for
oneDNN (the layout inductor's weight-packing pass uses), which streams the weights ~1.5x faster than
``F.linear`` on this kind of machine (measured: 10.3 ms vs 16.0 ms for all of SmolLM2-135M's weights at
batch 1). Everywhere else ``F.linear`` is used.

``Linear.quantize`` (CPU) adds a low-bit copy of the weight for the steps that carry few tokens: at batch 1 a
matmul is a pass over the weights, and fewer bytes are a faster pass.
- 4-bit, groups of 32 input features each with its own step and minimum (a GGUF's Q4_1), run by torch's int4
  kernel: measured on the default model, all layers at 1 token 5.0 ms vs 15.7 ms packed bf16; level at 8
  tokens, bf16 2x faster at 32;
- 8-bit, symmetric, groups of 32 each with a scale (a GGUF's Q8_0), run by eoq's CPU kernel: the default
  model's LM head at 1 token 2.2 ms vs 3.3 ms bf16, level at 2 tokens.
By default a copy is made only of weights that already lie on such a grid (the checkpoint is low-bit), so it
holds the checkpoint's own values; ``int4`` rounds every weight to 4 bits (lossy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eoq.engine.model.kernels import CpuKernels

INT4_GROUP = 32  # input features that share one step and minimum (Q4_1's block)
INT4_LEVELS = 15  # 4 bits: values lo + q * step, q in 0..15
INT8_GROUP = 32  # input features that share one scale (Q8_0's block)
INT8_MAX_TOKENS = 2  # the 8-bit kernel is compute-bound beyond: bf16 wins from 3-4 tokens (measured, LM head)


def _onednn_packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear(nn.Module):
    """y = x W^T + b, with W (out_features, in_features) as in ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        self._int4: torch.Tensor | None = None  # packed 4-bit weight for steps of <= int4_max_tokens rows
        self._int4_scales: torch.Tensor | None = None  # (in / group, out, 2): step and the value of q = 8
        self.int4_max_tokens = -1  # no 4-bit path (a step may carry 0 rows to the LM head)
        self._int8: torch.Tensor | None = None  # (out, in) int8 for steps of <= int8_max_tokens rows
        self._int8_scales: torch.Tensor | None = None  # (out, in / group) float32
        self.int8_max_tokens = -1
        self._kernels: CpuKernels | None = None

    def quantize(self, mode: str) -> str | None:
        """Keep a low-bit copy of the (float32, CPU) weight for small steps. ``auto``: a 4-bit copy if it
        reproduces the weight, else an 8-bit one if that does (the checkpoint is already low-bit); ``int4``: a
        4-bit copy, rounded. Returns "int4", "int8" or None. Call before the weights are cast."""
        if self.weight.device.type != "cpu" or mode == "never":
            return None
        if self.quantize_int4(only_if_exact=mode == "auto"):
            return "int4"
        if mode == "auto" and self.quantize_int8(only_if_exact=True):
            return "int8"
        return None

    def quantize_int8(self, only_if_exact: bool) -> bool:
        """An 8-bit copy (symmetric, a scale per group of 32 inputs); with ``only_if_exact`` only when it
        reproduces every weight to within 1 % of its group's scale. Returns whether the copy was made."""
        w = self.weight.detach()
        if self.in_features % INT8_GROUP:
            return False
        out_f, in_f = w.shape
        groups = w.float().view(out_f, in_f // INT8_GROUP, INT8_GROUP)
        amax = groups.abs().amax(-1)  # (out, in / group)
        scale = amax / 127
        q = (groups / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).round_().clamp_(-127, 127)
        if only_if_exact:
            err = (q * scale[..., None] - groups).abs().amax(-1)
            if bool((err > 0.01 * scale + 1e-6 * amax).any()):
                return False
        self._int8 = q.to(torch.int8).view(out_f, in_f).contiguous()
        self._int8_scales = scale.contiguous()
        return True

    def quantize_int4(self, only_if_exact: bool) -> bool:
        """A 4-bit copy (a step and a minimum per group of 32 inputs); with ``only_if_exact`` only when it
        reproduces every weight to within 1 % of its group's step. Returns whether the copy was made."""
        w = self.weight.detach()
        if self.in_features % INT4_GROUP or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False
        out_f, in_f = w.shape
        groups = w.float().view(out_f, in_f // INT4_GROUP, INT4_GROUP)
        lo = groups.amin(-1)  # (out, in / group)
        step = (groups.amax(-1) - lo) / INT4_LEVELS
        q = ((groups - lo[..., None]) / step.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
        q = q.round_().clamp_(0, INT4_LEVELS)
        if only_if_exact:
            err = (q * step[..., None] + lo[..., None] - groups).abs().amax(-1)
            if bool((err > 0.01 * step + 1e-6 * groups.abs().amax(-1)).any()):
                return False
        self._int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_f, in_f).to(torch.int32), 1)
        # The kernel computes (q - 8) * step + zero: zero is the value at q = 8.
        self._int4_scales = torch.stack([step, lo + 8 * step], -1).transpose(0, 1).contiguous()
        return True

    def quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._int4, self._int4_scales, self._int8,
                                                            self._int8_scales) if t is not None)

    def prepare(self, dtype: torch.dtype, max_tokens: int = 0, kernels: CpuKernels | None = None) -> None:
        """Pick the fastest matmul for the weight's device and dtype (call after weights are loaded; once).

        ``max_tokens``: steps of at most this many rows use the low-bit copy, if one was made (the 8-bit one
        needs eoq's CPU ``kernels``: without them it is dropped)."""
        if self._int4 is not None:
            self._int4_scales = self._int4_scales.to(dtype)  # the kernel takes them in the activations' dtype
            self.int4_max_tokens = max_tokens
        if self._int8 is not None and (kernels is None or not kernels.supports(self.weight.device, dtype)):
            self._int8 = self._int8_scales = None
        if self._int8 is not None:
            self._kernels = kernels
            self.int8_max_tokens = min(max_tokens, INT8_MAX_TOKENS)
        if self._packed is not None:
            return
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.bfloat16 and _onednn_packing_available():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.data, 1)
            # The packed copy is the weight now: keep one copy in memory (a tied embedding keeps its own).
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in_features)
        if x.shape[0] <= self.int4_max_tokens:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self._int4, INT4_GROUP, self._int4_scales)
            return y if self.bias is None else y + self.bias
        if x.shape[0] <= self.int8_max_tokens:
            y = self._kernels.int8_matmul(x, self._int8, self._int8_scales)
            return y if self.bias is None else y + self.bias
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class _Norm(nn.Module):
    """Norms read the float32 residual stream and hand the model's dtype to the next matmul.

    The decoders keep the residual stream in float32 whatever the weights' dtype: the norm's fused float32
    kernel is then one op (in bfloat16 on the CPU it is several: ~2x slower), and the sums are more exact
    than transformers' bfloat16 residual. Their weights stay float32 (``keep_float32``)."""

    keep_float32 = True

    def __init__(self) -> None:
        super().__init__()
        self.out_dtype = torch.float32
        self.kernels: CpuKernels | None = None

    def prepare(self, dtype: torch.dtype, kernels: CpuKernels | None = None) -> None:
        self.out_dtype = dtype
        self.kernels = kernels


class RMSNorm(_Norm):
    """Llama's RMSNorm, with the residual add before it: ``x += delta`` (in place), then the norm of x.

    With eoq's CPU kernels the two are one call (``csrc/rms_norm.cpp``): in torch they are seven dispatched
    ops, which at one token a step cost more than their arithmetic (~30 us a norm here vs ~3 us)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:  # x float32, contiguous
        if self.kernels is not None:
            return self.kernels.add_rms_norm(x, delta, self.weight, self.eps, self.out_dtype)
        if delta is not None:
            x += delta
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps).to(self.out_dtype)


class LayerNorm(_Norm):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x float32
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps).to(self.out_dtype)
