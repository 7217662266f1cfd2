"""``AnswerLog`` in Redis: every replica reads every detached answer's events (see ``eoq.chat.answers``).

Keys (``P`` is the store's ``key_prefix``, ``A`` an answer's message id):

- ``P:answer:A:events`` stream; entry ``N-0`` is the event of sequence ``N`` (field ``e``: its JSON). Explicit
  ids make a replay exact (``XREAD`` after ``N-0`` returns the events after ``N``, in order, each once) and a
  second write of the same event an error rather than a duplicate. Its length is bounded (``MAXLEN``: an
  answer has at most ``max_events`` events); it expires ``retention_seconds`` after the answer ends, and while
  the answer runs it is kept alive ``retention_seconds`` ahead of the last write (a dead server's logs expire);
- ``P:answer:A:cancel`` string: set by ``request_cancel``, expires with the lease;
- ``P:tenant:T:detached`` sorted set of the tenant's running detached answers scored by their lease's expiry
  (unix ms), each under a token of its own: counted after dropping expired entries, in one script, so the limit holds across replicas.

Blocking reads hold one pooled connection each for at most ``block_seconds`` (below the socket timeout).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from eoq.chat.answers import AnswerLogSettings, too_many_detached
from eoq.chat.events import AnswerEvent

# KEYS: the tenant's set. ARGV: answer id, now ms, expiry ms, most running. -> -1 added, else how many run
_START = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return -1 end
if n >= tonumber(ARGV[4]) then return n end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) - tonumber(ARGV[2]))
return -1
"""


class RedisAnswerLog:
    """``AnswerLog`` on ``redis`` (the Redis store's client: its timeouts, retry and failure mapping apply
    through ``call``, the store's context manager that turns Redis errors into ``StoreUnavailable``)."""

    def __init__(self, redis: aioredis.Redis, call, key_prefix: str, settings: AnswerLogSettings,
                 max_events: int, block_seconds: float) -> None:
        self.settings = settings
        self._redis = redis
        self._call = call
        self._prefix = key_prefix
        self._max_events = max_events
        self._block_ms = max(1, int(block_seconds * 1000))
        self._retention_ms = max(1, round(settings.retention_seconds * 1000))
        self._lease_ms = max(1, round(settings.lease_seconds * 1000))
        self._start = redis.register_script(_START)

    def _events_key(self, answer_id: str) -> str:
        return f"{self._prefix}:answer:{answer_id}:events"

    def _running_key(self, tenant: str) -> str:
        return f"{self._prefix}:tenant:{tenant}:detached"

    async def start(self, tenant: str, slot: str) -> None:
        now = int(time.time() * 1000)
        async with self._call("answer_start"):
            n = await self._start(keys=[self._running_key(tenant)],
                                  args=[slot, now, now + self._lease_ms, self.settings.max_detached_per_tenant])
        if n != -1:
            raise too_many_detached(n, self.settings)

    async def renew(self, tenant: str, slot: str) -> None:
        now = int(time.time() * 1000)
        async with self._call("answer_renew"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._running_key(tenant), {slot: now + self._lease_ms}, xx=True)
                pipe.pexpire(self._running_key(tenant), self._lease_ms)
                await pipe.execute()

    async def end(self, tenant: str, slot: str) -> None:
        async with self._call("answer_end"):
            await self._redis.zrem(self._running_key(tenant), slot)

    async def finish(self, answer_id: str) -> None:
        async with self._call("answer_finish"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.pexpire(self._events_key(answer_id), self._retention_ms)
                pipe.delete(f"{self._prefix}:answer:{answer_id}:cancel")
                await pipe.execute()

    async def publish(self, answer_id: str, events: Sequence[AnswerEvent]) -> None:
        if not events:
            return
        key = self._events_key(answer_id)
        async with self._call("answer_publish"):
            async with self._redis.pipeline(transaction=True) as pipe:
                for e in events:
                    pipe.xadd(key, {"e": e.to_json()}, id=f"{e.sequence}-0", maxlen=self._max_events,
                              approximate=False)
                pipe.pexpire(key, self._retention_ms + self._lease_ms)
                try:
                    await pipe.execute()
                except ResponseError as err:  # an id not above the last: this event is already in the log
                    raise ValueError(f"answer {answer_id}: events published out of order: {err}") from err

    async def read(self, answer_id: str, after: int, timeout: float) -> list[AnswerEvent] | None:
        key = self._events_key(answer_id)
        block = min(self._block_ms, max(1, int(timeout * 1000)))
        async with self._call("answer_read"):
            found = await self._redis.xread({key: f"{after}-0"}, count=self._max_events)
            if not found:
                if timeout <= 0:
                    return [] if await self._redis.exists(key) else None
                # Blocks also on a stream not created yet: the answer's first event wakes it.
                found = await self._redis.xread({key: f"{after}-0"}, count=self._max_events, block=block)
        return [AnswerEvent.from_json(fields["e"]) for _, fields in found[0][1]] if found else []

    async def request_cancel(self, answer_id: str) -> None:
        async with self._call("answer_cancel"):
            await self._redis.set(f"{self._prefix}:answer:{answer_id}:cancel", "1", px=self._lease_ms)

    async def cancel_requested(self, answer_id: str) -> bool:
        async with self._call("answer_cancel_check"):
            return bool(await self._redis.exists(f"{self._prefix}:answer:{answer_id}:cancel"))

    async def close(self) -> None:
        return None
