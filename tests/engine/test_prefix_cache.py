"""Prefix caching in the engine (float32, greedy): the same tokens with and without the cache, reuse across a
conversation's turns, tenant salting, and eviction under pressure never corrupting a running sequence."""

from __future__ import annotations

import random

from eoq.engine.types import EngineRequest, SamplingParams

from .conftest import generate, make_core, merge, run_to_end
from .test_fidelity import prompt_ids


def conversation(core, turns: list[list[int]], salt: str = "") -> list[tuple[list[int], int]]:
    """Multi-turn: each prompt is the previous prompt + its answer + the next question. Returns, per turn,
    (answer tokens, cached prompt tokens)."""
    history: list[int] = []
    results = []
    for i, question in enumerate(turns):
        prompt = history + question
        core.add_request(EngineRequest(f"{salt}-t{i}", prompt, SamplingParams(max_tokens=20, ignore_eos=True),
                                       cache_salt=salt))
        out = merge(run_to_end(core)[f"{salt}-t{i}"])
        results.append((out.token_ids, out.num_cached_tokens))
        history = prompt + out.token_ids
    return results


def test_same_tokens_with_and_without_the_cache_and_growing_reuse(tiny_llama):
    checkpoint, _ = tiny_llama
    turns = [prompt_ids(n, seed=20 + n) for n in (30, 12, 25, 9)]
    cached = conversation(make_core(checkpoint), turns)
    uncached = conversation(make_core(checkpoint, enable_prefix_caching=False), turns)
    assert [a for a, _ in cached] == [a for a, _ in uncached]
    assert [c for _, c in uncached] == [0, 0, 0, 0]
    hits = [c for _, c in cached]
    assert hits[0] == 0
    # Each turn reuses (nearly) everything before it: prompt + answer of the previous turn, in whole blocks.
    history = 0
    for i in range(1, len(turns)):
        history += len(turns[i - 1]) + 20
        assert history - 16 < hits[i] <= history
        assert hits[i] > hits[i - 1]


def test_tenants_never_share_cache(tiny_llama):
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint)
    prompt = prompt_ids(64, seed=31)
    a = generate(core, prompt, max_tokens=4)
    core.add_request(EngineRequest("bob", prompt, SamplingParams(max_tokens=4), cache_salt="bob"))
    bob = merge(run_to_end(core)["bob"])
    core.add_request(EngineRequest("alice", prompt, SamplingParams(max_tokens=4), cache_salt=""))
    alice_again = merge(run_to_end(core)["alice"])
    assert a.num_cached_tokens == 0
    assert bob.num_cached_tokens == 0  # same tokens, another tenant: no hit (not even timing-visible)
    assert alice_again.num_cached_tokens == 48  # 63 tokens may hit, in whole blocks of 16
    assert bob.token_ids == a.token_ids == alice_again.token_ids


def test_eviction_under_pressure_never_corrupts_a_running_sequence(tiny_llama):
    checkpoint, _ = tiny_llama
    kw = dict(kv_cache_memory_gb=0.5 * 2**-10, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64)
    long_prompt = prompt_ids(100, seed=41)
    solo = generate(make_core(checkpoint, **kw), long_prompt, max_tokens=150, ignore_eos=True).token_ids

    core = make_core(checkpoint, **kw)
    blocks = core.scheduler.blocks
    rng = random.Random(5)
    shared = [prompt_ids(48, seed=s) for s in range(4)]  # common prefixes, cached and evicted over and over
    core.add_request(EngineRequest("long", long_prompt, SamplingParams(max_tokens=150, ignore_eos=True)))
    outs: dict[str, list] = {}
    n = 0
    evictions_seen = False
    while core.has_work():
        if n < 120 and rng.random() < 0.7:
            prefix = rng.choice(shared)
            core.add_request(EngineRequest(f"x{n}", prefix + prompt_ids(rng.randrange(1, 40), seed=1000 + n),
                                           SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=True)))
            n += 1
        cached_before = blocks.num_cached_blocks
        for o in core.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
        evictions_seen |= blocks.num_cached_blocks < cached_before
    assert evictions_seen
    assert merge(outs["long"]).token_ids == solo
    assert sum(1 for v in outs.values() if merge(v).num_cached_tokens > 0) > 10  # the prefixes were reused
    assert blocks.num_free_blocks == blocks.num_blocks
