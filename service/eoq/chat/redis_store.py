"""The Redis conversation store: conversations shared by every replica, surviving restarts.

Keys (``P`` is ``key_prefix``, ``ID`` a conversation id, 32 hex digits):

- ``P:conv:ID`` hash: ``tenant``, ``system_prompt`` (absent = the model's default), ``system_prompt_preview``
  (its first ``SYSTEM_PROMPT_PREVIEW_CHARS`` characters, what ``list`` reads), ``created_at``, ``updated_at``
  (unix seconds, repr floats), ``message_count``, ``num_bytes`` (``text_bytes`` of the system prompt and every
  message's content), ``last_turn`` (token of the last turn);
- ``P:conv:ID:messages`` list, oldest first, of JSON objects
  ``{"role", "content", "created_at", "finish_reason", "token_ids"}``;
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
whose message names no address and no exception (clients see it); the log line has both.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from eoq.engine.types import FinishReason
from eoq.errors import InternalError, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)

# KEYS: hash, index. ARGV: tenant, id, created_at, ttl ms, most conversations of the tenant, num_bytes,
# '1' when a system prompt follows, system prompt, its preview. -> 1 created, 0 the index is at the quota.
# Finding the hash means an earlier attempt of this same call created it and its reply was lost (ids are new).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'created_at', ARGV[3], 'updated_at', ARGV[3], 'message_count', 0,
           'num_bytes', ARGV[6])
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'system_prompt', ARGV[8], 'system_prompt_preview', ARGV[9]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# A conversation whose messages list was evicted while its hash was not: removed whole (KEYS: hash, messages,
# index; ARGV[2] the id), so that no reader gets a history that silently lost turns.
_DROP_IF_TORN = """
local function torn(num_messages)
  if num_messages == tonumber(redis.call('HGET', KEYS[1], 'message_count')) then return false end
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return true
end
"""

# KEYS: hash, messages, index. ARGV: tenant, id, ttl ms. -> false, or {hash fields, messages}
_GET = _DROP_IF_TORN + """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
local messages = redis.call('LRANGE', KEYS[2], 0, -1)
if torn(#messages) then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return {redis.call('HGETALL', KEYS[1]), messages}
"""

# KEYS: hash, messages, index, lock. ARGV: tenant, id, updated_at, ttl ms, user json, assistant json,
# '1' to replace the system prompt, system prompt, turn token, the turn's text bytes, the new system prompt's
# bytes, its preview, most messages, most bytes, the lease's token ('' = no lease to check).
# -> false (gone), {'lost'} (the lock is no longer the lease's: nothing written), {'full', the bytes the turn
# would add, hash fields} (refused: nothing written but a missing num_bytes), or the hash fields after the turn.
# A turn whose token is already the last one was stored by an earlier attempt (a retry whose reply was lost, or
# the final save a cancel raced): not again. The limit check is check_room's rule (eoq.chat.store).
_APPEND_TURN = _DROP_IF_TORN + """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
if redis.call('HGET', KEYS[1], 'last_turn') == ARGV[9] then return redis.call('HGETALL', KEYS[1]) end
if ARGV[15] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[15] then return {'lost'} end
if torn(redis.call('LLEN', KEYS[2])) then return false end
local count = tonumber(redis.call('HGET', KEYS[1], 'message_count'))
local size = tonumber(redis.call('HGET', KEYS[1], 'num_bytes'))
if not size then  -- written before num_bytes was kept: count it once (the JSON strings decode to UTF-8)
  size = redis.call('HSTRLEN', KEYS[1], 'system_prompt')
  for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do size = size + #cjson.decode(raw).content end
  redis.call('HSET', KEYS[1], 'num_bytes', size)
end
local added = tonumber(ARGV[10])
if ARGV[7] == '1' then added = added + tonumber(ARGV[11]) - redis.call('HSTRLEN', KEYS[1], 'system_prompt') end
if count + 2 > tonumber(ARGV[13]) or size + added > tonumber(ARGV[14]) then
  return {'full', added, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'last_turn', ARGV[9])
redis.call('RPUSH', KEYS[2], ARGV[5], ARGV[6])
redis.call('HINCRBY', KEYS[1], 'message_count', 2)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'num_bytes', size + added)
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'system_prompt', ARGV[8], 'system_prompt_preview', ARGV[12]) end
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
        self._create = self._redis.register_script(_CREATE)
        self._get = self._redis.register_script(_GET)
        self._append_turn = self._redis.register_script(_APPEND_TURN)
        self._delete = self._redis.register_script(_DELETE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

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
                keys=self._keys(tenant, conversation_id), args=[tenant, conversation_id, self._ttl_ms]
            )
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
        user: StoredMessage,
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
        await self._redis.aclose()

    def _turn_args(
        self,
        tenant: str,
        conversation_id: str,
        user: StoredMessage,
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
            _encode_message(user),
            _encode_message(assistant),
            "0" if system_prompt is None else "1",
            system_prompt or "",
            turn_token or secrets.token_hex(16),
            text_bytes(user.content) + text_bytes(assistant.content),
            text_bytes(system_prompt),
            _preview(system_prompt),
            limits.max_messages,
            limits.max_bytes,
            lease.token if lease is not None else "",
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
        num_bytes=(
            int(num_bytes) if num_bytes is not None
            else text_bytes(system_prompt) + sum(text_bytes(m.content) for m in messages)
        ),
    )


def _encode_message(message: StoredMessage) -> str:
    return json.dumps(
        {
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
    )
