"""Linear layers shared by the decoder families (their norms: ``norms.py``).

``Linear.prepare`` chooses the matmul once, at load:
- CPU, float32 (CPUs without fast bfloat16), with eoq's kernels: the weight is re-laid out in panels of 16
  outputs for ``csrc/gemm.cpp``; the BLAS path of ``F.linear`` ran the rows of a decode step at 40-80 GFLOP/s on
  such a machine (measured, all of SmolLM2-135M's layers at 32 rows, weights in cache: 87-92 ms; kernel 24 ms);
- CPU, bfloat16: the weight is re-laid out for oneDNN (the layout inductor's weight-packing pass uses), which
  streams the weights ~1.5x faster than ``F.linear`` (measured on an AVX-512 BF16 CPU: 10.3 ms vs 16.0 ms for
  all of SmolLM2-135M's weights at batch 1);
- everywhere else ``F.linear``.

``Linear.quantize`` (CPU) adds a low-bit copy of the weight: at few rows a matmul is a pass over the weights, and
fewer bytes are a faster pass. The copies are run by eoq's CPU kernels (without them none is kept):
- 4-bit, groups of 32 input features each with its own step and minimum (a GGUF's Q4_1); on a 2-core AVX-512
  CPU (~20 GB/s) all of the default model's layers at 1 token, streamed from memory, take 5.4 ms (torch's int4
  CPU kernel took 110 ms there), about level with the float32 kernel at 4 tokens;
- 8-bit, symmetric, groups of 32 each with a scale (a GGUF's Q8_0): the default model's LM head at 1 token
  1.8 ms there (2.2 ms vs 3.3 ms bf16 on an AVX-512 BF16 CPU), level with the dtype's path at 2-3 tokens.
Steps of up to ``max_tokens`` rows run row kernels on them. In float32 an exact copy also runs every bigger
step, in panels (``csrc/gemm.cpp`` expands each block of weights into float32 in L1 just before use): the float32
weight is then not kept, and a step streams an eighth of the bytes.
By default a copy is made only of weights that already lie on such a grid (the checkpoint is low-bit), so it
holds the checkpoint's own values; ``int4`` rounds every weight to 4 bits (lossy; then only the small steps use
it).

With int8 activations (``prepare``'s ``Int8Activations``; chosen at load by ``device.select_int8_activations``)
the low-bit copies' matmuls quantize their input to int8 per row and block of 32 and sum each group's products in
integers (``csrc/x8_rows.cpp``, ``csrc/x8_gemm.cpp``, as llama.cpp does on CPUs): less arithmetic per weight than
float32's FMAs where there is no fast bfloat16, at a small loss (the activations keep 8 bits per block). One panel
layout serves both kinds of activations, so a step picks its kind when it runs: ``DECODE_STEPS`` takes int8 for
the steps that carry no prompt token (decodes, whatever their number: row kernels and panels), so a prompt's
positions and the first answer token are float32's (int8 prompts flipped the default model's near-tie France
answer); ``DECODE_PANELS`` (bfloat16 on a CPU) only for the decode steps bigger than the row kernels', which then
run an exact copy in panels kept beside oneDNN's weight (prompts stay on oneDNN); ``ALL_STEPS`` takes int8 for
every step.
"""

from __future__ import annotations

import enum
import sys

import torch
import torch.nn.functional as F
from torch import nn

from eoq.engine.model.kernels.bindings import CpuKernels
from eoq.engine.model.kernels.formats import (
    LowBitPanels,
    LowBitRows,
    pack_gemm_weight,
    pack_int4_panels,
    pack_int8_panels,
)

INT4_GROUP = 32  # input features that share one step and minimum (Q4_1's block)
INT4_LEVELS = 15  # 4 bits: values lo + q * step, q in 0..15
INT8_GROUP = 32  # input features that share one scale (Q8_0's block)
INT8_MAX_TOKENS = 2  # the 8-bit kernel is compute-bound beyond: bf16 wins from 3-4 tokens (measured, LM head)
# Logits of a 16-bit matmul recomputed in float32 per row (LMHead): the largest ones, where the greedy choice is.
LOGIT_CANDIDATES = 8


class Int8Activations(enum.Enum):
    """Which steps of a low-bit copy take int8 activations."""

    OFF = "off"  # none: float32 activations (exact to the copy's values)
    DECODE_STEPS = "decode steps"  # the steps of decodes only (no prompt token); prompts' steps float32
    # The decode steps bigger than the row kernels': the panels, kept beside oneDNN's bfloat16 weight for them; the
    # small steps keep the row kernels' float32 arithmetic, prompts the dtype's path (bfloat16 CPUs: device.py)
    DECODE_PANELS = "decode steps on the panels"
    ALL_STEPS = "all steps"  # every step


def _onednn_packing_available() -> bool:
    """Whether oneDNN can pack a bfloat16 weight here: it refuses on CPUs without AVX-512 (BW/VL/DQ) or
    AVX-NE-CONVERT, where bfloat16 runs through F.linear."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Module):
    """y = x W^T + b, with W (out_features, in_features) as in ``nn.Linear``.

    The weight's representations, public for what reads them (the one-call Llama step, the load log, tests); each
    is None where there is none, and ``weight`` is empty once a re-laid-out copy replaced it (``prepare``):
    - ``int4``, ``int8``: low-bit copies (``LowBitRows``, by ``quantize``) run by the row kernels for steps of up to
      ``int4_max_tokens`` / ``int8_max_tokens`` rows (-1: none);
    - ``lowbit_panels``: an exact low-bit copy in panels (``LowBitPanels``) running every bigger step
      (``panels_every_step``), or only the bigger decode steps (``Int8Activations.DECODE_PANELS``);
    - ``float32_panels``: a float32 weight in panels for eoq's float32 GEMM;
    - ``onednn_weight``: a bfloat16 weight re-laid out for oneDNN (unless ``pack_for_onednn`` is turned off)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.onednn_weight: torch.Tensor | None = None
        self.float32_panels: torch.Tensor | None = None  # (ceil(out / 16), in, 16) float32 (csrc/gemm.cpp)
        self.int4: LowBitRows | None = None
        self.int4_max_tokens = -1  # no 4-bit path (a step may carry 0 rows to the LM head)
        self.int8: LowBitRows | None = None
        self.int8_max_tokens = -1
        # In float32, an exact copy in panels for eoq's float32 kernel (csrc/gemm.cpp), which then runs every other
        # step too, in place of the float32 weight (made by prepare).
        self.lowbit_panels: LowBitPanels | None = None
        self.panels_every_step = False  # the panels run every step beyond the row kernels (else: decodes only)
        self.pack_for_onednn = True  # a bfloat16 weight is re-laid out for oneDNN (dropping the plain one)
        self._exact_copy = False  # the low-bit copy holds the weight's own values (made by quantize, auto)
        # Which steps of the low-bit copy's kernels (row kernels, panels) take int8 activations (set by prepare).
        self.int8_activations = Int8Activations.OFF
        # DECODE_PANELS: the decode steps of up to this many rows run the panels (bigger ones the dtype's weight)
        self.decode_panels_max_tokens = sys.maxsize
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

    def _weight_groups(self, group: int) -> torch.Tensor | None:
        """The weight as float32 (out, in / group, group), or None when the inputs do not split into groups."""
        if self.in_features % group:
            return None
        return self.weight.detach().float().view(self.out_features, self.in_features // group, group)

    def quantize_int8(self, only_if_exact: bool) -> bool:
        """An 8-bit copy (symmetric, a scale per group of 32 inputs); with ``only_if_exact`` only when it
        reproduces every weight to within 1 % of its group's scale. Returns whether the copy was made."""
        groups = self._weight_groups(INT8_GROUP)
        if groups is None:
            return False
        amax = groups.abs().amax(-1)  # (out, in / group)
        scale = amax / 127
        q = (groups / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).round_().clamp_(-127, 127)
        if only_if_exact:
            err = (q * scale[..., None] - groups).abs().amax(-1)
            if bool((err > 0.01 * scale + 1e-6 * amax).any()):
                return False
        self.int8 = LowBitRows(8, q.to(torch.int8).view(self.out_features, self.in_features).contiguous(),
                               scale.contiguous())
        self._exact_copy = only_if_exact
        return True

    def quantize_int4(self, only_if_exact: bool) -> bool:
        """A 4-bit copy (a step and a minimum per group of 32 inputs); with ``only_if_exact`` only when it
        reproduces every weight to within 1 % of its group's step. Returns whether the copy was made."""
        groups = self._weight_groups(INT4_GROUP)
        if groups is None:
            return False
        out_f, in_f = self.out_features, self.in_features
        lo = groups.amin(-1)  # (out, in / group)
        step = (groups.amax(-1) - lo) / INT4_LEVELS
        q = ((groups - lo[..., None]) / step.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
        q = q.round_().clamp_(0, INT4_LEVELS)
        if only_if_exact:
            err = (q * step[..., None] + lo[..., None] - groups).abs().amax(-1)
            if bool((err > 0.01 * step + 1e-6 * groups.abs().amax(-1)).any()):
                return False
        halves = q.to(torch.uint8).view(out_f, in_f // INT4_GROUP, 2, INT4_GROUP // 2)
        values = (halves[:, :, 0] | (halves[:, :, 1] << 4)).contiguous()  # byte i: q[i] | q[i + 16] << 4
        self.int4 = LowBitRows(4, values, torch.stack([step, lo], -1).contiguous())
        self._exact_copy = only_if_exact
        return True

    def _pack_exact_copy(self) -> LowBitPanels | None:
        """The exact low-bit copy re-laid out in panels (``formats.pack_int4_panels`` / ``pack_int8_panels``)."""
        if not self._exact_copy:
            return None
        if self.int4 is not None:
            nibbles = self.int4.values
            q = torch.cat([nibbles & 0xF, nibbles >> 4], -1).view(self.out_features, self.in_features)
            return pack_int4_panels(q, self.int4.scales[..., 0], self.int4.scales[..., 1])
        if self.int8 is not None:
            return pack_int8_panels(self.int8.values, self.int8.scales)
        return None

    def quantized_bytes(self) -> int:
        return sum(c.nbytes() for c in (self.int4, self.int8, self.lowbit_panels) if c is not None)

    def prepare(self, dtype: torch.dtype, max_tokens: int = 0, kernels: CpuKernels | None = None,
                int8_activations: Int8Activations = Int8Activations.OFF,
                decode_panels_max_tokens: int = sys.maxsize) -> None:
        """Pick the fastest matmul for the weight's device and dtype (call after weights are loaded; once).

        ``max_tokens``: steps of at most this many rows run the low-bit copy's row kernel, if a copy was made (it
        needs eoq's CPU ``kernels``: without them it is dropped). In float32 an exact copy also runs the bigger
        steps, in panels, and the weight itself is dropped; with ``Int8Activations.DECODE_PANELS`` (bfloat16) the
        panels are kept beside the dtype's weight, for the bigger decode steps. ``int8_activations``: which of a
        low-bit copy's steps quantize their input to int8 (lossy; the float32 weight's own steps, if kept, stay
        float32); ``decode_panels_max_tokens``: with ``DECODE_PANELS`` the biggest decode step on the panels
        (``device.decode_panels_max_tokens``)."""
        usable = kernels is not None and kernels.supports(self.weight.device, dtype)
        every_step = dtype == torch.float32 or (dtype == torch.bfloat16 and not _onednn_packing_available())
        if not usable:
            self.int4 = self.int8 = None
        elif self.lowbit_panels is None and self.weight.numel() and (
                every_step or int8_activations is Int8Activations.DECODE_PANELS):
            self.lowbit_panels = self._pack_exact_copy()
            self.panels_every_step = every_step and self.lowbit_panels is not None
        has_copy = usable and (self.int4 is not None or self.int8 is not None)
        self.int8_activations = int8_activations if has_copy else Int8Activations.OFF
        self._kernels = kernels if usable else None
        self.decode_panels_max_tokens = decode_panels_max_tokens
        if self.int4 is not None:
            self.int4_max_tokens = max_tokens
        if self.int8 is not None:
            self.int8_max_tokens = min(max_tokens, INT8_MAX_TOKENS)
        if self.weight.numel() == 0:  # prepared already: a re-laid-out copy replaced the weight
            return
        w = self.weight
        if self.panels_every_step:  # the exact low-bit copy serves every step: no float32 copy
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        elif usable and w.dtype == torch.float32:
            self.float32_panels = pack_gemm_weight(w.data)
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)  # as below
        elif (w.device.type == "cpu" and w.dtype == torch.bfloat16 and self.pack_for_onednn
              and _onednn_packing_available()):
            self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(w.data, 1)
            # The packed copy is the weight now: keep one copy in memory (a tied embedding keeps its own).
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)

    def runs_float32(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows runs float32 arithmetic whatever the model's dtype (a row kernel of a
        low-bit copy, or eoq's float32 GEMM), so that a float32 input gives a float32 result."""
        return (rows <= max(self.int4_max_tokens, self.int8_max_tokens) or self.panels_every_step
                or self.float32_panels is not None)

    def runs_int8_activations(self, rows: int, decode: bool = False) -> bool:
        """Whether a step of ``rows`` rows quantizes its input to int8: it runs a low-bit copy's kernel, and the
        setting takes int8 for its kind of step (``decode``: the step carries no prompt token)."""
        mode = self.int8_activations
        if mode is Int8Activations.OFF or (mode is not Int8Activations.ALL_STEPS and not decode):
            return False
        row_kernel = rows <= max(self.int4_max_tokens, self.int8_max_tokens)
        if mode is Int8Activations.DECODE_PANELS:
            return not row_kernel and self.lowbit_panels is not None and rows <= self.decode_panels_max_tokens
        return row_kernel or self.lowbit_panels is not None

    def decodes_run_panels(self) -> bool:
        """Whether the decode steps beyond the row kernels (up to ``decode_panels_max_tokens`` rows with
        ``DECODE_PANELS``) run the exact 4-bit copy's panels (the one-call step's condition for them)."""
        return (self.lowbit_panels is not None and self.lowbit_panels.bits == 4
                and (self.panels_every_step or self.int8_activations is Int8Activations.DECODE_PANELS))

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """x (rows, in_features); ``decode``: the step carries no prompt token (``AttentionMetadata.decode_only``),
        which ``DECODE_STEPS`` runs with int8 activations."""
        int8 = self.runs_int8_activations(x.shape[0], decode)
        if x.shape[0] <= self.int4_max_tokens:
            y = self._kernels.int4_matmul(x, self.int4.values, self.int4.scales, int8)
        elif x.shape[0] <= self.int8_max_tokens:
            y = self._kernels.int8_matmul(x, self.int8.values, self.int8.scales, int8)
        elif self.lowbit_panels is not None and (self.panels_every_step or int8):
            # float32 arithmetic (or int8): a bfloat16 step's rows are widened
            y = self._kernels.gemm_lowbit(x.float(), self.lowbit_panels, self.out_features, int8).to(x.dtype)
        elif self.float32_panels is not None:
            y = self._kernels.gemm(x, self.float32_panels, self.out_features)
        elif self.onednn_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn_weight, self.bias, "none", [], "")
        else:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias


class LMHead(Linear):
    """The LM head: float32 logits from the float32 final hidden state, whatever the model's dtype.

    Logits rounded to bfloat16 keep 8 significant bits: at a logit of 25 a step of 0.125, wider than the gap
    between a question's two best first tokens (the default model in float32: "The" 25.33, "L" 25.24). Ties then
    go to the lower token id and one rounding anywhere before flips the answer. So:
    - float32 models, and small steps on a low-bit copy (its row kernels accumulate in float32 and take the
      float32 input here), give float32 logits directly;
    - a 16-bit matmul (oneDNN, F.linear, CUDA) runs as before, then each row's ``LOGIT_CANDIDATES`` largest
      logits are recomputed in float32 from the float32 input and the weight's rows: the greedy token then is
      float32's (the true largest logit is within one bfloat16 step of the rounded largest), at ~0.1 ms a row
      of the default model's 49152 on a CPU; the rest keep the matmul's rounding, far below any temperature's
      effect. Shapes are static (CUDA graphs can hold it);
    - with int8 activations (a low-bit copy's, ``runs_int8_activations``) the same recomputation, from the copy's own
      values: the greedy token is then the float32 matmul's with the copy whenever that one is among the int8
      path's ``LOGIT_CANDIDATES`` best.
    The head keeps its 16-bit weight for that: a tied head's is the embedding's (no copy), so it may also be
    packed for oneDNN; an untied one is not packed (that would hold the weight twice) and runs F.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self._dtype = torch.float32
        self.recompute_weight: torch.Tensor | None = None  # (out, in) the 16-bit weight the recomputation reads
        self.tied = False

    def tie(self, embedding: nn.Embedding) -> None:
        """Share the token embedding's weight (one tensor, not a copy)."""
        self.weight = embedding.weight
        self.tied = True

    def prepare(self, dtype: torch.dtype, max_tokens: int = 0, kernels: CpuKernels | None = None,
                int8_activations: Int8Activations = Int8Activations.OFF,
                decode_panels_max_tokens: int = sys.maxsize) -> None:
        if dtype != torch.float32 and self.weight.numel():
            self.recompute_weight = self.weight.data
            self.pack_for_onednn = self.tied
        self._dtype = dtype
        super().prepare(dtype, max_tokens, kernels, int8_activations, decode_panels_max_tokens)

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:  # (S, in) float32 -> (S, out) float32
        x = x.float()
        if self.runs_int8_activations(x.shape[0], decode):  # the low-bit copy's own values, int8 activations
            copy = self.int4 if self.int4 is not None else self.int8
            return self._recompute_best(super().forward(x, decode).float(), x, copy.rows)
        if self._dtype == torch.float32 or self.runs_float32(x.shape[0]):
            return super().forward(x).float()
        logits = super().forward(x.to(self._dtype)).float()  # (S, out), rounded to the 16-bit dtype
        return self._recompute_best(logits, x, lambda index: self.recompute_weight[index].float())

    def _recompute_best(self, logits: torch.Tensor, x: torch.Tensor, weight_rows) -> torch.Tensor:
        """``logits`` (S, out) with each row's ``LOGIT_CANDIDATES`` largest recomputed in float32 from x (S, in) and
        ``weight_rows(index)`` (the weight's rows ``index`` as float32, (*index.shape, in))."""
        k = min(LOGIT_CANDIDATES, logits.shape[1])
        candidates = logits.topk(k, dim=-1).indices  # (S, k)
        exact = torch.bmm(weight_rows(candidates), x.unsqueeze(-1)).squeeze(-1)  # (S, k, in) @ (S, in, 1)
        if self.bias is not None:
            exact += self.bias.float()[candidates]
        return logits.scatter_(1, candidates, exact)
