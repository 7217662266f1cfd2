"""Answers that survive a dropped connection: detached Chat and Regenerate, WatchAnswer on the same replica and
on a second one sharing the Redis store, CancelAnswer from anywhere, the tenant's limit, retention, and a server
SIGKILLed mid-answer — all over real gRPC with the real default model and a real redis-server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, ask, collect, connect, rpc_error, sampling, serving, wait_for
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

LONG = "Write a long story about a lighthouse keeper."


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def replica_b(shared_redis: RedisServer) -> AsyncIterator[RunningServer]:
    """A second replica on the same Redis, keeping finished answers' events 1 s, 2 detached answers a tenant."""
    async with serving(redis_url=shared_redis.url, answer_retention_seconds=1.0,
                       max_detached_answers_per_tenant=2) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def stub_b(replica_b: RunningServer) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with connect(replica_b) as s:
        yield s


def detached(message: str, conversation_id: str = "", max_tokens: int = 120) -> pb.ChatRequest:
    return pb.ChatRequest(conversation_id=conversation_id, message=message, detach=True,
                          sampling=sampling(max_tokens, ignore_eos=True))


async def read_some_then_drop(call, n: int) -> list[pb.ChatEvent]:
    """Read ``n`` events of a stream, then go away as a client whose connection broke."""
    events = [await call.read() for _ in range(n)]
    call.cancel()
    return events


async def rest_of(call) -> list[pb.ChatEvent]:
    """The events of a stream already read from with ``read()``, to its end."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def watch(stub, event: pb.ChatEvent, after: int) -> list[pb.ChatEvent]:
    request = pb.WatchAnswerRequest(conversation_id=event.conversation_id, message_id=event.message_id,
                                    after_sequence=after)
    return [e async for e in stub.WatchAnswer(request)]


async def stored_answer(stub, event: pb.ChatEvent) -> pb.Message:
    conv = await stub.GetConversation(pb.GetConversationRequest(id=event.conversation_id, tree=True))
    return next(m for m in conv.messages if m.id == event.message_id)


def check_whole(events: list[pb.ChatEvent], stored: pb.Message) -> None:
    """Every event once, in order, ending with the last: their deltas are the stored answer."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert all(e.finish_reason == pb.FINISH_REASON_UNSPECIFIED for e in events[:-1])
    assert "".join(e.delta for e in events) == stored.content
    assert stored.finish_reason == events[-1].finish_reason and not stored.generating


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_dropped_detached_answer_is_watched_to_the_end_on_the_same_replica(stub, seed: int) -> None:
    n = random.Random(seed).randint(1, 25)
    seen = await read_some_then_drop(stub.Chat(detached(LONG)), n)
    rest = await watch(stub, seen[-1], after=n)
    stored = await stored_answer(stub, seen[-1])
    check_whole(seen + rest, stored)
    assert stored.finish_reason == pb.FINISH_REASON_LENGTH  # it went on after the client left: all 120 tokens
    assert rest[-1].usage.completion_tokens == 120


@pytest.mark.parametrize("seed", [3, 4])
async def test_a_dropped_detached_answer_is_watched_to_the_end_from_another_replica(stub, stub_b, seed: int) -> None:
    n = random.Random(seed).randint(1, 25)
    seen = await read_some_then_drop(stub.Chat(detached(LONG)), n)
    rest = await watch(stub_b, seen[-1], after=n)
    check_whole(seen + rest, await stored_answer(stub_b, seen[-1]))
    # Watching from the start on either replica gives the same events again.
    again = await watch(stub_b, seen[-1], after=0)
    assert [(e.sequence, e.delta) for e in again] == [(e.sequence, e.delta) for e in seen + rest]


async def test_a_watcher_after_the_end_gets_the_whole_answer(stub, stub_b) -> None:
    events = await collect(stub_b.Chat(detached(FRANCE, max_tokens=40)))
    last = events.last
    # Within the retention: the same events, exactly.
    replay = await watch(stub, last, after=0)
    assert [(e.sequence, e.delta) for e in replay] == [(e.sequence, e.delta) for e in events.events]
    assert [e.sequence for e in await watch(stub, last, after=3)][0] == 4
    # After it (1 s on replica b, which wrote it): the whole answer from the store, once.
    await asyncio.sleep(1.5)
    whole = await watch(stub, last, after=0)
    assert len(whole) == 1 and whole[0].delta == events.text and whole[0].finish_reason == last.finish_reason
    error = await rpc_error(collect(stub.WatchAnswer(pb.WatchAnswerRequest(
        conversation_id=last.conversation_id, message_id=last.message_id, after_sequence=3))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # An answer that was never detached replays whole too.
    plain = await ask(stub, FRANCE)
    whole = await watch(stub_b, plain.last, after=0)
    assert [e.delta for e in whole] == [plain.text]


async def test_cancel_answer_from_another_replica(stub, stub_b) -> None:
    call = stub.Chat(detached(LONG, max_tokens=400))
    first = await call.read()
    busy = await rpc_error(collect(stub_b.Chat(pb.ChatRequest(conversation_id=first.conversation_id,
                                                              message=FRANCE))))
    assert busy.code() == grpc.StatusCode.ABORTED  # one answer at a time, across replicas
    reply = await stub_b.CancelAnswer(pb.CancelAnswerRequest(conversation_id=first.conversation_id,
                                                             message_id=first.message_id))
    assert reply.was_running
    rest = await rest_of(call)  # the asker's stream ends with the cancel
    assert rest[-1].finish_reason == pb.FINISH_REASON_CANCELLED
    stored = await stored_answer(stub, first)
    check_whole([first, *rest], stored)
    assert 0 < rest[-1].sequence < 400
    reply = await stub.CancelAnswer(pb.CancelAnswerRequest(conversation_id=first.conversation_id,
                                                           message_id=first.message_id))
    assert not reply.was_running
    # The lock went with the answer: the conversation takes a question at once.
    assert (await ask(stub_b, FRANCE, first.conversation_id)).last.finish_reason == pb.FINISH_REASON_STOP


async def test_a_detached_regenerate_and_the_tenants_limit(stub, stub_b, replica_b: RunningServer) -> None:
    first = await ask(stub, FRANCE)
    calls = [stub_b.Regenerate(pb.RegenerateRequest(conversation_id=first.conversation_id, detach=True,
                                                    sampling=sampling(300, ignore_eos=True)))]
    firsts = [await calls[0].read()]
    assert firsts[0].user_message_id == first.last.user_message_id
    calls.append(stub_b.Chat(detached(LONG, max_tokens=300)))
    firsts.append(await calls[1].read())
    # Replica b allows a tenant 2 detached answers (counted in Redis, across replicas).
    error = await rpc_error(collect(stub_b.Chat(detached(LONG))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_detached_answers_per_tenant" in error.details()
    for call, event in zip(calls, firsts):
        call.cancel()  # the askers go away; the answers go on
        await stub.CancelAnswer(pb.CancelAnswerRequest(conversation_id=event.conversation_id,
                                                       message_id=event.message_id))
    for event in firsts:
        events = await watch(stub, event, after=0)
        assert events[-1].finish_reason == pb.FINISH_REASON_CANCELLED
    # Both ended: the tenant may start detached answers again.
    await wait_for(lambda: replica_b.servicer.num_streaming == 0, 10, "replica b's detached answers ended")
    again = await collect(stub_b.Chat(detached(FRANCE, max_tokens=8)))
    assert again.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    messages = (await stub.GetConversation(pb.GetConversationRequest(id=first.conversation_id))).messages
    assert len(messages[1].sibling_ids) == 2  # the regenerated answer is the first answer's sibling
