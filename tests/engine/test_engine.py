"""Engine behaviour on CPU with tiny random models (float32) and the real default model."""

from __future__ import annotations

import random

import pytest

from eoq.engine.builder import build_engine_core
from eoq.engine.types import EngineConfig, EngineRequest, FinishReason, SamplingParams
from eoq.errors import ConfigError

from .conftest import generate, make_core, merge, run_to_end
from .test_fidelity import prompt_ids


def test_batch_invariance_greedy(tiny_llama):
    """A request gives the same tokens alone and inside a batch of 16 mixed requests of different lengths that
    arrive at different steps (chunked prefills mixed with decodes)."""
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint, max_num_batched_tokens=64)
    target = prompt_ids(45, seed=7)
    alone = generate(core, target, max_tokens=40, ignore_eos=True).token_ids

    rng = random.Random(3)
    arrivals: dict[int, list[tuple[str, list[int], int]]] = {}
    for i in range(15):
        arrivals.setdefault(rng.randrange(0, 12), []).append((f"o{i}", prompt_ids(rng.randrange(3, 120), seed=100 + i),
                                                              rng.randrange(5, 60)))
    arrivals.setdefault(5, []).append(("target", target, 40))
    outs: dict[str, list] = {}
    step = 0
    while core.has_work() or step <= max(arrivals):
        for rid, prompt, n in arrivals.get(step, []):
            core.add_request(EngineRequest(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
        for o in core.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
        step += 1
    assert len(outs) == 16
    assert merge(outs["target"]).token_ids == alone
    assert all(merge(v).finished for v in outs.values())


def test_seed_reproducible_whatever_the_batch(tiny_llama):
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint)
    prompt = prompt_ids(30, seed=11)
    params = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = generate(core, prompt, **params).token_ids
    for i in range(6):
        core.add_request(EngineRequest(f"noise{i}", prompt_ids(10 + i, seed=i), SamplingParams(
            temperature=1.0, max_tokens=30, ignore_eos=True)))
    core.add_request(EngineRequest("seeded", prompt, SamplingParams(**params)))
    outs = run_to_end(core)
    assert merge(outs["seeded"]).token_ids == alone
    other_seed = generate(core, prompt, **{**params, "seed": 99}).token_ids
    assert other_seed != alone


def test_temperature_zero_is_deterministic_and_max_tokens_holds(tiny_gpt2):
    checkpoint, _ = tiny_gpt2
    core = make_core(checkpoint)
    prompt = prompt_ids(12, seed=5)
    a = generate(core, prompt, max_tokens=17, ignore_eos=True)
    b = generate(core, prompt, max_tokens=17, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.num_completion_tokens == len(a.token_ids) == 17
    assert a.finish_reason is FinishReason.LENGTH


def test_stop_token_ends_the_answer(tiny_llama):
    """Stop token ids end generation with STOP; the stop token is reported but never detokenized."""
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint)
    prompt = prompt_ids(25, seed=8)
    free = generate(core, prompt, max_tokens=20, ignore_eos=True).token_ids
    stop_at = free[5]
    out = generate(core, prompt, max_tokens=20, ignore_eos=True, stop_token_ids=(stop_at,))
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == free[: free.index(stop_at) + 1]


def test_cache_accounting_under_random_aborts(tiny_llama):
    """200 requests of random lengths, random aborts and finishes, with a cache small enough to preempt: every
    request ends exactly once and every block is free again."""
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint, kv_cache_memory_gb=0.5 * 2**-10, max_num_seqs=24, max_num_batched_tokens=96,
                     max_model_len=512)
    blocks = core.scheduler.blocks
    rng = random.Random(0)
    pending = [(f"r{i}", prompt_ids(rng.randrange(1, 300), seed=i), rng.randrange(1, 100)) for i in range(200)]
    finished: dict[str, FinishReason] = {}
    live: set[str] = set()
    preemptions = 0
    while pending or core.has_work():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                rid, prompt, n = pending.pop()
                core.add_request(EngineRequest(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                                         temperature=rng.choice([0.0, 0.8]))))
                live.add(rid)
        if live and rng.random() < 0.1:
            rid = rng.choice(sorted(live))
            (out,) = core.abort_request(rid)
            assert out.finish_reason is FinishReason.CANCELLED and out.last
            finished[rid] = out.finish_reason
            live.discard(rid)
        result = core.step()
        preemptions += result.stats.num_preemptions
        for o in result.outputs:
            if o.finished:
                assert o.request_id not in finished, "a request ended twice"
                finished[o.request_id] = o.finish_reason
                live.discard(o.request_id)
        assert blocks.num_used_blocks <= blocks.num_blocks
    assert len(finished) == 200
    assert not core.requests
    assert blocks.num_free_blocks == blocks.num_blocks
    assert sum(b.ref_count for b in blocks.blocks) == 0
    assert preemptions > 0, "the cache was meant to be small enough to preempt"


def test_budget_too_small_refused_with_what_to_change(tiny_llama):
    checkpoint, _ = tiny_llama
    with pytest.raises(ConfigError, match="--kv-cache-memory-gb"):
        build_engine_core(EngineConfig(checkpoint=checkpoint, model_name="tiny", dtype="float32",
                                       kv_cache_memory_gb=1e-6))


def test_unsupported_architecture_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ConfigError, match="supported: gpt2, llama"):
        build_engine_core(EngineConfig(checkpoint=tmp_path, model_name="x"))


@pytest.mark.e2e
def test_default_model_answers_paris(default_checkpoint):
    from eoq.chat.prompt import ChatMessage, PromptBuilder
    from eoq.engine.model.checkpoint import load_tokenizer

    # As served: auto takes bfloat16 or, on a CPU without fast bfloat16, float32 with int8 activations in decode steps.
    core = make_core(default_checkpoint.path, dtype="auto", activation_quantization="auto", kv_cache_memory_gb=0.25,
                     max_model_len=2048)
    prompts = PromptBuilder(load_tokenizer(default_checkpoint.path))
    prompt = prompts.render(None, [ChatMessage("user", "What is the capital of France?")])
    out = generate(core, prompt, max_tokens=48)
    assert "Paris" in out.text
    assert out.finish_reason is FinishReason.STOP  # ended at the end-of-answer token
