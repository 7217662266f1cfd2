"""The sampler on fixed logits: exact top-k/top-p masks, transformers' repetition penalty, seeded rows."""

from __future__ import annotations

import math

import pytest
import torch

from eoq.engine.model.ops import CpuKernelOps
from eoq.engine.sampler import Sampler, SamplingBatch, SamplingRow, apply_repetition_penalty, apply_top_k_top_p
from eoq.engine.types import SamplingParams

CPU = torch.device("cpu")


def batch_of(params: list[SamplingParams], generators=None, outputs=None, end=frozenset()) -> SamplingBatch:
    """Rows with an empty prompt and ``outputs[i]`` (default none) generated so far."""
    generators = generators or [None] * len(params)
    outputs = outputs or [[] for _ in params]
    return SamplingBatch.build([SamplingRow(p, list(o), 0, end, g) for p, o, g in zip(params, outputs, generators)],
                               CPU)


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
        out = sampler(logits, batch_of(params)).token_ids
        assert out[0] == 1
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
        return [sampler(logits, batch_of(params, gens)).token_ids[row] for _ in range(20)]

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


def test_logit_bias_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    sampler = Sampler(CPU)
    p = SamplingParams(logprobs=True, logit_bias=((0, 5.0),), presence_penalty=0.5, frequency_penalty=0.25)
    # output so far: token 2 twice, token 3 once -> 2: 3 - 2*0.25 - 0.5 = 2.0; 3: 0.5 - 0.25 - 0.5 = -0.25
    res = sampler(logits, batch_of([p], outputs=[[2, 2, 3]]))
    expected = torch.tensor([[6.0, 2.0, 2.0, -0.25]])
    assert res.token_ids == [0]
    assert res.logprobs[0].logprob == pytest.approx(expected.log_softmax(-1)[0, 0].item(), abs=1e-6)


def test_min_tokens_masks_the_end_tokens_until_reached():
    logits = torch.tensor([[0.0, 9.0, 1.0]])  # token 1 = the end token, most likely
    p = SamplingParams(min_tokens=2)
    sampler = Sampler(CPU)
    assert sampler(logits, batch_of([p], outputs=[[2]], end=frozenset({1}))).token_ids == [2]
    assert sampler(logits, batch_of([p], outputs=[[2, 2]], end=frozenset({1}))).token_ids == [1]


def test_logprobs_are_of_the_tempered_distribution_before_top_k_and_sorted():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=gen)
    params = [SamplingParams(logprobs=True, top_logprobs=5),  # greedy: temperature 1
              SamplingParams(temperature=0.7, top_k=3, logprobs=True, top_logprobs=20, seed=1),
              SamplingParams(temperature=1.0)]  # asked for nothing
    res = Sampler(CPU)(logits, batch_of(params, [None, torch.Generator().manual_seed(1), None]))
    assert res.logprobs[2] is None
    for row, t, k in ((0, 1.0, 5), (1, 0.7, 20)):
        lp = res.logprobs[row]
        ref = (logits[row] / t).log_softmax(-1)
        assert lp.token_id == res.token_ids[row]
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-6)
        assert [i for i, _ in lp.top] == ref.topk(k).indices.tolist()
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and len(values) == k
    assert res.logprobs[0].token_id == res.logprobs[0].top[0][0]  # greedy: the most likely token
    assert res.logprobs[1].token_id in logits[1].topk(3).indices.tolist()  # top-k still applies to the draw


def test_a_token_of_probability_zero_is_never_drawn():
    """Masked tokens (a grammar's, top-k's) are -inf logits: the inverse-CDF draw never lands on them, also
    between allowed ones and at the ends of the vocabulary."""
    logits = torch.full((4, 300), float("-inf"))
    allowed = [0, 7, 8, 150, 299]
    logits[:, allowed] = torch.tensor([0.5, 2.0, -1.0, 0.0, 1.0])
    sampler = Sampler(CPU, seed=3)
    params = [SamplingParams(temperature=1.5)] * 4
    drawn = set()
    for _ in range(500):
        drawn.update(sampler(logits, batch_of(params)).token_ids)
    assert drawn == set(allowed)


def test_the_torch_grammar_mask_equals_xgrammars_kernel():
    """The mask path other devices take (torch's ops) masks exactly what xgrammar's CPU kernel masks."""
    from eoq.engine.structured import allocate_bitmask, apply_bitmask, apply_bitmask_torch

    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1))
    bitmask = allocate_bitmask(5, 1000)
    bitmask.random_(-2**31, 2**31 - 1, generator=torch.Generator().manual_seed(2))
    rows = [0, 2, 3]
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask_torch(ours, bitmask, rows)
    apply_bitmask(theirs, bitmask, rows)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[[1, 4]], logits[[1, 4]]) and torch.isinf(ours[0]).any()
