"""The conversation store contract, shared by the in-process store and the Redis store.

Invariants every implementation keeps (the contract tests in ``tests/chat/test_store.py`` run against both):
- a conversation belongs to one tenant; any other tenant gets ``NotFound`` for its id, exactly as for an
  unknown id;
- messages form a tree (``eoq.chat.tree``): each has an id and a parent, ``get`` returns them all in creation
  order with the active leaf; messages stored before the tree read as one branch;
- a turn (the user message and the assistant answer, with its finish reason) is appended atomically: a
  reader sees both or neither — except a detached answer, appended unfinished and then written as it grows
  (``update_answer``) while its lock is held;
- ``lock`` is a lease with an expiry, renewed in the background while held, so a crashed holder never locks a
  conversation forever; a second ``lock`` on a held conversation raises ``ConversationBusy`` at once;
- every use (get, append) refreshes the conversation's time-to-live;
- a conversation holds at most ``ConversationLimits.max_messages`` messages and ``max_bytes`` bytes of UTF-8
  text (its messages' content and its system prompt): ``append_turn`` refuses a turn past either with
  ``ConversationFull``, in the same atomic step that would write it (the rule is ``check_room``); a tenant
  holds at most ``max_conversations_per_tenant`` live conversations: ``create`` refuses one more with
  ``ResourceExhausted`` (deleted and expired conversations do not count);
- listed conversations carry only the first ``SYSTEM_PROMPT_PREVIEW_CHARS`` characters of their system
  prompt (``system_prompt_truncated`` says when it was cut); ``get`` has the whole one;
- conversation ids longer than ``MAX_CONVERSATION_ID_LENGTH`` are ``InvalidArgument`` and other malformed ids
  ``NotFound``, both before the backend is asked (``check_conversation_id``); no error message repeats more
  than a short prefix of what a client sent;
- a store that cannot reach its backend raises ``StoreUnavailable`` quickly, writes nothing half-way, and
  serves again once the backend is back, without a restart.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from eoq.engine.types import FinishReason
from eoq.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from eoq.chat.answers import AnswerLog

# Called with (operation name, seconds) after each backend operation, and (operation, None) on a failure.
LatencyObserver = Callable[[str, float | None], None]

SYSTEM_PROMPT_PREVIEW_CHARS = 256  # of a listed conversation's system prompt
MAX_CONVERSATION_ID_LENGTH = 128  # longer ids are refused without being echoed
MAX_PAGE_TOKEN_LENGTH = 512  # ours are under 100 characters
_MAX_ECHO_CHARS = 40  # the most of a client's string an error message repeats

# Both stores mint ids as uuid4().hex; nothing else can exist, and in Redis a crafted id like "ID:messages"
# must never reach a key name.
_ID_RE = re.compile(r"[0-9a-f]{32}")


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
    # The content's token ids, so a later turn's prompt reuses them (and hits the prefix cache) instead of
    # tokenizing the history again: a question as it was tokenized, an answer as it was generated (without the
    # end-of-answer token, when they match the content exactly). ``token_model`` is the fingerprint of the
    # tokenizer they belong to (``PromptBuilder.fingerprint``): ids of another model are never reused.
    token_ids: tuple[int, ...] | None = None
    token_model: str | None = None
    # Its place in the conversation's tree (``eoq.chat.tree``): its id, and its parent's (``None`` for a first
    # question). Messages stored before the tree get both when they are read (``tree.with_legacy_ids``).
    id: str = ""
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    tenant: str
    system_prompt: str | None  # None = the model's default
    created_at: float  # unix seconds
    updated_at: float
    message_count: int
    messages: tuple[StoredMessage, ...] = ()  # oldest first; empty when listed
    num_bytes: int = 0  # UTF-8 bytes of the stored text: every message's content and the system prompt
    # Listed conversations: system_prompt holds only its first SYSTEM_PROMPT_PREVIEW_CHARS characters.
    system_prompt_truncated: bool = False
    # The leaf of the branch clients see and continue, as stored (``tree.active_leaf`` resolves it; None: the
    # newest branch).
    active_leaf: str | None = None
    # The answer a detached generation is writing into the store as it grows (``update_answer``), until it ends;
    # ``locked``: the conversation's lock is held now. An answer still ``generating`` with no lock held was cut
    # off by a dead server: it reads as cancelled.
    generating: str | None = None
    locked: bool = False


@dataclass(frozen=True, slots=True)
class ConversationLimits:
    """What one conversation and one tenant may hold (settings ``max_conversation_messages``,
    ``max_conversation_bytes``, ``max_conversations_per_tenant``)."""

    max_messages: int = 1000
    max_bytes: int = 4 * 1024 * 1024
    max_conversations_per_tenant: int = 10_000

    def __post_init__(self) -> None:
        if self.max_messages < 2 or self.max_bytes < 1 or self.max_conversations_per_tenant < 1:
            raise ValueError(f"limits must allow one turn and one conversation, got {self}")


class ConversationBusy(Aborted):
    """Another answer in this conversation is still streaming (on this replica or another)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held ``lock``: ``append_turn(..., lease=...)`` writes only while it is still the holder's."""

    token: str


class LeaseLost(Aborted):
    """The lock expired (its renewals failed) before the turn was written: another answer may have been written
    meanwhile, so this one is not (the client asks again)."""


class ConversationFull(FailedPrecondition):
    """The conversation holds as many messages or bytes as it may: the client starts a new one."""


class StoreUnavailable(Unavailable):
    """The backend (Redis) cannot be reached."""


class ConversationStore(Protocol):
    """Where conversations live. All methods are coroutine-safe; ids are opaque strings."""

    @property
    def description(self) -> str:
        """One line for the start-up log, e.g. 'redis at redis://host:6379/0' or 'in-process (not shared)'."""
        ...

    @property
    def limits(self) -> ConversationLimits:
        """What a conversation and a tenant may hold here (for ``check_room`` before a model runs)."""
        ...

    # The live events of detached answers, shared as widely as the conversations (``eoq.chat.answers``).
    answers: AnswerLog

    async def create(self, tenant: str, system_prompt: str | None) -> Conversation:
        """A new, empty conversation. Raises ``ResourceExhausted`` when the tenant already holds
        ``max_conversations_per_tenant`` (``quota_exceeded``), ``InvalidArgument`` for a system prompt over
        ``max_bytes`` (``check_system_prompt``)."""
        ...

    async def get(self, tenant: str, conversation_id: str) -> Conversation:
        """The conversation with its messages. Raises ``NotFound`` (unknown, expired or another tenant's)."""
        ...

    async def list(self, tenant: str, page_size: int, page_token: str = "") -> tuple[list[Conversation], str]:
        """One page of the tenant's conversations, most recently updated first, as ``listed`` rows (no
        messages, a system prompt preview), and the token of the next page ('' on the last); conversations
        whose data is gone (expired, evicted) are skipped. A bad page token raises ``InvalidArgument``."""
        ...

    async def delete(self, tenant: str, conversation_id: str) -> None:
        """Raises ``NotFound`` like ``get``."""
        ...

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
        """Append one turn atomically — a question and its answer, or (``user`` None) a new answer to a stored
        question — and make the answer the active leaf; the messages carry their ids and parents (the caller,
        holding the lock, has checked the parents exist). An answer with no ``finish_reason`` is one still being
        generated: it becomes the conversation's ``generating`` answer, completed by ``update_answer``. When
        ``system_prompt`` is given it replaces the conversation's in the same write. Returns the updated
        conversation without messages. Raises ``NotFound`` if the conversation is gone, ``ConversationFull``
        (writing nothing) when the turn does not fit its limits (``check_room``). ``turn_token``: the turn's
        id — a second append with the last turn's token writes nothing (a retry, or a cancel racing the final
        save, never stores a turn twice). ``lease``: the ``lock`` held for the turn; if it is no longer held,
        ``LeaseLost`` and nothing is written."""
        ...

    async def update_answer(self, tenant: str, conversation_id: str, answer: StoredMessage, lease: Lease) -> None:
        """Replace the ``generating`` answer (same id) with ``answer``: its text so far, or (with a
        ``finish_reason``) its final form, which ends ``generating``. Only while ``lease`` holds the lock
        (``LeaseLost``, nothing written, otherwise); ``NotFound`` if the conversation is gone or the answer is not
        the one being generated. The growth is not checked against the byte limit: the caller reserved room for
        the whole answer (``check_room``) before it started."""
        ...

    async def set_active_leaf(self, tenant: str, conversation_id: str, leaf_id: str) -> None:
        """Make ``leaf_id`` (a message the caller found in the conversation) the active leaf. ``NotFound`` like
        ``get``."""
        ...

    async def replace_messages(self, tenant: str, conversation_id: str, messages: tuple[StoredMessage, ...],
                               active_leaf: str | None, lease: Lease) -> None:
        """Replace the whole tree with ``messages`` (a subset of it in the same order, e.g. without a deleted
        subtree) and its active leaf, atomically, only while ``lease`` holds the lock (``LeaseLost``)."""
        ...

    def lock(self, tenant: str, conversation_id: str) -> AbstractAsyncContextManager[Lease]:
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
    """The ``(updated_at, conversation_id)`` inside ``token``. Raises ``InvalidArgument`` for any other string:
    over ``MAX_PAGE_TOKEN_LENGTH`` characters, not ASCII, not base64 of a JSON ``[number, string]`` pair, nested
    too deep for the parser, a number too big for a float. The message repeats at most a short prefix of it."""
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise _bad_page_token(f"({len(token)} characters, at most {MAX_PAGE_TOKEN_LENGTH})")
    if not token.isascii():
        raise _bad_page_token("(not ASCII)")
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        if (
            not isinstance(value, list)
            or len(value) != 2
            or isinstance(value[0], bool)
            or not isinstance(value[0], (int, float))
            or not math.isfinite(value[0])  # OverflowError for an int beyond float's range
            or not isinstance(value[1], str)
        ):
            raise ValueError("not an [updated_at, id] pair")
        return float(value[0]), value[1]
    except (binascii.Error, ValueError, RecursionError, OverflowError) as e:  # ValueError: JSON, UTF-8
        raise _bad_page_token(repr(token[:_MAX_ECHO_CHARS])) from e


def _bad_page_token(what: str) -> InvalidArgument:
    return InvalidArgument(f"invalid page_token {what}: pass the next_page_token of a previous page")


# Limits. One rule for both stores, which the chat service also checks before it runs the model.


def text_bytes(text: str | None) -> int:
    """The UTF-8 size of ``text`` as the limits count it (0 for ``None``)."""
    return len(text.encode("utf-8", "surrogatepass")) if text else 0


def check_room(conv: Conversation, limits: ConversationLimits, new_bytes: int, new_messages: int = 2) -> None:
    """Raise ``ConversationFull`` unless ``conv`` can take ``new_messages`` more messages (a turn is two) that add
    ``new_bytes`` bytes of text (with a replaced system prompt: its change in size, maybe negative), within
    ``limits``. Only ``conv.message_count`` and ``conv.num_bytes`` are read. The Redis store's append script
    applies the same rule inside Redis, atomically with the write."""
    if conv.message_count + new_messages > limits.max_messages:
        raise ConversationFull(
            f"conversation is full ({conv.message_count} messages, limit {limits.max_messages}): start a new one"
        )
    if conv.num_bytes + new_bytes > limits.max_bytes:
        raise ConversationFull(
            f"conversation is full ({conv.num_bytes} bytes of text and {new_bytes} more in this turn, limit "
            f"{limits.max_bytes} bytes): start a new one"
        )


def check_system_prompt(system_prompt: str | None, limits: ConversationLimits) -> None:
    """Raise ``InvalidArgument`` for a system prompt that alone is over the conversation's byte limit."""
    size = text_bytes(system_prompt)
    if size > limits.max_bytes:
        raise InvalidArgument(
            f"the system prompt is too long ({size} bytes, a conversation holds at most {limits.max_bytes})"
        )


def quota_exceeded(num_conversations: int, limits: ConversationLimits) -> ResourceExhausted:
    """The error ``create`` raises when the tenant holds ``num_conversations`` and may hold no more."""
    return ResourceExhausted(
        f"too many conversations: this tenant has {num_conversations}, its quota "
        f"(max_conversations_per_tenant) is {limits.max_conversations_per_tenant}; delete old conversations "
        "(DeleteConversation) to start new ones"
    )


def listed(conv: Conversation) -> Conversation:
    """``conv`` as a list row: no messages, and at most ``SYSTEM_PROMPT_PREVIEW_CHARS`` of its system prompt."""
    system_prompt = conv.system_prompt
    truncated = system_prompt is not None and len(system_prompt) > SYSTEM_PROMPT_PREVIEW_CHARS
    if truncated:
        system_prompt = system_prompt[:SYSTEM_PROMPT_PREVIEW_CHARS]
    return replace(conv, system_prompt=system_prompt, system_prompt_truncated=truncated, messages=())


def check_conversation_id(conversation_id: str) -> None:
    """Raise ``InvalidArgument`` for an id over ``MAX_CONVERSATION_ID_LENGTH`` characters (not repeated back), and
    ``NotFound`` for any other string that is not an id the stores mint (it cannot exist)."""
    if len(conversation_id) > MAX_CONVERSATION_ID_LENGTH:
        raise InvalidArgument(
            f"conversation id too long ({len(conversation_id)} characters; ids are 32 hex digits)"
        )
    if not _ID_RE.fullmatch(conversation_id):
        raise NotFound(f"conversation {conversation_id} not found")
