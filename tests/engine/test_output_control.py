"""Output control in the engine (tiny random Llama, float32): grammar-constrained answers, logprobs against
transformers, ``n`` answers from one prefill with shared KV blocks, and bad constraints refused."""

from __future__ import annotations

import json
import re

import pytest
import torch

from eoq.engine.types import Constraint, ConstraintKind, EngineRequest, FinishReason, SamplingParams

from .conftest import generate, make_core, merge, run_to_end
from .test_fidelity import prompt_ids

EMAIL = r"[a-z]{3,8}@example\.com"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def core(tiny_llama):
    return make_core(tiny_llama[0], kv_cache_memory_gb=0.004)


def answers(outs) -> dict[int, list]:
    by_index: dict[int, list] = {}
    for o in outs:
        by_index.setdefault(o.index, []).append(o)
    return {i: merge(v) for i, v in sorted(by_index.items())}


def test_constrained_answers_hold_their_language(core):
    """Random weights at temperature 1 would write anything: the mask alone keeps each answer in its language,
    and each ends at the end token once the language is complete."""
    cases = [
        (Constraint(ConstraintKind.REGEX, EMAIL), lambda t: re.fullmatch(EMAIL, t)),
        (Constraint(ConstraintKind.CHOICE, choices=("red", "green", "blue")), lambda t: t in ("red", "green", "blue")),
        (Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)), lambda t: _valid(json.loads(t))),
        (Constraint(ConstraintKind.GRAMMAR, 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'),
         lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
    ]
    for i, (constraint, holds) in enumerate(cases):
        for seed in range(3):
            core.add_request(EngineRequest(f"c{i}-{seed}", prompt_ids(20, seed=seed), SamplingParams(
                temperature=1.0, seed=seed, max_tokens=200, constraint=constraint)))
    outs = run_to_end(core)
    assert len(outs) == 12
    for rid, o in outs.items():
        out = merge(o)
        constraint, holds = cases[int(rid[1 : rid.index("-")])]
        assert out.finish_reason is FinishReason.STOP, (rid, out.text)
        assert holds(out.text), (constraint.kind, out.text)


def _valid(obj) -> bool:
    import jsonschema

    jsonschema.validate(obj, SCHEMA)
    return True


def test_an_unconstrained_row_is_untouched_by_constrained_neighbours(core):
    prompt = prompt_ids(33, seed=5)
    alone = generate(core, prompt, max_tokens=24, ignore_eos=True).token_ids
    for i in range(3):
        core.add_request(EngineRequest(f"json{i}", prompt_ids(20 + i, seed=i), SamplingParams(
            max_tokens=40, constraint=Constraint(ConstraintKind.JSON_OBJECT))))
    core.add_request(EngineRequest("plain", prompt, SamplingParams(max_tokens=24, ignore_eos=True)))
    outs = run_to_end(core)
    assert merge(outs["plain"]).token_ids == alone
    for i in range(3):
        text = merge(outs[f"json{i}"]).text
        if merge(outs[f"json{i}"]).finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(text), dict)
        else:  # cut at max_tokens: a prefix of an object
            assert text.startswith("{")


def test_logprobs_equal_transformers_log_softmax(core, tiny_llama):
    _, hf = tiny_llama
    prompt = prompt_ids(25, seed=9)
    out = generate(core, prompt, max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=5)
    check_logprobs(out, hf, prompt)


def check_logprobs(out, hf, prompt: list[int]) -> torch.Tensor:
    """``out``'s greedy logprobs (top 5) against transformers' log_softmax within 1e-4; returns the reference."""
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0].float().log_softmax(-1)  # (T, V)
    for j, lp in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + j]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()
        assert all(v == pytest.approx(row[t].item(), abs=1e-4) for t, v in lp.top)
        assert lp.top[0][0] == lp.token_id  # greedy: the sampled token is the most likely
    return ref


def test_logprobs_stay_aligned_with_held_back_stop_text(core):
    prompt = prompt_ids(18, seed=4)
    free = generate(core, prompt, max_tokens=20, ignore_eos=True)
    stop = core.tokenizer.decode(free.token_ids[8:10])
    core.add_request(EngineRequest("s", prompt, SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,),
                                                               logprobs=True)))
    for o in run_to_end(core)["s"]:
        assert [lp.token_id for lp in o.logprobs] == o.token_ids


def test_n_answers_share_one_prefill_and_their_blocks(core):
    blocks = core.scheduler.blocks
    prompt = prompt_ids(40, seed=3)  # block size 16: two full blocks and a partial one
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    core.add_request(EngineRequest("four", prompt, params))
    first = core.step()
    assert first.stats.num_batched_tokens == 40  # the prompt, computed once
    answers_now = [s for s in core.requests.values() if s.output_id == "four"]
    assert sorted(s.answer_index for s in answers_now) == [0, 1, 2, 3]
    tables = [s.block_ids for s in answers_now]
    assert len({t[0] for t in tables}) == len({t[1] for t in tables}) == 1  # the full blocks: shared
    assert blocks.blocks[tables[0][0]].ref_count == 4
    assert len({t[2] for t in tables}) == 4  # the partial block: a copy each
    outs = [o for o in first.outputs]
    while core.has_work():
        outs += core.step().outputs
    got = answers(outs)
    assert sorted(got) == [0, 1, 2, 3]
    assert all(a.num_completion_tokens == 10 and a.num_prompt_tokens == 40 for a in got.values())
    assert len({tuple(a.token_ids) for a in got.values()}) > 1  # different draws
    assert sum(o.last for o in outs) == 1 and outs[-1].last
    assert blocks.num_free_blocks == blocks.num_blocks and sum(b.ref_count for b in blocks.blocks) == 0
    # The same seed reproduces all four; answer 0 is the request's own seed, as with n = 1.
    core.add_request(EngineRequest("again", prompt, params))
    again = answers(run_to_end(core)["again"])
    assert [a.token_ids for a in again.values()] == [a.token_ids for a in got.values()]
    solo = generate(core, prompt, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    assert solo.token_ids == got[0].token_ids


def test_greedy_n_answers_equal_the_single_answer(core):
    """Greedy answers of one prompt are all the same answer: true only if each fork's copied KV is right."""
    prompt = prompt_ids(37, seed=8)
    solo = generate(core, prompt, max_tokens=16, ignore_eos=True).token_ids
    core.add_request(EngineRequest("g", prompt, SamplingParams(n=3, max_tokens=16, ignore_eos=True)))
    got = answers(run_to_end(core)["g"])
    assert [a.token_ids for a in got.values()] == [solo] * 3


def test_aborting_a_request_ends_all_its_answers(core):
    blocks = core.scheduler.blocks
    core.add_request(EngineRequest("n", prompt_ids(30, seed=1), SamplingParams(n=3, temperature=1.0, max_tokens=50,
                                                                              ignore_eos=True)))
    core.step()
    core.step()
    outs = core.abort_request("n")
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert all(o.finish_reason is FinishReason.CANCELLED for o in outs) and outs[-1].last
    assert not core.requests and not core.has_work()
    assert blocks.num_free_blocks == blocks.num_blocks


def test_min_tokens_and_logit_bias_in_the_engine(core):
    prompt = prompt_ids(12, seed=2)
    eos = next(iter(core.eos_token_ids))
    # A bias of +100 on the end token ends every answer at once, unless min_tokens holds it off.
    ended = generate(core, prompt, max_tokens=20, logit_bias=((eos, 100.0),))
    assert ended.num_completion_tokens == 1 and ended.finish_reason is FinishReason.STOP
    held = generate(core, prompt, max_tokens=20, logit_bias=((eos, 100.0),), min_tokens=5)
    assert held.num_completion_tokens == 6 and held.token_ids[-1] == eos


def test_a_grammar_that_does_not_compile_fails_its_request_as_invalid(core):
    core.add_request(EngineRequest("bad", prompt_ids(10, seed=1), SamplingParams(
        constraint=Constraint(ConstraintKind.GRAMMAR, "root ::= undefined_rule"))))
    (out,) = run_to_end(core)["bad"]
    assert out.error_is_invalid_argument and out.last and "undefined_rule" in out.error
    assert not core.requests


@pytest.mark.parametrize("bad, field", [
    (dict(n=0), "n must be"), (dict(n=99), "n must be"), (dict(top_logprobs=3), "needs logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(logit_bias=((5, 101.0),)), "logit_bias"),
    (dict(logit_bias=((5, 1.0), (5, 2.0))), "twice"), (dict(logit_bias=((-1, 1.0),)), "negative"),
    (dict(min_tokens=600), "min_tokens"),
    (dict(min_tokens=2, constraint=Constraint(ConstraintKind.JSON_OBJECT)), "min_tokens cannot"),
    (dict(ignore_eos=True, constraint=Constraint(ConstraintKind.REGEX, "a+")), "ignore_eos cannot"), (dict(stop_token_ids=(-3,)), "stop_token_ids"),
    (dict(constraint=Constraint(ConstraintKind.CHOICE)), "choice"),
    (dict(constraint=Constraint(ConstraintKind.REGEX, " ")), "empty"),
])
def test_bad_output_control_is_refused_by_name(bad, field):
    from eoq.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**bad).validate(max_tokens_limit=1024)


@pytest.mark.parametrize("constraint, words", [
    (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), "not valid JSON"),
    (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "objectx"}'), "objectx"),
    (Constraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "must be a JSON object"),
    (Constraint(ConstraintKind.REGEX, "a(b"), "parenthesis"),
    (Constraint(ConstraintKind.GRAMMAR, 'root ::= "a" | b'), "not defined"),
])
def test_bad_constraints_are_refused_at_the_door_with_the_reason(constraint, words):
    from eoq.engine.structured import grammar_of
    from eoq.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=words) as e:
        grammar_of(constraint)
    assert "/project/" not in str(e.value)  # xgrammar's source location is stripped


def test_prompt_logprobs_equal_transformers_across_chunks_and_skip_the_prefix_cache(tiny_llama):
    checkpoint, hf = tiny_llama
    core = make_core(checkpoint, kv_cache_memory_gb=0.004, max_num_batched_tokens=16)  # a 50-token prompt: 4 chunks
    prompt = prompt_ids(50, seed=12)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # (P, V)
    for attempt in range(2):  # the second time the prompt's blocks are cached: still computed, all of them
        out = generate(core, prompt, max_tokens=3, ignore_eos=True, prompt_logprobs=True, top_logprobs=2)
        assert [lp.token_id for lp in out.prompt_logprobs] == prompt[1:]
        for pos, lp in enumerate(out.prompt_logprobs, start=1):
            assert lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == ref[pos - 1].topk(2).indices.tolist()
        assert out.num_cached_tokens == 0
    assert generate(core, prompt, max_tokens=3, ignore_eos=True).num_cached_tokens == 48  # others still hit


def test_default_model_logprobs_equal_transformers_in_float32(default_checkpoint):
    """The acceptance's figure for the real model: generated-token and prompt logprobs within 1e-4 of
    transformers' log_softmax (float32, decode steps on the low-bit copies that equal the checkpoint)."""
    from transformers import AutoModelForCausalLM

    from eoq.chat.prompt import ChatMessage, PromptBuilder
    from eoq.engine.model.checkpoint import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(default_checkpoint.path, dtype=torch.float32).eval()
    core = make_core(default_checkpoint.path, kv_cache_memory_gb=0.25, max_model_len=2048)
    prompt = PromptBuilder(load_tokenizer(default_checkpoint.path)).render(
        None, [ChatMessage("user", "What is the capital of France?")])
    out = generate(core, prompt, max_tokens=16, logprobs=True, top_logprobs=5, prompt_logprobs=True)
    ref = check_logprobs(out, hf, prompt)
    for pos, lp in enumerate(out.prompt_logprobs, start=1):
        assert lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
    assert "Paris" in out.text


def test_a_grammar_past_its_compile_time_limit_is_refused(tiny_llama):
    """The compile thread is held busy here (a real grammar compile cannot be made slow on demand): the request
    waits past --max-grammar-compile-seconds and is refused as invalid, naming the limit; the engine goes on."""
    import threading

    core = make_core(tiny_llama[0], kv_cache_memory_gb=0.004, max_grammar_compile_seconds=0.05)
    release = threading.Event()
    core.grammars._pool.submit(release.wait, 10)  # occupies the one compile thread
    try:
        core.add_request(EngineRequest("slow", prompt_ids(10, seed=1), SamplingParams(
            constraint=Constraint(ConstraintKind.REGEX, "[a-z]+"))))
        (out,) = run_to_end(core)["slow"]
    finally:
        release.set()
    assert out.error_is_invalid_argument and "--max-grammar-compile-seconds" in out.error
    assert not core.requests and not core.has_work()
    assert generate(core, prompt_ids(10, seed=1), max_tokens=4, ignore_eos=True).num_completion_tokens == 4
