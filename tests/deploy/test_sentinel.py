"""Redis Sentinel: eoq follows a failover without a restart, and no turn is ever half-written.

Real processes only (``sentinel.py``): a primary, a replica and three sentinels (Debian's redis-sentinel) on
loopback, the sentinels quick to decide (down after 1 s). The primary is SIGKILLed while turns are being
written; the sentinels promote the replica; the store (and, end to end, ``eoq serve`` with the real model)
reaches the new primary within seconds. Every call meanwhile either succeeds or fails UNAVAILABLE (a lease
lost with the old primary: ABORTED, "ask again"); afterwards every conversation is whole turns, and with
``--redis-wait-replicas 1`` every acknowledged turn survived the failover.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import make_store
from eoq.chat.redis_client import parse_sentinels
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import Role, StoredMessage, StoreUnavailable
from eoq.config import load_settings
from eoq.engine.types import FinishReason
from eoq.errors import ConfigError
from eoq.metrics import Metrics

from .live import EoqServer, bearer, chat, wait_until
from .sentinel import MASTER, SentinelCluster

FAILOVER_BOUND_SECONDS = 15.0  # kill -> first success; with down-after 1 s it takes about 2-4 s here


# --- settings (no processes) ---------------------------------------------------------------------------------


def test_sentinel_addresses_are_parsed() -> None:
    assert parse_sentinels("a:1, b:26380,[::1]:7,c") == (("a", 1), ("b", 26380), ("::1", 7), ("c", 26379))
    for bad in ("", "a:x", ":1", "a:70000", "[::1"):
        with pytest.raises(ValueError):
            parse_sentinels(bad)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"redis_sentinels": "a:1"}, "--redis-sentinel-master"),
    ({"redis_sentinel_master": "eoq"}, "--redis-sentinels"),
    ({"redis_sentinels": "a:port", "redis_sentinel_master": "eoq"}, "--redis-sentinels / EOQ_REDIS_SENTINELS"),
    ({"redis_wait_replicas": -1}, "--redis-wait-replicas"),
    ({"redis_wait_timeout_ms": 2000}, "--redis-wait-timeout-ms"),  # not below --redis-timeout-seconds (2 s)
    ({"redis_wait_timeout_ms": 0}, "--redis-wait-timeout-ms"),
])
def test_bad_sentinel_and_wait_settings_are_refused_by_name(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("/", ".")):
        load_settings(**overrides)


def test_sentinels_alone_make_a_redis_store() -> None:
    settings = load_settings(redis_sentinels="10.0.0.1:26379,10.0.0.2:26379", redis_sentinel_master="eoq",
                             redis_wait_replicas=1, redis_url="redis://:secret@ignored:1/3")
    store = make_store(settings, Metrics())
    assert isinstance(store, RedisConversationStore)
    assert store.description == ("redis primary 'eoq' (from sentinels 10.0.0.1:26379,10.0.0.2:26379, db 3), each "
                                 "conversation write waiting for 1 replica(s) (up to 500 ms)")
    assert "secret" not in store.description
    kwargs = store._redis.connection_pool.connection_kwargs  # the URL's password and db, not its host
    assert (kwargs["password"], kwargs["db"], "host" in kwargs) == ("secret", 3, False)


# --- the store against a real Sentinel set-up ----------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    c = SentinelCluster(tmp_path / "sentinel")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _store(cluster: SentinelCluster, wait_replicas: int = 0, observed: list | None = None,
           wait_timeout_ms: int = 500) -> RedisConversationStore:
    return RedisConversationStore(
        "", ttl_seconds=3600, timeout_seconds=1.0, sentinels=parse_sentinels(cluster.sentinel_addresses),
        sentinel_master=MASTER, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms,
        observer=None if observed is None else (lambda op, seconds: observed.append((time.monotonic(), op, seconds))),
    )


def _message(role: Role, text: str) -> StoredMessage:
    return StoredMessage(role=role, content=text, created_at=time.time(),
                         finish_reason=FinishReason.STOP if role is Role.ASSISTANT else None)


async def _append_turn(store: RedisConversationStore, cid: str, n: int) -> None:
    """Turn ``n`` of ``cid`` (tenant acme): the question ``q<n>``, its answer ``a<n>``."""
    await store.append_turn("acme", cid, _message(Role.USER, f"q{n}"), _message(Role.ASSISTANT, f"a{n}"))


async def _write_through_a_failover(cluster: SentinelCluster, wait_replicas: int) -> dict:
    """Four writers append numbered turns to their conversations; the primary is killed after a few; they go on
    until each has written turns after the failover too. Returns what each saw."""
    observed: list = []
    store = _store(cluster, wait_replicas, observed)
    conversations = [(await store.create("acme", None)).id for _ in range(4)]
    acknowledged: dict[str, list[int]] = {cid: [] for cid in conversations}
    failed: dict[str, list[int]] = {cid: [] for cid in conversations}
    killed = asyncio.Event()
    after_kill: list[float] = []
    unexpected: list[BaseException] = []
    kill_time: list[float] = []

    async def writer(cid: str) -> None:
        n, done_after = 0, 0
        while done_after < 5:
            n += 1
            try:
                await _append_turn(store, cid, n)
            except StoreUnavailable:
                failed[cid].append(n)
                await asyncio.sleep(0.05)
                continue
            except BaseException as e:  # anything but UNAVAILABLE is a failure of the test
                unexpected.append(e)
                return
            acknowledged[cid].append(n)
            if killed.is_set():
                done_after += 1
                if done_after == 1:
                    after_kill.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def killer() -> None:
        while min(len(v) for v in acknowledged.values()) < 5:
            await asyncio.sleep(0.01)
        old = cluster.kill_primary()
        kill_time.append(time.monotonic())
        killed.set()
        await asyncio.to_thread(cluster.wait_promoted, old)

    await asyncio.wait_for(asyncio.gather(killer(), *(writer(cid) for cid in conversations)), 60)
    stored = {cid: await store.get("acme", cid) for cid in conversations}
    await store.close()
    return dict(acknowledged=acknowledged, failed=failed, stored=stored, unexpected=unexpected,
                resumed=max(after_kill) - kill_time[0], observed=observed, killed_at=kill_time[0])


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_the_store_follows_a_failover_and_never_half_writes_a_turn(cluster: SentinelCluster,
                                                                   wait_replicas: int) -> None:
    seen = asyncio.run(_write_through_a_failover(cluster, wait_replicas))
    assert seen["unexpected"] == []  # every failure was StoreUnavailable
    assert any(seen["failed"].values()), "the failover went unnoticed: was the primary killed?"
    assert seen["resumed"] < FAILOVER_BOUND_SECONDS, seen["resumed"]
    for cid, conversation in seen["stored"].items():
        messages = conversation.messages
        # Whole turns: question n then its answer n, every turn once, in order.
        assert conversation.message_count == len(messages) and len(messages) % 2 == 0
        turns = [int(m.content[1:]) for m in messages[::2]]
        assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT] * len(turns)
        assert [m.content for m in messages[1::2]] == [f"a{n}" for n in turns]
        assert turns == sorted(set(turns))
        # Nothing stored that no writer attempted; a turn that failed may or may not be there (its reply was
        # lost, not necessarily its write).
        assert set(turns) <= set(seen["acknowledged"][cid]) | set(seen["failed"][cid])
        if wait_replicas:
            # Each acknowledged turn had reached the replica before it was acknowledged (no WAIT fell short
            # before the kill), and the sentinels promoted that replica: none is lost.
            short = [t for t, op, s in seen["observed"] if op == "wait" and s is None and t < seen["killed_at"]]
            assert short == []
            assert set(seen["acknowledged"][cid]) <= set(turns)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_wait_the_replicas_cannot_meet_costs_its_timeout_and_is_counted(cluster: SentinelCluster) -> None:
    async def scenario() -> tuple[float, float, list]:
        observed: list = []
        one = _store(cluster, wait_replicas=1)
        two = _store(cluster, wait_replicas=2, observed=observed, wait_timeout_ms=300)  # there is one replica
        cid = (await one.create("acme", None)).id
        start = time.perf_counter()
        await _append_turn(one, cid, 1)
        met = time.perf_counter() - start
        start = time.perf_counter()
        await _append_turn(two, cid, 2)
        short = time.perf_counter() - start
        assert (await two.get("acme", cid)).message_count == 4  # stored on the primary all the same
        await one.close()
        await two.close()
        return met, short, observed

    met, short, observed = asyncio.run(scenario())
    assert met < 0.25  # one replica on loopback acknowledges at once
    assert 0.3 <= short < 1.0
    assert [op for _, op, s in observed if s is None] == ["wait"]  # eoq_redis_errors_total{operation="wait"}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_connections_to_a_demoted_primary_move_to_the_new_one(cluster: SentinelCluster) -> None:
    """A planned failover (SENTINEL FAILOVER): the old primary lives on as a replica, so pooled connections get
    READONLY; redis-py drops them and the one retry reaches the new primary."""

    async def scenario() -> tuple[int, int, int]:
        store = _store(cluster)
        cid = (await store.create("acme", None)).id
        await _append_turn(store, cid, 1)
        old = cluster.current_primary()
        with cluster.sentinels[0].client() as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER)
        await asyncio.to_thread(cluster.wait_promoted, old)
        with old.client() as c:
            await asyncio.to_thread(wait_until, lambda: c.info("replication")["role"] == "slave", 30,
                                    "the old primary demoted")
        errors = 0
        for n in range(2, 7):  # turns 2 to 6
            try:
                await _append_turn(store, cid, n)
            except StoreUnavailable:
                errors += 1
        count = (await store.get("acme", cid)).message_count
        await store.close()
        return errors, count, cluster.master_port()

    errors, count, port = asyncio.run(scenario())
    assert errors == 0
    assert count == 12
    assert port == cluster.replica.port


# --- end to end: eoq serve on the Sentinel set-up -----------------------------------------------------------

API_KEY = "sentinel-key"
AUTH = bearer(API_KEY)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_eoq_serve_follows_a_failover_mid_traffic_without_a_restart(tmp_path: Path) -> None:
    with ExitStack() as stack:
        cluster = SentinelCluster(tmp_path / "sentinel")
        stack.callback(cluster.stop)
        cluster.start()
        server = EoqServer(tmp_path, "sentinel", api_keys=f"{API_KEY}:team", extra_args=[
            "--redis-sentinels", cluster.sentinel_addresses, "--redis-sentinel-master", MASTER,
            "--redis-wait-replicas", "1", "--redis-timeout-seconds", "1", "--lock-ttl-seconds", "5"])
        stack.callback(server.stop)
        server.start()
        server.wait_serving()
        pid = server.process._process.pid
        channel = stack.enter_context(grpc.insecure_channel(server.address))
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        outcomes: list[tuple[float, str, str, str]] = []  # (time, conversation, code, detail)
        acknowledged: dict[str, list[str]] = {}
        stop = threading.Event()

        def client(i: int) -> None:
            cid = chat(stub, f"Name a colour. ({i})", metadata=AUTH, max_tokens=4).conversation_id
            acknowledged[cid] = [f"Name a colour. ({i})"]
            n = 0
            while not stop.is_set():
                n += 1
                question = f"Another one? ({n})"
                try:
                    chat(stub, question, cid, metadata=AUTH, max_tokens=4)
                except grpc.RpcError as e:
                    outcomes.append((time.monotonic(), cid, e.code().name, e.details()))
                    time.sleep(0.1)
                    continue
                outcomes.append((time.monotonic(), cid, "OK", ""))
                acknowledged[cid].append(question)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(o[2] == "OK" for o in outcomes) >= 6, 120, "turns before the failover")
        old = cluster.kill_primary()
        killed = time.monotonic()
        cluster.wait_promoted(old)
        wait_until(lambda: sum(o[2] == "OK" and o[0] > killed + 0.5 for o in outcomes) >= 6, 120,
                   "turns after the failover")
        stop.set()
        for t in threads:
            t.join(60)

        codes = {code for _, _, code, _ in outcomes}
        assert codes <= {"OK", "UNAVAILABLE", "ABORTED"}, [o for o in outcomes if o[2] not in ("OK",)]
        # Turns completed again within seconds (a turn that needed Redis only outside the window never noticed).
        resumed = min(t for t, _, code, _ in outcomes if code == "OK" and t > killed) - killed
        assert resumed < FAILOVER_BOUND_SECONDS, resumed
        assert not server.process.exited and server.process._process.pid == pid  # no restart
        if "UNAVAILABLE" in codes:  # counted, for EoqRedisErrors
            assert sum(v for (name, _), v in server.metrics().items() if name == "eoq_redis_errors_total") > 0
        for cid, questions in acknowledged.items():
            stored = stub.GetConversation(pb.GetConversationRequest(id=cid), metadata=AUTH, timeout=30)
            messages = list(stored.messages)
            assert [m.role for m in messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT] * (len(messages) // 2)
            assert all(m.content for m in messages[1::2])  # every stored answer whole, none empty
            users = [m.content for m in messages[::2]]
            # Every acknowledged turn survived (each waited for the replica that was promoted), in order; a
            # turn that failed may be there too (its answer was stored, the reply lost) or not.
            assert [q for q in users if q in questions] == questions, (users, questions)
