"""Fixtures of the HTTP API tests: one in-process server with the real default model serving both ports (the
HTTP API on a socket the test binds to port 0, so the kernel picks a free port), the real ``openai`` client on
it, a raw HTTP client (the one ``openai`` itself uses) for what the client hides, and a gRPC stub on the same
server to compare answers with.

Tests here run on this package's event loop (``pytestmark = pytest.mark.asyncio(loop_scope="package")``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import openai
import pytest
import pytest_asyncio

from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import RunningServer, start_server
from tests.api.client import server_settings

try:  # openai >= 2 ships httpx2 (the same API); older ones httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]


def free_socket() -> socket.socket:
    """A socket bound to 127.0.0.1 on a port the kernel picks (not listening: the server listens on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serving_http(**overrides: object) -> AsyncIterator[RunningServer]:
    """A server with the HTTP API on, for the block; stopped (no grace) after it unless the test drained it."""
    running = await start_server(server_settings(**overrides), http_socket=free_socket())
    try:
        yield running
    finally:
        if not running.servicer.draining:
            await running.drain_and_stop(0)


def base_url(running: RunningServer) -> str:
    return f"http://127.0.0.1:{running.http_port}"


def openai_client(running: RunningServer, api_key: str = "unused") -> openai.AsyncOpenAI:
    """The real OpenAI client on the server; no retries, so a refusal is seen as it is."""
    return openai.AsyncOpenAI(base_url=base_url(running) + "/v1", api_key=api_key, max_retries=0, timeout=120)


def raw_client(running: RunningServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url(running), timeout=120)


def model_name(running: RunningServer) -> str:
    assert running.engine.info is not None
    return running.engine.info.name


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def http_server() -> AsyncIterator[RunningServer]:
    """The default model behind gRPC and HTTP, conversations in-process, no auth (tenant 'public')."""
    async with serving_http() as running:
        yield running


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def client(http_server: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(http_server) as c:
        yield c


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def raw(http_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with raw_client(http_server) as c:
        yield c


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def grpc_stub(http_server: RunningServer) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{http_server.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="package")
def model(http_server: RunningServer) -> str:
    return model_name(http_server)
