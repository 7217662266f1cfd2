"""Conversations as trees: message ids, paths, siblings and subtrees — pure functions over stored messages.

A conversation's messages form a tree. Every message has an ``id`` and a ``parent_id``: a question's parent is
an answer (or none, for a first question), an answer's parent is its question. Regenerating an answer adds a
sibling answer under the same question; editing a question adds a sibling question under the same parent. The
conversation's *active leaf* says which branch a client sees and continues; a turn's prompt is the path from the
root to its parent, rendered exactly as the linear conversation of that path would be (so the prefix cache, keyed
by the tokens alone, serves every earlier turn of a branch).

Message ids name their conversation: ``<conversation id>-<suffix>``, the suffix 16 hex digits for a message
written by this version, or the decimal position in the store for one written before messages had ids (read as
a single branch, each message the parent of the next). So a message id from another conversation is recognised
as such without a lookup.

Messages are kept in creation order: a parent always comes before its children.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import replace

from eoq.chat.store import MAX_CONVERSATION_ID_LENGTH, Role, StoredMessage
from eoq.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_MESSAGE_ID_LENGTH = MAX_CONVERSATION_ID_LENGTH + 1 + 16
_MESSAGE_ID_RE = re.compile(r"([0-9a-f]{32})-([0-9a-f]{16}|[0-9]{1,9})")


def new_message_id(conversation_id: str) -> str:
    return f"{conversation_id}-{secrets.token_hex(8)}"


def legacy_message_id(conversation_id: str, position: int) -> str:
    """The id of the message at ``position`` of a conversation stored before messages had ids."""
    return f"{conversation_id}-{position}"


def with_legacy_ids(conversation_id: str, messages: Sequence[StoredMessage]) -> tuple[StoredMessage, ...]:
    """``messages`` with an id and a parent for each message stored without one (the old layout: one branch,
    every message the parent of the next). Messages that have ids are returned as they are."""
    out: list[StoredMessage] = []
    for i, m in enumerate(messages):
        if not m.id:
            parent = out[i - 1].id if i else None
            m = replace(m, id=legacy_message_id(conversation_id, i), parent_id=parent)
        out.append(m)
    return tuple(out)


def check_message_id(conversation_id: str, message_id: str, what: str = "message") -> None:
    """``InvalidArgument`` for an over-long id or one of another conversation; ``NotFound`` for a malformed one
    (it cannot exist). Never repeats more than a short prefix of a long id."""
    if len(message_id) > MAX_MESSAGE_ID_LENGTH:
        raise InvalidArgument(f"{what} id too long ({len(message_id)} characters)")
    match = _MESSAGE_ID_RE.fullmatch(message_id)
    if match is None:
        raise NotFound(f"{what} {message_id} not found in conversation {conversation_id}")
    if match.group(1) != conversation_id:
        raise InvalidArgument(
            f"{what} {message_id} belongs to another conversation ({match.group(1)}), not {conversation_id}"
        )


def find(messages: Sequence[StoredMessage], message_id: str, conversation_id: str,
         what: str = "message") -> StoredMessage:
    check_message_id(conversation_id, message_id, what)
    for m in messages:
        if m.id == message_id:
            return m
    raise NotFound(f"{what} {message_id} not found in conversation {conversation_id}")


def path_to(messages: Sequence[StoredMessage], leaf_id: str | None) -> list[StoredMessage]:
    """The messages from the root to ``leaf_id`` (inclusive), oldest first; [] for ``None``."""
    by_id = {m.id: m for m in messages}
    path: list[StoredMessage] = []
    node = by_id.get(leaf_id) if leaf_id else None
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id else None
    path.reverse()
    return path


def children(messages: Sequence[StoredMessage], parent_id: str | None) -> list[StoredMessage]:
    """The children of ``parent_id`` (``None``: the first questions), in creation order."""
    return [m for m in messages if m.parent_id == parent_id]


def newest_leaf_under(messages: Sequence[StoredMessage], message_id: str) -> str:
    """The leaf a client lands on when it selects ``message_id``: following the newest child down."""
    kids: dict[str | None, str] = {}
    for m in messages:  # creation order: the last child seen is the newest
        kids[m.parent_id] = m.id
    node = message_id
    while node in kids:
        node = kids[node]
    return node


def active_leaf(messages: Sequence[StoredMessage], stored_leaf: str | None) -> str | None:
    """The active leaf: the stored one while it exists, else the newest message's branch leaf (data written
    before the tree kept no leaf: its last message), ``None`` for an empty conversation."""
    if not messages:
        return None
    if stored_leaf and any(m.id == stored_leaf for m in messages):
        return stored_leaf
    return newest_leaf_under(messages, messages[-1].id)


def subtree_ids(messages: Sequence[StoredMessage], message_id: str) -> set[str]:
    """``message_id`` and every message below it."""
    gone = {message_id}
    for m in messages:  # parents come before their children
        if m.parent_id in gone:
            gone.add(m.id)
    return gone


def question_parent(messages: Sequence[StoredMessage], requested: str, conversation_id: str,
                    leaf_id: str | None) -> str | None:
    """The parent a new question hangs from, given the client's ``parent_message_id`` (``requested``): '' = the
    active branch's leaf ``leaf_id`` (which must be an answer), the conversation's id = the root (a new first
    question), else an answer of this conversation. Returns the parent's id (``None`` for the root)."""
    if requested == conversation_id:
        return None
    if not requested:
        if leaf_id is None:
            return None
        leaf = find(messages, leaf_id, conversation_id)
        if leaf.role is not Role.ASSISTANT:
            raise FailedPrecondition(
                f"the active branch of conversation {conversation_id} ends in a question without an answer "
                f"({leaf_id}): Regenerate its answer, or pass parent_message_id"
            )
        return leaf.id
    parent = find(messages, requested, conversation_id, "parent message")
    if parent.role is not Role.ASSISTANT:
        raise InvalidArgument(
            f"parent message {requested} is a question: a question follows an answer (to edit a question, pass "
            "the parent of the one you edit; for a first question, the conversation id)"
        )
    return parent.id


def last_question(messages: Sequence[StoredMessage], leaf_id: str | None, conversation_id: str) -> StoredMessage:
    """The last question on the branch ending at ``leaf_id`` (what Regenerate answers again by default)."""
    for m in reversed(path_to(messages, leaf_id)):
        if m.role is Role.USER:
            return m
    raise FailedPrecondition(f"conversation {conversation_id} has no question to answer again")


def siblings(messages: Sequence[StoredMessage]) -> dict[str, tuple[str, ...]]:
    """Each message's id -> the ids of its parent's children (itself included), oldest first."""
    by_parent: dict[str | None, list[str]] = {}
    for m in messages:
        by_parent.setdefault(m.parent_id, []).append(m.id)
    groups = {parent: tuple(ids) for parent, ids in by_parent.items()}
    return {m.id: groups[m.parent_id] for m in messages}
