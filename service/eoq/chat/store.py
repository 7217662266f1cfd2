"""The conversation store contract, shared by the in-process store and the Redis store.

Invariants every implementation keeps (the contract tests in ``tests/chat/test_store.py`` run against both):
- a conversation belongs to one tenant; any other tenant gets ``NotFound`` for its id, exactly as for an
  unknown id;
- a turn (the user message and the assistant answer, with its finish reason) is appended atomically: a
  reader sees both or neither;
- ``lock`` is a lease with an expiry, renewed in the background while held, so a crashed holder never locks a
  conversation forever; a second ``lock`` on a held conversation raises ``ConversationBusy`` at once;
- every use (get, append) refreshes the conversation's time-to-live;
- a store that cannot reach its backend raises ``StoreUnavailable`` quickly, writes nothing half-way, and
  serves again once the backend is back, without a restart.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from eoq.engine.types import FinishReason
from eoq.errors import Aborted, InvalidArgument, Unavailable

# Called with (operation name, seconds) after each backend operation, and (operation, None) on a failure.
LatencyObserver = Callable[[str, float | None], None]


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    role: Role
    content: str
    created_at: float  # unix seconds
    finish_reason: FinishReason | None = None  # assistant messages only
    # Assistant answers: the generated token ids (without the end-of-answer token) when they match the
    # content exactly, so the next turn's prompt reuses the same tokens and hits the prefix cache.
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    tenant: str
    system_prompt: str | None  # None = the model's default
    created_at: float  # unix seconds
    updated_at: float
    message_count: int
    messages: tuple[StoredMessage, ...] = ()  # oldest first; empty when listed


class ConversationBusy(Aborted):
    """Another answer in this conversation is still streaming (on this replica or another)."""


class StoreUnavailable(Unavailable):
    """The backend (Redis) cannot be reached."""


class ConversationStore(Protocol):
    """Where conversations live. All methods are coroutine-safe; ids are opaque strings."""

    @property
    def description(self) -> str:
        """One line for the start-up log, e.g. 'redis at redis://host:6379/0' or 'in-process (not shared)'."""
        ...

    async def create(self, tenant: str, system_prompt: str | None) -> Conversation: ...

    async def get(self, tenant: str, conversation_id: str) -> Conversation:
        """The conversation with its messages. Raises ``NotFound`` (unknown, expired or another tenant's)."""
        ...

    async def list(self, tenant: str, page_size: int, page_token: str = "") -> tuple[list[Conversation], str]:
        """One page of the tenant's conversations, most recently updated first, without messages, and the
        token of the next page ('' on the last). A bad page token raises ``InvalidArgument``."""
        ...

    async def delete(self, tenant: str, conversation_id: str) -> None:
        """Raises ``NotFound`` like ``get``."""
        ...

    async def append_turn(
        self,
        tenant: str,
        conversation_id: str,
        user: StoredMessage,
        assistant: StoredMessage,
        system_prompt: str | None = None,
    ) -> Conversation:
        """Append one turn atomically; when ``system_prompt`` is given it replaces the conversation's in the
        same write. Returns the updated conversation without messages. Raises ``NotFound`` if the
        conversation is gone."""
        ...

    def lock(self, tenant: str, conversation_id: str) -> AbstractAsyncContextManager[None]:
        """Hold the conversation for one answer. Raises ``ConversationBusy`` if another holder has it."""
        ...

    async def ping(self) -> None:
        """Raises ``StoreUnavailable`` when the backend cannot be reached."""
        ...

    async def close(self) -> None: ...


# Page tokens. Both stores order a tenant's conversations by (updated_at, id), newest first, and a page token
# is the position of the last conversation returned; the next page starts strictly after it, so conversations
# created while a client pages land before the cursor and never shift, duplicate or hide older ones.


def encode_page_token(updated_at: float, conversation_id: str) -> str:
    """An opaque token for the position just after ``(updated_at, conversation_id)``."""
    # json writes floats with repr, which round-trips exactly: the cursor compares equal to the stored score.
    raw = json.dumps([updated_at, conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_page_token(token: str) -> tuple[float, str]:
    """The ``(updated_at, conversation_id)`` inside ``token``. Raises ``InvalidArgument`` for any other string."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (UnicodeEncodeError, binascii.Error, ValueError) as e:
        raise InvalidArgument(
            f"invalid page_token {token[:40]!r}: pass the next_page_token of a previous page"
        ) from e
    if (
        not isinstance(value, list)
        or len(value) != 2
        or isinstance(value[0], bool)
        or not isinstance(value[0], (int, float))
        or not math.isfinite(value[0])
        or not isinstance(value[1], str)
    ):
        raise InvalidArgument(
            f"invalid page_token {token[:40]!r}: pass the next_page_token of a previous page"
        )
    return float(value[0]), value[1]
