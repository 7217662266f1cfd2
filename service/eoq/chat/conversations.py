"""The conversation-tree use cases: create one (with a history a client brings), read its active branch or its
whole tree, select a branch, delete a message and its subtree — and settle an answer whose server died while it
was being generated (stored as far as its events got, cancelled), which reading or writing the conversation
does first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from eoq.chat import tree
from eoq.chat.store import Conversation, ConversationBusy, ConversationStore, Lease, Role, StoredMessage
from eoq.engine.types import FinishReason
from eoq.errors import EoqError

if TYPE_CHECKING:
    from eoq.chat.service import ChatLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConversationView:
    """A conversation as a client reads it: ``conversation.messages`` is its active branch (or the whole tree),
    with each message's siblings and the answer a detached generation is writing now, if any."""

    conversation: Conversation
    active_leaf: str | None
    siblings: dict[str, tuple[str, ...]]
    generating: str | None


class Conversations:
    def __init__(self, store: ConversationStore, limits: ChatLimits) -> None:
        self.store = store
        self.limits = limits

    async def discard(self, tenant: str, conversation_id: str) -> None:
        """Delete a conversation a refused request started; a failure is only logged (the caller's error matters
        more, and the empty conversation expires by itself)."""
        try:
            await self.store.delete(tenant, conversation_id)
        except EoqError as e:
            log.warning("could not delete the unused conversation %s: %s", conversation_id, e)

    async def settle(self, conv: Conversation, lease: Lease) -> Conversation:
        """With the lock held: an answer still marked ``generating`` was cut off by a server that died (its lock
        expired); store it as far as its events got, CANCELLED. Returns the conversation as it is now."""
        if conv.generating is None:
            return conv
        answer = next((m for m in conv.messages if m.id == conv.generating), None)
        if answer is None:
            return conv
        events = await self.store.answers.read(answer.id, 0, 0) or []
        text = "".join(e.text for e in events) if events else answer.content
        settled = replace(answer, content=text, finish_reason=FinishReason.CANCELLED, token_ids=None)
        await self.store.update_answer(conv.tenant, conv.id, settled, lease)
        await self.store.answers.finish(answer.id)
        log.info("answer %s: its server died while generating it; stored as far as it got (cancelled)", answer.id)
        return await self.store.get(conv.tenant, conv.id)

    async def create(self, tenant: str, system_prompt: str | None = None,
                                  history: tuple[tuple[str, str], ...] = ()) -> Conversation:
        """A new conversation, optionally holding ``history`` — (question, answer) turns a client brings along
        (OpenAI's ``items``), stored as one branch."""
        for question, answer in history:
            self.limits.check(question)
            self.limits.check(answer, what="an answer")
        self.limits.check("", system_prompt or "")
        conv = await self.store.create(tenant, system_prompt)
        try:
            parent = None
            for question, answer in history:
                user = StoredMessage(Role.USER, question, time.time(), id=tree.new_message_id(conv.id),
                                     parent_id=parent)
                reply = StoredMessage(Role.ASSISTANT, answer, time.time(), FinishReason.STOP,
                                      id=tree.new_message_id(conv.id), parent_id=user.id)
                conv = await self.store.append_turn(tenant, conv.id, user, reply)
                parent = reply.id
        except BaseException:
            await self.discard(tenant, conv.id)
            raise
        return conv

    async def get(self, tenant: str, conversation_id: str, whole_tree: bool = False) -> ConversationView:
        """The active branch (or, ``whole_tree``, every message in creation order) with each message's siblings.
        An answer cut off by a dead server is stored as cancelled first (if nobody holds the conversation)."""
        conv = await self.store.get(tenant, conversation_id)
        if conv.generating is not None and not conv.locked:
            try:
                async with self.store.lock(tenant, conversation_id) as lease:
                    conv = await self.settle(await self.store.get(tenant, conversation_id), lease)
            except ConversationBusy:  # taken meanwhile: its holder settles it
                conv = await self.store.get(tenant, conversation_id)
        return self._view(conv, whole_tree)

    def _view(self, conv: Conversation, whole_tree: bool) -> ConversationView:
        messages = conv.messages
        leaf = tree.active_leaf(messages, conv.active_leaf)
        shown = list(messages) if whole_tree else tree.path_to(messages, leaf)
        generating = conv.generating if conv.locked else None
        return ConversationView(replace(conv, messages=tuple(shown)), leaf, tree.siblings(messages), generating)

    async def set_active_branch(self, tenant: str, conversation_id: str, message_id: str) -> ConversationView:
        conv = await self.store.get(tenant, conversation_id)
        message = tree.find(conv.messages, message_id, conversation_id)
        leaf = tree.newest_leaf_under(conv.messages, message.id)
        await self.store.set_active_leaf(tenant, conversation_id, leaf)
        return self._view(replace(conv, active_leaf=leaf), whole_tree=False)

    async def delete_message(self, tenant: str, conversation_id: str, message_id: str) -> tuple[int, str | None]:
        """Delete ``message_id`` and its subtree; returns how many messages went and the active leaf after."""
        async with self.store.lock(tenant, conversation_id) as lease:
            conv = await self.settle(await self.store.get(tenant, conversation_id), lease)
            message = tree.find(conv.messages, message_id, conversation_id)
            gone = tree.subtree_ids(conv.messages, message.id)
            kept = tuple(m for m in conv.messages if m.id not in gone)
            leaf = tree.active_leaf(conv.messages, conv.active_leaf)
            if leaf in gone:
                leaf = (tree.newest_leaf_under(kept, message.parent_id) if message.parent_id
                        else tree.active_leaf(kept, None))
            await self.store.replace_messages(tenant, conversation_id, kept, leaf, lease)
        return len(gone), leaf
