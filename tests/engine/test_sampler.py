"""The sampler on fixed logits: exact top-k/top-p masks, transformers' repetition penalty, seeded rows."""

from __future__ import annotations

import math

import pytest
import torch

from eoq.engine.model.ops import CpuKernelOps
from eoq.engine.sampler import Sampler, SamplingBatch, apply_repetition_penalty, apply_top_k_top_p
from eoq.engine.types import SamplingParams

CPU = torch.device("cpu")


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2]), None)
    assert torch.isinf(out).tolist() == [[True, False, True, False, True]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_k_top_p(probs.log(), None, torch.tensor([0.75]))
    assert (~torch.isinf(out)).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.75
    out = apply_top_k_top_p(probs.log(), None, torch.tensor([0.5]))
    assert (~torch.isinf(out)).tolist() == [[True, False, False, False]]


def test_per_row_parameters_in_one_batch():
    logits = torch.tensor([[1.0, 5.0, 3.0], [1.0, 5.0, 3.0]])
    out = apply_top_k_top_p(logits, torch.tensor([1, 0]), None)
    assert torch.isinf(out).tolist() == [[True, False, True], [False, False, False]]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, -1], [3, 3, 3]])
    ours = apply_repetition_penalty(logits, torch.tensor([1.5, 1.2]), seen)
    ref0 = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 1]]), logits[:1].clone())
    ref1 = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[3, 3, 3]]), logits[1:].clone())
    assert torch.allclose(ours, torch.cat([ref0, ref1]))


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_distribution():
    _check_greedy_and_sampled_rows(Sampler(CPU, seed=0))


def test_greedy_rows_take_the_argmax_kernel_and_sampled_rows_follow_their_distribution(cpu_kernels_lib):
    _check_greedy_and_sampled_rows(Sampler(CPU, seed=0, ops=CpuKernelOps(cpu_kernels_lib)))


def _check_greedy_and_sampled_rows(sampler: Sampler) -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().repeat(2, 1)
    params = [SamplingParams(), SamplingParams(temperature=1.0)]
    counts = torch.zeros(3)
    n = 4000
    for _ in range(n):
        batch = SamplingBatch.build(params, [], [None, None], CPU)
        out = sampler(logits, batch)
        assert out[0].item() == 1
        counts[out[1]] += 1
    freq = counts / n
    assert all(math.isclose(f, p, abs_tol=0.03) for f, p in zip(freq.tolist(), probs.tolist()))


def test_seeded_row_ignores_its_neighbours():
    def draw(batch_size: int, row: int) -> list[int]:
        sampler = Sampler(CPU, seed=batch_size)  # the shared generator differs from run to run
        g = torch.Generator().manual_seed(42)
        logits = torch.randn(batch_size, 50, generator=torch.Generator().manual_seed(batch_size))  # neighbours vary
        logits[row] = torch.randn(50, generator=torch.Generator().manual_seed(0))  # the seeded request's row
        params = [SamplingParams(temperature=1.0)] * batch_size
        gens = [None] * batch_size
        gens[row] = g
        return [sampler(logits, SamplingBatch.build(params, [], gens, CPU))[row].item() for _ in range(20)]

    assert draw(1, 0) == draw(5, 3) == draw(8, 7)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 49152])
def test_argmax_kernel_takes_the_first_of_equal_maxima(cpu_kernels_lib, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(40, n, generator=gen)  # 40 rows x 49152: spread over threads
    x[1] = float("-inf")
    x[2, n // 2] = x[2, n - 1] = x[2].max() + 1  # a tie: the first wins
    x[3] = 7.0  # all equal
    if n > 1:
        x[4, -1] = 1e30  # the last element, past the vectorized part
    out = cpu_kernels_lib.argmax(x)
    assert out.dtype == torch.int64
    assert torch.equal(out, x.argmax(dim=-1))
    assert out[2].item() == n // 2 and out[3].item() == 0
