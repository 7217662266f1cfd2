"""The OpenAI-compatible API through the real ``openai`` client, against the real default model: the same greedy
answers as the gRPC API, streamed and not, usage and the prefix cache, stop strings, max_tokens, the models
list, the completions endpoint, the SSE wire format, a client that leaves mid-answer, the request counts."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from eoq.metrics import HTTP_ROUTES
from tests.api.client import FRANCE, ask, collect, engine_idle, sampling, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="package")

CHAT = "POST /v1/chat/completions"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def requests_count(running: RunningServer, rpc: str, code: str) -> float:
    return running.metrics.registry.get_sample_value("eoq_requests_total", {"rpc": rpc, "code": code})


async def test_models_lists_the_one_served_model(client: openai.AsyncOpenAI, model: str) -> None:
    listed = [m async for m in client.models.list()]
    assert [(m.id, m.object, m.owned_by) for m in listed] == [(model, "model", "eoq")]
    assert model == "SmolLM2-135M-Instruct"
    assert (await client.models.retrieve(model)).id == model
    with pytest.raises(openai.NotFoundError) as e:
        await client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message


async def test_chat_completion_equals_the_grpc_chat_answer(client, grpc_stub, model) -> None:
    grpc_answer = await ask(grpc_stub, FRANCE, max_tokens=16)
    reply = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16)
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == grpc_answer.text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and grpc_answer.last.finish_reason == pb.FINISH_REASON_STOP
    assert reply.object == "chat.completion" and reply.model == model and reply.id.startswith("chatcmpl-")
    usage, grpc_usage = reply.usage, grpc_answer.last.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (grpc_usage.prompt_tokens, grpc_usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens < 16


async def test_streamed_chat_completion_equals_the_whole_one(client, model) -> None:
    whole = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16)
    stream = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *answer, finish, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in answer) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in answer] == [None] * len(answer)
    assert finish.choices[0].finish_reason == "stop"
    assert last.choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                                       whole.usage.completion_tokens)
    # Without include_usage: no usage chunk.
    plain = [c async for c in await client.chat.completions.create(model=model, messages=user(FRANCE),
                                                                   max_tokens=16, stream=True)]
    assert plain[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in plain)


async def test_a_repeated_request_hits_the_prefix_cache(client, model) -> None:
    question = "Name three rivers of Europe and the seas they flow into, please, in one sentence each."
    first = await client.chat.completions.create(model=model, messages=user(question), max_tokens=4)
    again = await client.chat.completions.create(model=model, messages=user(question), max_tokens=4)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 32
    cached = again.usage.prompt_tokens_details.cached_tokens
    # Every full block of the prompt but the last token's is found again (block size 16).
    assert cached > first.usage.prompt_tokens_details.cached_tokens
    assert cached >= (again.usage.prompt_tokens - 1) // 16 * 16
    assert again.choices[0].message.content == first.choices[0].message.content


async def test_a_system_message_and_content_parts_render_as_the_grpc_api_does(client, grpc_stub, model) -> None:
    system = "You answer in French."
    grpc_answer = await ask(grpc_stub, FRANCE, system_prompt=system, max_tokens=16)
    reply = await client.chat.completions.create(
        model=model, max_tokens=16,
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                               {"type": "text", "text": "of France?"}]}])
    assert reply.choices[0].message.content == grpc_answer.text
    assert reply.usage.prompt_tokens == grpc_answer.last.usage.prompt_tokens
    # "developer" is OpenAI's newer name for the system role.
    developer = await client.chat.completions.create(
        model=model, max_tokens=16, messages=[{"role": "developer", "content": system}, *user(FRANCE)])
    assert developer.choices[0].message.content == grpc_answer.text


async def test_stop_strings_end_the_answer_before_them(client, model) -> None:
    full = (await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16)
            ).choices[0].message.content
    assert " Paris" in full
    for stop in (" Paris", [" Paris", "never in it"]):
        reply = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16, stop=stop)
        assert reply.choices[0].message.content == full[: full.index(" Paris")]
        assert reply.choices[0].finish_reason == "stop"


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(client, model) -> None:
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        reply = await client.chat.completions.create(model=model, messages=user(FRANCE), **limit)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 3
    stream = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=3, stream=True)
    assert [c.choices[0].finish_reason async for c in stream][-1] == "length"


async def test_a_seeded_sample_is_reproducible_and_equals_the_grpc_one(client, grpc_stub, model) -> None:
    kwargs = {"temperature": 0.9, "seed": 1234, "max_tokens": 24}
    # The first request puts the prompt in the prefix cache. In bfloat16 the prompt's last tokens computed in a
    # short step after cached blocks differ in the last bits from the same tokens computed in the whole prompt,
    # which can move a seeded draw at a near tie; so the compared answers all start from the cached prefix.
    await client.chat.completions.create(model=model, messages=user("Tell me about cats."), **kwargs)
    one = await client.chat.completions.create(model=model, messages=user("Tell me about cats."), **kwargs)
    two = await client.chat.completions.create(model=model, messages=user("Tell me about cats."), **kwargs)
    assert one.usage.prompt_tokens_details.cached_tokens == two.usage.prompt_tokens_details.cached_tokens > 0
    assert one.choices[0].message.content == two.choices[0].message.content
    grpc_answer = await ask(grpc_stub, "Tell me about cats.", max_tokens=24, temperature=0.9, seed=1234)
    assert one.choices[0].message.content == grpc_answer.text


async def test_a_whole_conversation_is_answered_statelessly(client, model) -> None:
    reply = await client.chat.completions.create(model=model, max_tokens=24, messages=[
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": "Nice to meet you, Ada! I will remember your name."},
        {"role": "user", "content": "What is my name?"},
    ])
    assert "Ada" in reply.choices[0].message.content


async def test_completions_equal_the_grpc_complete_answer(client, grpc_stub, model) -> None:
    prompt = "Once upon a time"
    grpc_answer = await collect(grpc_stub.Complete(pb.CompleteRequest(prompt=prompt, sampling=sampling(16))))
    reply = await client.completions.create(model=model, prompt=prompt, max_tokens=16)
    [choice] = reply.choices
    assert choice.text == grpc_answer.text and choice.finish_reason == "length"
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (grpc_answer.last.usage.prompt_tokens, 16)
    stream = await client.completions.create(model=model, prompt=[prompt], max_tokens=16, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_answer.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # A prompt ending in <EOQ> is one question in the chat template, as on the gRPC API.
    question = await client.completions.create(model=model, prompt=FRANCE + "<EOQ>", max_tokens=16)
    assert "Paris" in question.choices[0].text


async def test_the_stream_is_server_sent_events(raw, model) -> None:
    body = {"model": model, "messages": user(FRANCE), "max_tokens": 16, "stream": True}
    async with raw.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache" and len(response.headers["x-request-id"]) == 24
        text = (await response.aread()).decode()
    assert text.endswith("\n\ndata: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = []
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e, e  # one data line per event
        chunks.append(json.loads(e.removeprefix("data: ")))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert {c["id"] for c in chunks} == {"chatcmpl-" + response.headers["x-request-id"]}
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


async def test_a_client_that_leaves_mid_stream_ends_its_generation(http_server: RunningServer, raw, model) -> None:
    cancelled = requests_count(http_server, CHAT, "CANCELLED")
    body = {"model": model, "messages": user("Tell me a long story."), "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    async with raw.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        assert http_server.engine.num_unfinished == 1 and http_server.http.api.num_active == 1
    # Closing the response closed the connection: the generation is aborted, its place given back.
    await wait_for(lambda: engine_idle(http_server) and http_server.http.api.num_active == 0, 10.0,
                   "the engine idle after the client left")
    await wait_for(lambda: requests_count(http_server, CHAT, "CANCELLED") == cancelled + 1, 5.0, "counted")


async def test_a_client_that_leaves_before_a_whole_answer_ends_its_generation(http_server, raw, model) -> None:
    body = {"model": model, "messages": user("Tell me a long story."), "max_tokens": 2000, "ignore_eos": True}
    request = asyncio.create_task(raw.post("/v1/chat/completions", json=body))
    await wait_for(lambda: http_server.engine.num_unfinished == 1, 10.0, "generating")
    request.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await request
    await wait_for(lambda: engine_idle(http_server) and http_server.http.api.num_active == 0, 10.0,
                   "the engine idle after the client left")


async def test_requests_are_counted_by_route_and_status_name(http_server: RunningServer, client, model) -> None:
    for route in HTTP_ROUTES:  # every series exists before its first request (rate() needs a first sample)
        assert requests_count(http_server, route, "INTERNAL") is not None
    ok, bad = requests_count(http_server, CHAT, "OK"), requests_count(http_server, CHAT, "INVALID_ARGUMENT")
    await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=1, temperature=-1)
    assert requests_count(http_server, CHAT, "OK") == ok + 1
    assert requests_count(http_server, CHAT, "INVALID_ARGUMENT") == bad + 1
    models = requests_count(http_server, "GET /v1/models", "OK")
    await client.models.list()
    assert requests_count(http_server, "GET /v1/models", "OK") == models + 1
