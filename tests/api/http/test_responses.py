"""OpenAI's Responses and Conversations APIs on eoq's conversation trees, through the real ``openai`` client (sync
and async) against the real default model: stored responses continued with ``previous_response_id`` over three
turns (cached tokens grow), branches, ``store: false``, streaming with the Responses event types, background
responses resumed from a sequence number (every event exactly once), cancel, and conversations."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pydantic
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE
from tests.api.http.conftest import base_url, raw_client

pytestmark = pytest.mark.asyncio(loop_scope="package")

GERMANY = "What is the capital of Germany?"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ITALY = "What is the capital of Italy?"


async def test_three_turns_with_previous_response_id(client: openai.AsyncOpenAI, model: str, grpc_stub) -> None:
    first = await client.responses.create(model=model, input=FRANCE, max_output_tokens=24)
    assert first.status == "completed" and "Paris" in first.output_text
    assert first.id.startswith("resp_") and first.conversation is not None
    second = await client.responses.create(model=model, input=GERMANY, previous_response_id=first.id,
                                           max_output_tokens=24)
    third = await client.responses.create(model=model, input=ITALY, previous_response_id=second.id,
                                          max_output_tokens=24)
    assert "Berlin" in second.output_text and "Rome" in third.output_text
    assert third.previous_response_id == second.id and third.conversation.id == first.conversation.id
    cached = [r.usage.input_tokens_details.cached_tokens for r in (first, second, third)]
    # Each turn's history comes from the prefix cache: the cached part grows, and by the third turn all but the
    # last partial block of the second turn's prompt is cached. (The first turn may already find its first
    # blocks cached: earlier tests asked the same question.)
    assert cached[0] <= cached[1] < cached[2], cached
    assert cached[2] >= second.usage.input_tokens - 16, (cached, second.usage.input_tokens)
    assert third.usage.input_tokens > second.usage.input_tokens
    # The same conversation over gRPC: three turns on one branch.
    cid = first.conversation.id.removeprefix("conv_")
    conv = await grpc_stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert [m.content for m in conv.messages][::2] == [FRANCE, GERMANY, ITALY]
    assert conv.messages[-1].content == third.output_text
    # Retrieved later: the same text and status.
    got = await client.responses.retrieve(third.id)
    assert (got.output_text, got.status, got.previous_response_id) == (third.output_text, "completed", second.id)


async def test_a_previous_response_id_that_is_not_the_latest_branches(client: openai.AsyncOpenAI, model: str) -> None:
    first = await client.responses.create(model=model, input=FRANCE, max_output_tokens=24)
    await client.responses.create(model=model, input=GERMANY, previous_response_id=first.id, max_output_tokens=24)
    branch = await client.responses.create(model=model, input=ITALY, previous_response_id=first.id,
                                           max_output_tokens=24)
    assert "Rome" in branch.output_text
    items = await client.conversations.items.list(branch.conversation.id, order="asc")
    texts = [item.content[0].text for item in items.data]
    assert texts[0] == FRANCE and texts[2] == ITALY and len(texts) == 4  # the active branch: the new one
    assert len(items.data[2].model_extra["sibling_ids"]) == 2  # GERMANY and ITALY hang from the first answer


async def test_store_false_answers_without_storing(client: openai.AsyncOpenAI, model: str) -> None:
    first = await client.responses.create(model=model, input=FRANCE, max_output_tokens=24)
    stateless = await client.responses.create(model=model, input=GERMANY, previous_response_id=first.id,
                                              store=False, max_output_tokens=24)
    assert "Berlin" in stateless.output_text and stateless.store is False
    assert stateless.usage.input_tokens_details.cached_tokens > 0  # the stored branch's prefix, still cached
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(stateless.id)
    items = await client.conversations.items.list(first.conversation.id)
    assert len(items.data) == 2  # nothing was added


async def test_input_items_instructions_and_the_sync_client(http_server: RunningServer, model: str) -> None:
    def run() -> openai.types.responses.Response:
        with openai.OpenAI(base_url=base_url(http_server) + "/v1", api_key="unused", max_retries=0) as sync:
            return sync.responses.create(
                model=model, instructions="Answer in one short sentence.", max_output_tokens=24,
                input=[{"role": "user", "content": FRANCE}, {"role": "assistant", "content": "Paris."},
                       {"role": "user", "content": [{"type": "input_text", "text": GERMANY}]}])

    response = await asyncio.to_thread(run)
    assert "Berlin" in response.output_text
    async with raw_client(http_server) as raw:
        items = (await raw.get(f"/v1/conversations/{response.conversation.id}/items", params={"order": "asc"})).json()
    assert [i["content"][0]["text"] for i in items["data"]][:3] == [FRANCE, "Paris.", GERMANY]


async def test_streaming_has_the_responses_event_types(client: openai.AsyncOpenAI, model: str) -> None:
    stream = await client.responses.create(model=model, input=FRANCE, max_output_tokens=24, stream=True)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == done.output_text and "Paris" in deltas and done.status == "completed"
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    assert done.usage.output_tokens > 0


async def test_a_background_response_resumed_from_a_sequence_number(http_server: RunningServer, model: str,
                                                                   client: openai.AsyncOpenAI) -> None:
    """Read part of a background stream, drop it, resume with starting_after: every event exactly once."""
    async with raw_client(http_server) as raw:
        seen: list[dict] = []
        async with raw.stream("POST", "/v1/responses", json={
                "model": model, "input": "Write a long story about a lighthouse.", "stream": True,
                "background": True, "max_output_tokens": 120, "ignore_eos": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 12:
                        break  # the connection drops here
        rid = seen[0]["response"]["id"]
        last = seen[-1]["sequence_number"]
        rest: list[dict] = []
        async with raw.stream("GET", f"/v1/responses/{rid}", params={"stream": "true",
                                                                     "starting_after": last}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    rest.append(json.loads(line[6:]))
    events = seen + rest
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # no duplicate, in order
    assert rest[0]["sequence_number"] > last
    assert events[-1]["type"] == "response.incomplete"  # max_output_tokens reached
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text
    stored = await client.responses.retrieve(rid)
    assert stored.output_text == text and stored.status == "incomplete"
    # Through the openai client too: the whole stream again from the start.
    replay = [e async for e in await client.responses.retrieve(rid, stream=True, starting_after=0)]
    assert [e.sequence_number for e in replay] == [n for n in numbers if n > 0]


async def test_background_without_stream_then_poll_and_cancel(client: openai.AsyncOpenAI, model: str) -> None:
    started = await client.responses.create(model=model, input="Write a long story.", background=True,
                                            max_output_tokens=400, extra_body={"ignore_eos": True})
    assert started.status == "in_progress" and started.background
    polled = await client.responses.retrieve(started.id)
    assert polled.status == "in_progress"
    cancelled = await client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    for _ in range(100):
        final = await client.responses.retrieve(started.id)
        if final.status != "in_progress":
            break
        await asyncio.sleep(0.05)
    assert final.status == "cancelled" and final.output_text
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=model, input=FRANCE, background=True, store=False)


async def test_conversations_create_get_items_delete(client: openai.AsyncOpenAI, model: str) -> None:
    conv = await client.conversations.create(items=[{"type": "message", "role": "system",
                                                     "content": "You are a helpful assistant."}])
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    response = await client.responses.create(model=model, input=FRANCE, conversation=conv.id, max_output_tokens=24)
    assert "Paris" in response.output_text and response.conversation.id == conv.id
    again = await client.responses.create(model=model, input=GERMANY, conversation=conv.id, max_output_tokens=24)
    assert again.usage.input_tokens_details.cached_tokens > 0
    items = await client.conversations.items.list(conv.id, order="asc")
    assert [i.role for i in items.data] == ["user", "assistant", "user", "assistant"]
    assert (await client.conversations.retrieve(conv.id)).id == conv.id
    deleted = await client.conversations.delete(conv.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conv.id)


async def test_regenerate_and_switch_branches_extensions(http_server: RunningServer, model: str,
                                                         client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model=model, input=FRANCE, max_output_tokens=24)
    conv = first.conversation.id
    async with raw_client(http_server) as raw:
        r = await raw.post(f"/v1/conversations/{conv}/regenerate",
                           json={"model": model, "temperature": 1.0, "seed": 5, "max_output_tokens": 24})
        assert r.status_code == 200, r.text
        regenerated = r.json()
        assert regenerated["id"] != first.id and regenerated["status"] in ("completed", "incomplete")
        items = (await raw.get(f"/v1/conversations/{conv}/items", params={"order": "asc"})).json()
        answer = items["data"][1]
        assert answer["response_id"] == regenerated["id"]
        assert answer["sibling_ids"] == [f"msg_{first.id.removeprefix('resp_')}", answer["id"]]
        r = await raw.post(f"/v1/conversations/{conv}/active", json={"item_id": answer["sibling_ids"][0]})
        assert r.json()["data"][1]["content"][0]["text"] == first.output_text
        # An edit of the first question: parent_item_id is the conversation itself.
        r = await raw.post("/v1/responses", json={"model": model, "input": GERMANY, "conversation": conv,
                                                  "parent_item_id": conv, "max_output_tokens": 24})
        assert "Berlin" in r.json()["output"][0]["content"][0]["text"]
        tree = (await raw.get(f"/v1/conversations/{conv}/items", params={"branch": "tree"})).json()
        assert len(tree["data"]) == 5
        listed = (await raw.get("/v1/conversations", params={"limit": 100})).json()
        assert conv in [c["id"] for c in listed["data"]]


async def test_errors_in_openai_shape(client: openai.AsyncOpenAI, model: str, http_server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_" + "0" * 32 + "-" + "0" * 16)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=model, input=FRANCE, previous_response_id="resp_nonsense")
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model=model, input=FRANCE, tools=[{"type": "web_search"}])
    assert e.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model=model, input=[{"role": "assistant", "content": "hi"}])
    assert e.value.param is not None and e.value.param.startswith("input")
    first = await client.responses.create(model=model, input=FRANCE, max_output_tokens=8)
    other = await client.responses.create(model=model, input=FRANCE, max_output_tokens=8)
    with pytest.raises(openai.BadRequestError):  # a response of another conversation as parent
        await client.responses.create(model=model, input=GERMANY, conversation=first.conversation.id,
                                      extra_body={"parent_item_id": "msg_" + other.id.removeprefix("resp_")})
    async with raw_client(http_server) as raw:
        r = await raw.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        # Busy: a second question while a background answer streams in the same conversation.
        started = await client.responses.create(model=model, input="Write a long story.", background=True,
                                                max_output_tokens=300, extra_body={"ignore_eos": True})
        r = await raw.post("/v1/responses", json={"model": model, "input": FRANCE,
                                                  "previous_response_id": first.id})
        assert r.status_code == 200  # another branch's leaf... of another conversation: fine
        r = await raw.post("/v1/responses", json={"model": model, "input": FRANCE,
                                                  "conversation": started.conversation.id})
        assert r.status_code == 409 and r.json()["error"]["type"] == "invalid_request_error"
        await client.responses.cancel(started.id)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


async def test_structured_output_through_text_format(client: openai.AsyncOpenAI, model: str,
                                                      http_server: RunningServer) -> None:
    """``text.format`` (the schema in the format itself, as the Responses API has it): json_schema, json_object,
    streamed, regenerated (eoq's extension), and the client's ``responses.parse`` into a pydantic model; the format
    is echoed."""
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    made = await client.responses.create(model=model, input="Invent a person.", max_output_tokens=80,
                                         temperature=1.0, extra_body={"seed": 5}, text={"format": fmt})
    assert made.status == "completed"
    jsonschema.validate(json.loads(made.output_text), PERSON)
    assert made.text.format.type == "json_schema" and made.text.format.name == "person"
    async with raw_client(http_server) as raw:
        r = await raw.post(f"/v1/conversations/{made.conversation.id}/regenerate",
                           json={"model": model, "temperature": 1.0, "seed": 6, "max_output_tokens": 80,
                                 "text": {"format": fmt}})
        assert r.status_code == 200, r.text
        again = r.json()
    assert again["text"]["format"]["name"] == "person"
    jsonschema.validate(json.loads(again["output"][0]["content"][0]["text"]), PERSON)
    parsed = await client.responses.parse(model=model, input="Invent a person.", max_output_tokens=80,
                                          text_format=Person)
    assert isinstance(parsed.output_parsed, Person), parsed.output_text
    obj = await client.responses.create(model=model, input=FRANCE, max_output_tokens=60, store=False,
                                        text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(obj.output_text), dict)
    text = ""
    async with client.responses.stream(model=model, input="Invent a person.", max_output_tokens=80,
                                       text={"format": fmt}) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = await stream.get_final_response()
    jsonschema.validate(json.loads(text), PERSON)
    assert final.output_text == text and final.text.format.type == "json_schema"
    plain = await client.responses.create(model=model, input=FRANCE, max_output_tokens=8, store=False,
                                          text={"format": {"type": "text"}})
    assert plain.text.format.type == "text" and plain.output_text


@pytest.mark.parametrize("text, param", [
    ({"format": {"type": "xml"}}, "text.format.type"),
    ({"format": {"type": "json_schema", "name": "x"}}, "text.format.schema"),
    ({"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}, None),  # xgrammar's reason
    ("json", "text"),
])
async def test_a_text_format_it_cannot_follow_is_refused(client: openai.AsyncOpenAI, model: str, text,
                                                         param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model=model, input=FRANCE, max_output_tokens=8, store=False,
                                      extra_body={"text": text})
    assert e.value.param == param and e.value.code in ("invalid_value", "invalid_type"), e.value.body
