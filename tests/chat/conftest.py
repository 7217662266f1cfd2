"""Fixtures of the store tests: both stores behind one contract, made by ``Backend`` (the in-process store, or
the Redis store on a real redis-server the test starts)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from eoq.chat.memory_store import MemoryConversationStore, _Lease
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import ConversationLimits, ConversationStore
from tests.conftest import RedisServer


class Backend:
    """Makes stores of one kind, plants a "crashed holder's" lock, closes what it made."""

    def __init__(self, redis_server: RedisServer | None) -> None:
        self.redis_server = redis_server
        self.stores: list[ConversationStore] = []

    def make(
        self, ttl_seconds: float = 60.0, lock_ttl_seconds: float = 30.0, limits: ConversationLimits | None = None
    ) -> ConversationStore:
        store: ConversationStore
        if self.redis_server is None:
            store = MemoryConversationStore(ttl_seconds, lock_ttl_seconds, limits=limits)
        else:
            store = RedisConversationStore(self.redis_server.url, ttl_seconds, lock_ttl_seconds, limits=limits)
        self.stores.append(store)
        return store

    def plant_lock(self, store: ConversationStore, conversation_id: str, seconds: float) -> None:
        """Leave a lock as a holder that crashed (no renewal, no release) would, replacing any other."""
        if self.redis_server is None:
            assert isinstance(store, MemoryConversationStore)
            store._leases[conversation_id] = _Lease("crashed-holder", time.monotonic() + seconds)
        else:
            with self.redis_server.client() as r:
                r.set(f"eoq:conv:{conversation_id}:lock", "crashed-holder", px=round(seconds * 1000))


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    b = Backend(request.getfixturevalue("redis_server") if request.param == "redis" else None)
    yield b
    for store in b.stores:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> ConversationStore:
    return backend.make()
