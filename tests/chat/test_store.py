"""The conversation store contract, run against both stores: in-process, and Redis on a real redis-server.

The second half checks what only the Redis store has: its key layout, timeouts, restarts and the observer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from eoq.chat.memory_store import MemoryConversationStore
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import (
    Conversation,
    ConversationBusy,
    ConversationFull,
    ConversationLimits,
    ConversationStore,
    LeaseLost,
    Role,
    StoredMessage,
    StoreUnavailable,
    check_room,
    decode_page_token,
    encode_page_token,
)
from eoq.engine.types import FinishReason
from eoq.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tests.chat.conftest import Backend
from tests.conftest import RedisServer


def user(content: str) -> StoredMessage:
    return StoredMessage(Role.USER, content, created_at=time.time())


def answer(
    content: str, reason: FinishReason = FinishReason.STOP, ids: tuple[int, ...] | None = None
) -> StoredMessage:
    return StoredMessage(Role.ASSISTANT, content, time.time(), finish_reason=reason, token_ids=ids)


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
    for token in ["garbage!", "%%%", not_a_pair, *HOSTILE_PAGE_TOKENS.values()]:
        with pytest.raises(InvalidArgument, match="invalid page_token") as refused:
            await store.list("acme", 10, token)
        assert len(str(refused.value)) < 120  # a short prefix of the token at most
        assert len(token) <= 40 or token[40:80] not in str(refused.value)
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
    # Appended without ids, the messages read as one branch: each the parent of the next.
    assert [replace(m, id="", parent_id=None) for m in got.messages] == [q1, a1, q2, a2]
    assert [m.parent_id for m in got.messages] == [None] + [m.id for m in got.messages[:-1]]
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


# ---------------------------------------------------------------- input integrity and limits, both stores


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


# Each made the old decode_page_token raise something other than InvalidArgument, or echo the whole token.
HOSTILE_PAGE_TOKENS = {
    "nested": b64("[" * 100_000 + "]" * 100_000),  # RecursionError in the JSON parser
    "huge int": b64(f'[{"9" * 350}, "x"]'),  # OverflowError converting it to a float
    "huge int, short": b64(f'[{"9" * 310}, ""]'),
    "non-ASCII": "WzEsIngiXQ==é",
    "long": "A" * 5000,
}


@pytest.mark.parametrize("name", HOSTILE_PAGE_TOKENS)
def test_hostile_page_tokens_are_invalid_argument_without_echo(name: str) -> None:
    token = HOSTILE_PAGE_TOKENS[name]
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(token)
    message = str(refused.value)
    assert message.startswith("invalid page_token ") and message.endswith(
        ": pass the next_page_token of a previous page"
    )
    assert len(message) < 120
    if len(token) > 512:
        assert message.startswith(f"invalid page_token ({len(token)} characters, at most 512)")
    assert decode_page_token(encode_page_token(1.5e9, "a" * 32)) == (1.5e9, "a" * 32)


async def test_over_long_ids_are_invalid_argument_without_echo(store: ConversationStore) -> None:
    long_id = "f" * 129
    calls = {
        "get": lambda: store.get("acme", long_id),
        "delete": lambda: store.delete("acme", long_id),
        "append_turn": lambda: store.append_turn("acme", long_id, user("q"), answer("a")),
        "lock": lambda: store.lock("acme", long_id).__aenter__(),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidArgument) as refused:
            await call()
        assert str(refused.value) == "conversation id too long (129 characters; ids are 32 hex digits)", name
    with pytest.raises(NotFound, match=f"conversation {'f' * 128} not found"):  # at the limit: looked up
        await store.get("acme", "f" * 128)


def conversation(message_count: int, num_bytes: int) -> Conversation:
    return Conversation("0" * 32, "acme", None, 0.0, 0.0, message_count, num_bytes=num_bytes)


def test_check_room_is_the_one_rule() -> None:
    limits = ConversationLimits(max_messages=6, max_bytes=100)
    check_room(conversation(4, 90), limits, new_bytes=10)  # exactly at both limits: fits
    check_room(conversation(4, 100), limits, new_bytes=-5, new_messages=0)
    with pytest.raises(ConversationFull) as full:
        check_room(conversation(6, 0), limits, new_bytes=1)
    assert str(full.value) == "conversation is full (6 messages, limit 6): start a new one"
    assert isinstance(full.value, FailedPrecondition)
    with pytest.raises(ConversationFull) as full:
        check_room(conversation(2, 90), limits, new_bytes=11)
    assert str(full.value) == (
        "conversation is full (90 bytes of text and 11 more in this turn, limit 100 bytes): start a new one"
    )
    with pytest.raises(ValueError):
        ConversationLimits(max_messages=1)
    assert ConversationLimits() == ConversationLimits(1000, 4 * 1024 * 1024, 10_000)


async def test_turns_past_the_message_cap_are_refused(backend: Backend) -> None:
    store = backend.make(limits=ConversationLimits(max_messages=4))
    assert store.limits == ConversationLimits(max_messages=4)
    assert backend.make().limits == ConversationLimits()  # the defaults: 1000 messages, 4 MiB, 10000 per tenant
    conv = await store.create("acme", None)
    for i in range(2):
        assert (await store.append_turn("acme", conv.id, user(f"q{i}"), answer(f"a{i}"))).message_count == 2 * i + 2
    with pytest.raises(ConversationFull) as full:
        await store.append_turn("acme", conv.id, user("q2"), answer("a2"), system_prompt="new")
    assert str(full.value) == "conversation is full (4 messages, limit 4): start a new one"
    got = await store.get("acme", conv.id)  # nothing of the refused turn was written
    assert [m.content for m in got.messages] == ["q0", "a0", "q1", "a1"]
    assert got.message_count == 4 and got.system_prompt is None
    async with store.lock("acme", conv.id):  # and nothing is left locked
        pass


async def test_turns_past_the_byte_cap_are_refused(backend: Backend) -> None:
    store = backend.make(limits=ConversationLimits(max_bytes=24))
    conv = await store.create("acme", "sys!")  # 4 bytes
    assert conv.num_bytes == 4 and (await store.get("acme", conv.id)).num_bytes == 4
    after = await store.append_turn("acme", conv.id, user("héllo"), answer("wörld"))  # 6 + 6 bytes
    assert after.num_bytes == 16 and (await store.get("acme", conv.id)).num_bytes == 16
    # A replaced system prompt counts by its change in size: 16 - 4 + 1 + 1 + 1.
    after = await store.append_turn("acme", conv.id, user("q"), answer("a"), system_prompt="s")
    assert after.num_bytes == 15 and after.system_prompt == "s"
    after = await store.append_turn("acme", conv.id, user("1234"), answer("56789"))
    assert after.num_bytes == 24  # exactly at the limit
    with pytest.raises(ConversationFull) as full:
        await store.append_turn("acme", conv.id, user("?"), answer(""))
    assert str(full.value) == (
        "conversation is full (24 bytes of text and 1 more in this turn, limit 24 bytes): start a new one"
    )
    got = await store.get("acme", conv.id)
    assert (got.message_count, got.num_bytes) == (6, 24)
    assert got.num_bytes == len(got.system_prompt.encode()) + sum(len(m.content.encode()) for m in got.messages)
    with pytest.raises(InvalidArgument, match=r"the system prompt is too long \(25 bytes, a conversation holds"):
        await store.create("acme", "x" * 25)
    assert await all_ids(store, "acme", 10) == [[conv.id]]


async def test_concurrent_turns_never_pass_the_cap(backend: Backend) -> None:
    store = backend.make(limits=ConversationLimits(max_messages=6))
    conv = await store.create("acme", None)
    results = await asyncio.gather(
        *(store.append_turn("acme", conv.id, user(f"q{i}"), answer(f"a{i}")) for i in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Conversation) for r in results) == 3
    assert all(isinstance(r, (Conversation, ConversationFull)) for r in results)
    assert (await store.get("acme", conv.id)).message_count == 6


async def test_tenant_quota(backend: Backend) -> None:
    store = backend.make(limits=ConversationLimits(max_conversations_per_tenant=3))
    results = await asyncio.gather(*(store.create("acme", None) for _ in range(5)), return_exceptions=True)
    mine = [r.id for r in results if isinstance(r, Conversation)]
    assert len(mine) == 3
    for refused in [r for r in results if not isinstance(r, Conversation)] + [None]:
        if refused is None:
            with pytest.raises(ResourceExhausted) as caught:
                await store.create("acme", "one more")
            refused = caught.value
        assert isinstance(refused, ResourceExhausted)
        assert str(refused) == (
            "too many conversations: this tenant has 3, its quota (max_conversations_per_tenant) is 3; delete "
            "old conversations (DeleteConversation) to start new ones"
        )
    assert len((await store.list("acme", 10))[0]) == 3
    assert (await store.create("other", None)).tenant == "other"  # a quota per tenant
    await store.delete("acme", mine[0])  # deleted ones do not count
    replacement = await store.create("acme", None)
    with pytest.raises(ResourceExhausted):
        await store.create("acme", None)
    assert sorted(c.id for c in (await store.list("acme", 10))[0]) == sorted([*mine[1:], replacement.id])


async def test_expired_conversations_do_not_count_against_the_quota(backend: Backend) -> None:
    store = backend.make(ttl_seconds=0.8, limits=ConversationLimits(max_conversations_per_tenant=2))
    expired = (await store.create("acme", None)).id
    await asyncio.sleep(0.5)
    alive = (await store.create("acme", None)).id  # keeps the Redis index alive, with the expired id in it
    await asyncio.sleep(0.4)  # before the in-process store's once-a-second sweep
    third = (await store.create("acme", None)).id
    assert sorted(c.id for c in (await store.list("acme", 10))[0]) == sorted([alive, third])
    with pytest.raises(ResourceExhausted, match="this tenant has 2"):
        await store.create("acme", None)
    with pytest.raises(NotFound):
        await store.get("acme", expired)


async def test_list_rows_carry_a_system_prompt_preview(store: ConversationStore) -> None:
    long_prompt = "é" * 250 + "abcdefghij"  # 260 characters, 510 bytes: cut by characters, not bytes
    at_limit = "x" * 256
    long = await store.create("acme", long_prompt)
    exact = await store.create("acme", at_limit)
    none = await store.create("acme", None)
    rows = {c.id: c for c in (await store.list("acme", 10))[0]}
    assert (rows[long.id].system_prompt, rows[long.id].system_prompt_truncated) == (long_prompt[:256], True)
    assert (rows[exact.id].system_prompt, rows[exact.id].system_prompt_truncated) == (at_limit, False)
    assert (rows[none.id].system_prompt, rows[none.id].system_prompt_truncated) == (None, False)
    assert rows[long.id].num_bytes == 510 and rows[long.id].messages == ()
    got = await store.get("acme", long.id)
    assert (got.system_prompt, got.system_prompt_truncated) == (long_prompt, False)
    # A turn that replaces the system prompt replaces its preview.
    await store.append_turn("acme", exact.id, user("q"), answer("a"), system_prompt="y" * 300)
    row = (await store.list("acme", 1))[0][0]
    assert (row.id, row.system_prompt, row.system_prompt_truncated) == (exact.id, "y" * 256, True)
    await store.append_turn("acme", long.id, user("q"), answer("a"), system_prompt="short")
    row = (await store.list("acme", 1))[0][0]
    assert (row.id, row.system_prompt, row.system_prompt_truncated) == (long.id, "short", False)


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


async def test_redis_down_then_back(redis_server: RedisServer, redis_store: RedisConversationStore,
                                    caplog: pytest.LogCaptureFixture) -> None:
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
        # Clients see this message: no address, no exception text. The log has both.
        assert str(failed.value) == "conversation store unreachable: retry later", name
        logged = caplog.records[-1]
        assert (logged.name, logged.levelname) == ("eoq.chat.redis_store", "WARNING")
        assert logged.getMessage().startswith(f"redis {name}: redis at 127.0.0.1:{redis_server.port} unreachable: ")
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


async def test_redis_refusals_name_no_internals(
    redis_server: RedisServer, redis_store: RedisConversationStore, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server.client() as r:
        r.set("ballast", "x" * 2_000_000)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1mb")  # below what it holds: Redis refuses writes (OOM)
    with pytest.raises(StoreUnavailable) as refused:
        await redis_store.create("acme", None)
    assert str(refused.value) == "conversation store refused the operation: retry later"
    logged = caplog.records[-1].getMessage()
    assert "OutOfMemoryError" in logged and f"127.0.0.1:{redis_server.port}" in logged


def plant_old_format(r, conversation_id: str, tenant: str, system_prompt: str | None, num_turns: int) -> None:
    """A conversation as the store wrote it before num_bytes and system_prompt_preview existed."""
    key = f"eoq:conv:{conversation_id}"
    fields = {"tenant": tenant, "created_at": "1700000000.5", "updated_at": "1700000001.5",
              "message_count": str(2 * num_turns), "last_turn": "0" * 32}
    if system_prompt is not None:
        fields["system_prompt"] = system_prompt
    r.hset(key, mapping=fields)
    for i in range(num_turns):
        for role, content in (("user", f"q{i} ünï"), ("assistant", f'a{i} "quoted"\n')):
            r.rpush(f"{key}:messages", json.dumps({"role": role, "content": content, "created_at": 1700000001.0,
                                                   "finish_reason": "stop" if role == "assistant" else None,
                                                   "token_ids": None}, ensure_ascii=False))
    r.zadd(f"eoq:tenant:{tenant}:conversations", {conversation_id: 1700000001.5})
    for k in (key, f"{key}:messages", f"eoq:tenant:{tenant}:conversations"):
        r.pexpire(k, 60_000)


async def test_redis_old_format_data_loads(redis_server: RedisServer) -> None:
    store = RedisConversationStore(redis_server.url, 60, limits=ConversationLimits(max_messages=6, max_bytes=1000))
    long_prompt, old, short = "p" * 300, "a" * 32, "b" * 32
    turn_bytes = len("q0 ünï".encode()) + len('a0 "quoted"\n')
    with redis_server.client() as r:
        plant_old_format(r, old, "acme", long_prompt, num_turns=2)
        plant_old_format(r, short, "acme", None, num_turns=1)
    got = await store.get("acme", old)
    assert got.system_prompt == long_prompt and got.message_count == 4
    assert got.num_bytes == 300 + 2 * turn_bytes
    # The old layout reads as a single branch: ids by position, each message the parent of the next.
    assert got.messages[1] == StoredMessage(Role.ASSISTANT, 'a0 "quoted"\n', 1700000001.0, FinishReason.STOP,
                                            id=f"{old}-1", parent_id=f"{old}-0")
    assert [m.parent_id for m in got.messages] == [None, f"{old}-0", f"{old}-1", f"{old}-2"]
    rows = {c.id: c for c in (await store.list("acme", 10))[0]}
    assert (rows[old].system_prompt, rows[old].system_prompt_truncated) == ("p" * 256, True)
    assert (rows[old].num_bytes, rows[old].message_count) == (300 + 2 * turn_bytes, 4)
    assert (rows[short].system_prompt, rows[short].num_bytes) == (None, turn_bytes)
    # The first turn appended counts the old messages once (in the script) and keeps the count.
    after = await store.append_turn("acme", old, user("new"), answer("turn"))
    assert (after.message_count, after.num_bytes) == (6, 300 + 2 * turn_bytes + 7)
    with redis_server.client() as r:
        assert r.hget(f"eoq:conv:{old}", "num_bytes") == str(after.num_bytes)
    with pytest.raises(ConversationFull, match=r"\(6 messages, limit 6\)"):
        await store.append_turn("acme", old, user("q"), answer("a"))
    row = next(c for c in (await store.list("acme", 10))[0] if c.id == old)
    assert (row.system_prompt, row.system_prompt_truncated, row.num_bytes) == ("p" * 256, True, after.num_bytes)
    await store.close()


async def test_redis_old_format_data_at_the_byte_cap(redis_server: RedisServer) -> None:
    turn_bytes = len("q0 ünï".encode()) + len('a0 "quoted"\n')
    store = RedisConversationStore(redis_server.url, 60, limits=ConversationLimits(max_bytes=turn_bytes + 2))
    with redis_server.client() as r:
        plant_old_format(r, "c" * 32, "acme", None, num_turns=1)
    await store.append_turn("acme", "c" * 32, user("1"), answer(""))
    with pytest.raises(ConversationFull, match=f"\\({turn_bytes + 1} bytes of text and 2 more"):
        await store.append_turn("acme", "c" * 32, user("2"), answer("3"))
    await store.close()


async def test_redis_list_skips_evicted_conversations(
    redis_server: RedisServer, redis_store: RedisConversationStore
) -> None:
    ids = await create_many(redis_store, "acme", 4)
    for cid in ids:
        await redis_store.append_turn("acme", cid, user("q"), answer("a"))
    with redis_server.client() as r:
        r.delete(f"eoq:conv:{ids[1]}")  # evicted (maxmemory-policy volatile-lru): the hash
        r.delete(f"eoq:conv:{ids[2]}", f"eoq:conv:{ids[2]}:messages")  # the whole conversation
        r.delete(f"eoq:conv:{ids[3]}:messages")  # only its messages: a history that lost its turns
    for cid in ids[1:]:
        with pytest.raises(NotFound):
            await redis_store.get("acme", cid)
        with pytest.raises(NotFound):
            await redis_store.append_turn("acme", cid, user("q"), answer("a"))
    assert await all_ids(redis_store, "acme", 1) == [[ids[0]]]
    with redis_server.client() as r:
        assert r.zrange("eoq:tenant:acme:conversations", 0, -1) == [ids[0]]  # unindexed
        assert not r.exists(f"eoq:conv:{ids[3]}")  # the torn one was deleted whole
    assert (await redis_store.get("acme", ids[0])).message_count == 2


async def test_redis_list_reads_a_bounded_part_of_each_hash(
    redis_server: RedisServer, redis_store: RedisConversationStore
) -> None:
    created = await redis_store.create("acme", "s" * 100_000)
    with redis_server.client() as r:
        r.config_resetstat()
        (row,), _ = await redis_store.list("acme", 10)
        assert row.system_prompt == "s" * 256 and row.system_prompt_truncated
        stats = r.info("commandstats")
    assert "cmdstat_hgetall" not in stats and "cmdstat_hget" not in stats and stats["cmdstat_hmget"]["calls"] == 1
    assert (await redis_store.get("acme", created.id)).system_prompt == "s" * 100_000


async def test_a_turn_token_stores_its_turn_once(store: ConversationStore) -> None:
    """The final save and a cancel racing it (or a retry) carry the turn's one token: one turn is stored."""
    conversation = await store.create("acme", None)
    async with store.lock("acme", conversation.id) as lease:
        first = await store.append_turn("acme", conversation.id, user("Hi"), answer("Hello"),
                                        turn_token="turn-1", lease=lease)
        again = await store.append_turn("acme", conversation.id, user("Hi"),
                                        answer("Hel", FinishReason.CANCELLED), turn_token="turn-1", lease=lease)
    assert first.message_count == again.message_count == 2
    stored = await store.get("acme", conversation.id)
    assert [(m.content, m.finish_reason) for m in stored.messages] == [("Hi", None), ("Hello", FinishReason.STOP)]


async def test_a_turn_whose_lease_was_lost_is_not_written(backend: Backend, store: ConversationStore) -> None:
    conversation = await store.create("acme", None)
    async with store.lock("acme", conversation.id) as lease:
        backend.plant_lock(store, conversation.id, 30.0)  # ours expired, another holder took it
        with pytest.raises(LeaseLost, match="its lock expired before the answer was stored"):
            await store.append_turn("acme", conversation.id, user("Hi"), answer("Hello"), turn_token="t",
                                    lease=lease)
    assert (await store.get("acme", conversation.id)).message_count == 0
