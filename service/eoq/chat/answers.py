"""The answer log: the live events of detached answers, readable from any replica, and their bookkeeping.

A detached answer (``ChatRequest.detach``) keeps generating when its client goes away. Its events are appended
to a log under the answer's message id, numbered from 1 (``AnswerEvent.sequence``); ``WatchAnswer`` reads the
events after a sequence number, the stored ones first and then, blocking, the live rest — exactly once and in
order, since each event is written once under its own number and read by number. After the answer ends its
log is kept ``retention_seconds`` (a late watcher replays it exactly), then only the stored answer remains.

The log also carries what crosses replicas for a detached answer: a cancel request (``CancelAnswer`` on any
replica; the generating one polls it) and the count of a tenant's detached answers running (a limit across
replicas; each entry expires unless its generator renews it, so a dead server's answers stop counting).

Two implementations keep this contract: ``MemoryAnswerLog`` (in-process, with the in-process store) and
``RedisAnswerLog`` (Redis Streams, with the Redis store; ``eoq.chat.redis_answers``). The contract tests in
``tests/chat/test_answers.py`` run against both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from eoq.chat.events import AnswerEvent
from eoq.errors import ResourceExhausted


@dataclass(frozen=True, slots=True)
class AnswerLogSettings:
    """Settings ``max_detached_answers_per_tenant``, ``answer_retention_seconds``; ``lease_seconds``: how long a
    detached answer counts against its tenant unless its generator renews it (the conversation lock's ttl)."""

    max_detached_per_tenant: int = 16
    retention_seconds: float = 600.0
    lease_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_detached_per_tenant < 1 or self.retention_seconds <= 0 or self.lease_seconds <= 0:
            raise ValueError(f"answer log settings must be positive, got {self}")


def too_many_detached(num_running: int, settings: AnswerLogSettings) -> ResourceExhausted:
    return ResourceExhausted(
        f"too many detached answers: this tenant has {num_running} running, at most "
        f"{settings.max_detached_per_tenant} (max_detached_answers_per_tenant); wait for one to end or cancel one "
        "(CancelAnswer)"
    )


class AnswerLog(Protocol):
    settings: AnswerLogSettings

    async def start(self, tenant: str, slot: str) -> None:
        """Count a new detached answer of ``tenant`` under ``slot`` (a fresh token); ``ResourceExhausted``
        (``too_many_detached``) when the tenant already runs ``max_detached_per_tenant`` (on any replica)."""
        ...

    async def renew(self, tenant: str, slot: str) -> None:
        """The answer still runs: it keeps counting for another ``lease_seconds``."""
        ...

    async def end(self, tenant: str, slot: str) -> None:
        """The answer ended (however): it stops counting."""
        ...

    async def finish(self, answer_id: str) -> None:
        """The answer's last event is published: its log is kept ``retention_seconds`` more."""
        ...

    async def publish(self, answer_id: str, events: Sequence[AnswerEvent]) -> None:
        """Append ``events`` (their sequence numbers follow the last one published)."""
        ...

    async def read(self, answer_id: str, after: int, timeout: float) -> list[AnswerEvent] | None:
        """The events after sequence ``after``. With a ``timeout`` (> 0), waits up to that long for one if there
        are none yet — also for the answer's first event — and returns [] if none came; without (0), returns at
        once, ``None`` when the log holds nothing for the answer (never published, or past its retention)."""
        ...

    async def request_cancel(self, answer_id: str) -> None:
        """Ask the replica generating ``answer_id`` to stop it."""
        ...

    async def cancel_requested(self, answer_id: str) -> bool: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Log:
    events: list[AnswerEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    expires_at: float = float("inf")  # time.monotonic(); set when the answer ends


class MemoryAnswerLog:
    """``AnswerLog`` in this process (one event loop), for the in-process store."""

    def __init__(self, settings: AnswerLogSettings | None = None) -> None:
        self.settings = settings or AnswerLogSettings()
        self._logs: dict[str, _Log] = {}
        self._running: dict[str, dict[str, float]] = {}  # tenant -> answer id -> expiry (monotonic)
        self._cancels: set[str] = set()

    async def start(self, tenant: str, slot: str) -> None:
        now = time.monotonic()
        running = {a: t for a, t in self._running.get(tenant, {}).items() if t > now}
        if len(running) >= self.settings.max_detached_per_tenant:
            raise too_many_detached(len(running), self.settings)
        running[slot] = now + self.settings.lease_seconds
        self._running[tenant] = running

    async def renew(self, tenant: str, slot: str) -> None:
        running = self._running.get(tenant)
        if running is not None and slot in running:
            running[slot] = time.monotonic() + self.settings.lease_seconds

    async def end(self, tenant: str, slot: str) -> None:
        running = self._running.get(tenant, {})
        running.pop(slot, None)
        if not running:
            self._running.pop(tenant, None)

    async def finish(self, answer_id: str) -> None:
        self._cancels.discard(answer_id)
        log = self._logs.get(answer_id)
        if log is not None:
            log.expires_at = time.monotonic() + self.settings.retention_seconds
            log.changed.set()
        self._sweep()

    async def publish(self, answer_id: str, events: Sequence[AnswerEvent]) -> None:
        log = self._logs.setdefault(answer_id, _Log())
        last = log.events[-1].sequence if log.events else 0
        for e in events:
            if e.sequence <= last:
                raise ValueError(f"answer {answer_id}: event {e.sequence} published after {last}")
            last = e.sequence
        log.events.extend(events)
        log.changed.set()
        log.changed = asyncio.Event()

    async def read(self, answer_id: str, after: int, timeout: float) -> list[AnswerEvent] | None:
        log = self._logs.get(answer_id)
        if log is not None and log.expires_at <= time.monotonic():
            del self._logs[answer_id]
            log = None
        if log is None:
            if timeout <= 0:
                return None
            log = self._logs[answer_id] = _Log()  # its first event wakes the reader
        found = [e for e in log.events if e.sequence > after]
        if found or log.expires_at != float("inf") or timeout <= 0:
            return found
        try:
            await asyncio.wait_for(log.changed.wait(), timeout)
        except asyncio.TimeoutError:
            return []
        return [e for e in log.events if e.sequence > after]

    async def request_cancel(self, answer_id: str) -> None:
        self._cancels.add(answer_id)

    async def cancel_requested(self, answer_id: str) -> bool:
        return answer_id in self._cancels

    async def close(self) -> None:
        return None

    def _sweep(self) -> None:
        now = time.monotonic()
        for answer_id in [a for a, log in self._logs.items() if log.expires_at <= now]:
            del self._logs[answer_id]
