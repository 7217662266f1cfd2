"""The chat use cases: a question in a conversation, a stateless completion, and conversation management.

For a Chat turn: hold the conversation (a lease in the store, so a second question while an answer streams is
refused — across replicas when the store is Redis), render the history and the question into a prompt (oldest
turns dropped to fit the context), stream the engine's answer, and store the question and the answer together
when it ends — also when the client cancels (the answer as far as it got, marked cancelled). The prompt's
tokens are salted with the tenant in the prefix cache, so a conversation's next turn reuses its KV blocks and
no other tenant's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, replace

from eoq.chat.prompt import ChatMessage, PromptBuilder, Turn
from eoq.chat.store import Conversation, ConversationStore, Lease, Role, StoredMessage, check_room, text_bytes
from eoq.engine.async_engine import AsyncEngine
from eoq.engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams
from eoq.errors import EoqError, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    time_to_first_token_seconds: float
    total_seconds: float
    queue_seconds: float


@dataclass(slots=True)
class AnswerEvent:
    """One streamed piece of an answer; the last has ``finish_reason`` and ``usage``."""

    conversation_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    dropped_turns: int = 0


def _usage(prompt_len: int, out: RequestOutput) -> Usage:
    t = out.timings
    return Usage(
        prompt_tokens=prompt_len,
        completion_tokens=out.num_completion_tokens,
        cached_prompt_tokens=out.num_cached_tokens,
        time_to_first_token_seconds=t.ttft_seconds if t else 0.0,
        total_seconds=t.total_seconds if t else 0.0,
        queue_seconds=t.queue_seconds if t else 0.0,
    )


def history_turns(conv: Conversation, token_model: str | None = None, vocab_size: int | None = None) -> list[Turn]:
    """Pair the stored messages into (question, answer) turns. A message's stored token ids are reused only when
    they are this model's — tagged with ``token_model`` (the prompt builder's fingerprint) and every id below
    ``vocab_size`` —, else its text is tokenized again: ids of another model never reach the engine."""

    def own(m: StoredMessage) -> tuple[int, ...] | None:
        ids = m.token_ids
        if not ids or m.token_model != token_model:
            return None
        return ids if vocab_size is None or 0 <= min(ids) <= max(ids) < vocab_size else None

    turns = []
    msgs = conv.messages
    for i in range(0, len(msgs) - 1, 2):
        u, a = msgs[i], msgs[i + 1]
        if u.role is not Role.USER or a.role is not Role.ASSISTANT:
            log.warning("conversation %s: unexpected roles at %d; skipping", conv.id, i)
            continue
        turns.append(Turn(ChatMessage("user", u.content, own(u)), ChatMessage("assistant", a.content, own(a))))
    return turns


@dataclass(frozen=True, slots=True)
class _TurnWrite:
    """Where and how a turn is written: its conversation, its one turn token, the lock held for it."""

    tenant: str
    conversation_id: str
    token: str
    lease: Lease


@dataclass(frozen=True, slots=True)
class ChatLimits:
    """Sizes checked in characters before any tokenization (a 4 MB message is refused at once, not after seconds
    of tokenizing it); the settings ``max_message_chars`` and ``max_system_prompt_chars`` hold their defaults."""

    max_message_chars: int
    max_system_prompt_chars: int

    def check(self, message: str, system_prompt: str = "", what: str = "the message") -> None:
        if len(message) > self.max_message_chars:
            raise InvalidArgument(f"{what} is too long: {len(message)} characters, at most "
                                  f"{self.max_message_chars} (--max-message-chars)")
        if len(system_prompt) > self.max_system_prompt_chars:
            raise InvalidArgument(f"the system prompt is too long: {len(system_prompt)} characters, at most "
                                  f"{self.max_system_prompt_chars} (--max-system-prompt-chars)")


class ChatService:
    """The use cases. Prompt building and tokenization run on one worker thread of their own, never on the event
    loop: a big message or a long history never stalls other streams or the health check."""

    def __init__(self, engine: AsyncEngine, store: ConversationStore, prompts: PromptBuilder,
                 limits: ChatLimits) -> None:
        self.engine = engine
        self.store = store
        self.prompts = prompts
        self.limits = limits
        assert engine.info is not None
        self.context_length = engine.info.context_length
        self.vocab_size = engine.info.vocab_size
        self._end_ids = frozenset(engine.info.eos_token_ids)  # the model's and the template's (EngineConfig)
        # One thread: the tokenizer is not shared across threads (see PromptBuilder).
        self._prompt_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eoq-prompts")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prompt_worker, functools.partial(fn, *args))

    def close(self) -> None:
        self._prompt_worker.shutdown(wait=False, cancel_futures=True)

    def _with_defaults(self, sampling: SamplingParams) -> SamplingParams:
        if self.prompts.default_stop:
            return replace(sampling, stop=tuple(dict.fromkeys((*sampling.stop, *self.prompts.default_stop))))
        return sampling

    async def chat(self, tenant: str, conversation_id: str, message: str, sampling: SamplingParams,
                   system_prompt: str = "") -> AsyncIterator[AnswerEvent]:
        """One question in a conversation (a new one if ``conversation_id`` is empty) -> the streamed answer.

        Refusals that cost nothing come first — sizes in characters, the server's and the tenant's places — before
        any store work or tokenization."""
        if not message.strip():
            raise InvalidArgument("the message is empty")
        self.limits.check(message, system_prompt)
        with self.engine.admission(tenant):
            sampling = self._with_defaults(sampling)
            if conversation_id:
                conv = await self.store.get(tenant, conversation_id)
                async with aclosing(self._turn(tenant, conv.id, message, sampling, system_prompt)) as events:
                    async for event in events:
                        yield event
                return
            conv = await self.store.create(tenant, system_prompt or None)
            answered = False
            try:
                async with aclosing(self._turn(tenant, conv.id, message, sampling, system_prompt)) as events:
                    async for event in events:
                        answered = True
                        yield event
            except Exception:
                if not answered:  # refused before any answer (too long, server full...): no conversation started
                    await self._discard(tenant, conv.id)
                raise

    async def _discard(self, tenant: str, conversation_id: str) -> None:
        try:
            await self.store.delete(tenant, conversation_id)
        except EoqError as e:  # the caller's error matters more; the empty conversation expires by itself
            log.warning("could not delete the unused conversation %s: %s", conversation_id, e)

    async def _turn(self, tenant: str, conversation_id: str, message: str, sampling: SamplingParams,
                    system_prompt: str) -> AsyncIterator[AnswerEvent]:
        """Hold the conversation, stream the answer to ``message``, store the turn (also when cut short)."""
        async with self.store.lock(tenant, conversation_id) as lease:
            conv = await self.store.get(tenant, conversation_id)  # under the lock: the latest history
            system = system_prompt or conv.system_prompt
            # Room for the question, the answer (about 4 bytes a token at most) and a new system prompt: refused
            # now rather than after the answer, which could then not be stored.
            new_system_bytes = text_bytes(system_prompt) - text_bytes(conv.system_prompt) if system_prompt else 0
            check_room(conv, self.store.limits, text_bytes(message) + 4 * sampling.max_tokens + new_system_bytes)
            turn = _TurnWrite(tenant, conv.id, secrets.token_hex(16), lease)  # one token: never stored twice
            history = history_turns(conv, self.prompts.fingerprint, self.vocab_size)
            prompt = await self._off_loop(self.prompts.build_chat, system, history, message,
                                          self.context_length - sampling.max_tokens)
            request = EngineRequest(self.engine.new_request_id("chat"), prompt.token_ids, sampling, cache_salt=tenant)
            user = StoredMessage(Role.USER, message, time.time(), token_ids=prompt.question_ids or None,
                                 token_model=self.prompts.fingerprint)
            new_system = system_prompt or None
            texts: list[str] = []
            ids: list[int] = []
            saved = False
            try:
                first = True
                async with aclosing(self.engine.generate(request, admitted=True)) as stream:
                    async for out in stream:
                        texts.append(out.text)
                        ids.extend(out.token_ids)
                        event = AnswerEvent(conv.id, out.text, out.token_ids,
                                            dropped_turns=prompt.dropped_turns if first else 0)
                        first = False
                        if out.finished:
                            event.finish_reason = out.finish_reason
                            event.usage = _usage(len(prompt.token_ids), out)
                            # Stored before the last event goes out: a client that saw the end knows it is kept.
                            await self._save(turn, user, texts, ids, out.finish_reason, new_system)
                            saved = True
                        yield event
            except (asyncio.CancelledError, GeneratorExit):
                if not saved:  # the client went away: keep the answer as far as it got
                    await asyncio.shield(
                        self._save(turn, user, texts, ids, FinishReason.CANCELLED, new_system, quiet=True)
                    )
                raise

    async def _save(self, turn: _TurnWrite, user: StoredMessage, texts: list[str], ids: list[int],
                    reason: FinishReason | None, system_prompt: str | None, quiet: bool = False) -> None:
        token_ids = self.prompts.answer_token_ids(ids, reason is FinishReason.STOP, reason is FinishReason.LENGTH,
                                                  self._end_ids)
        answer = StoredMessage(Role.ASSISTANT, "".join(texts), time.time(), reason, token_ids,
                               self.prompts.fingerprint)
        try:
            await self.store.append_turn(turn.tenant, turn.conversation_id, user, answer, system_prompt,
                                         turn_token=turn.token, lease=turn.lease)
        except Exception:
            if not quiet:
                raise
            log.exception("could not store the cancelled turn of conversation %s", turn.conversation_id)

    async def complete(self, prompt: str, sampling: SamplingParams, tenant: str = "") -> AsyncIterator[AnswerEvent]:
        """A stateless continuation; a prompt ending in <EOQ> is one question rendered with the chat template."""
        self.limits.check(prompt, what="the prompt")
        with self.engine.admission(tenant):
            sampling = self._with_defaults(sampling)
            token_ids = await self._off_loop(self.prompts.build_completion, prompt)
            request = EngineRequest(self.engine.new_request_id("complete"), token_ids, sampling, cache_salt=tenant)
            async with aclosing(self.engine.generate(request, admitted=True)) as stream:
                async for out in stream:
                    event = AnswerEvent("", out.text, out.token_ids)
                    if out.finished:
                        event.finish_reason = out.finish_reason
                        event.usage = _usage(len(token_ids), out)
                    yield event
