"""Output control through the real ``openai`` client (default model): response_format json_schema, n choices
(streamed and not), logprobs / top_logprobs in OpenAI's shapes, logit_bias, vLLM's structured_outputs."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.api.client import FRANCE

pytestmark = pytest.mark.asyncio(loop_scope="package")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_json_schema_response_format_in_n_choices(client: openai.AsyncOpenAI, model: str) -> None:
    reply = await client.chat.completions.create(
        model=model, messages=user("Invent a person."), max_tokens=80, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for c in reply.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    single = await client.chat.completions.create(model=model, messages=user("Invent a person."), max_tokens=80,
                                                  temperature=1.0, seed=3)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    obj = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=60,
                                               response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


async def test_streamed_n_choices_equal_the_whole_ones(client, model) -> None:
    kw = dict(model=model, messages=user(FRANCE), max_tokens=12, temperature=1.0, seed=11, n=2)
    whole = await client.chat.completions.create(**kw)
    stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_logprobs_in_openai_shape(client, model, http_server) -> None:
    reply = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=10, logprobs=True,
                                                 top_logprobs=4)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 4 and t.top_logprobs[0].token == t.token  # greedy: the most likely
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    legacy = await client.completions.create(model=model, prompt=f"{FRANCE}<EOQ>", max_tokens=6, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                        lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


async def test_logit_bias_and_structured_outputs_extensions(client, model, grpc_stub) -> None:
    from eoq._proto.chat.v1 import chat_pb2 as pb
    from tests.api.client import collect, sampling

    greedy = await collect(grpc_stub.Complete(pb.CompleteRequest(prompt=f"{FRANCE}<EOQ>", sampling=sampling(6))))
    plain = await client.completions.create(model=model, prompt=f"{FRANCE}<EOQ>", max_tokens=6)
    assert plain.choices[0].text == greedy.text
    banned = await client.completions.create(model=model, prompt=f"{FRANCE}<EOQ>", max_tokens=6,
                                             logit_bias={str(greedy.token_ids[0]): -100})
    assert banned.choices[0].text != greedy.text
    ids = await client.completions.create(model=model, prompt=f"{FRANCE}<EOQ>", max_tokens=6,
                                          extra_body={"structured_outputs": {"regex": r"[0-9]{3}"}})
    assert re.fullmatch(r"[0-9]{3}", ids.choices[0].text)
    pick = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=6,
                                                extra_body={"structured_outputs": {"choice": ["Paris", "Rome"]}})
    assert pick.choices[0].message.content in ("Paris", "Rome")
