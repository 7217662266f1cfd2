"""Decode steps padded to the shapes CUDA graphs are captured for (``engine/cuda_graphs.py``).

On a CPU the padded steps run eagerly (``decode_graphs="eager"``): the padding rows, the null block, the table
widths and the in-step mask are the graphs' own, only the capture is missing. With a CUDA device the same checks
run with real graphs."""

from __future__ import annotations

import pytest
import torch

from eoq.engine.builder import build_engine_core
from eoq.engine.cuda_graphs import batch_buckets, width_bucket
from eoq.engine.step_inputs import DecodeInputs
from eoq.engine.types import EngineConfig, EngineRequest, RequestOutput, SamplingParams
from eoq.errors import ConfigError

from .conftest import make_core, merge, run_to_end
from .test_fidelity import prompt_ids

# Prompts of 3..70 tokens answered with 6..48 tokens: the batch shrinks 6 -> 1 through the buckets 8, 4, 2, 1
# while tables grow across block boundaries (16 tokens).
CASES = [(3, 48), (17, 30), (70, 20), (33, 41), (9, 6), (50, 12)]


def batch_answers(core, tag: str) -> dict[str, RequestOutput]:
    """CASES' greedy answers, each token with the two most likely at its position (``top_logprobs``)."""
    for i, (n, answer) in enumerate(CASES):
        core.add_request(EngineRequest(f"{tag}{i}", prompt_ids(n, seed=40 + i),
                                       SamplingParams(max_tokens=answer, ignore_eos=True, logprobs=True,
                                                      top_logprobs=2)))
    return {rid.removeprefix(tag): merge(outs) for rid, outs in run_to_end(core).items()}


# Two attention paths sum the same float32 products in another order (eoq's paged kernel; the padded steps'
# masked SDPA): their logits differ in the last bits, so where a step's two best tokens are that close either
# may win. The tiny model's random weights make such near ties happen (seen on Intel CPUs with AMX).
NEAR_TIE = 1e-4


def assert_same_answers(expected: dict[str, RequestOutput], got: dict[str, RequestOutput]) -> None:
    """The same tokens, up to a near tie: at the first token that differs, the two tokens are ``expected``'s two
    best, within ``NEAR_TIE`` of each other (what follows a different token differs rightly)."""
    assert expected.keys() == got.keys()
    for rid, e in expected.items():
        g = got[rid]
        assert len(e.token_ids) == len(g.token_ids), rid
        i = next((i for i, (a, b) in enumerate(zip(e.token_ids, g.token_ids)) if a != b), None)
        if i is not None:
            top = dict(e.logprobs[i].top)
            b = g.token_ids[i]
            assert b in top and abs(top[e.token_ids[i]] - top[b]) < NEAR_TIE, (rid, i, e.logprobs[i], g.logprobs[i])


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(1) == [1]
    assert [width_bucket(n, 32) for n in (0, 1, 2, 3, 5, 16, 17, 40)] == [1, 1, 2, 4, 8, 16, 32, 32]
    assert width_bucket(9, 12) == 12


def test_decode_inputs_pad_tables_with_the_given_block():
    inputs = DecodeInputs([5, 6], [17, 3], [81, 35], [18, 4], [[4, 5], [2]])
    assert inputs.width == 2
    assert inputs.padded_tables(4, pad_block=9) == [4, 5, 9, 9, 2, 9, 9, 9]


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch"])
def test_padded_decode_steps_give_the_same_tokens(tiny_llama, cpu_kernels):
    checkpoint, _ = tiny_llama
    plain = make_core(checkpoint, cpu_kernels=cpu_kernels, decode_graphs="off")
    padded = make_core(checkpoint, cpu_kernels=cpu_kernels, decode_graphs="eager")
    graphs = padded.runner.graphs
    assert plain.runner.graphs is None and graphs is not None
    # The null block lies beyond the blocks the scheduler hands out, within the same budget.
    blocks = padded.scheduler.blocks.num_blocks
    assert blocks == plain.scheduler.blocks.num_blocks - 1
    assert padded.runner.kv_cache.shape[3] == blocks + 1 and graphs.null_block == blocks

    expected = batch_answers(plain, "a")
    assert_same_answers(expected, batch_answers(padded, "a"))
    shapes = graphs.captured
    assert {b for b, _ in shapes} == {1, 2, 4, 8}  # 6 sequences ran as 8, then 4, 2, 1
    # The longest table sets the width: 5-6 blocks (70 + 20, 33 + 41 tokens) as 8; once only 3 + 48 is left, 4.
    assert {w for _, w in shapes} == {4, 8}
    # Again, now hitting the prefix cache: the padding rows wrote only to the null block.
    assert_same_answers(expected, batch_answers(padded, "b"))
    assert padded.scheduler.blocks.num_used_blocks == 0


def test_padded_step_logits_match_the_eager_step(tiny_llama):
    """One decode step of three sequences, run both ways on the same cache: the same logits."""
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint, cpu_kernels=False, decode_graphs="eager")
    for i, n in enumerate((5, 21, 40)):
        core.add_request(EngineRequest(f"r{i}", prompt_ids(n, seed=60 + i), SamplingParams(max_tokens=8)))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in core.requests.values()):
        core.step()  # the prompts' prefill
    out = core.scheduler.schedule()
    assert len(out.decodes) == 3 and not out.prefills
    runner = core.runner
    step = runner.prepare(out)
    with torch.inference_mode():
        eager = runner.model(step.input_ids, step.positions, runner.kv_caches, step.meta, step.logits_indices)
        padded = runner.graphs.run(DecodeInputs.of(out.decodes, runner.block_size))
    assert runner.graphs.captured == [(4, 4)]  # 3 sequences as 4; 40 + 1 tokens in 3 blocks as 4
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)  # float32 sums in another order


def test_decode_graphs_setting_is_checked(tiny_llama):
    checkpoint, _ = tiny_llama
    with pytest.raises(ConfigError, match="decode-graphs"):
        build_engine_core(EngineConfig(checkpoint=checkpoint, model_name="tiny", dtype="float32",
                                       kv_cache_memory_gb=0.002, decode_graphs="sometimes"))
    assert make_core(checkpoint, decode_graphs="auto").runner.graphs is None  # auto: graphs on CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_give_the_same_tokens(tiny_llama):
    checkpoint, _ = tiny_llama
    plain = make_core(checkpoint, device="cuda", decode_graphs="off")
    graphed = make_core(checkpoint, device="cuda", decode_graphs="auto")
    expected = batch_answers(plain, "a")
    assert_same_answers(expected, batch_answers(graphed, "a"))
    assert graphed.runner.graphs is not None and graphed.runner.graphs.captured
    assert_same_answers(expected, batch_answers(graphed, "b"))
