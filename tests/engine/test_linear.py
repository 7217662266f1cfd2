"""The matmul paths of ``Linear``: the low-bit copies, made only for weights already on a 4- or 8-bit grid unless
asked, used only by steps of few rows, and equal to a matmul with the low-bit weights they hold; the packed float32
kernel, equal to ``F.linear`` for any number of rows and outputs. RMSNorm with the residual add, by eoq's CPU kernel
and by torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eoq.engine.model.kernels.bindings import CpuKernels
from eoq.engine.model.kernels.formats import pack_gemm_weight
from eoq.engine.model.linear import INT4_GROUP, INT4_LEVELS, INT8_GROUP, INT8_MAX_TOKENS, Linear
from eoq.engine.model.norms import RMSNorm
from eoq.engine.model.ops import select_ops

IN, OUT = 4 * INT4_GROUP, 48


@pytest.fixture(scope="module")
def kernels(cpu_kernels_lib) -> CpuKernels:
    return cpu_kernels_lib


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    lin = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _on_grid(gen: torch.Generator) -> torch.Tensor:
    """A weight as a Q4_1 checkpoint holds it: per group of 32 inputs, min + q * step with q in 0..15 (both ends
    used, as the quantizer that made it does)."""
    q = torch.randint(0, INT4_LEVELS + 1, (OUT, IN // INT4_GROUP, INT4_GROUP), generator=gen).float()
    q[..., 0], q[..., 1] = 0, INT4_LEVELS
    step = torch.rand(OUT, IN // INT4_GROUP, 1, generator=gen) * 0.01 + 1e-3
    lo = -torch.rand(OUT, IN // INT4_GROUP, 1, generator=gen) * 0.05
    return (lo + q * step).view(OUT, IN)


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """Round to nearest on each group's min..max in 15 steps, computed here independently of ``Linear``."""
    g = weight.view(OUT, IN // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / INT4_LEVELS
    return (lo + ((g - lo) / step).round() * step).view(OUT, IN)


def test_auto_keeps_a_4bit_copy_only_of_weights_on_a_4bit_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    assert not _linear(torch.randn(OUT, IN, generator=gen)).quantize_int4(only_if_exact=True)
    lin = _linear(_on_grid(gen))
    assert lin.quantize_int4(only_if_exact=True)
    assert lin.quantized_bytes() > 0
    # A weight off the grid in one place only is not on the grid.
    w = _on_grid(gen)
    w[5, 7] += 0.3 * (w[5, 0:32].amax() - w[5, 0:32].amin()) / INT4_LEVELS
    assert not _linear(w).quantize_int4(only_if_exact=True)


@pytest.mark.parametrize("bias", [False, True])
def test_small_steps_use_the_4bit_weights_and_big_steps_the_original(kernels, bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(OUT, IN, generator=gen)
    b = torch.randn(OUT, generator=gen) if bias else None
    lin = _linear(weight, b)
    assert lin.quantize_int4(only_if_exact=False)  # "always": round to nearest
    lin.prepare(torch.float32, max_tokens=4, kernels=kernels)
    small, big = torch.randn(4, IN, generator=gen), torch.randn(5, IN, generator=gen)
    assert torch.allclose(lin(small), F.linear(small, _dequantized(weight), b), atol=1e-4)
    assert torch.allclose(lin(big), F.linear(big, weight, b), atol=1e-4)
    assert not torch.allclose(lin(small), F.linear(small, weight, b), atol=1e-3)  # the copy really is 4-bit
    assert lin(torch.empty(0, IN)).shape == (0, OUT)  # a step whose chunk samples nothing


def test_4bit_grid_weights_give_the_same_result_on_both_paths(kernels) -> None:
    """On a Q4_1 checkpoint the 4-bit copy is exact: the two paths agree to float rounding, in float32 and bf16."""
    gen = torch.Generator().manual_seed(2)
    weight = _on_grid(gen)
    x = torch.randn(3, IN, generator=gen)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        lin = _linear(weight)
        assert lin.quantize_int4(only_if_exact=True)
        lin.to(dtype)
        lin.prepare(dtype, max_tokens=3, kernels=kernels)
        assert lin.int4_max_tokens == 3
        ref = F.linear(x, weight)  # float32, the checkpoint's values
        assert (lin(x.to(dtype)).float() - ref).abs().max().item() < tol * ref.abs().max().item()


def test_without_a_copy_every_step_uses_the_original_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(OUT, IN, generator=gen)
    lin = _linear(weight)
    assert not lin.quantize_int4(only_if_exact=True)
    lin.prepare(torch.float32, max_tokens=4)
    x = torch.randn(2, IN, generator=gen)
    assert torch.equal(lin(x), F.linear(x, weight))
    assert lin(torch.empty(0, IN)).shape == (0, OUT)


@pytest.mark.parametrize("rows", [0, 1, 40])  # 40: rows spread over threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm_adds_the_residual_in_place_then_normalizes(kernels, rows, dtype, with_delta) -> None:
    gen = torch.Generator().manual_seed(rows)
    dim, eps = 576, 1e-5
    x0 = torch.randn(rows, dim, generator=gen) * 3
    delta = (torch.randn(rows, dim, generator=gen)).to(dtype) if with_delta else None
    weight = torch.rand(dim, generator=gen) + 0.5
    summed = x0 + delta.float() if with_delta else x0
    ref = (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * weight).to(dtype)
    for use_kernels in (True, False):
        norm = RMSNorm(dim, eps)
        with torch.no_grad():
            norm.weight.copy_(weight)
        norm.prepare(dtype, select_ops(kernels if use_kernels else None))
        x = x0.clone()
        out = norm(x, delta)
        assert out.dtype == dtype and out.shape == (rows, dim)
        torch.testing.assert_close(x, summed, atol=1e-6, rtol=1e-6)  # the residual stream now holds the sum
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _on_int8_grid(gen: torch.Generator) -> torch.Tensor:
    """A weight as a Q8_0 checkpoint holds it: per group of 32 inputs, scale * q with q in -127..127 (the
    largest magnitude at 127, as the quantizer that made it does)."""
    q = torch.randint(-127, 128, (OUT, IN // INT8_GROUP, INT8_GROUP), generator=gen).float()
    q[..., 3] = 127 * torch.sign(torch.randn(OUT, IN // INT8_GROUP, generator=gen))
    scale = torch.rand(OUT, IN // INT8_GROUP, 1, generator=gen) * 1e-3 + 1e-4
    return (q * scale).view(OUT, IN)


def test_auto_keeps_an_8bit_copy_of_weights_on_an_8bit_grid_and_runs_it_for_two_rows(kernels) -> None:
    gen = torch.Generator().manual_seed(4)
    weight = _on_int8_grid(gen)
    lin = _linear(weight)
    assert lin.quantize("auto") == "int8"  # not on a 4-bit grid, on an 8-bit one
    assert _linear(torch.randn(OUT, IN, generator=gen)).quantize("auto") is None
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        lin = _linear(weight)
        lin.quantize("auto")
        lin.to(dtype)
        lin.prepare(dtype, max_tokens=4, kernels=kernels)
        assert lin.int8_max_tokens == INT8_MAX_TOKENS
        for rows in (0, 1, INT8_MAX_TOKENS, INT8_MAX_TOKENS + 1):  # the last takes the dtype's path
            x = torch.randn(rows, IN, generator=gen)
            ref = F.linear(x, weight)
            out = lin(x.to(dtype)).float()
            assert out.shape == (rows, OUT)
            if rows:
                assert (out - ref).abs().max().item() <= tol * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("grid", ["int4", "int8"])
def test_a_low_bit_copy_is_dropped_without_the_cpu_kernels(grid: str) -> None:
    gen = torch.Generator().manual_seed(5)
    lin = _linear(_on_grid(gen) if grid == "int4" else _on_int8_grid(gen))
    assert lin.quantize("auto") == grid
    lin.prepare(torch.float32, max_tokens=4, kernels=None)
    assert lin.int4 is None and lin.int8 is None and lin.quantized_bytes() == 0
    x = torch.randn(1, IN)
    assert torch.equal(lin(x), F.linear(x, lin.weight))


@pytest.mark.parametrize("out_f, in_f", [(48, 128), (100, 64), (49, 96), (7, 32)])  # whole and partial panels
def test_packed_float32_kernel_equals_linear_for_any_rows(kernels, out_f: int, in_f: int) -> None:
    gen = torch.Generator().manual_seed(out_f)
    weight = torch.randn(out_f, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    lin = _linear(weight, bias)
    lin.prepare(torch.float32, kernels=kernels)
    assert lin.float32_panels is not None and lin.weight.numel() == 0  # the packed copy replaced the weight
    for rows in (0, 1, 3, 8, 9, 13, 64, 65, 130):  # tiles of 8 rows, chunks of 64, remainders
        x = torch.randn(rows, in_f, generator=gen)
        out = lin(x)
        assert out.shape == (rows, out_f)
        torch.testing.assert_close(out, F.linear(x.double(), weight.double(), bias.double()).float(),
                                   atol=1e-4, rtol=1e-5)
    # The kernel reads the panels as laid out: a weight whose every output differs is not confused.
    ramp = torch.arange(out_f * in_f, dtype=torch.float32).view(out_f, in_f) / (out_f * in_f)
    x = torch.randn(5, in_f, generator=gen)
    torch.testing.assert_close(kernels.gemm(x, pack_gemm_weight(ramp), out_f), x @ ramp.T, atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_are_not_packed_for_the_float32_kernel(kernels) -> None:
    weight = torch.randn(OUT, IN)
    lin = _linear(weight).to(torch.bfloat16)
    lin.prepare(torch.bfloat16, kernels=kernels)
    assert lin.float32_panels is None
    x = torch.randn(3, IN).bfloat16()
    torch.testing.assert_close(lin(x).float(), F.linear(x, weight.bfloat16()).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [0, 1, 64])  # 64 x 1536: spread over threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_equals_torch(kernels, rows, dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    inter = 1536
    gate_up = (torch.randn(rows, 2 * inter, generator=gen) * 4).to(dtype)
    gate_up[:, :8] = torch.tensor([-150.0, -90.0, -81.0, -79.0, 79.0, 81.0, 90.0, 150.0]).to(dtype)  # exp's edges
    gate, up = gate_up.float().split(inter, dim=-1)
    ref = F.silu(gate) * up
    out = kernels.silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (rows, inter)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("in_f", [32, 96, 576])  # groups: one, an odd number, the default model's 18
def test_int4_kernel_equals_a_matmul_with_the_dequantized_weight(kernels, in_f: int) -> None:
    gen = torch.Generator().manual_seed(in_f)
    out_f = 37
    q = torch.randint(0, INT4_LEVELS + 1, (out_f, in_f), generator=gen)
    step = torch.rand(out_f, in_f // INT4_GROUP, generator=gen) * 0.01
    lo = -torch.rand(out_f, in_f // INT4_GROUP, generator=gen) * 0.05
    weight = (q.view(out_f, -1, INT4_GROUP) * step[..., None] + lo[..., None]).view(out_f, in_f)
    halves = q.to(torch.uint8).view(out_f, in_f // INT4_GROUP, 2, INT4_GROUP // 2)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).contiguous()
    scales = torch.stack([step, lo], -1).contiguous()
    _check_row_kernel(lambda x: kernels.int4_matmul(x, packed, scales), weight, gen)
    with pytest.raises(RuntimeError, match="refused its arguments"):  # more rows than the kernel takes
        kernels.int4_matmul(torch.randn(9, in_f), packed, scales)


@pytest.mark.parametrize("grid", ["int4", "int8"])
def test_an_exact_low_bit_copy_runs_every_step_in_float32_in_place_of_the_weight(kernels, grid: str) -> None:
    """On a low-bit checkpoint the float32 weight is not kept: big steps run the same low-bit values through the
    panel kernel (csrc/gemm.cpp), exact to float rounding."""
    gen = torch.Generator().manual_seed(6)
    weight = _on_grid(gen) if grid == "int4" else _on_int8_grid(gen)
    b = torch.randn(OUT, generator=gen)
    lin = _linear(weight, b)
    assert lin.quantize("auto") == grid
    lin.prepare(torch.float32, max_tokens=2, kernels=kernels)
    assert lin.lowbit_panels is not None and lin.lowbit_panels.bits == (4 if grid == "int4" else 8)
    assert lin.weight.numel() == 0 and lin.float32_panels is None
    for rows in (0, 1, 3, 8, 9, 70):  # the row kernels, then the panel kernel's tiles and chunks
        x = torch.randn(rows, IN, generator=gen)
        ref = F.linear(x.double(), weight.double(), b.double()).float()
        torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-5)


def test_a_rounded_4bit_copy_leaves_big_steps_to_the_original_weight(kernels) -> None:
    """``int4`` (lossy) keeps the float32 weight for the steps above the limit: only small steps are rounded."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(OUT, IN, generator=gen)
    lin = _linear(weight)
    assert lin.quantize("int4") == "int4"
    lin.prepare(torch.float32, max_tokens=2, kernels=kernels)
    assert lin.lowbit_panels is None and lin.float32_panels is not None
    x = torch.randn(9, IN, generator=gen)
    torch.testing.assert_close(lin(x), F.linear(x, weight), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("in_f", [32, 96, 576])  # blocks: one, an odd number, the default model's 18
def test_int8_kernel_equals_a_matmul_with_the_dequantized_weight(kernels, in_f: int) -> None:
    gen = torch.Generator().manual_seed(in_f)
    out_f = 37
    q = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    scales = torch.rand(out_f, in_f // INT8_GROUP, generator=gen) * 1e-2
    weight = (q.view(out_f, -1, INT8_GROUP).float() * scales[..., None]).view(out_f, in_f)
    _check_row_kernel(lambda x: kernels.int8_matmul(x, q, scales), weight, gen)


def _check_row_kernel(matmul, weight: torch.Tensor, gen: torch.Generator) -> None:
    """A low-bit row kernel (``matmul(x)``) against float64 with the dequantized ``weight``, for every row count it
    is built for, in float32 and bfloat16."""
    for rows in range(9):
        x = torch.randn(rows, weight.shape[1], generator=gen)
        ref = F.linear(x.double(), weight.double()).float()
        torch.testing.assert_close(matmul(x), ref, atol=1e-5, rtol=1e-5)
        out = matmul(x.bfloat16())
        assert out.dtype == torch.bfloat16
        ref16 = F.linear(x.bfloat16().double(), weight.double()).float()
        torch.testing.assert_close(out.float(), ref16, atol=2e-2, rtol=2e-2)


def _near_tie_head(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(weight (OUT, IN) exact in bfloat16, x (IN,)) whose two largest logits, at rows ``lo`` < ``hi``, are 0.03-0.1
    apart near 25 (float64): closer than bfloat16's step there (0.125), so rounded logits tie or flip and the
    lower row wins. ``hi`` is the true argmax."""
    x = torch.randn(IN, generator=gen)
    weight = (torch.randn(OUT, IN, generator=gen) * 0.02).bfloat16().float()
    lo, hi = 3, 11
    unit = x / x.dot(x)  # row = t * unit gives the logit t, before the row's own rounding to bfloat16
    for row, (low, high) in ((lo, (25.20, 25.24)), (hi, (25.27, 25.30))):  # both round to 25.25
        weight[row] = next(r for t in torch.linspace(low, high, 64)
                           if low <= (r := (t * unit).bfloat16().float()).double() @ x.double() <= high)
    logits = weight.double() @ x.double()
    assert logits.argmax().item() == hi and 0.03 < (logits[hi] - logits[lo]).item() < 0.1
    assert logits[lo].bfloat16() >= logits[hi].bfloat16()  # rounded, the wrong row wins (or ties, then wins)
    return weight, x, lo, hi


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-if-here", "no-onednn"])
@pytest.mark.parametrize("with_kernels", [True, False], ids=["eoq-kernels", "torch-ops"])
def test_lm_head_gives_float32_logits_in_bfloat16(kernels, with_kernels, onednn, monkeypatch) -> None:
    """In a bfloat16 model the LM head's logits are float32's where greedy decides: a gap below bfloat16's step
    between the two best tokens keeps its order, on every matmul path (oneDNN's where this CPU has it, F.linear
    where not, a low-bit row kernel, eoq's float32 panels); the largest logits equal float64 to float rounding."""
    from eoq.engine.model import linear

    if not onednn:  # the paths of a CPU without oneDNN's bfloat16 (AVX2-only): F.linear or the float32 panels
        monkeypatch.setattr(linear, "_onednn_packing_available", lambda: False)
    gen = torch.Generator().manual_seed(8)
    weight, x, lo, hi = _near_tie_head(gen)
    for grid in (False, True):  # True: on a Q8_0 grid, as the default model's head (an 8-bit copy is kept)
        w = weight
        if grid:
            scale = w.view(OUT, -1, INT8_GROUP).abs().amax(-1, keepdim=True) / 127
            w = ((w.view(OUT, -1, INT8_GROUP) / scale).round() * scale).view(OUT, IN)
        ref = w.double() @ x.double()
        assert ref.argmax().item() == hi and ref[lo].bfloat16() >= ref[hi].bfloat16()  # still a near tie
        head = linear.LMHead(IN, OUT, bias=False)
        with torch.no_grad():
            head.weight.copy_(w)
        assert head.quantize("auto") == ("int8" if grid else None)
        head.to(torch.bfloat16)
        head.prepare(torch.bfloat16, max_tokens=4, kernels=kernels if with_kernels else None)
        for rows in (1, 2, 3, 9):  # the 8-bit row kernel's (if kept), then the 16-bit matmul's or the panels'
            out = head(x.expand(rows, IN).contiguous())
            assert out.dtype == torch.float32 and out.shape == (rows, OUT)
            if grid and not head.runs_float32(rows):
                continue  # a 16-bit matmul of the weight rounded to bfloat16: not the grid's own values
            assert out.argmax(-1).tolist() == [hi] * rows, (grid, rows)
            top = ref.topk(2).indices
            torch.testing.assert_close(out[:, top].double(), ref[top].expand(rows, 2), atol=1e-4, rtol=1e-5)
            rest = torch.ones(OUT, dtype=torch.bool)
            rest[top] = False  # the others keep the matmul's rounding at most
            torch.testing.assert_close(out[:, rest].double(), ref[rest].expand(rows, -1), atol=2e-2, rtol=1e-2)


def test_bfloat16_without_onednn_runs_an_exact_low_bit_copy_in_float32_panels(kernels, monkeypatch) -> None:
    """A CPU without oneDNN's bfloat16 path (AVX2-only) runs a bfloat16 model's big steps on the exact low-bit copy
    in eoq's float32 panel kernel (the checkpoint's own values, float32 sums) instead of F.linear's bfloat16."""
    from eoq.engine.model import linear

    monkeypatch.setattr(linear, "_onednn_packing_available", lambda: False)
    gen = torch.Generator().manual_seed(9)
    weight = _on_grid(gen)
    lin = _linear(weight)
    assert lin.quantize("auto") == "int4"
    lin.to(torch.bfloat16)
    lin.prepare(torch.bfloat16, max_tokens=2, kernels=kernels)
    assert lin.lowbit_panels is not None and lin.onednn_weight is None and lin.weight.numel() == 0
    assert lin.runs_float32(9)
    for rows in (3, 9, 70):
        x = torch.randn(rows, IN, generator=gen).bfloat16()
        out = lin(x)
        assert out.dtype == torch.bfloat16
        ref = F.linear(x.double(), weight.double())  # the checkpoint's values, the rounded input
        torch.testing.assert_close(out.double(), ref.bfloat16().double(), atol=1e-3, rtol=8e-3)


def test_an_untied_bfloat16_head_holds_its_weight_once() -> None:
    """A head tied to the embedding may be packed for oneDNN (the embedding keeps the plain weight anyway); an
    untied one is not packed — it keeps one copy, the one its float32 recomputation reads — and gives the same
    logits. (Where oneDNN cannot pack bfloat16 — AVX2 without AVX-512 — neither is packed, and torch refuses to:
    the packing is not forced there.)"""
    from eoq.engine.model import linear

    gen = torch.Generator().manual_seed(10)
    weight, x, _, hi = _near_tie_head(gen)
    embedding = torch.nn.Embedding(OUT, IN)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    untied, tied = linear.LMHead(IN, OUT, bias=False), linear.LMHead(IN, OUT, bias=False)
    with torch.no_grad():
        untied.weight.copy_(weight)
    tied.tie(embedding)
    for head in (untied, tied):
        head.to(torch.bfloat16)
        embedding.to(torch.bfloat16)
        head.prepare(torch.bfloat16, kernels=None)
    assert untied.onednn_weight is None and untied.weight.numel() == OUT * IN
    if linear._onednn_packing_available():
        assert tied.onednn_weight is not None and tied.recompute_weight.data_ptr() == embedding.weight.data_ptr()
    else:
        assert tied.onednn_weight is None
    xs = x.expand(4, IN).contiguous()
    assert untied(xs).argmax(-1).tolist() == tied(xs).argmax(-1).tolist() == [hi] * 4
