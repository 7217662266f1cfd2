"""Fixtures of the service tests: one real redis-server and one in-process server with the real default model,
shared by the modules of this package (starting the model takes seconds; each test leaves the engine idle).

Tests here run on the package's event loop (``pytestmark = pytest.mark.asyncio(loop_scope="package")`` in each
module), the loop the shared server and its gRPC channel live on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import RunningServer
from tests.api.client import connect, serving
from tests.conftest import RedisServer, redis_fixture


shared_redis = redis_fixture("package", "A redis-server for the whole package (tests that kill Redis start their own).")


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def server(shared_redis: RedisServer) -> AsyncIterator[RunningServer]:
    """The default model behind gRPC, conversations in ``shared_redis``, no auth (tenant 'public')."""
    async with serving(redis_url=shared_redis.url) as running:
        yield running


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def stub(server: RunningServer) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with connect(server) as s:
        yield s
