"""The conversation store contract, run against both stores: in-process, and Redis on a real redis-server.

The second half checks what only the Redis store has: its key layout, timeouts, restarts and the observer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import pytest

from eoq.chat.memory_store import MemoryConversationStore, _Lease
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import ConversationBusy, ConversationStore, Role, StoredMessage, StoreUnavailable
from eoq.engine.types import FinishReason
from eoq.errors import InvalidArgument, NotFound
from tests.conftest import RedisServer


def user(content: str) -> StoredMessage:
    return StoredMessage(Role.USER, content, created_at=time.time())


def answer(
    content: str, reason: FinishReason = FinishReason.STOP, ids: tuple[int, ...] | None = None
) -> StoredMessage:
    return StoredMessage(Role.ASSISTANT, content, time.time(), finish_reason=reason, token_ids=ids)


class Backend:
    """Makes stores of one kind, plants a "crashed holder's" lock, closes what it made."""

    def __init__(self, redis_server: RedisServer | None) -> None:
        self.redis_server = redis_server
        self.stores: list[ConversationStore] = []

    def make(self, ttl_seconds: float = 60.0, lock_ttl_seconds: float = 30.0) -> ConversationStore:
        store: ConversationStore
        if self.redis_server is None:
            store = MemoryConversationStore(ttl_seconds, lock_ttl_seconds)
        else:
            store = RedisConversationStore(self.redis_server.url, ttl_seconds, lock_ttl_seconds)
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


async def create_many(store: ConversationStore, tenant: str, n: int) -> list[str]:
    """n conversations, oldest first, each updated strictly after the previous one."""
    ids = []
    for _ in range(n):
        ids.append((await store.create(tenant, None)).id)
        await asyncio.sleep(0.002)
    return ids


async def all_ids(store: ConversationStore, tenant: str, page_size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page, token = await store.list(tenant, page_size, token)
        pages.append([c.id for c in page])
        if not token:
            return pages


# ---------------------------------------------------------------- the contract, both stores


async def test_create_get_round_trip(store: ConversationStore) -> None:
    before = time.time()
    created = await store.create("acme", "Be brief.")
    assert created.tenant == "acme" and created.system_prompt == "Be brief."
    assert created.message_count == 0 and created.messages == ()
    assert before <= created.created_at == created.updated_at <= time.time()
    assert await store.get("acme", created.id) == created
    plain = await store.create("acme", None)
    assert (await store.get("acme", plain.id)).system_prompt is None
    assert plain.id != created.id


async def test_list_pages_newest_first(store: ConversationStore) -> None:
    ids = await create_many(store, "acme", 7)
    newest_first = ids[::-1]
    assert await all_ids(store, "acme", 3) == [newest_first[0:3], newest_first[3:6], newest_first[6:]]
    assert await all_ids(store, "acme", 7) == [newest_first]
    page, token = await store.list("acme", 10)
    assert [c.id for c in page] == newest_first and token == ""
    assert all(c.messages == () for c in page)
    assert await store.list("nobody", 5) == ([], "")


async def test_paging_is_stable_while_conversations_are_added(store: ConversationStore) -> None:
    ids = await create_many(store, "acme", 5)
    page, token = await store.list("acme", 2)
    assert [c.id for c in page] == [ids[4], ids[3]]
    added = await store.create("acme", None)
    page, token = await store.list("acme", 2, token)
    assert [c.id for c in page] == [ids[2], ids[1]]
    page, token = await store.list("acme", 2, token)
    assert [c.id for c in page] == [ids[0]] and token == ""
    assert (await store.list("acme", 1))[0][0].id == added.id


async def test_list_orders_by_last_update(store: ConversationStore) -> None:
    ids = await create_many(store, "acme", 3)
    await store.append_turn("acme", ids[0], user("hi"), answer("hello"))
    assert await all_ids(store, "acme", 2) == [[ids[0], ids[2]], [ids[1]]]


async def test_bad_page_token_and_page_size(store: ConversationStore) -> None:
    await create_many(store, "acme", 2)
    not_a_pair = base64.urlsafe_b64encode(json.dumps({"a": 1}).encode()).decode()
    for token in ["garbage!", "%%%", not_a_pair]:
        with pytest.raises(InvalidArgument, match="invalid page_token"):
            await store.list("acme", 10, token)
    with pytest.raises(InvalidArgument, match="page_size"):
        await store.list("acme", 0)


async def test_delete(store: ConversationStore) -> None:
    kept, gone = await create_many(store, "acme", 2)
    await store.delete("acme", gone)
    for op in (
        store.get("acme", gone),
        store.delete("acme", gone),
        store.append_turn("acme", gone, user("q"), answer("a")),
    ):
        with pytest.raises(NotFound, match=f"conversation {gone} not found"):
            await op
    with pytest.raises(NotFound):
        async with store.lock("acme", gone):
            pass
    assert await all_ids(store, "acme", 10) == [[kept]]


async def test_tenant_isolation(store: ConversationStore) -> None:
    theirs = await store.create("acme", "secret")
    await store.append_turn("acme", theirs.id, user("q"), answer("a"))
    for op in (
        store.get("intruder", theirs.id),
        store.delete("intruder", theirs.id),
        store.append_turn("intruder", theirs.id, user("q2"), answer("a2")),
        store.get("acme", "0" * 32),
        store.get("acme", f"{theirs.id}:messages"),  # must not address another key
    ):
        with pytest.raises(NotFound):
            await op
    with pytest.raises(NotFound):
        async with store.lock("intruder", theirs.id):
            pass
    mine = await store.create("intruder", None)
    assert await all_ids(store, "intruder", 10) == [[mine.id]]
    assert await all_ids(store, "acme", 10) == [[theirs.id]]
    intact = await store.get("acme", theirs.id)
    assert intact.message_count == 2 and [m.content for m in intact.messages] == ["q", "a"]
    async with store.lock("acme", theirs.id):  # the intruder's attempt left no lock behind
        pass


async def test_append_turn_stores_both_messages(store: ConversationStore) -> None:
    created = await store.create("acme", None)
    q1, a1 = user("What is 2+2?"), answer("4", FinishReason.STOP, (19, 20))
    q2, a2 = user("And ünïcode?"), answer("It is cut", FinishReason.LENGTH, None)
    await asyncio.sleep(0.002)
    after_one = await store.append_turn("acme", created.id, q1, a1)
    assert after_one.message_count == 2 and after_one.messages == ()
    assert after_one.updated_at > created.updated_at and after_one.created_at == created.created_at
    after_two = await store.append_turn("acme", created.id, q2, a2)
    assert after_two.message_count == 4 and after_two.updated_at >= after_one.updated_at
    got = await store.get("acme", created.id)
    assert got.messages == (q1, a1, q2, a2)
    assert got.messages[1].token_ids == (19, 20) and got.messages[3].finish_reason is FinishReason.LENGTH
    assert got.message_count == 4 and got.updated_at == after_two.updated_at


async def test_append_turn_replaces_system_prompt(store: ConversationStore) -> None:
    created = await store.create("acme", "old")
    replaced = await store.append_turn("acme", created.id, user("q"), answer("a"), system_prompt="new")
    assert replaced.system_prompt == "new"
    kept = await store.append_turn("acme", created.id, user("q"), answer("a"))
    assert kept.system_prompt == "new" and (await store.get("acme", created.id)).system_prompt == "new"


async def test_concurrent_appends_all_land_and_readers_see_whole_turns(store: ConversationStore) -> None:
    conversation = await store.create("acme", None)
    num_turns = 40
    done = asyncio.Event()
    snapshots = 0

    async def writer(i: int) -> None:
        await store.append_turn("acme", conversation.id, user(f"q{i}"), answer(f"a{i}"))

    async def reader() -> None:
        nonlocal snapshots
        while not done.is_set():
            got = await store.get("acme", conversation.id)
            assert got.message_count == len(got.messages) and got.message_count % 2 == 0
            for q, a in zip(got.messages[::2], got.messages[1::2]):
                assert (q.role, a.role, a.content) == (Role.USER, Role.ASSISTANT, "a" + q.content[1:])
            snapshots += 1
            await asyncio.sleep(0)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(i) for i in range(num_turns)))
    done.set()
    await reading
    got = await store.get("acme", conversation.id)
    assert got.message_count == 2 * num_turns
    assert sorted(m.content for m in got.messages[::2]) == sorted(f"q{i}" for i in range(num_turns))
    assert snapshots > 0


async def test_lock_is_exclusive_until_released(store: ConversationStore) -> None:
    a, b = await create_many(store, "acme", 2)
    async with store.lock("acme", a):
        with pytest.raises(ConversationBusy) as busy:
            async with store.lock("acme", a):
                pass
        assert str(busy.value) == f"conversation {a} is busy: another answer is still streaming"
        async with store.lock("acme", b):  # other conversations are not held
            pass
    async with store.lock("acme", a):
        pass
    with pytest.raises(ValueError):
        async with store.lock("acme", a):
            raise ValueError("the answer failed")
    async with store.lock("acme", a):  # released on the way out of a failure too
        pass


async def test_lock_is_renewed_while_held(backend: Backend) -> None:
    store = backend.make(lock_ttl_seconds=0.3)
    conversation = await store.create("acme", None)
    async with store.lock("acme", conversation.id):
        await asyncio.sleep(1.0)  # more than three lease times
        with pytest.raises(ConversationBusy):
            async with store.lock("acme", conversation.id):
                pass
    async with store.lock("acme", conversation.id):
        pass


async def test_crashed_holders_lock_expires(backend: Backend, store: ConversationStore) -> None:
    conversation = await store.create("acme", None)
    backend.plant_lock(store, conversation.id, 0.3)
    with pytest.raises(ConversationBusy):
        async with store.lock("acme", conversation.id):
            pass
    await asyncio.sleep(0.4)
    async with store.lock("acme", conversation.id):
        pass


async def test_release_never_frees_another_holders_lock(backend: Backend, store: ConversationStore) -> None:
    conversation = await store.create("acme", None)
    async with store.lock("acme", conversation.id):
        # Our lease expired (say Redis stalled) and another replica took the conversation.
        backend.plant_lock(store, conversation.id, 30.0)
    with pytest.raises(ConversationBusy):
        async with store.lock("acme", conversation.id):
            pass


async def test_conversations_expire_unless_used(backend: Backend) -> None:
    store = backend.make(ttl_seconds=1.0)
    used, idle = await create_many(store, "acme", 2)
    await asyncio.sleep(0.6)
    await store.get("acme", used)
    await asyncio.sleep(0.6)  # 1.2 s since create: idle is gone, used was touched 0.6 s ago
    await store.append_turn("acme", used, user("q"), answer("a"))
    with pytest.raises(NotFound):
        await store.get("acme", idle)
    with pytest.raises(NotFound):  # an expired conversation is not brought back by a late answer
        await store.append_turn("acme", idle, user("q"), answer("a"))
    await asyncio.sleep(0.6)
    assert (await store.get("acme", used)).message_count == 2
    assert await all_ids(store, "acme", 10) == [[used]]
    await asyncio.sleep(1.2)
    with pytest.raises(NotFound):
        await store.get("acme", used)
    assert await store.list("acme", 10) == ([], "")


def test_descriptions() -> None:
    memory = MemoryConversationStore(60)
    assert memory.description == "in-process (not shared between replicas, lost on restart)"
    url = "redis://127.0.0.1:6379/0"  # connects lazily: no server needed to describe it
    assert RedisConversationStore(url, 60).description == f"redis at {url}"
    with_password = RedisConversationStore("redis://:hunter2@127.0.0.1:1/0", 60).description
    assert with_password == "redis at redis://:***@127.0.0.1:1/0"


# ---------------------------------------------------------------- Redis only


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisConversationStore]:
    store = RedisConversationStore(redis_server.url, ttl_seconds=60, lock_ttl_seconds=3, timeout_seconds=0.5)
    yield store
    await store.close()


async def test_redis_key_layout(redis_server: RedisServer, redis_store: RedisConversationStore) -> None:
    conversation = await redis_store.create("acme", "sys")
    await redis_store.append_turn("acme", conversation.id, user("q"), answer("a", FinishReason.STOP, (5, 6)))
    key = f"eoq:conv:{conversation.id}"
    with redis_server.client() as r:
        assert {k: r.type(k) for k in r.keys("eoq:*")} == {
            key: "hash",
            f"{key}:messages": "list",
            "eoq:tenant:acme:conversations": "zset",
        }
        assert r.hgetall(key)["system_prompt"] == "sys" and r.hgetall(key)["message_count"] == "2"
        stored = json.loads(r.lindex(f"{key}:messages", 1))
        assert {k: stored[k] for k in ("role", "content", "finish_reason", "token_ids")} == {
            "role": "assistant", "content": "a", "finish_reason": "stop", "token_ids": [5, 6]
        }  # fmt: skip
        for k in r.keys("eoq:*"):
            assert 55_000 < r.pttl(k) <= 60_000, k
        async with redis_store.lock("acme", conversation.id):
            assert 0 < r.pttl(f"{key}:lock") <= 3000
        assert not r.exists(f"{key}:lock")


async def test_redis_paging_through_equal_scores(
    redis_server: RedisServer, redis_store: RedisConversationStore
) -> None:
    ids = await create_many(redis_store, "acme", 5)
    with redis_server.client() as r:  # five conversations updated in the same instant
        r.zadd("eoq:tenant:acme:conversations", {cid: 1000.0 for cid in ids})
    assert await all_ids(redis_store, "acme", 2) == [sorted(ids, reverse=True)[i : i + 2] for i in (0, 2, 4)]


async def test_redis_list_drops_expired_index_entries(redis_server: RedisServer) -> None:
    store = RedisConversationStore(redis_server.url, ttl_seconds=0.6)
    expired = (await store.create("acme", None)).id
    await asyncio.sleep(0.4)
    alive = (await store.create("acme", None)).id  # also keeps the tenant's index alive
    await asyncio.sleep(0.3)
    with redis_server.client() as r:
        assert r.zrange("eoq:tenant:acme:conversations", 0, -1) == [expired, alive]
        assert await all_ids(store, "acme", 10) == [[alive]]
        assert r.zrange("eoq:tenant:acme:conversations", 0, -1) == [alive]
    await store.close()


async def test_redis_down_then_back(redis_server: RedisServer, redis_store: RedisConversationStore) -> None:
    conversation = await redis_store.create("acme", None)
    await redis_store.append_turn("acme", conversation.id, user("q"), answer("a", ids=(1, 2)))
    redis_server.stop()
    operations = {
        "create": lambda: redis_store.create("acme", None),
        "get": lambda: redis_store.get("acme", conversation.id),
        "list": lambda: redis_store.list("acme", 10),
        "delete": lambda: redis_store.delete("acme", conversation.id),
        "append_turn": lambda: redis_store.append_turn("acme", conversation.id, user("q"), answer("a")),
        "lock": lambda: redis_store.lock("acme", conversation.id).__aenter__(),
        "ping": redis_store.ping,
    }
    for name, call in operations.items():
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as failed:
            await call()
        assert time.monotonic() - start < 1.5, name
        assert str(failed.value).startswith(
            f"conversation store unreachable (redis at 127.0.0.1:{redis_server.port}): "
        ), name
    redis_server.start()
    await redis_store.ping()
    # Killed and restarted while the pool holds idle connections: the first call after it must work too.
    redis_server.stop()
    redis_server.start()
    got = await redis_store.get("acme", conversation.id)
    assert [(m.content, m.token_ids) for m in got.messages] == [("q", None), ("a", (1, 2))]
    assert (
        await redis_store.append_turn("acme", conversation.id, user("q2"), answer("a2"))
    ).message_count == 4
    assert [c.id for c in (await redis_store.list("acme", 10))[0]] == [conversation.id]


async def test_redis_retried_writes_apply_once(redis_store: RedisConversationStore) -> None:
    """A write whose reply was lost with its connection is retried once; running it twice must not matter."""
    conversation = await redis_store.create("acme", None)
    keys = redis_store._keys("acme", conversation.id)
    args = redis_store._turn_args("acme", conversation.id, user("q"), answer("a"), None)
    for _ in range(2):  # the first attempt, then redis-py's retry with the same arguments
        await redis_store._append_turn(keys=keys, args=args)
    assert (await redis_store.get("acme", conversation.id)).message_count == 2
    lock_keys = [keys[0], redis_store._lock_key(conversation.id)]
    for _ in range(2):
        assert await redis_store._acquire(keys=lock_keys, args=["acme", "token", 3000]) == 1
    assert await redis_store._acquire(keys=lock_keys, args=["acme", "another", 3000]) == 0


async def test_redis_stalled_times_out(
    redis_server: RedisServer, redis_store: RedisConversationStore
) -> None:
    conversation = await redis_store.create("acme", None)
    redis_server.pause()
    try:
        for call in (redis_store.ping, lambda: redis_store.get("acme", conversation.id)):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await call()
            assert 0.4 < time.monotonic() - start < 1.5
        with pytest.raises(StoreUnavailable):
            await redis_store.append_turn("acme", conversation.id, user("q"), answer("a"))
    finally:
        redis_server.resume()
    # The timed-out append may still have run once Redis woke up, but only whole.
    assert (await redis_store.get("acme", conversation.id)).message_count in (0, 2)


async def test_redis_observer(redis_server: RedisServer) -> None:
    calls: list[tuple[str, float | None]] = []
    store = RedisConversationStore(
        redis_server.url, 60, lock_ttl_seconds=0.3, observer=lambda op, s: calls.append((op, s))
    )
    conversation = await store.create("acme", None)
    await store.get("acme", conversation.id)
    await store.list("acme", 10)
    await store.append_turn("acme", conversation.id, user("q"), answer("a"))
    async with store.lock("acme", conversation.id):
        await asyncio.sleep(0.25)
    await store.delete("acme", conversation.id)
    with pytest.raises(NotFound):  # an answer from Redis, so not a failure
        await store.get("acme", conversation.id)
    await store.ping()
    ops = ["create", "get", "list", "append_turn", "lock", "unlock", "delete", "get", "ping"]
    assert [op for op, _ in calls if op != "renew"] == ops
    assert [op for op, _ in calls].count("renew") >= 1
    assert all(s is not None and 0 <= s < 1 for _, s in calls)
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.list("acme", 10)
    assert calls[-2:] == [("ping", None), ("list", None)]
    await store.close()
