"""Shutdown: the drain lets streaming answers finish (and stores them), refuses new calls, reports NOT_SERVING,
and cuts what is left after the grace period (stored as cancelled). Last, the real thing: ``eoq serve`` in its
own process, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import RunningServer, start_server
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import Conversation, Role
from eoq.engine.types import FinishReason
from tests.api.client import FRANCE, SERVICE, ask, rpc_error, sampling, server_settings, wait_for
from tests.conftest import RedisServer, _free_port, model_cache_dir

pytestmark = pytest.mark.asyncio(loop_scope="package")

STORY = "Tell me a long story about a lighthouse keeper."
SHUTTING_DOWN = "the server is shutting down; retry (another replica will answer)"


@asynccontextmanager
async def channel(port: int) -> AsyncIterator[tuple[chat_pb2_grpc.ChatServiceStub, health_pb2_grpc.HealthStub]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch), health_pb2_grpc.HealthStub(ch)


async def health_of(health: health_pb2_grpc.HealthStub) -> list[int]:
    return [(await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status for s in ("", SERVICE)]


async def start_long_answer(stub, max_tokens: int):
    call = stub.Chat(pb.ChatRequest(message=STORY, sampling=sampling(max_tokens, ignore_eos=True)))
    events = call.__aiter__()
    return call, events, await events.__anext__()


async def stored_conversation(redis: RedisServer, conversation_id: str) -> Conversation:
    """Read straight from Redis, as any replica would after this one is gone."""
    store = RedisConversationStore(redis.url, ttl_seconds=3600)
    try:
        return await store.get("public", conversation_id)
    finally:
        await store.close()


@pytest_asyncio.fixture(loop_scope="package")
async def running(shared_redis: RedisServer) -> AsyncIterator[RunningServer]:
    """A server of its own, for the test to drain; stopped here if the test failed before draining it."""
    running = await start_server(server_settings(redis_url=shared_redis.url))
    yield running
    if not running.servicer.draining:
        await running.drain_and_stop(0)


async def test_drain_lets_the_streaming_answer_finish(shared_redis: RedisServer, running: RunningServer) -> None:
    async with channel(running.port) as (stub, health):
        call, events, first = await start_long_answer(stub, 64)
        assert running.servicer.num_streaming == 1
        drain = asyncio.create_task(running.drain_and_stop(60))
        await wait_for(lambda: running.servicer.draining, 3.0, "draining")
        assert await health_of(health) == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
        assert running.metrics.registry.get_sample_value("eoq_serving") == 0
        error = await rpc_error(ask(stub, FRANCE))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        error = await rpc_error(stub.Complete(pb.CompleteRequest(prompt="Hi", sampling=sampling())).read())
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        rest = [e async for e in events]
        assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(drain, 30)
    text = first.delta + "".join(e.delta for e in rest)
    assert (rest[-1].finish_reason, rest[-1].usage.completion_tokens) == (pb.FINISH_REASON_LENGTH, 64)
    conv = await stored_conversation(shared_redis, first.conversation_id)
    assert [(m.role, m.content, m.finish_reason) for m in conv.messages] == [
        (Role.USER, STORY, None), (Role.ASSISTANT, text, FinishReason.LENGTH)]


async def test_drain_past_the_grace_period_cuts_the_answer_and_stores_it_cancelled(
    shared_redis: RedisServer, running: RunningServer
) -> None:
    async with channel(running.port) as (stub, _):
        _, events, first = await start_long_answer(stub, 2000)
        assert running.servicer.num_streaming == 1
        await running.drain_and_stop(0.2)
        received = [first]

        async def rest() -> None:
            async for event in events:
                received.append(event)

        await rest()  # the stream ends normally, its last event saying why
        assert received[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert all(e.finish_reason == pb.FINISH_REASON_UNSPECIFIED for e in received[:-1])
        assert received[-1].usage.completion_tokens < 2000
    conv = await stored_conversation(shared_redis, first.conversation_id)
    [question, answer] = conv.messages
    assert (question.content, answer.finish_reason) == (STORY, FinishReason.CANCELLED)
    assert answer.content == "".join(e.delta for e in received)


async def test_sigterm_drains_and_exits_zero(shared_redis: RedisServer, tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eoq.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--http-port", "0", "--redis-url", shared_redis.url,
            "--kv-cache-memory-gb", "0.5",
            "--cache-dir", str(model_cache_dir()), "--grace-period-seconds", "60",
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        async with channel(port) as (stub, health):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while True:
                assert proc.returncode is None, log_path.read_text()
                try:
                    if await health_of(health) == [health_pb2.HealthCheckResponse.SERVING] * 2:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert loop.time() < deadline, "not SERVING within 120 s"
                await asyncio.sleep(0.2)

            assert "Paris" in (await ask(stub, FRANCE, max_tokens=32)).text
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode())
            assert 'eoq_requests_total{code="OK",rpc="Chat"} 1.0' in metrics.splitlines()
            assert "eoq_serving 1.0" in metrics.splitlines()

            _, events, first = await start_long_answer(stub, 96)
            proc.send_signal(signal.SIGTERM)
            while await health_of(health) != [health_pb2.HealthCheckResponse.NOT_SERVING] * 2:
                await asyncio.sleep(0.02)
            error = await rpc_error(ask(stub, FRANCE))
            assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            rest = [e async for e in events]
        assert (rest[-1].finish_reason, rest[-1].usage.completion_tokens) == (pb.FINISH_REASON_LENGTH, 96)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    conv = await stored_conversation(shared_redis, first.conversation_id)
    text = first.delta + "".join(e.delta for e in rest)
    assert [(m.content, m.finish_reason) for m in conv.messages] == [(STORY, None), (text, FinishReason.LENGTH)]
