"""Conversations as trees: the pure tree functions, and the tree part of the store contract on both stores
(ids and parents kept, answers appended alone, an answer written as it grows, the active leaf, a subtree
replaced away) — and the answer log's contract on both (events by sequence, blocking reads, retention, the
tenant's count of detached answers, cancel requests)."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import replace
from collections.abc import AsyncIterator

import pytest

from eoq.chat import tree
from eoq.chat.answers import AnswerLog, AnswerLogSettings, MemoryAnswerLog
from eoq.chat.events import AnswerEvent, Usage
from eoq.chat.memory_store import MemoryConversationStore
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import ConversationFull, ConversationLimits, ConversationStore, LeaseLost, Role, StoredMessage
from eoq.engine.types import FinishReason
from eoq.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tests.chat.conftest import Backend
from tests.conftest import RedisServer

CID = "a" * 32
OTHER = "b" * 32


def mid(name: str, cid: str = CID) -> str:
    """A message id of ``cid`` for a readable name ('q1', 'a2b', ...)."""
    return f"{cid}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def msg(role: Role, name: str, parent: str | None, content: str = "", reason: FinishReason | None = None,
        cid: str = CID) -> StoredMessage:
    return StoredMessage(role, content or name, time.time(), reason, id=mid(name, cid),
                         parent_id=parent and mid(parent, cid))


def q(name: str, parent: str | None, content: str = "", cid: str = CID) -> StoredMessage:
    return msg(Role.USER, name, parent, content, cid=cid)


def a(name: str, parent: str, content: str = "", reason: FinishReason | None = FinishReason.STOP,
      cid: str = CID) -> StoredMessage:
    return msg(Role.ASSISTANT, name, parent, content, reason, cid=cid)


# q1 -> a1 -> q2 -> {a2, a2b}; q1 -> a1b (a regenerated first answer); a1 -> q2e -> a2e (q2 edited).
TREE = (q("q1", None), a("a1", "q1"), q("q2", "a1"), a("a2", "q2"), a("a1b", "q1"), a("a2b", "q2"),
        q("q2e", "a1"), a("a2e", "q2e"))
NAMES = {m.id: m.content for m in TREE}


def names(messages_or_ids) -> list[str]:
    return [NAMES[m if isinstance(m, str) else m.id] for m in messages_or_ids]


# ---------------------------------------------------------------- pure tree functions


def test_paths_children_and_siblings() -> None:
    assert names(tree.path_to(TREE, mid("a2b"))) == ["q1", "a1", "q2", "a2b"]
    assert names(tree.path_to(TREE, mid("a2e"))) == ["q1", "a1", "q2e", "a2e"]
    assert tree.path_to(TREE, None) == []
    assert names(tree.children(TREE, mid("q2"))) == ["a2", "a2b"]
    assert names(tree.children(TREE, None)) == ["q1"]
    siblings = tree.siblings(TREE)
    assert names(siblings[mid("a2b")]) == ["a2", "a2b"]
    assert names(siblings[mid("q2e")]) == ["q2", "q2e"]  # the questions under a1
    assert names(siblings[mid("a1b")]) == ["a1", "a1b"]
    assert names(siblings[mid("q1")]) == ["q1"]
    # Selecting a message lands on the newest leaf under it: a1 -> q2e (newer than q2) -> a2e.
    assert tree.newest_leaf_under(TREE, mid("a1")) == mid("a2e")
    assert tree.newest_leaf_under(TREE, mid("q2")) == mid("a2b")
    assert tree.newest_leaf_under(TREE, mid("a2")) == mid("a2")
    assert sorted(names(tree.subtree_ids(TREE, mid("q2")))) == ["a2", "a2b", "q2"]
    assert sorted(names(tree.subtree_ids(TREE, mid("a1")))) == ["a1", "a2", "a2b", "a2e", "q2", "q2e"]


def test_active_leaf_falls_back_to_the_newest_branch() -> None:
    assert tree.active_leaf(TREE, mid("a2")) == mid("a2")
    assert tree.active_leaf(TREE, mid("gone")) == mid("a2e")  # the newest message's branch
    assert tree.active_leaf(TREE, None) == mid("a2e")
    assert tree.active_leaf((), None) is None


def test_question_parent_rules() -> None:
    # '' = the active leaf (an answer); the conversation id = the root; else an answer of this conversation.
    assert tree.question_parent(TREE, "", CID, mid("a2b")) == mid("a2b")
    assert tree.question_parent(TREE, CID, CID, mid("a2b")) is None
    assert tree.question_parent(TREE, mid("a1"), CID, None) == mid("a1")
    assert tree.question_parent((), "", CID, None) is None
    with pytest.raises(InvalidArgument, match="is a question"):
        tree.question_parent(TREE, mid("q2"), CID, None)
    with pytest.raises(NotFound):
        tree.question_parent(TREE, mid("unknown"), CID, None)
    with pytest.raises(InvalidArgument, match="another conversation"):
        tree.question_parent(TREE, mid("a1", OTHER), CID, None)
    with pytest.raises(NotFound):
        tree.question_parent(TREE, "nonsense", CID, None)
    with pytest.raises(InvalidArgument, match="too long"):
        tree.question_parent(TREE, "x" * 1000, CID, None)
    unanswered = (*TREE, q("q3", "a2b"))
    with pytest.raises(FailedPrecondition, match="without an answer"):
        tree.question_parent(unanswered, "", CID, mid("q3"))
    assert tree.last_question(unanswered, mid("q3"), CID).id == mid("q3")
    assert tree.last_question(TREE, mid("a2b"), CID).id == mid("q2")


def test_legacy_ids_are_positions_in_one_branch() -> None:
    plain = [StoredMessage(Role.USER, "q", 1.0), StoredMessage(Role.ASSISTANT, "a", 1.0)]
    got = tree.with_legacy_ids(CID, [*plain, q("q9", None)])
    assert [m.id for m in got] == [f"{CID}-0", f"{CID}-1", mid("q9")]
    assert [m.parent_id for m in got] == [None, f"{CID}-0", None]  # a message with an id keeps its parent
    tree.check_message_id(CID, f"{CID}-0")  # a legacy id is a valid id
    tree.check_message_id(CID, tree.new_message_id(CID))


# ---------------------------------------------------------------- the store's tree contract, both stores


async def test_tree_round_trip_with_answers_alone_and_the_active_leaf(store: ConversationStore) -> None:
    conv = await store.create("acme", None)
    c = conv.id
    q1, a1 = q("q1", None, cid=c), a("a1", "q1", "first", cid=c)
    await store.append_turn("acme", c, q1, a1)
    a1b = a("a1b", "q1", "second", cid=c)
    after = await store.append_turn("acme", c, None, a1b)  # a regenerated answer: one message
    assert after.message_count == 3
    got = await store.get("acme", c)
    assert got.messages == (q1, a1, a1b) and got.active_leaf == a1b.id
    await store.set_active_leaf("acme", c, a1.id)
    assert (await store.get("acme", c)).active_leaf == a1.id
    with pytest.raises(NotFound):
        await store.set_active_leaf("other-tenant", c, a1.id)


async def test_an_answer_written_as_it_grows(backend: Backend) -> None:
    store = backend.make(limits=ConversationLimits(max_messages=4))
    c = (await store.create("acme", None)).id
    q1 = q("q1", None, "hi", cid=c)
    placeholder = StoredMessage(Role.ASSISTANT, "", time.time(), None, id=mid("a1", c), parent_id=q1.id)
    async with store.lock("acme", c) as lease:
        await store.append_turn("acme", c, q1, placeholder, lease=lease)
        got = await store.get("acme", c)
        assert (got.generating, got.locked, got.messages[1].content) == (placeholder.id, True, "")
        await store.update_answer("acme", c, replace(placeholder, content="Hel"), lease)
        got = await store.get("acme", c)
        assert (got.messages[1].content, got.generating, got.num_bytes) == ("Hel", placeholder.id, 2 + 3)
        final = replace(placeholder, content="Hello ünï", finish_reason=FinishReason.STOP, token_ids=(1, 2))
        await store.update_answer("acme", c, final, lease)
        got = await store.get("acme", c)
        assert got.messages[1] == final and got.generating is None
        assert got.num_bytes == 2 + len("Hello ünï".encode())
        with pytest.raises(NotFound, match="not being generated"):  # it ended
            await store.update_answer("acme", c, final, lease)
    got = await store.get("acme", c)
    assert not got.locked
    with pytest.raises(LeaseLost):  # the lease is over
        await store.update_answer("acme", c, final, lease)
    # A regenerated answer counts one message: at 3 of 4, one more answer fits but not a whole turn.
    await store.append_turn("acme", c, None, a("a1b", "q1", cid=c))
    with pytest.raises(ConversationFull):
        await store.append_turn("acme", c, q("q2", "a1b", cid=c), a("a2", "q2", cid=c))
    await store.append_turn("acme", c, None, a("a1c", "q1", cid=c))
    with pytest.raises(ConversationFull):
        await store.append_turn("acme", c, None, a("a1d", "q1", cid=c))


async def test_replace_messages_removes_a_subtree(store: ConversationStore) -> None:
    c = (await store.create("acme", "sys")).id
    q1, a1 = q("q1", None, cid=c), a("a1", "q1", cid=c)
    q2, a2 = q("q2", "a1", cid=c), a("a2", "q2", cid=c)
    await store.append_turn("acme", c, q1, a1)
    await store.append_turn("acme", c, q2, a2)
    async with store.lock("acme", c) as lease:
        await store.replace_messages("acme", c, (q1, a1), a1.id, lease)
    got = await store.get("acme", c)
    assert got.messages == (q1, a1) and got.active_leaf == a1.id
    assert (got.message_count, got.num_bytes) == (2, len("sys") + 4)
    with pytest.raises(LeaseLost):
        await store.replace_messages("acme", c, (), None, lease)


async def test_old_layout_ids_survive_a_rewrite(redis_server: RedisServer) -> None:
    """A conversation stored before the tree: its messages get ids by position, and a rewrite (deleting a
    subtree) stores those ids, so they stay what clients were given."""
    from tests.chat.test_store import plant_old_format

    store = RedisConversationStore(redis_server.url, 60)
    old = "c" * 32
    with redis_server.client() as r:
        plant_old_format(r, old, "acme", None, num_turns=3)
    got = await store.get("acme", old)
    assert [m.id for m in got.messages] == [f"{old}-{i}" for i in range(6)]
    assert tree.active_leaf(got.messages, got.active_leaf) == f"{old}-5"
    async with store.lock("acme", old) as lease:
        await store.replace_messages("acme", old, got.messages[:4], f"{old}-3", lease)
    again = await store.get("acme", old)
    assert again.messages == got.messages[:4]
    with redis_server.client() as r:
        assert '"id":"' + f"{old}-0" in r.lindex(f"eoq:conv:{old}:messages", 0)
    await store.close()


# ---------------------------------------------------------------- the answer log's contract, both logs


@pytest.fixture(params=["memory", "redis"])
async def answer_log(request: pytest.FixtureRequest) -> AsyncIterator[AnswerLog]:
    settings = AnswerLogSettings(max_detached_per_tenant=2, retention_seconds=0.5, lease_seconds=0.5)
    if request.param == "memory":
        yield MemoryAnswerLog(settings)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisConversationStore(server.url, 60, lock_ttl_seconds=0.5, answers=settings)
    yield store.answers
    await store.close()


def event(seq: int, text: str = "", reason: FinishReason | None = None) -> AnswerEvent:
    usage = Usage(3, seq, 1, 0.1, 0.2, 0.0) if reason else None
    return AnswerEvent(CID, text or f"t{seq} ", [seq], reason, usage, user_message_id=f"{CID}-q",
                       message_id=f"{CID}-a", sequence=seq)


async def test_events_are_read_by_sequence_exactly_once(answer_log: AnswerLog) -> None:
    answer = uuid.uuid4().hex
    assert await answer_log.read(answer, 0, 0) is None  # nothing published
    await answer_log.publish(answer, [event(1), event(2)])
    assert await answer_log.read(answer, 0, 0) == [event(1), event(2)]
    assert await answer_log.read(answer, 1, 0) == [event(2)]
    assert await answer_log.read(answer, 2, 0) == []
    with pytest.raises(ValueError):  # an event already in the log is never appended twice
        await answer_log.publish(answer, [event(2)])

    async def later() -> None:
        await asyncio.sleep(0.1)
        await answer_log.publish(answer, [event(3, reason=FinishReason.STOP)])

    publisher = asyncio.create_task(later())
    start = time.perf_counter()
    got = await answer_log.read(answer, 2, 2.0)  # blocks until the event comes
    assert got == [event(3, reason=FinishReason.STOP)] and time.perf_counter() - start < 1.5
    await publisher
    assert got[0].usage == Usage(3, 3, 1, 0.1, 0.2, 0.0)  # the JSON round trip keeps every field


async def test_a_finished_log_is_kept_for_its_retention(answer_log: AnswerLog) -> None:
    answer = uuid.uuid4().hex
    await answer_log.publish(answer, [event(1, reason=FinishReason.STOP)])
    await answer_log.finish(answer)
    assert await answer_log.read(answer, 0, 0) == [event(1, reason=FinishReason.STOP)]
    await asyncio.sleep(0.7)
    assert await answer_log.read(answer, 0, 0) is None


async def test_the_tenants_count_of_detached_answers(answer_log: AnswerLog) -> None:
    await answer_log.start("acme", "s1")
    await answer_log.start("acme", "s2")
    with pytest.raises(ResourceExhausted, match="max_detached_answers_per_tenant"):
        await answer_log.start("acme", "s3")
    await answer_log.start("other", "s4")  # another tenant's count is its own
    await answer_log.end("acme", "s1")
    await answer_log.start("acme", "s3")
    # An entry nobody renews (its server died) stops counting after the lease.
    await asyncio.sleep(0.3)
    await answer_log.renew("acme", "s3")
    await asyncio.sleep(0.3)
    await answer_log.start("acme", "s5")  # s2 expired, s3 was renewed
    with pytest.raises(ResourceExhausted):
        await answer_log.start("acme", "s6")


async def test_cancel_requests(answer_log: AnswerLog) -> None:
    answer = uuid.uuid4().hex
    assert not await answer_log.cancel_requested(answer)
    await answer_log.request_cancel(answer)
    assert await answer_log.cancel_requested(answer)
    await answer_log.finish(answer)
    assert not await answer_log.cancel_requested(answer)


def test_memory_store_has_a_memory_log() -> None:
    assert isinstance(MemoryConversationStore(60).answers, MemoryAnswerLog)
