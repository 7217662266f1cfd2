"""The Redis conversation store: conversations shared by every replica, surviving restarts.

Keys (``P`` is ``key_prefix``, ``ID`` a conversation id, 32 hex digits):

- ``P:conv:ID`` hash: ``tenant``, ``system_prompt`` (absent = the model's default), ``created_at``,
  ``updated_at`` (unix seconds, repr floats), ``message_count``, ``last_turn`` (token of the last turn);
- ``P:conv:ID:messages`` list, oldest first, of JSON objects
  ``{"role", "content", "created_at", "finish_reason", "token_ids"}``;
- ``P:conv:ID:lock`` string: the random token of the holder of the conversation's lease;
- ``P:tenant:TENANT:conversations`` sorted set of ids scored by ``updated_at``, for paging.

Every read-modify-write is one Lua script (atomic on the server): a turn's two messages, its count, its time
and the index entry change together or not at all, and a script that finds the hash gone writes nothing, so a
deleted or expired conversation is never brought back. The hash, the list and the tenant's index get the
time-to-live on create, get and append; index entries whose conversation expired are removed by ``list``.

Failures: connect and read timeouts are ``timeout_seconds``; a command whose connection broke is retried once,
at once, which is how a restarted Redis serves the next call; every failure becomes ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eoq.chat.store import (
    Conversation,
    ConversationBusy,
    LatencyObserver,
    Role,
    StoredMessage,
    StoreUnavailable,
    decode_page_token,
    encode_page_token,
)
from eoq.engine.types import FinishReason
from eoq.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

# Ids are minted by ``create``; anything else cannot exist, and must not reach a key name where a crafted id
# like "ID:messages" would address another key.
_ID_RE = re.compile(r"[0-9a-f]{32}")

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)

# KEYS: hash, messages, index. ARGV: tenant, ttl ms. -> false, or {hash fields, messages}
_GET = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS: hash, messages, index. ARGV: tenant, id, updated_at, ttl ms, user json, assistant json,
# '1' to replace the system prompt, system prompt, turn token. -> false, or the hash fields after the turn.
# A turn whose token is already the last one was stored by an attempt whose reply was lost: not again.
_APPEND_TURN = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
if redis.call('HGET', KEYS[1], 'last_turn') == ARGV[9] then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'last_turn', ARGV[9])
redis.call('RPUSH', KEYS[2], ARGV[5], ARGV[6])
redis.call('HINCRBY', KEYS[1], 'message_count', 2)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'system_prompt', ARGV[8]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: hash, messages, index. ARGV: tenant, id. -> 1 deleted, 0 not found
_DELETE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: hash, lock. ARGV: tenant, token, lease ms. -> 1 acquired, 0 busy, -1 not found.
# Finding its own token means an earlier attempt of this same call took the lock and its reply was lost.
_ACQUIRE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return -1 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
return 0
"""

# KEYS: lock. ARGV: token, lease ms. -> 1 renewed, 0 the lease is no longer ours
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock. ARGV: token. -> 1 released, 0 the lease is no longer ours (expired, maybe taken by another)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisConversationStore:
    """``ConversationStore`` in Redis (redis-py's asyncio client). ``ttl_seconds``: idle time after which a
    conversation is gone; ``lock_ttl_seconds``: expiry of a lock whose holder stopped renewing it (renewed
    every third of it); ``timeout_seconds``: connect and read timeout; ``observer``: gets (operation,
    seconds) after each operation that reached Redis and (operation, None) after each that failed."""

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        lock_ttl_seconds: float = 30.0,
        timeout_seconds: float = 2.0,
        observer: LatencyObserver | None = None,
        key_prefix: str = "eoq",
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
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            # One immediate retry, on a broken connection only (never on a timeout): a pooled connection
            # that Redis closed when it restarted fails once and the retry reconnects. The scripts make the
            # retry safe when the first attempt did run: a turn carries a token and is stored once, a lock
            # attempt recognises its own token.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._description = f"redis at {_redact(url)}"
        kwargs = self._redis.connection_pool.connection_kwargs
        address = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self._where = f"redis at {address}"
        self._get = self._redis.register_script(_GET)
        self._append_turn = self._redis.register_script(_APPEND_TURN)
        self._delete = self._redis.register_script(_DELETE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    @property
    def description(self) -> str:
        return self._description

    async def create(self, tenant: str, system_prompt: str | None) -> Conversation:
        conversation_id = uuid.uuid4().hex
        now = time.time()
        fields = {"tenant": tenant, "created_at": repr(now), "updated_at": repr(now), "message_count": 0}
        if system_prompt is not None:
            fields["system_prompt"] = system_prompt
        index = self._index_key(tenant)
        async with self._call("create"), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._conv_key(conversation_id), mapping=fields)
            pipe.pexpire(self._conv_key(conversation_id), self._ttl_ms)
            pipe.zadd(index, {conversation_id: now})
            pipe.pexpire(index, self._ttl_ms)
            await pipe.execute()
        return Conversation(conversation_id, tenant, system_prompt, now, now, 0)

    async def get(self, tenant: str, conversation_id: str) -> Conversation:
        _check_id(conversation_id)
        async with self._call("get"):
            found = await self._get(keys=self._keys(tenant, conversation_id), args=[tenant, self._ttl_ms])
        if not found:
            raise NotFound(f"conversation {conversation_id} not found")
        fields, raw_messages = found
        messages = tuple(_decode_message(raw) for raw in raw_messages)
        return _decode_conversation(conversation_id, _pairs(fields), messages)

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
                async with self._redis.pipeline(transaction=False) as pipe:
                    for _, cid in after:
                        pipe.hgetall(self._conv_key(cid))
                    records = await pipe.execute()
                for (score, cid), fields in zip(after, records):
                    if fields.get("tenant") == tenant:
                        found.append((score, _decode_conversation(cid, fields, ())))
                    else:
                        stale.append(cid)  # expired: ids are never reused, so it cannot come back
                cursor = after[-1]
                if len(rows) < batch:
                    break
            if stale:
                await self._redis.zrem(index, *stale)
        page = found[:page_size]
        next_token = encode_page_token(page[-1][0], page[-1][1].id) if len(found) > page_size else ""
        return [conversation for _, conversation in page], next_token

    async def delete(self, tenant: str, conversation_id: str) -> None:
        _check_id(conversation_id)
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
        user: StoredMessage,
        assistant: StoredMessage,
        system_prompt: str | None = None,
    ) -> Conversation:
        _check_id(conversation_id)
        args = self._turn_args(tenant, conversation_id, user, assistant, system_prompt)
        async with self._call("append_turn"):
            fields = await self._append_turn(keys=self._keys(tenant, conversation_id), args=args)
        if not fields:
            raise NotFound(f"conversation {conversation_id} not found")
        return _decode_conversation(conversation_id, _pairs(fields), ())

    @asynccontextmanager
    async def lock(self, tenant: str, conversation_id: str) -> AsyncIterator[None]:
        _check_id(conversation_id)
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
            yield
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
        await self._redis.aclose()

    def _turn_args(
        self,
        tenant: str,
        conversation_id: str,
        user: StoredMessage,
        assistant: StoredMessage,
        system_prompt: str | None,
    ) -> list[str | int]:
        """ARGV of ``_APPEND_TURN``, with a fresh turn token: a retry of the same call sends the same one."""
        return [
            tenant,
            conversation_id,
            repr(time.time()),
            self._ttl_ms,
            _encode_message(user),
            _encode_message(assistant),
            "0" if system_prompt is None else "1",
            system_prompt or "",
            secrets.token_hex(16),
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
            raise StoreUnavailable(f"conversation store unreachable ({self._where}): {e}") from e
        except RedisError as e:
            # e.g. OOM, MISCONF, READONLY: Redis answers but refuses; a later retry may succeed.
            self._observe(op, None)
            raise StoreUnavailable(f"conversation store failed ({self._where}): {e}") from e
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


def _check_id(conversation_id: str) -> None:
    if not _ID_RE.fullmatch(conversation_id):
        raise NotFound(f"conversation {conversation_id} not found")


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}"))


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL as a Lua script returns it, [field, value, ...], as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def _decode_conversation(
    conversation_id: str, fields: dict[str, str], messages: tuple[StoredMessage, ...]
) -> Conversation:
    return Conversation(
        id=conversation_id,
        tenant=fields["tenant"],
        system_prompt=fields.get("system_prompt"),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
        message_count=int(fields["message_count"]),
        messages=messages,
    )


def _encode_message(message: StoredMessage) -> str:
    return json.dumps(
        {
            "role": message.role.value,
            "content": message.content,
            "created_at": message.created_at,
            "finish_reason": None if message.finish_reason is None else message.finish_reason.value,
            "token_ids": None if message.token_ids is None else list(message.token_ids),
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
    )
