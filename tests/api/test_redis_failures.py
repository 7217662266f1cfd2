"""Redis killed, frozen or gone at the end of an answer: calls fail fast with UNAVAILABLE, nothing is written
half-way, and the server serves again, history intact, once Redis is back (no restart)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, ask, connect, engine_idle, rpc_error, sampling, serving, wait_for
from tests.conftest import RedisServer, redis_fixture

pytestmark = pytest.mark.asyncio(loop_scope="package")

LOCK_TTL = 3.0


redis = redis_fixture("module", "This module's own redis-server: its tests kill and freeze it.")


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def server(redis: RedisServer) -> AsyncIterator[RunningServer]:
    async with serving(redis_url=redis.url, redis_timeout_seconds=0.5, redis_wait_timeout_ms=100,
                       lock_ttl_seconds=LOCK_TTL) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="package")
async def stub(server: RunningServer, redis: RedisServer):
    if not redis.running:  # a failed test left it down
        redis.start()
    async with connect(server) as s:
        yield s


def store_errors(server: RunningServer, operation: str) -> float:
    return server.metrics.registry.get_sample_value("eoq_redis_errors_total", {"operation": operation})


async def assert_unavailable_fast(call, redis: RedisServer) -> None:
    start = time.monotonic()
    error = await rpc_error(call)
    assert time.monotonic() - start < 3.0  # the 0.5 s timeout, not a hang
    assert_unavailable(error, redis)


def assert_unavailable(error: grpc.aio.AioRpcError, redis: RedisServer) -> None:
    """UNAVAILABLE that says what to do, naming neither Redis' address nor the client library's exception."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "conversation store unreachable: retry later"
    for internal in (str(redis.port), "127.0.0.1", "Error", "Connection refused", "Timeout"):
        assert internal not in error.details()


async def test_redis_killed_between_turns(server: RunningServer, stub, redis: RedisServer) -> None:
    first = await ask(stub, FRANCE, max_tokens=32)
    cid = first.conversation_id
    listed = await stub.ListConversations(pb.ListConversationsRequest(page_size=100))
    redis.stop()
    errors = store_errors(server, "get")
    await assert_unavailable_fast(ask(stub, "And of Germany?", cid, max_tokens=32), redis)
    await assert_unavailable_fast(stub.GetConversation(pb.GetConversationRequest(id=cid)), redis)
    assert store_errors(server, "get") - errors == 2
    await assert_unavailable_fast(ask(stub, FRANCE), redis)  # a new conversation
    await assert_unavailable_fast(stub.ListConversations(pb.ListConversationsRequest()), redis)
    await assert_unavailable_fast(stub.CreateConversation(pb.CreateConversationRequest()), redis)
    assert engine_idle(server)

    redis.start()
    second = await ask(stub, "And of Germany?", cid, max_tokens=32)
    assert "Berlin" in second.text  # the first turn came back from Redis' append-only file
    conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert [m.content for m in conv.messages] == [FRANCE, first.text, "And of Germany?", second.text]
    assert conv.message_count == 4
    relisted = await stub.ListConversations(pb.ListConversationsRequest(page_size=100))
    # The refused calls created nothing.
    assert [c.id for c in relisted.conversations] == [c.id for c in listed.conversations]
    assert relisted.conversations[0].id == cid


async def test_redis_frozen_times_out(server: RunningServer, stub, redis: RedisServer) -> None:
    cid = (await ask(stub, FRANCE, max_tokens=8)).conversation_id
    redis.pause()
    try:
        await assert_unavailable_fast(ask(stub, "And of Germany?", cid), redis)
    finally:
        redis.resume()
    await ask(stub, "And of Germany?", cid, max_tokens=8)
    conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert [m.content for m in conv.messages[::2]] == [FRANCE, "And of Germany?"]


async def test_redis_down_when_the_answer_ends(server: RunningServer, stub, redis: RedisServer) -> None:
    first = await ask(stub, FRANCE, max_tokens=8)
    cid = first.conversation_id
    call = stub.Chat(pb.ChatRequest(conversation_id=cid, message="Tell me a story.",
                                    sampling=sampling(64, ignore_eos=True)))
    events = call.__aiter__()
    received = [await events.__anext__()]
    redis.stop()
    assert server.servicer.num_streaming == 1  # Redis died while the answer streamed

    last_event_at = time.monotonic()

    async def rest() -> None:
        nonlocal last_event_at
        async for event in events:
            received.append(event)
            last_event_at = time.monotonic()

    assert_unavailable(await rpc_error(rest()), redis)
    assert time.monotonic() - last_event_at < 3.0
    # The answer was never stored, so its end never went out.
    assert all(e.finish_reason == pb.FINISH_REASON_UNSPECIFIED for e in received)
    await wait_for(lambda: engine_idle(server), 3.0, "the engine is idle")

    redis.start()
    conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert [(m.content, m.finish_reason) for m in conv.messages] == [
        (FRANCE, pb.FINISH_REASON_UNSPECIFIED), (first.text, first.last.finish_reason)]
    assert conv.message_count == 2
    # The lease could not be released while Redis was down; it expires by itself within its time-to-live.
    deadline = time.monotonic() + LOCK_TTL + 3
    while True:
        try:
            answer = await ask(stub, "And of Germany?", cid, max_tokens=8)
            break
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.ABORTED and time.monotonic() < deadline, e
            await asyncio.sleep(0.2)
    conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert [m.content for m in conv.messages] == [FRANCE, first.text, "And of Germany?", answer.text]
