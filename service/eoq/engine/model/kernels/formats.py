"""The weight formats eoq's CPU kernels read: low-bit copies in rows (``csrc/lowbit_rows.cpp``: ``LowBitRows``, made
by ``Linear.quantize``) and every weight kind in panels of 16 outputs (``csrc/gemm.cpp``: ``pack_gemm_weight``,
``LowBitPanels``), re-laid out once at load."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LowBitWeight:
    """A 4- or 8-bit weight: its values and the scales of its groups of 32 inputs, laid out as a subclass says."""

    bits: int
    values: torch.Tensor
    scales: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scales))


class LowBitRows(LowBitWeight):
    """A weight (out, in) a row per output, as the row kernels take it (``CpuKernels.int4_matmul`` /
    ``int8_matmul``):
    - 4 bits: ``values`` (out, in / 32, 16) uint8, byte i of a group q[i] | q[i + 16] << 4; ``scales`` (out, in / 32,
      2) float32, (step, minimum): w = step * q + minimum;
    - 8 bits: ``values`` (out, in) int8; ``scales`` (out, in / 32) float32: w = scale * q."""

    __slots__ = ()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The weight's rows ``index`` (any shape) as float32, (*index.shape, in): exactly the values held."""
        values, scales = self.values[index], self.scales[index]
        if self.bits == 8:  # (..., in) int8, (..., in / 32)
            w = values.float().unflatten(-1, (-1, 32)) * scales[..., None]
        else:  # (..., in / 32, 16) nibbles, (..., in / 32, 2)
            q = torch.cat([values & 0xF, values >> 4], -1).float()  # (..., in / 32, 32)
            w = q * scales[..., 0:1] + scales[..., 1:2]
        return w.flatten(-2)


GEMM_LANES = 16  # output features per panel of a weight packed for csrc/gemm.cpp


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """t (out, ...) with zero rows added up to a multiple of 16, viewed as (panels, 16, ...)."""
    panels = -(-t.shape[0] // GEMM_LANES)
    padded = torch.zeros(panels * GEMM_LANES, *t.shape[1:], dtype=t.dtype)
    padded[: t.shape[0]] = t
    return padded.view(panels, GEMM_LANES, *t.shape[1:])


def pack_gemm_weight(w: torch.Tensor) -> torch.Tensor:
    """W (out, in) float32 as ``CpuKernels.gemm`` reads it: panels of 16 outputs, (ceil(out / 16), in, 16), the
    last padded with zeros; 64-byte aligned (a fresh tensor)."""
    packed = _padded_rows(w.float()).transpose(1, 2).contiguous()
    if packed.data_ptr() % 64:  # torch's CPU allocator aligns to 64 bytes; never rely on it silently
        raise RuntimeError("the packed weight is not 64-byte aligned")
    return packed


class LowBitPanels(LowBitWeight):
    """A 4- or 8-bit weight in panels of 16 outputs for ``CpuKernels.gemm_lowbit``, one layout for both kinds of
    activations: laid out for integer dot products (``csrc/x8_gemm.cpp``: each output's weights in quads of
    consecutive inputs, one quad per 32-bit lane of a 64-byte line), which ``csrc/gemm.cpp`` expands into float32
    for float32 activations (``pack_int4_panels``, ``pack_int8_panels``)."""

    __slots__ = ()


def pack_int4_panels(q: torch.Tensor, step: torch.Tensor, lo: torch.Tensor) -> LowBitPanels:
    """A 4-bit weight (``q`` (out, in) in 0..15, ``step`` and ``lo`` (out, in / 32): w = step * q + lo): values uint8
    (ceil(out / 16), in / 8, 16, 4), byte b of output j's quad for inputs 8i..8i+7 = q[j][8i + b] | q[j][8i + 4 + b]
    << 4; scales float32 (ceil(out / 16), in / 32, 2, 16) = each group's steps then minimums; padded outputs are 0."""
    octets = _padded_rows(q.to(torch.uint8)).unflatten(2, (-1, 2, 4))  # (panels, 16, in / 8, 2, 4)
    values = (octets[..., 0, :] | (octets[..., 1, :] << 4)).transpose(1, 2).contiguous()  # (panels, in / 8, 16, 4)
    scales = _padded_rows(torch.stack([step, lo], -1).float()).permute(0, 2, 3, 1).contiguous()
    return LowBitPanels(4, values, scales)


def pack_int8_panels(q: torch.Tensor, scale: torch.Tensor) -> LowBitPanels:
    """An 8-bit weight (``q`` (out, in) int8, ``scale`` (out, in / 32): w = scale * q): values int8 (ceil(out / 16),
    in / 4, 16, 4), output j's inputs 4i..4i+3 in quad (i, j); scales float32 (ceil(out / 16), in / 32, 16); padded
    outputs are 0."""
    values = _padded_rows(q.to(torch.int8)).unflatten(2, (-1, 4)).transpose(1, 2).contiguous()
    scales = _padded_rows(scale.float()).transpose(1, 2).contiguous()
    return LowBitPanels(8, values, scales)
