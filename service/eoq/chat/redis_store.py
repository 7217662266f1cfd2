"""The Redis conversation store: conversations shared by every replica, surviving restarts.

Keys (``P`` is ``key_prefix``, ``ID`` a conversation id, 32 hex digits):

- ``P:conv:ID`` hash: ``tenant``, ``system_prompt`` (absent = the model's default), ``system_prompt_preview``
  (its first ``SYSTEM_PROMPT_PREVIEW_CHARS`` characters, what ``list`` reads), ``created_at``, ``updated_at``
  (unix seconds, repr floats), ``message_count``, ``num_bytes`` (``text_bytes`` of the system prompt and every
  message's content), ``last_turn`` (token of the last turn), ``active_leaf`` (the id of the active branch's
  leaf), ``generating`` and ``generating_index`` (the id and list index of the answer a detached generation is
  writing, while it is);
- ``P:conv:ID:messages`` list, in creation order (a parent before its children), of JSON objects
  ``{"id", "parent_id", "role", "content", "created_at", "finish_reason", "token_ids", "token_model"}``
  (messages stored before the tree have no ``id``/``parent_id``: read as one branch, ``tree.with_legacy_ids``);
- ``P:conv:ID:lock`` string: the random token of the holder of the conversation's lease;
- ``P:tenant:TENANT:conversations`` sorted set of ids scored by ``updated_at``, for paging.

Every read-modify-write is one Lua script (atomic on the server): a turn's two messages, its count, its time
and the index entry change together or not at all, and a script that finds the hash gone writes nothing, so a
deleted or expired conversation is never brought back. The hash, the list and the tenant's index get the
time-to-live on create, get and append; index entries whose conversation expired are removed by ``list``.
The limits are checked inside the same scripts: ``create`` counts the tenant's index (pruning entries whose
hash is gone before it refuses), ``append_turn`` the hash's ``message_count`` and ``num_bytes``.

Eviction (``maxmemory-policy volatile-lru``, see deploy/README.md): every key has a time-to-live, so Redis may
evict any of them. A conversation whose hash is gone is gone (``list`` skips and unindexes it); one whose
messages list is gone while its hash is not (``message_count`` disagrees with the list) is deleted whole by the
next ``get`` or ``append_turn``, which then answer ``NotFound``: never a history that silently lost turns.

Data written before ``num_bytes`` and ``system_prompt_preview`` existed still loads: ``get`` counts the bytes
from the messages, ``append_turn`` counts and stores them once, ``list`` reads such rows whole.

Failures: connect and read timeouts are ``timeout_seconds``; a command whose connection broke is retried once,
at once, which is how a restarted Redis serves the next call; every failure becomes ``StoreUnavailable``,
whose message names no address and no exception (clients see it); the log line has both. With ``sentinels``
the client follows the primary they name across failovers, and with ``wait_replicas`` every conversation
write waits for that many replicas (``WAIT``, at most ``wait_timeout_ms``): see ``eoq.chat.redis_client``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eoq.chat.store import (
    Lease,
    LeaseLost,
    SYSTEM_PROMPT_PREVIEW_CHARS,
    Conversation,
    ConversationBusy,
    ConversationLimits,
    LatencyObserver,
    Role,
    StoredMessage,
    StoreUnavailable,
    check_conversation_id,
    check_room,
    check_system_prompt,
    decode_page_token,
    encode_page_token,
    listed,
    quota_exceeded,
    text_bytes,
)
from eoq.chat.answers import AnswerLogSettings
from eoq.chat import redis_scripts as scripts
from eoq.chat.redis_answers import RedisAnswerLog
from eoq.chat.redis_client import connect, waited
from eoq.chat.tree import with_legacy_ids
from eoq.engine.types import FinishReason
from eoq.errors import InternalError, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


def _check_leased_write(done: int, conversation_id: str, when: str) -> None:
    """What a script writing under the conversation's lease answered: 0 = the conversation is gone, -1 = the
    lease expired (``when``, e.g. "before the change was written"); other codes are the caller's."""
    if done == 0:
        raise NotFound(f"conversation {conversation_id} not found")
    if done == -1:
        raise LeaseLost(f"conversation {conversation_id}: its lock expired {when}")


class RedisConversationStore:
    """``ConversationStore`` in Redis (redis-py's asyncio client). ``ttl_seconds``: idle time after which a
    conversation is gone; ``lock_ttl_seconds``: expiry of a lock whose holder stopped renewing it (renewed
    every third of it); ``timeout_seconds``: connect and read timeout; ``observer``: gets (operation,
    seconds) after each operation that reached Redis and (operation, None) after each that failed; ``limits``:
    what a conversation and a tenant may hold."""

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        lock_ttl_seconds: float = 30.0,
        timeout_seconds: float = 2.0,
        observer: LatencyObserver | None = None,
        key_prefix: str = "eoq",
        limits: ConversationLimits | None = None,
        answers: AnswerLogSettings | None = None,
        max_answer_events: int = 100_000,
        *,
        sentinels: Sequence[tuple[str, int]] = (),
        sentinel_master: str | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ) -> None:
        if ttl_seconds <= 0 or lock_ttl_seconds <= 0 or timeout_seconds <= 0:
            raise ValueError(
                f"ttl_seconds, lock_ttl_seconds and timeout_seconds must be > 0, "
                f"got {ttl_seconds}, {lock_ttl_seconds}, {timeout_seconds}"
            )
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._lock_ttl = lock_ttl_seconds
        self._lock_ttl_ms = max(1, round(lock_ttl_seconds * 1000))
        self._observer = observer
        self._prefix = key_prefix
        self._limits = limits or ConversationLimits()
        # One client for the store and its answer log, to ``url`` or to the primary the sentinels name (it
        # follows failovers), with one immediate retry on a broken connection (eoq.chat.redis_client.connect).
        # The scripts make the retry safe when the first attempt did run: a turn carries a token and is
        # stored once, a lock attempt recognises its own token.
        self._connection = connect(url, timeout_seconds, sentinels=sentinels, sentinel_master=sentinel_master)
        self._redis = self._connection.client
        self._description = self._connection.description
        if wait_replicas:
            self._description += f", each conversation write waiting for {wait_replicas} replica(s) " \
                                 f"(up to {wait_timeout_ms} ms)"
        # The live events of detached answers, on the same client (eoq.chat.redis_answers).
        self.answers = RedisAnswerLog(self._redis, self._call, key_prefix,
                                      answers or AnswerLogSettings(lease_seconds=lock_ttl_seconds),
                                      max_events=max_answer_events, block_seconds=min(1.0, timeout_seconds / 2))
        self._where = self._connection.where

        def short(acknowledged: int) -> None:
            self._observe("wait", None)  # eoq_redis_errors_total{operation="wait"}
            logger.warning("redis WAIT: %d of %d replica(s) acknowledged a conversation write within %d ms; it is "
                           "stored on the primary only", acknowledged, wait_replicas, wait_timeout_ms)

        def write(script: str):
            # Conversation writes wait for replicas when asked (--redis-wait-replicas); locks and the answer
            # log's events do not (short-lived, and the log replays from the store).
            return waited(self._redis.register_script(script), self._redis, wait_replicas, wait_timeout_ms, short)

        self._create = write(scripts.CREATE)
        self._get = self._redis.register_script(scripts.GET)
        self._append_turn = write(scripts.APPEND_TURN)
        self._update_answer = write(scripts.UPDATE_ANSWER)
        self._set_active_leaf = write(scripts.SET_ACTIVE_LEAF)
        self._replace_messages = write(scripts.REPLACE_MESSAGES)
        self._delete = write(scripts.DELETE)
        self._acquire = self._redis.register_script(scripts.ACQUIRE)
        self._renew = self._redis.register_script(scripts.RENEW)
        self._release = self._redis.register_script(scripts.RELEASE)

    @property
    def limits(self) -> ConversationLimits:
        return self._limits

    @property
    def description(self) -> str:
        return self._description

    async def create(self, tenant: str, system_prompt: str | None) -> Conversation:
        check_system_prompt(system_prompt, self._limits)
        conversation_id = uuid.uuid4().hex
        now = time.time()
        num_bytes = text_bytes(system_prompt)
        keys = [self._conv_key(conversation_id), self._index_key(tenant)]
        args = [
            tenant, conversation_id, repr(now), self._ttl_ms, self._limits.max_conversations_per_tenant, num_bytes,
            "0" if system_prompt is None else "1", system_prompt or "", _preview(system_prompt),
        ]  # fmt: skip
        num_conversations = 0
        async with self._call("create"):
            created = await self._create(keys=keys, args=args)
            if not created:  # at the quota, maybe counting conversations that expired: unindex those, retry
                num_conversations = await self._prune_index(tenant)
                created = await self._create(keys=keys, args=args)
        if not created:
            raise quota_exceeded(num_conversations, self._limits)
        return Conversation(conversation_id, tenant, system_prompt, now, now, 0, num_bytes=num_bytes)

    async def _prune_index(self, tenant: str) -> int:
        """Remove the tenant's index entries whose conversation is gone; returns how many are left. At most
        ``max_conversations_per_tenant`` entries (plus races), so one pipeline of EXISTS."""
        index = self._index_key(tenant)
        ids = await self._redis.zrange(index, 0, -1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.exists(self._conv_key(cid))
            alive = await pipe.execute()
        gone = [cid for cid, exists in zip(ids, alive) if not exists]
        if gone:  # ids are never reused, so a gone conversation cannot come back
            await self._redis.zrem(index, *gone)
        return len(ids) - len(gone)

    async def get(self, tenant: str, conversation_id: str) -> Conversation:
        check_conversation_id(conversation_id)
        async with self._call("get"):
            found = await self._get(
                keys=[*self._keys(tenant, conversation_id), self._lock_key(conversation_id)],
                args=[tenant, conversation_id, self._ttl_ms],
            )
        if not found:
            raise NotFound(f"conversation {conversation_id} not found")
        fields, raw_messages, locked = found
        messages = with_legacy_ids(conversation_id, [_decode_message(raw) for raw in raw_messages])
        return replace(_decode_conversation(conversation_id, _pairs(fields), messages), locked=bool(locked))

    async def list(self, tenant: str, page_size: int, page_token: str = "") -> tuple[list[Conversation], str]:
        if page_size < 1:
            raise InvalidArgument(f"page_size must be at least 1, got {page_size}")
        cursor = decode_page_token(page_token) if page_token else None
        index = self._index_key(tenant)
        found: list[tuple[float, Conversation]] = []
        stale: list[str] = []
        batch = page_size + 1  # one more than the page tells whether a next page exists
        async with self._call("list"):
            while len(found) <= page_size:
                # From the cursor's score down, inclusive: entries sharing its score come in descending id
                # order and those not after the cursor are dropped here.
                top = "+inf" if cursor is None else repr(cursor[0])
                rows = await self._redis.zrevrangebyscore(
                    index, top, "-inf", start=0, num=batch, withscores=True
                )
                after = [(score, cid) for cid, score in rows if cursor is None or (score, cid) < cursor]
                if not after:
                    if len(rows) < batch:
                        break
                    batch *= 2  # a run of equal scores longer than the batch: look further
                    continue
                rows_found, rows_gone = await self._list_rows(tenant, after)
                found += rows_found
                stale += rows_gone  # expired or evicted: ids are never reused, so it cannot come back
                cursor = after[-1]
                if len(rows) < batch:
                    break
            if stale:
                await self._redis.zrem(index, *stale)
        page = found[:page_size]
        next_token = encode_page_token(page[-1][0], page[-1][1].id) if len(found) > page_size else ""
        return [conversation for _, conversation in page], next_token

    async def _list_rows(
        self, tenant: str, positions: list[tuple[float, str]]
    ) -> tuple[list[tuple[float, Conversation]], list[str]]:
        """The ``listed`` rows of the conversations at ``positions`` (their order kept), and the ids whose hash
        is gone. Reads a bounded part of each hash (never a whole system prompt), except for rows written
        before ``num_bytes`` and ``system_prompt_preview`` were kept, which are read whole."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, cid in positions:
                pipe.hmget(self._conv_key(cid), _LIST_FIELDS)
                pipe.hstrlen(self._conv_key(cid), "system_prompt")
            replies = await pipe.execute()
        rows: list[tuple[float, Conversation | None]] = []
        gone: list[str] = []
        old: list[tuple[int, str]] = []  # (row, id)
        for (score, cid), values, system_prompt_bytes in zip(positions, replies[::2], replies[1::2]):
            fields = dict(zip(_LIST_FIELDS, values))
            if fields["tenant"] != tenant:
                gone.append(cid)
                continue
            preview = fields["system_prompt_preview"]
            if fields["num_bytes"] is None or (system_prompt_bytes and preview is None):
                old.append((len(rows), cid))
                rows.append((score, None))
                continue
            rows.append((score, Conversation(
                id=cid, tenant=tenant, system_prompt=preview, created_at=float(fields["created_at"]),
                updated_at=float(fields["updated_at"]), message_count=int(fields["message_count"]),
                num_bytes=int(fields["num_bytes"]),
                system_prompt_truncated=preview is not None and system_prompt_bytes > text_bytes(preview),
            )))  # fmt: skip
        if old:
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, cid in old:
                    pipe.hgetall(self._conv_key(cid))
                    pipe.lrange(f"{self._conv_key(cid)}:messages", 0, -1)
                replies = await pipe.execute()
            for (i, cid), fields, raw_messages in zip(old, replies[::2], replies[1::2]):
                if fields.get("tenant") != tenant:
                    gone.append(cid)
                    continue
                messages = tuple(_decode_message(raw) for raw in raw_messages)
                rows[i] = (rows[i][0], listed(_decode_conversation(cid, fields, messages)))
        return [(score, conversation) for score, conversation in rows if conversation is not None], gone

    async def delete(self, tenant: str, conversation_id: str) -> None:
        check_conversation_id(conversation_id)
        async with self._call("delete"):
            deleted = await self._delete(
                keys=self._keys(tenant, conversation_id), args=[tenant, conversation_id]
            )
        if not deleted:
            raise NotFound(f"conversation {conversation_id} not found")

    async def append_turn(
        self,
        tenant: str,
        conversation_id: str,
        user: StoredMessage | None,
        assistant: StoredMessage,
        system_prompt: str | None = None,
        *,
        turn_token: str | None = None,
        lease: Lease | None = None,
    ) -> Conversation:
        check_conversation_id(conversation_id)
        args = self._turn_args(tenant, conversation_id, user, assistant, system_prompt, turn_token, lease)
        keys = [*self._keys(tenant, conversation_id), self._lock_key(conversation_id)]
        async with self._call("append_turn"):
            fields = await self._append_turn(keys=keys, args=args)
        if not fields:
            raise NotFound(f"conversation {conversation_id} not found")
        if fields[0] == "lost":
            raise LeaseLost(f"conversation {conversation_id}: its lock expired before the answer was stored; "
                            "ask again")
        if fields[0] == "full":  # the script refused the turn by check_room's rule: the same error from it
            _, new_bytes, state = fields
            check_room(_decode_conversation(conversation_id, _pairs(state), ()), self._limits, new_bytes)
            raise InternalError("the append script refused a turn that check_room accepts")
        return _decode_conversation(conversation_id, _pairs(fields), ())

    async def update_answer(self, tenant: str, conversation_id: str, answer: StoredMessage, lease: Lease) -> None:
        check_conversation_id(conversation_id)
        keys = [*self._keys(tenant, conversation_id), self._lock_key(conversation_id)]
        args = [tenant, conversation_id, lease.token, answer.id, _encode_message(answer), text_bytes(answer.content),
                "0" if answer.finish_reason is None else "1", repr(time.time()), self._ttl_ms]
        async with self._call("update_answer"):
            done = await self._update_answer(keys=keys, args=args)
        _check_leased_write(done, conversation_id, "while the answer was written")
        if done == -2:
            raise NotFound(f"answer {answer.id} is not being generated in conversation {conversation_id}")

    async def set_active_leaf(self, tenant: str, conversation_id: str, leaf_id: str) -> None:
        check_conversation_id(conversation_id)
        async with self._call("set_active_leaf"):
            done = await self._set_active_leaf(keys=[self._conv_key(conversation_id)], args=[tenant, leaf_id])
        if not done:
            raise NotFound(f"conversation {conversation_id} not found")

    async def replace_messages(self, tenant: str, conversation_id: str, messages: tuple[StoredMessage, ...],
                               active_leaf: str | None, lease: Lease) -> None:
        check_conversation_id(conversation_id)
        conv = await self.get(tenant, conversation_id)
        index = next((str(i) for i, m in enumerate(messages) if m.id == conv.generating), "")
        num_bytes = text_bytes(conv.system_prompt) + sum(text_bytes(m.content) for m in messages)
        keys = [*self._keys(tenant, conversation_id), self._lock_key(conversation_id)]
        args = [tenant, conversation_id, lease.token, active_leaf or "", num_bytes, repr(time.time()), self._ttl_ms,
                index, *(_encode_message(m) for m in messages)]
        async with self._call("replace_messages"):
            done = await self._replace_messages(keys=keys, args=args)
        _check_leased_write(done, conversation_id, "before the change was written")

    @asynccontextmanager
    async def lock(self, tenant: str, conversation_id: str) -> AsyncIterator[Lease]:
        check_conversation_id(conversation_id)
        key = self._lock_key(conversation_id)
        token = secrets.token_hex(16)
        async with self._call("lock"):
            acquired = await self._acquire(
                keys=[self._conv_key(conversation_id), key], args=[tenant, token, self._lock_ttl_ms]
            )
        if acquired == -1:
            raise NotFound(f"conversation {conversation_id} not found")
        if acquired == 0:
            raise ConversationBusy(
                f"conversation {conversation_id} is busy: another answer is still streaming"
            )
        renewal = asyncio.create_task(self._keep_alive(key, token), name=f"eoq-lease-{conversation_id}")
        try:
            yield Lease(token)
        finally:
            # Not awaited: a renewal still in flight is harmless, it only extends a lease that is still ours.
            renewal.cancel()
            try:
                async with self._call("unlock"):
                    await self._release(keys=[key], args=[token])
            except StoreUnavailable as e:
                # The lease expires by itself within lock_ttl_seconds; raising here would replace the
                # outcome of the answer (maybe already stored) with an error about the lock.
                logger.warning("could not release the lock of conversation %s: %s", conversation_id, e)

    async def ping(self) -> None:
        async with self._call("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        await self._connection.aclose()

    def _turn_args(
        self,
        tenant: str,
        conversation_id: str,
        user: StoredMessage | None,
        assistant: StoredMessage,
        system_prompt: str | None,
        turn_token: str | None = None,
        lease: Lease | None = None,
    ) -> list[str | int]:
        """ARGV of ``_APPEND_TURN``; without a ``turn_token`` a fresh one (a retry of the same call sends the
        same one either way)."""
        limits = self._limits
        return [
            tenant,
            conversation_id,
            repr(time.time()),
            self._ttl_ms,
            "" if user is None else _encode_message(user),
            _encode_message(assistant),
            "0" if system_prompt is None else "1",
            system_prompt or "",
            turn_token or secrets.token_hex(16),
            (0 if user is None else text_bytes(user.content)) + text_bytes(assistant.content),
            text_bytes(system_prompt),
            _preview(system_prompt),
            limits.max_messages,
            limits.max_bytes,
            lease.token if lease is not None else "",
            assistant.id,
            "1" if assistant.finish_reason is None else "0",
        ]

    async def _keep_alive(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            try:
                async with self._call("renew"):
                    renewed = await self._renew(keys=[key], args=[token, self._lock_ttl_ms])
            except StoreUnavailable as e:
                logger.warning("could not renew %s (will retry): %s", key, e)
                continue
            if not renewed:
                logger.warning("lost the lock %s: it expired before it was renewed", key)
                return

    @asynccontextmanager
    async def _call(self, op: str) -> AsyncIterator[None]:
        """Time one operation for the observer and turn Redis failures into ``StoreUnavailable``."""
        start = time.perf_counter()
        try:
            yield
        except _UNREACHABLE as e:
            self._observe(op, None)
            logger.warning("redis %s: %s unreachable: %s: %s", op, self._where, type(e).__name__, e)
            raise StoreUnavailable("conversation store unreachable: retry later") from e
        except RedisError as e:
            # e.g. OOM, MISCONF, READONLY: Redis answers but refuses; a later retry may succeed.
            self._observe(op, None)
            logger.warning("redis %s: %s refused it: %s: %s", op, self._where, type(e).__name__, e)
            raise StoreUnavailable("conversation store refused the operation: retry later") from e
        self._observe(op, time.perf_counter() - start)

    def _observe(self, op: str, seconds: float | None) -> None:
        if self._observer is not None:
            self._observer(op, seconds)

    def _conv_key(self, conversation_id: str) -> str:
        return f"{self._prefix}:conv:{conversation_id}"

    def _lock_key(self, conversation_id: str) -> str:
        return f"{self._prefix}:conv:{conversation_id}:lock"

    def _index_key(self, tenant: str) -> str:
        return f"{self._prefix}:tenant:{tenant}:conversations"

    def _keys(self, tenant: str, conversation_id: str) -> list[str]:
        """The hash, the messages list and the tenant's index, in the order the scripts take them."""
        conv = self._conv_key(conversation_id)
        return [conv, f"{conv}:messages", self._index_key(tenant)]


# What ``list`` reads of each hash (``_list_rows``): never the whole system prompt.
_LIST_FIELDS = ("tenant", "created_at", "updated_at", "message_count", "num_bytes", "system_prompt_preview")


def _preview(system_prompt: str | None) -> str:
    return (system_prompt or "")[:SYSTEM_PROMPT_PREVIEW_CHARS]


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL as a Lua script returns it, [field, value, ...], as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def _decode_conversation(
    conversation_id: str, fields: dict[str, str], messages: tuple[StoredMessage, ...]
) -> Conversation:
    """The hash ``fields`` (and ``messages``) as a conversation. A hash written before ``num_bytes`` was kept has
    its size counted from ``messages``: pass them all for such a hash."""
    system_prompt = fields.get("system_prompt")
    num_bytes = fields.get("num_bytes")
    return Conversation(
        id=conversation_id,
        tenant=fields["tenant"],
        system_prompt=system_prompt,
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
        message_count=int(fields["message_count"]),
        messages=messages,
        active_leaf=fields.get("active_leaf"),
        generating=fields.get("generating"),
        num_bytes=(
            int(num_bytes) if num_bytes is not None
            else text_bytes(system_prompt) + sum(text_bytes(m.content) for m in messages)
        ),
    )


def _encode_message(message: StoredMessage) -> str:
    return json.dumps(
        {
            "id": message.id or None,
            "parent_id": message.parent_id,
            "role": message.role.value,
            "content": message.content,
            "created_at": message.created_at,
            "finish_reason": None if message.finish_reason is None else message.finish_reason.value,
            "token_ids": None if message.token_ids is None else list(message.token_ids),
            "token_model": message.token_model,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _decode_message(raw: str) -> StoredMessage:
    data = json.loads(raw)
    return StoredMessage(
        role=Role(data["role"]),
        content=data["content"],
        created_at=data["created_at"],
        finish_reason=None if data["finish_reason"] is None else FinishReason(data["finish_reason"]),
        token_ids=None if data["token_ids"] is None else tuple(data["token_ids"]),
        token_model=data.get("token_model"),  # absent in messages stored before it was kept
        id=data.get("id") or "",  # absent before the tree: with_legacy_ids gives them theirs
        parent_id=data.get("parent_id"),
    )
