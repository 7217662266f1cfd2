"""What the service tests share: settings for an in-process server, and a thin client that collects streams.

No fakes: every helper talks to a real server over real gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import RunningServer, start_server
from eoq.config import Settings, load_settings
from eoq.engine.types import EngineRequest
from tests.conftest import model_cache_dir

SERVICE = "chat.v1.ChatService"
FRANCE = "What is the capital of France?"


def server_settings(**overrides: object) -> Settings:
    """An in-process server on a free port of 127.0.0.1 with a small KV cache (tests need little)."""
    base: dict[str, object] = {
        "host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0, "kv_cache_memory_gb": 0.5,
        "cache_dir": model_cache_dir(),
    }
    return load_settings(**{**base, **overrides})


@asynccontextmanager
async def serving(**overrides: object) -> AsyncIterator[RunningServer]:
    """A running server for the block; stopped (no grace) after it."""
    running = await start_server(server_settings(**overrides))
    try:
        yield running
    finally:
        await running.drain_and_stop(0)


@asynccontextmanager
async def connect(running: RunningServer) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


async def assert_health_serving(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    """Health says SERVING for the whole server ('') and for the chat service; returns the Health stub."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return health


def sampling(max_tokens: int = 16, **kwargs: object) -> pb.SamplingParams:
    """Greedy (the default) unless told otherwise."""
    return pb.SamplingParams(max_tokens=max_tokens, **kwargs)


@dataclass
class Answer:
    """A whole streamed answer."""

    events: list = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.delta for e in self.events)

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def last(self):
        return self.events[-1]

    @property
    def conversation_id(self) -> str:
        return self.events[0].conversation_id


async def collect(call) -> Answer:
    """Read a Chat/Complete stream to its end (raises ``grpc.aio.AioRpcError`` on a failed status)."""
    answer = Answer()
    async for event in call:
        answer.events.append(event)
    return answer


async def ask(stub: chat_pb2_grpc.ChatServiceStub, message: str, conversation_id: str = "", *,
              system_prompt: str = "", metadata=None, timeout: float | None = None, max_tokens: int = 16,
              **sampling_kwargs: object) -> Answer:
    """One Chat turn, read to its end."""
    request = pb.ChatRequest(conversation_id=conversation_id, message=message, system_prompt=system_prompt,
                             sampling=sampling(max_tokens, **sampling_kwargs))
    return await collect(stub.Chat(request, metadata=metadata, timeout=timeout))


def capture_requests(monkeypatch, running: RunningServer) -> list[EngineRequest]:
    """Record every request the service hands the engine (the real engine still serves it)."""
    seen: list[EngineRequest] = []
    generate = running.engine.generate

    def recording(request: EngineRequest, admitted: bool = False):
        seen.append(request)
        return generate(request, admitted)

    monkeypatch.setattr(running.engine, "generate", recording)
    return seen


async def rpc_error(call: Awaitable | Callable[[], Awaitable]) -> grpc.aio.AioRpcError:
    """The error a unary call (awaitable) or a stream (``collect(...)``) ends with; fails if it succeeds."""
    try:
        await (call() if callable(call) else call)
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("the call succeeded; an error status was expected")


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Fails after ``timeout`` naming ``what``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def engine_idle(running: RunningServer) -> bool:
    """No request in the engine and every KV block free (cached blocks are free: ref count 0), as the engine's
    own stats say (they work whether the engine runs in its own process or on a thread)."""
    stats = running.engine.last_stats
    return (running.engine.num_unfinished == 0 and stats.num_running == 0 and stats.num_waiting == 0
            and stats.kv_cache_usage == 0.0)
