"""The norms of the decoder families: they read the float32 residual stream and hand the model's dtype to the next
matmul.

The decoders keep the residual stream in float32 whatever the weights' dtype: the norm's fused float32 kernel is
then one op (in bfloat16 on the CPU it is several: ~2x slower), and the sums are more exact than transformers'
bfloat16 residual. Their weights stay float32 (``keep_float32``). The final norm hands float32 to the LM head
(``float32_out``; see ``linear.LMHead``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eoq.engine.model.ops import TORCH_OPS, TorchOps


class Norm(nn.Module):
    keep_float32 = True  # DecoderModel.float32_tensors keeps these weights float32 through the cast

    def __init__(self, float32_out: bool = False) -> None:
        super().__init__()
        self.float32_out = float32_out
        self.out_dtype = torch.float32
        self.ops: TorchOps = TORCH_OPS

    def prepare(self, dtype: torch.dtype, ops: TorchOps) -> None:
        """The model's dtype (the norm's output, unless ``float32_out``) and the ops chosen at load."""
        self.out_dtype = torch.float32 if self.float32_out else dtype
        self.ops = ops


class RMSNorm(Norm):
    """Llama's RMSNorm, with the residual add before it: ``x += delta`` (in place), then the norm of x (one call
    of eoq's CPU kernels where they run: ``ops.add_rms_norm``)."""

    def __init__(self, dim: int, eps: float, float32_out: bool = False) -> None:
        super().__init__(float32_out)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:  # x float32, contiguous
        return self.ops.add_rms_norm(x, delta, self.weight, self.eps, self.out_dtype)


class LayerNorm(Norm):
    def __init__(self, dim: int, eps: float, float32_out: bool = False) -> None:
        super().__init__(float32_out)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x float32
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps).to(self.out_dtype)
