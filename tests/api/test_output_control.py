"""Output control over gRPC with the real default model: structured output (200 JSON-schema answers sampled at
temperature 1 all parse and validate; regex and choice hold), logprobs with their token texts, n answers (one
prefill; on Chat stored as sibling answers), penalties and biases, and bad inputs refused as INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, Answer, ask, collect, rpc_error, sampling

pytestmark = pytest.mark.asyncio(loop_scope="package")

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "country": {"enum": ["France", "Germany", "Italy"]}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "address": {"type": "object", "properties": {
                                          "street": {"type": "string", "maxLength": 24},
                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                          "required": ["zip"], "additionalProperties": False}},
     "required": ["name", "age", "address"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3},
                                      "ok": {"type": "boolean"}},
     "required": ["tags", "ok"], "additionalProperties": False},
    # Numbers are bounded: an unbounded one lets a model at temperature 1 write digits until max_tokens.
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99,
                                                                       "maximum": 99},
                                                                 "y": {"type": "integer", "minimum": 0,
                                                                       "maximum": 999}},
                                "required": ["x", "y"], "additionalProperties": False},
     "minItems": 1, "maxItems": 2},
]


def complete(stub, prompt: str, **kw) -> object:
    max_tokens = kw.pop("max_tokens", 16)
    return collect(stub.Complete(pb.CompleteRequest(prompt=prompt, sampling=sampling(max_tokens, **kw))))


def by_answer(answer: Answer) -> dict[int, list]:
    out: dict[int, list] = {}
    for e in answer.events:
        out.setdefault(e.answer_index, []).append(e)
    return out


async def test_two_hundred_json_schema_answers_at_temperature_one_all_validate(stub) -> None:
    async def one(i: int):
        schema = SCHEMAS[i % len(SCHEMAS)]
        answer = await complete(stub, "Describe something as JSON.<EOQ>", max_tokens=160, temperature=1.0, seed=i,
                                json_schema=json.dumps(schema))
        return schema, answer

    results = await asyncio.gather(*(one(i) for i in range(200)))
    bad = [(schema, answer.text) for schema, answer in results if answer.last.finish_reason != pb.FINISH_REASON_STOP]
    assert not bad, bad[:3]
    for schema, answer in results:
        jsonschema.validate(json.loads(answer.text), schema)


async def test_regex_and_choice_constraints_hold(stub) -> None:
    pattern = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"
    for seed in range(4):
        dated = await complete(stub, "When did it happen?<EOQ>", max_tokens=24, temperature=1.0, seed=seed,
                               regex=pattern)
        assert re.fullmatch(pattern, dated.text), dated.text
        picked = await complete(stub, f"{FRANCE} Answer with one word.<EOQ>", max_tokens=8, temperature=1.0,
                                seed=seed, choice=pb.Choice(choices=["Paris", "Lyon", "Marseille"]))
        assert picked.text in ("Paris", "Lyon", "Marseille")
    choices = pb.Choice(choices=["Berlin", "Paris", "Rome"])
    greedy = await complete(stub, f"{FRANCE}<EOQ>", choice=choices)
    assert greedy.text in choices.choices and greedy.last.finish_reason == pb.FINISH_REASON_STOP
    assert (await complete(stub, f"{FRANCE}<EOQ>", choice=choices)).text == greedy.text


async def test_logprobs_come_with_their_tokens_and_top_alternatives(stub, server: RunningServer) -> None:
    answer = await ask(stub, FRANCE, max_tokens=12, logprobs=True, top_logprobs=3)
    tok = server.servicer.chat.prompts.tokenizer
    for e in answer.events:
        assert [lp.token_id for lp in e.logprobs] == list(e.token_ids)
        for lp in e.logprobs:
            assert lp.token == tok.decode([lp.token_id], skip_special_tokens=False)
            assert len(lp.top) == 3 and [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top),
                                                                               reverse=True)
            assert lp.top[0].token_id == lp.token_id and lp.logprob == pytest.approx(lp.top[0].logprob)
            assert lp.logprob <= 0
    plain = await ask(stub, FRANCE, max_tokens=12)
    assert plain.text == answer.text and not any(e.logprobs for e in plain.events)


async def test_n_answers_share_the_prompt_and_are_stored_as_siblings(stub) -> None:
    answer = await ask(stub, FRANCE, max_tokens=10, n=3, temperature=1.0, seed=5)
    parts = by_answer(answer)
    assert sorted(parts) == [0, 1, 2]
    ids = {i: {e.message_id for e in events} for i, events in parts.items()}
    assert all(len(v) == 1 for v in ids.values()) and len({next(iter(v)) for v in ids.values()}) == 3
    assert all(events[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED for events in parts.values())
    usage = answer.last.usage
    single = await ask(stub, FRANCE, max_tokens=10, temperature=1.0, seed=5)
    assert usage.prompt_tokens == single.last.usage.prompt_tokens  # the prompt counted once
    assert usage.completion_tokens == sum(len([t for e in ev for t in e.token_ids]) for ev in parts.values())
    conv = await stub.GetConversation(pb.GetConversationRequest(id=answer.conversation_id, tree=True))
    assert [m.role for m in conv.messages] == [pb.ROLE_USER] + [pb.ROLE_ASSISTANT] * 3
    texts = {m.id: m.content for m in conv.messages[1:]}
    for i, events in parts.items():
        assert texts[events[0].message_id] == "".join(e.delta for e in events)
    assert conv.active_message_id == parts[0][0].message_id
    assert len(conv.messages[1].sibling_ids) == 3
    again = await ask(stub, FRANCE, max_tokens=10, n=3, temperature=1.0, seed=5)
    assert {i: "".join(e.delta for e in ev) for i, ev in by_answer(again).items()} == \
        {i: "".join(e.delta for e in ev) for i, ev in parts.items()}  # the seed reproduces every answer


async def test_logit_bias_penalties_and_min_tokens_change_the_answer(stub) -> None:
    greedy = await complete(stub, f"{FRANCE}<EOQ>", max_tokens=8)
    first = greedy.token_ids[0]
    banned = await complete(stub, f"{FRANCE}<EOQ>", max_tokens=8, logit_bias={first: -100.0})
    assert banned.token_ids[0] != first
    long = await complete(stub, f"{FRANCE}<EOQ>", max_tokens=60, min_tokens=40)
    assert len(long.token_ids) >= 40
    penalized = await complete(stub, "List the days of the week.<EOQ>", max_tokens=40, frequency_penalty=2.0,
                               presence_penalty=1.0)
    plain = await complete(stub, "List the days of the week.<EOQ>", max_tokens=40)
    assert penalized.token_ids != plain.token_ids
    ids = penalized.token_ids
    assert max(ids.count(t) for t in set(ids)) <= max(plain.token_ids.count(t) for t in set(plain.token_ids))


@pytest.mark.parametrize("kw, words", [
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema='{"type": "objectx"}'), "objectx"),
    (dict(regex="a(b"), "parenthesis"),
    (dict(grammar="root ::= undefined"), "undefined"),
    (dict(choice=pb.Choice(choices=[])), "choice"),
    (dict(n=9), "--max-n"),
    (dict(top_logprobs=2), "needs logprobs"),
    (dict(logit_bias={10**6: 1.0}), "vocabulary"),
    (dict(stop_token_ids=[10**6]), "vocabulary"),
    (dict(presence_penalty=5.0), "presence_penalty"),
])
async def test_bad_output_control_is_invalid_argument_with_the_reason(stub, kw, words) -> None:
    error = await rpc_error(complete(stub, "Hi<EOQ>", **kw))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.details()


async def test_n_answers_cannot_be_detached(stub) -> None:
    error = await rpc_error(collect(stub.Chat(pb.ChatRequest(message=FRANCE, detach=True,
                                                             sampling=sampling(8, n=2)))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "detached" in error.details()


async def test_prompt_logprobs_on_complete_and_refused_on_chat(stub, server: RunningServer) -> None:
    answer = await complete(stub, "The capital of France is", max_tokens=4, prompt_logprobs=True, top_logprobs=2)
    first = answer.events[0]
    tok = server.servicer.chat.prompts.tokenizer
    prompt_ids = tok.encode("The capital of France is", add_special_tokens=True)
    assert [lp.token_id for lp in first.prompt_logprobs] == prompt_ids[1:]
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in first.prompt_logprobs)
    assert all(lp.token == tok.decode([lp.token_id]) for lp in first.prompt_logprobs)
    assert not any(e.prompt_logprobs for e in answer.events[1:])
    assert answer.last.usage.cached_prompt_tokens == 0
    error = await rpc_error(collect(stub.Chat(pb.ChatRequest(message=FRANCE, sampling=sampling(
        4, prompt_logprobs=True)))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in error.details()
