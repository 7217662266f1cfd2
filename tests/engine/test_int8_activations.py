"""The int8-activation kernels (``csrc/x8_rows.cpp``, ``csrc/x8_gemm.cpp``): the 4- and 8-bit weights times the rows
quantized per block of 32, against float64 with the weights' own values, within the quantization's bound — on each
ISA branch this machine can run (``cpu_kernels_lib``); ``Linear`` running them for small and big steps; the choice
of ``--activation-quantization`` for each CPU kind.

The bound: a block of 32 activations x with d = max |x| / 127 is held as d q, q = round(x / d), so each |x - d q| <=
d / 2 (and d q keeps x's largest magnitude). The integer sums are exact, hence for each output

    |y_int8 - y| = |sum_g sum_(i in g) w_i (x_i - d_g q_i)| <= sum_g d_g / 2 * sum_(i in g) |w_i|,

plus float32 rounding of the scales and of the sums over groups (relative, ~1e-6 of sum |w_i x_i|: held at 1e-5).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from eoq.engine.device import AMX_DECODE_PANELS_MAX_TOKENS, decode_panels_max_tokens, select_int8_activations
from eoq.engine.model.kernels.bindings import CpuKernels
from eoq.engine.model.kernels.build import build
from eoq.engine.model.kernels.formats import pack_int4_panels, pack_int8_panels
from eoq.engine.model.linear import INT4_GROUP, INT4_LEVELS, INT8_MAX_TOKENS, Int8Activations, Linear, LMHead
from eoq.errors import ConfigError

from .conftest import _kernel_builds, cpu_flags

BLOCK = 32
FLOAT_TOL = 1e-5


def _expected_dot_isa(march: str) -> str:
    """The integer dot product a build for ``march`` should use here: VNNI where its target has it."""
    flags = cpu_flags()
    if march == "x86-64" or not {"avx2", "fma"} <= flags:
        return "generic"
    if march == "native" and {"avx512f", "avx512_vnni", "avx512vl"} <= flags:
        return "avx512-vnni"
    if march == "native" and "avx_vnni" in flags:
        return "avx-vnni"
    return "avx512bw" if march == "x86-64-v4" or (march == "native" and "avx512bw" in flags) else "avx2"


def _bound(x: torch.Tensor, w_abs: torch.Tensor, w_abs_parts: torch.Tensor) -> torch.Tensor:
    """(rows, out) bound on |y_int8 - y| for x (rows, in) float32, |W| (out, in), and the magnitudes the float32
    part adds up (|step q| + |min| for 4-bit, |w| for 8-bit)."""
    d = x.double().view(x.shape[0], x.shape[1] // BLOCK, BLOCK).abs().amax(-1) / 127  # (rows, in / 32)
    per_group = w_abs.double().view(w_abs.shape[0], -1, BLOCK).sum(-1)  # (out, in / 32)
    return d @ per_group.T / 2 + FLOAT_TOL * (x.double().abs() @ w_abs_parts.double().T) + 1e-30


def _int4_weight(gen: torch.Generator, out_f: int, in_f: int):
    q = torch.randint(0, INT4_LEVELS + 1, (out_f, in_f), generator=gen)
    step = torch.rand(out_f, in_f // INT4_GROUP, generator=gen) * 0.01 + 1e-3
    lo = -torch.rand(out_f, in_f // INT4_GROUP, generator=gen) * 0.05
    qg = q.view(out_f, -1, INT4_GROUP).float()
    weight = (qg * step[..., None] + lo[..., None]).view(out_f, in_f)
    parts = (qg * step[..., None]).abs() + lo.abs()[..., None]
    return q, step, lo, weight, parts.view(out_f, in_f)


def _int8_weight(gen: torch.Generator, out_f: int, in_f: int):
    """A Q8_0 weight: each group's largest magnitude at 127, as its quantizer leaves it."""
    q = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    q.view(out_f, -1, BLOCK)[..., 3] = 127
    scale = torch.rand(out_f, in_f // BLOCK, generator=gen) * 1e-2 + 1e-4
    weight = (q.view(out_f, -1, BLOCK).float() * scale[..., None]).view(out_f, in_f)
    return q, scale, weight


def _activations(gen: torch.Generator, rows: int, in_f: int) -> torch.Tensor:
    """Rows with the shapes activations take: mostly normal, an outlier per row, a block of zeros (d = 0) where a
    row has more than one."""
    x = torch.randn(rows, in_f, generator=gen)
    if rows:
        x[:, 5] *= 20
    if rows and in_f > BLOCK:
        x[0, :BLOCK] = 0
    return x


def _check(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, parts: torch.Tensor, what: str) -> float:
    """out within the bound of float64's x W^T; returns the largest error as a share of its bound."""
    ref = F.linear(x.double(), weight.double())
    err = (out.double() - ref).abs()
    bound = _bound(x, weight.abs(), parts)
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.3f} x the bound"
    return worst


def test_each_build_uses_the_dot_product_its_target_has(cpu_kernels_lib, request) -> None:
    march = request.node.callspec.params["cpu_kernels_lib"]
    assert cpu_kernels_lib.int8_dot_isa == _expected_dot_isa(march)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_f", [32, 96, 576])  # groups: one, an odd number, the default model's 18
def test_row_kernels_are_within_the_quantization_bound(cpu_kernels_lib, bits: int, in_f: int) -> None:
    gen = torch.Generator().manual_seed(in_f + bits)
    out_f = 37
    if bits == 4:
        q, step, lo, weight, parts = _int4_weight(gen, out_f, in_f)
        halves = q.to(torch.uint8).view(out_f, in_f // INT4_GROUP, 2, INT4_GROUP // 2)
        packed, scales = (halves[:, :, 0] | (halves[:, :, 1] << 4)).contiguous(), torch.stack([step, lo], -1)
        matmul = cpu_kernels_lib.int4_matmul
    else:
        packed, scales, weight = _int8_weight(gen, out_f, in_f)
        parts = weight.abs()
        matmul = cpu_kernels_lib.int8_matmul
    worst = 0.0
    for rows in range(9):
        x = _activations(gen, rows, in_f)
        out = matmul(x, packed, scales, int8_activations=True)
        assert out.shape == (rows, out_f) and out.dtype == torch.float32
        worst = max(worst, _check(out, x, weight, parts, f"{rows} rows"))
        # bfloat16 in and out: the bound of the rounded input, plus the output's rounding (8 bits).
        x16 = x.bfloat16()
        out16 = matmul(x16, packed, scales, int8_activations=True)
        assert out16.dtype == torch.bfloat16
        ref16 = F.linear(x16.double(), weight.double())
        bound16 = _bound(x16.float(), weight.abs(), parts) + ref16.abs() * 2**-8
        assert ((out16.double() - ref16).abs() <= bound16).all(), f"bfloat16, {rows} rows"
        if rows:  # really int8: off float32's result by more than float rounding
            exact = matmul(x, packed, scales)
            assert (out - exact).abs().max().item() > 1e-4 * exact.abs().max().item()
    assert worst > 0.01  # a bound the errors come near, not one nothing could break
    with pytest.raises(RuntimeError, match="refused its arguments"):
        matmul(torch.randn(9, in_f), packed, scales, int8_activations=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_f, in_f", [(48, 128), (100, 64), (49, 96), (7, 32), (70, 576)])
def test_panel_kernels_are_within_the_quantization_bound(cpu_kernels_lib, bits: int, out_f: int, in_f: int) -> None:
    gen = torch.Generator().manual_seed(out_f * in_f + bits)
    if bits == 4:
        q, step, lo, weight, parts = _int4_weight(gen, out_f, in_f)
        panels = pack_int4_panels(q, step, lo)
    else:
        q, scale, weight = _int8_weight(gen, out_f, in_f)
        parts = weight.abs()
        panels = pack_int8_panels(q, scale)
    for rows in (0, 1, 2, 3, 4, 5, 8, 9, 13, 64, 65, 130):  # each tile's rows, chunks of 64, remainders
        x = _activations(gen, rows, in_f)
        out = cpu_kernels_lib.gemm_lowbit(x, panels, out_f, int8_activations=True)
        assert out.shape == (rows, out_f)
        _check(out, x, weight, parts, f"{rows} rows")
        # The same panels with float32 activations: float32's rounding only.
        torch.testing.assert_close(cpu_kernels_lib.gemm_lowbit(x, panels, out_f).double(),
                                   F.linear(x.double(), weight.double()), atol=1e-4, rtol=1e-5)
    # The layout is read as packed: a weight whose every output differs is not confused with another.
    ramp = (torch.arange(out_f * in_f) % 251 - 125).to(torch.int8).view(out_f, in_f)
    x = _activations(gen, 5, in_f)
    ones = torch.ones(out_f, in_f // BLOCK)
    _check(cpu_kernels_lib.gemm_lowbit(x, pack_int8_panels(ramp, ones), out_f, int8_activations=True), x,
           ramp.float(), ramp.float().abs(), "ramp")


@pytest.fixture(scope="module")
def avx2_kernels(tmp_path_factory) -> CpuKernels:
    """The kernels built for AVX2 (``x86-64-v3``), where this machine has more than AVX2."""
    if "x86-64-v3" not in _kernel_builds():
        pytest.skip("this machine's own build is the AVX2 one, or it has no AVX2")
    return CpuKernels(build(tmp_path_factory.mktemp("avx2-kernels"), march="x86-64-v3"))


@pytest.mark.parametrize("bits", [4, 8])
def test_the_x86_branches_give_the_panels_the_same_sums(cpu_kernels_lib, avx2_kernels, bits: int) -> None:
    """AVX-512's 512-bit tiles (with VNNI's vpdpbusd, or vpmaddubsw without) sum each group exactly and scale it with
    the float32 operations of the AVX2 tiles, lane for lane: the same outputs, bit for bit."""
    if cpu_kernels_lib.isa == "generic":
        pytest.skip("the portable vectors round the scales differently (no fused multiply-add)")
    gen = torch.Generator().manual_seed(bits)
    out_f, in_f = 100, 576  # 7 panels: a tile's panels and a remainder
    if bits == 4:
        q, step, lo, _, _ = _int4_weight(gen, out_f, in_f)
        panels = pack_int4_panels(q, step, lo)
    else:
        q, scale, _ = _int8_weight(gen, out_f, in_f)
        panels = pack_int8_panels(q, scale)
    for rows in (1, 3, 5, 32, 70):
        x = _activations(gen, rows, in_f)
        assert torch.equal(cpu_kernels_lib.gemm_lowbit(x, panels, out_f, int8_activations=True),
                           avx2_kernels.gemm_lowbit(x, panels, out_f, int8_activations=True)), f"{rows} rows"


def test_the_row_and_panel_kernels_agree(cpu_kernels_lib) -> None:
    """The same quantization in both (per row and block, rounded the same way): equal to float rounding."""
    gen = torch.Generator().manual_seed(11)
    out_f, in_f = 64, 576
    q, step, lo, _, _ = _int4_weight(gen, out_f, in_f)
    halves = q.to(torch.uint8).view(out_f, in_f // INT4_GROUP, 2, INT4_GROUP // 2)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).contiguous()
    x = _activations(gen, 8, in_f)
    rows = cpu_kernels_lib.int4_matmul(x, packed, torch.stack([step, lo], -1), int8_activations=True)
    panels = cpu_kernels_lib.gemm_lowbit(x, pack_int4_panels(q, step, lo), out_f, int8_activations=True)
    torch.testing.assert_close(rows, panels, atol=1e-5, rtol=1e-5)


def _on_int4_grid(gen: torch.Generator, out_f: int, in_f: int) -> torch.Tensor:
    q = torch.randint(0, INT4_LEVELS + 1, (out_f, in_f // INT4_GROUP, INT4_GROUP), generator=gen).float()
    q[..., 0], q[..., 1] = 0, INT4_LEVELS
    step = torch.rand(out_f, in_f // INT4_GROUP, 1, generator=gen) * 0.01 + 1e-3
    lo = -torch.rand(out_f, in_f // INT4_GROUP, 1, generator=gen) * 0.05
    return (lo + q * step).view(out_f, in_f)


def _int4_linear(gen: torch.Generator, out_f: int, in_f: int, kernels: CpuKernels,
                 int8_activations: Int8Activations) -> tuple[Linear, torch.Tensor]:
    """A ``Linear`` whose weight lies on the int4 grid (``_on_int4_grid``), so that auto quantizes it to an exact
    int4 copy, prepared for float32 with ``int8_activations``; returns it and the weight."""
    weight = _on_int4_grid(gen, out_f, in_f)
    lin = Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    assert lin.quantize("auto") == "int4"
    lin.prepare(torch.float32, max_tokens=4, kernels=kernels, int8_activations=int8_activations)
    return lin, weight


def test_linear_runs_every_step_of_an_exact_copy_with_int8_activations(cpu_kernels_lib) -> None:
    gen = torch.Generator().manual_seed(12)
    out_f, in_f = 48, 128
    lin, weight = _int4_linear(gen, out_f, in_f, cpu_kernels_lib, Int8Activations.ALL_STEPS)
    assert lin.lowbit_panels is not None
    parts = weight.abs() + 0.05  # a loose |step q| + |min|: |min| <= 0.05
    for rows in (1, 4, 5, 70):  # the row kernel, then the panels
        for decode in (False, True):
            assert lin.runs_int8_activations(rows, decode)
            x = _activations(gen, rows, in_f)
            _check(lin(x, decode), x, weight, parts, f"{rows} rows")


def _really_int8(out: torch.Tensor, exact: torch.Tensor) -> bool:
    return (out.double() - exact).abs().max().item() > 1e-4 * exact.abs().max().item()


def test_decode_steps_take_int8_at_any_size_and_prompt_steps_stay_exact(cpu_kernels_lib) -> None:
    """``DECODE_STEPS`` (what auto takes): int8 in the steps without a prompt token, row kernels and panels alike;
    a prompt's steps float32 on the same copy (one panel layout for both)."""
    gen = torch.Generator().manual_seed(14)
    out_f, in_f = 48, 128
    lin, weight = _int4_linear(gen, out_f, in_f, cpu_kernels_lib, Int8Activations.DECODE_STEPS)
    parts = weight.abs() + 0.05
    for rows in (4, 9, 40):  # the row kernel, then the panels
        assert lin.runs_int8_activations(rows, decode=True) and not lin.runs_int8_activations(rows, decode=False)
        x = _activations(gen, rows, in_f)
        exact = F.linear(x.double(), weight.double())
        decoded = lin(x, decode=True)
        assert _really_int8(decoded, exact)
        _check(decoded, x, weight, parts, f"{rows} decode rows")
        torch.testing.assert_close(lin(x).double(), exact, atol=1e-4, rtol=1e-5)


def _bfloat16_decode_panels(gen, out_f: int, in_f: int, kernels, **prepare) -> tuple[Linear, torch.Tensor]:
    """A bfloat16 Linear over an exact 4-bit weight (returned too) prepared with ``DECODE_PANELS``."""
    weight = _on_int4_grid(gen, out_f, in_f)
    lin = Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    assert lin.quantize("auto") == "int4"
    lin.to(torch.bfloat16)
    lin.prepare(torch.bfloat16, max_tokens=4, kernels=kernels, int8_activations=Int8Activations.DECODE_PANELS,
                **prepare)
    return lin, weight


def test_bfloat16_decode_panels_take_int8_beyond_the_row_kernels_only(cpu_kernels_lib) -> None:
    """``DECODE_PANELS`` (auto in bfloat16 on an AVX-512 BF16 CPU): the exact copy in panels is kept beside the
    dtype's weight (oneDNN's, where it packs); decode steps beyond the row kernels run the panels with int8
    activations (the rows widened, the results rounded to bfloat16), the row kernels keep float32 arithmetic, and
    prompts the dtype's matmul."""
    gen = torch.Generator().manual_seed(15)
    out_f, in_f = 48, 128
    lin, weight = _bfloat16_decode_panels(gen, out_f, in_f, cpu_kernels_lib)
    assert lin.lowbit_panels is not None and lin.decodes_run_panels()
    parts = weight.abs() + 0.05
    for rows in (1, 4):  # the row kernel, float32 arithmetic on the bfloat16 rows
        x = _activations(gen, rows, in_f).bfloat16()
        assert not lin.runs_int8_activations(rows, decode=True)
        assert torch.equal(lin(x, decode=True), cpu_kernels_lib.int4_matmul(x, lin.int4.values, lin.int4.scales))
    for rows in (5, 9, 40):  # the panels, int8
        x = _activations(gen, rows, in_f).bfloat16()
        assert lin.runs_int8_activations(rows, decode=True) and not lin.runs_int8_activations(rows, decode=False)
        decoded = lin(x, decode=True)
        assert decoded.dtype == torch.bfloat16
        assert torch.equal(decoded, cpu_kernels_lib.gemm_lowbit(x.float(), lin.lowbit_panels, out_f, True).bfloat16())
        bound = _bound(x.float(), weight.abs(), parts) + F.linear(x.double(), weight.double()).abs() * 2**-8
        assert bool(((decoded.double() - F.linear(x.double(), weight.double())).abs() <= bound).all())
        # A prompt's step of the same rows: the dtype's matmul, bfloat16's rounding only.
        torch.testing.assert_close(lin(x).double(), F.linear(x.double(), weight.double()), atol=0.05, rtol=0.02)


def test_bfloat16_decode_panels_stop_at_their_limit(cpu_kernels_lib) -> None:
    """``decode_panels_max_tokens`` (AMX): decode steps beyond it run the dtype's matmul with bfloat16 activations,
    as prompts do."""
    gen = torch.Generator().manual_seed(16)
    out_f, in_f = 48, 128
    lin, weight = _bfloat16_decode_panels(gen, out_f, in_f, cpu_kernels_lib, decode_panels_max_tokens=16)
    x = _activations(gen, 17, in_f).bfloat16()
    assert lin.runs_int8_activations(16, decode=True) and not lin.runs_int8_activations(17, decode=True)
    assert torch.equal(lin(x[:16], decode=True),
                       cpu_kernels_lib.gemm_lowbit(x[:16].float(), lin.lowbit_panels, out_f, True).bfloat16())
    assert torch.equal(lin(x, decode=True), lin(x))  # the prompt steps' matmul
    torch.testing.assert_close(lin(x).double(), F.linear(x.double(), weight.double()), atol=0.05, rtol=0.02)


def test_an_int8_activation_lm_head_recomputes_its_best_logits_exactly(cpu_kernels_lib) -> None:
    """The head's few largest logits are the copy's float32 ones: greedy picks what float32 would among them."""
    gen = torch.Generator().manual_seed(13)
    out_f, in_f = 200, 128
    q, scale, weight = _int8_weight(gen, out_f, in_f)
    head = LMHead(in_f, out_f, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    assert head.quantize("auto") == "int8"
    head.prepare(torch.float32, max_tokens=4, kernels=cpu_kernels_lib, int8_activations=Int8Activations.ALL_STEPS)
    for rows in (1, INT8_MAX_TOKENS, 9):  # the 8-bit row kernel, then the panels
        x = _activations(gen, rows, in_f)
        ref = F.linear(x.double(), weight.double())
        out = head(x, decode=True)
        top = out.topk(8, dim=-1).indices
        torch.testing.assert_close(out.gather(1, top).double(), ref.gather(1, top), atol=1e-5, rtol=1e-5)
        assert out.argmax(-1).tolist() == ref.argmax(-1).tolist()


FAST_BF16, NO_BF16, AMX = True, False, "amx"
OFF, DECODE, ALL = Int8Activations.OFF, Int8Activations.DECODE_STEPS, Int8Activations.ALL_STEPS
PANELS = Int8Activations.DECODE_PANELS


@pytest.mark.parametrize("setting, device, dtype, fast_bf16, expected", [
    ("auto", "cpu", torch.float32, NO_BF16, DECODE),  # AVX2-only, AVX-512 without BF16: eoq runs float32 there
    ("auto", "cpu", torch.float32, FAST_BF16, OFF),  # --dtype float32 on a bf16 machine: its path unchanged
    ("auto", "cpu", torch.bfloat16, FAST_BF16, PANELS),  # an AVX-512 BF16 machine as served: VNNI's panels
    ("auto", "cpu", torch.bfloat16, AMX, PANELS),  # AMX too, up to AMX_DECODE_PANELS_MAX_TOKENS rows
    ("auto", "cpu", torch.bfloat16, NO_BF16, OFF),  # bfloat16 asked for on an AVX2 machine
    ("auto", "cuda", torch.float32, NO_BF16, OFF),
    ("auto", "cuda", torch.bfloat16, FAST_BF16, OFF),
    ("int8", "cpu", torch.bfloat16, FAST_BF16, ALL),
    ("int8", "cpu", torch.float32, NO_BF16, ALL),
    ("int8", "cuda", torch.bfloat16, NO_BF16, OFF),  # the low-bit kernels are CPU-only
    ("off", "cpu", torch.float32, NO_BF16, OFF),
    ("off", "cpu", torch.bfloat16, FAST_BF16, OFF),
])
def test_activation_quantization_for_each_cpu_kind(setting, device, dtype, fast_bf16, expected) -> None:
    assert select_int8_activations(setting, torch.device(device), dtype, bool(fast_bf16)) is expected
    limit = decode_panels_max_tokens(expected, cpu_amx=fast_bf16 == AMX)
    assert limit == (AMX_DECODE_PANELS_MAX_TOKENS if fast_bf16 == AMX and expected is PANELS else sys.maxsize)


def test_an_unknown_activation_quantization_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="--activation-quantization 'int4'"):
        select_int8_activations("int4", torch.device("cpu"), torch.float32, False)
