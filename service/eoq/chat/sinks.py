"""Where an answer goes as it is generated: stored once when it ends, or — detached — stored as it grows and
published to the answer log for watchers on any replica.

``TurnSink`` is a Chat or Regenerate answer with a client on the stream: the question and the answer are written
in one atomic append when the answer ends (or is cut off). ``DetachedSink`` is an answer that outlives its
client: the question and an empty answer are written first (``generating``), every event is published to the
answer log as soon as the previous publish is done (events batch only while Redis is busy), the text so far is
written into the stored answer every ``snapshot_interval`` seconds (with the tenant's detached count renewed and
a cancel requested from another replica looked up), and the end writes the final answer before its last event
is published: a watcher that sees the end knows the answer is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from eoq.chat.events import AnswerEvent
from eoq.chat.store import ConversationStore, Lease, LeaseLost, StoredMessage
from eoq.errors import EoqError, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnWrite:
    """Where and how an answer is written: its conversation, its one turn token, the lock held for it, the
    question (``user`` None: a new answer to a stored question) and a replaced system prompt."""

    tenant: str
    conversation_id: str
    token: str
    lease: Lease
    user: StoredMessage | None
    system_prompt: str | None


class Sink(Protocol):
    async def begin(self, placeholder: StoredMessage) -> None:
        """Before the first event: ``placeholder`` is the answer with no text and no finish reason."""
        ...

    def add(self, event: AnswerEvent) -> None:
        """An event that is not the last (never blocks)."""
        ...

    async def end(self, answer: StoredMessage, last: AnswerEvent) -> None:
        """The final answer and the last event (``finish_reason`` set): stored before this returns."""
        ...


class TurnSink:
    """The answer stored with its question in one append when it ends."""

    def __init__(self, store: ConversationStore, write: TurnWrite) -> None:
        self._store = store
        self._write = write

    async def begin(self, placeholder: StoredMessage) -> None:
        return None

    def add(self, event: AnswerEvent) -> None:
        return None

    async def end(self, answer: StoredMessage, last: AnswerEvent) -> None:
        w = self._write
        await self._store.append_turn(w.tenant, w.conversation_id, w.user, answer, w.system_prompt,
                                      turn_token=w.token, lease=w.lease)


class DetachedSink:
    """The answer stored as it grows and published event by event (see the module docstring). ``on_cancel`` is
    called when another replica asks to cancel it, or its lock is lost."""

    def __init__(self, store: ConversationStore, write: TurnWrite, snapshot_interval: float,
                 on_cancel: Callable[[], None], slot: str) -> None:
        self._store = store
        self._log = store.answers
        self._write = write
        self._interval = snapshot_interval
        self._on_cancel = on_cancel
        self._slot = slot  # the answer's place in its tenant's count (AnswerLog.start)
        self._answer: StoredMessage | None = None
        self._texts: list[str] = []
        self._pending: list[AnswerEvent] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._closing = False

    async def begin(self, placeholder: StoredMessage) -> None:
        w = self._write
        self._answer = placeholder
        await self._store.append_turn(w.tenant, w.conversation_id, w.user, placeholder, w.system_prompt,
                                      turn_token=w.token, lease=w.lease)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name=f"eoq-answer-{placeholder.id}")

    def add(self, event: AnswerEvent) -> None:
        self._texts.append(event.text)
        self._pending.append(event)
        self._wake.set()

    async def end(self, answer: StoredMessage, last: AnswerEvent) -> None:
        assert self._answer is not None, "begin first"
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await asyncio.wait([self._flusher])  # publishes what is pending; never raises
        await self._store.update_answer(self._write.tenant, self._write.conversation_id, answer, self._write.lease)
        # Unpublished events (Redis was down) are published with the last one: watchers get every event.
        await self._log.publish(self._answer.id, [*self._pending, last])
        self._pending = []
        await self._log.finish(self._answer.id)

    async def _flush_loop(self) -> None:
        assert self._answer is not None
        w = self._write
        next_snapshot = time.monotonic() + self._interval
        while True:
            timeout = max(0.0, next_snapshot - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            pending, self._pending = self._pending, []
            try:
                if pending:
                    await self._log.publish(self._answer.id, pending)
            except EoqError as e:
                self._pending = pending + self._pending  # published next time, in order
                log.warning("answer %s: could not publish %d event(s), will retry: %s", self._answer.id,
                            len(pending), e)
            if self._closing:
                return
            if time.monotonic() < next_snapshot:
                continue
            next_snapshot = time.monotonic() + self._interval
            try:
                text = "".join(self._texts)
                await self._store.update_answer(w.tenant, w.conversation_id, replace(self._answer, content=text),
                                                w.lease)
                await self._log.renew(w.tenant, self._slot)
                if await self._log.cancel_requested(self._answer.id):
                    log.info("answer %s: cancelled from another replica", self._answer.id)
                    self._on_cancel()
                    return
            except (LeaseLost, NotFound) as e:  # the conversation's lock or the conversation itself is gone
                log.warning("answer %s: stopping: %s", self._answer.id, e)
                self._on_cancel()
                return
            except EoqError as e:
                log.warning("answer %s: could not store its text so far, will retry: %s", self._answer.id, e)
