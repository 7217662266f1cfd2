"""The in-process conversation store, used when the server runs without ``--redis-url``.

It keeps the same contract as ``RedisConversationStore`` (time-to-live refreshed on use, leases that expire,
tenant isolation, atomic turns, cursor paging, the same limits), so the contract tests in
``tests/chat/test_store.py`` run against both. Conversations live in this process only: not shared between
replicas, lost on restart.

Every method runs on the event loop without awaiting in the middle of a change, which is what makes a turn
atomic and the store coroutine-safe. It is not thread-safe: call it from one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from eoq.chat.store import (
    Lease,
    LeaseLost,
    Conversation,
    ConversationBusy,
    ConversationLimits,
    StoredMessage,
    check_conversation_id,
    check_room,
    check_system_prompt,
    decode_page_token,
    encode_page_token,
    listed,
    quota_exceeded,
    text_bytes,
)
from eoq.chat.answers import AnswerLogSettings, MemoryAnswerLog
from eoq.chat.tree import with_legacy_ids
from eoq.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

# Expired conversations are dropped when touched, and by a sweep at most this often (create/list), so an idle
# store's memory does not grow with conversations nobody reads again.
_SWEEP_INTERVAL_SECONDS = 1.0


@dataclass(slots=True)
class _Record:
    tenant: str
    system_prompt: str | None
    created_at: float  # unix seconds
    updated_at: float
    expires_at: float  # time.monotonic()
    messages: list[StoredMessage] = field(default_factory=list)
    num_bytes: int = 0  # text_bytes of the system prompt and every message's content
    last_turn: str | None = None  # the turn token of the last append
    active_leaf: str | None = None
    generating: str | None = None  # the id of the answer a detached generation is writing

    def to_conversation(self, conversation_id: str, with_messages: bool, locked: bool = False) -> Conversation:
        return Conversation(
            id=conversation_id,
            tenant=self.tenant,
            system_prompt=self.system_prompt,
            created_at=self.created_at,
            updated_at=self.updated_at,
            message_count=len(self.messages),
            messages=with_legacy_ids(conversation_id, self.messages) if with_messages else (),
            num_bytes=self.num_bytes,
            active_leaf=self.active_leaf,
            generating=self.generating,
            locked=locked,
        )


@dataclass(slots=True)
class _Lease:
    token: str
    expires_at: float  # time.monotonic()


class MemoryConversationStore:
    """``ConversationStore`` in a dict. ``ttl_seconds``: idle time after which a conversation is gone;
    ``lock_ttl_seconds``: expiry of a lock whose holder stopped renewing it (renewed every third of it);
    ``limits``: what a conversation and a tenant may hold."""

    def __init__(
        self, ttl_seconds: float, lock_ttl_seconds: float = 30.0, limits: ConversationLimits | None = None,
        answers: AnswerLogSettings | None = None,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        if lock_ttl_seconds <= 0:
            raise ValueError(f"lock_ttl_seconds must be > 0, got {lock_ttl_seconds}")
        self._ttl = ttl_seconds
        self._lock_ttl = lock_ttl_seconds
        self._limits = limits or ConversationLimits()
        self._records: dict[str, _Record] = {}
        self._ids_by_tenant: dict[str, set[str]] = {}
        self._leases: dict[str, _Lease] = {}
        self._next_sweep = 0.0
        self.answers = MemoryAnswerLog(answers or AnswerLogSettings(lease_seconds=lock_ttl_seconds))

    @property
    def limits(self) -> ConversationLimits:
        return self._limits

    @property
    def description(self) -> str:
        return "in-process (not shared between replicas, lost on restart)"

    async def create(self, tenant: str, system_prompt: str | None) -> Conversation:
        check_system_prompt(system_prompt, self._limits)
        self._sweep()
        num_conversations = len(self._ids_by_tenant.get(tenant, ()))
        if num_conversations >= self._limits.max_conversations_per_tenant:
            self._drop_expired(tenant)  # the sweep runs at most once a second: expired ones must not count
            num_conversations = len(self._ids_by_tenant.get(tenant, ()))
            if num_conversations >= self._limits.max_conversations_per_tenant:
                raise quota_exceeded(num_conversations, self._limits)
        conversation_id = uuid.uuid4().hex
        now = time.time()
        record = _Record(tenant, system_prompt, now, now, time.monotonic() + self._ttl,
                         num_bytes=text_bytes(system_prompt))
        self._records[conversation_id] = record
        self._ids_by_tenant.setdefault(tenant, set()).add(conversation_id)
        return record.to_conversation(conversation_id, with_messages=True)

    async def get(self, tenant: str, conversation_id: str) -> Conversation:
        record = self._live(tenant, conversation_id)
        record.expires_at = time.monotonic() + self._ttl
        return record.to_conversation(conversation_id, with_messages=True, locked=self._is_locked(conversation_id))

    async def list(self, tenant: str, page_size: int, page_token: str = "") -> tuple[list[Conversation], str]:
        if page_size < 1:
            raise InvalidArgument(f"page_size must be at least 1, got {page_size}")
        cursor = decode_page_token(page_token) if page_token else None
        self._sweep()
        now = time.monotonic()
        positions = sorted(
            (
                (record.updated_at, conversation_id)
                for conversation_id in self._ids_by_tenant.get(tenant, ())
                if (record := self._records.get(conversation_id)) is not None and record.expires_at > now
            ),
            reverse=True,
        )
        if cursor is not None:
            positions = [p for p in positions if p < cursor]
        page = positions[:page_size]
        next_token = encode_page_token(*page[-1]) if len(positions) > page_size else ""
        return [listed(self._records[cid].to_conversation(cid, with_messages=False)) for _, cid in page], next_token

    async def delete(self, tenant: str, conversation_id: str) -> None:
        self._live(tenant, conversation_id)
        self._drop(conversation_id)

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
        record = self._live(tenant, conversation_id)
        if turn_token is not None and record.last_turn == turn_token:  # stored already
            return record.to_conversation(conversation_id, with_messages=False)
        self._check_lease(conversation_id, lease)
        new = (assistant,) if user is None else (user, assistant)
        new_bytes = sum(text_bytes(m.content) for m in new)
        if system_prompt is not None:
            new_bytes += text_bytes(system_prompt) - text_bytes(record.system_prompt)
        check_room(record.to_conversation(conversation_id, with_messages=False), self._limits, new_bytes, len(new))
        record.messages += new
        record.last_turn = turn_token
        record.num_bytes += new_bytes
        record.active_leaf = assistant.id
        if assistant.finish_reason is None:
            record.generating = assistant.id
        if system_prompt is not None:
            record.system_prompt = system_prompt
        record.updated_at = time.time()
        record.expires_at = time.monotonic() + self._ttl
        return record.to_conversation(conversation_id, with_messages=False)

    async def update_answer(self, tenant: str, conversation_id: str, answer: StoredMessage, lease: Lease) -> None:
        record = self._live(tenant, conversation_id)
        self._check_lease(conversation_id, lease)
        if record.generating != answer.id:
            raise NotFound(f"answer {answer.id} is not being generated in conversation {conversation_id}")
        i = next(i for i, m in enumerate(record.messages) if m.id == answer.id)
        record.num_bytes += text_bytes(answer.content) - text_bytes(record.messages[i].content)
        record.messages[i] = answer
        if answer.finish_reason is not None:
            record.generating = None
        record.updated_at = time.time()
        record.expires_at = time.monotonic() + self._ttl

    async def set_active_leaf(self, tenant: str, conversation_id: str, leaf_id: str) -> None:
        record = self._live(tenant, conversation_id)
        record.active_leaf = leaf_id
        record.expires_at = time.monotonic() + self._ttl

    async def replace_messages(self, tenant: str, conversation_id: str, messages: tuple[StoredMessage, ...],
                               active_leaf: str | None, lease: Lease) -> None:
        record = self._live(tenant, conversation_id)
        self._check_lease(conversation_id, lease)
        record.messages = list(messages)
        record.num_bytes = text_bytes(record.system_prompt) + sum(text_bytes(m.content) for m in messages)
        record.active_leaf = active_leaf
        if record.generating not in {m.id for m in messages}:
            record.generating = None
        record.updated_at = time.time()
        record.expires_at = time.monotonic() + self._ttl

    def _check_lease(self, conversation_id: str, lease: Lease | None) -> None:
        if lease is None:
            return
        held = self._leases.get(conversation_id)
        if held is None or held.token != lease.token or held.expires_at <= time.monotonic():
            raise LeaseLost(f"conversation {conversation_id}: its lock expired before the answer was stored; "
                            "ask again")

    def _is_locked(self, conversation_id: str) -> bool:
        lease = self._leases.get(conversation_id)
        return lease is not None and lease.expires_at > time.monotonic()

    @asynccontextmanager
    async def lock(self, tenant: str, conversation_id: str) -> AsyncIterator[Lease]:
        self._live(tenant, conversation_id)
        if self._is_locked(conversation_id):
            raise ConversationBusy(
                f"conversation {conversation_id} is busy: another answer is still streaming"
            )
        token = secrets.token_hex(16)
        self._leases[conversation_id] = _Lease(token, time.monotonic() + self._lock_ttl)
        renewal = asyncio.create_task(
            self._keep_alive(conversation_id, token), name=f"eoq-lease-{conversation_id}"
        )
        try:
            yield Lease(token)
        finally:
            renewal.cancel()
            lease = self._leases.get(conversation_id)
            if lease is not None and lease.token == token:  # never release another holder's lease
                del self._leases[conversation_id]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _keep_alive(self, conversation_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            lease = self._leases.get(conversation_id)
            if lease is None or lease.token != token:
                logger.warning("lost the lock of conversation %s: it expired and was taken", conversation_id)
                return
            lease.expires_at = time.monotonic() + self._lock_ttl

    def _live(self, tenant: str, conversation_id: str) -> _Record:
        """The tenant's unexpired conversation; ``NotFound`` for unknown, expired or another tenant's ids."""
        check_conversation_id(conversation_id)
        record = self._records.get(conversation_id)
        if record is not None and record.expires_at <= time.monotonic():
            self._drop(conversation_id)
            record = None
        if record is None or record.tenant != tenant:
            raise NotFound(f"conversation {conversation_id} not found")
        return record

    def _drop(self, conversation_id: str) -> None:
        record = self._records.pop(conversation_id)
        ids = self._ids_by_tenant[record.tenant]
        ids.discard(conversation_id)
        if not ids:
            del self._ids_by_tenant[record.tenant]

    def _drop_expired(self, tenant: str) -> None:
        now = time.monotonic()
        expired = [cid for cid in self._ids_by_tenant.get(tenant, ()) if self._records[cid].expires_at <= now]
        for conversation_id in expired:
            self._drop(conversation_id)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL_SECONDS
        for conversation_id in [cid for cid, r in self._records.items() if r.expires_at <= now]:
            self._drop(conversation_id)
        for conversation_id in [cid for cid, lease in self._leases.items() if lease.expires_at <= now]:
            del self._leases[conversation_id]
