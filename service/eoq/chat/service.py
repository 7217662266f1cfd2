"""The chat use cases: a question in a conversation, a stateless completion, and conversation management.

For a Chat turn: hold the conversation (a lease in the store, so a second question while an answer streams is
refused — across replicas when the store is Redis, Regenerate and detached answers included), render the branch
the question follows (``eoq.chat.tree``: the path from the root to its parent) and the question into a prompt
(oldest turns dropped to fit the context), stream the engine's answer, and store the question and the answer
together when it ends — also when the client cancels (the answer as far as it got, marked cancelled). A detached
answer (``eoq.chat.detached``) is stored as it grows instead and outlives its client. The prompt's
tokens are salted with the tenant in the prefix cache, so a conversation's next turn reuses its KV blocks and
no other tenant's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, replace

from eoq.chat import tree
from eoq.chat.conversations import Conversations
from eoq.chat.detached import DetachedAnswers
from eoq.chat.events import AnswerEvent, Usage
from eoq.chat.prompt import ChatMessage, PromptBuilder, Turn
from eoq.chat.sinks import DetachedSink, TurnSink, TurnWrite
from eoq.chat.store import (
    Conversation,
    ConversationStore,
    Role,
    StoredMessage,
    check_room,
    text_bytes,
)
from eoq.engine.async_engine import AsyncEngine
from eoq.engine.structured import grammar_of
from eoq.engine.types import EngineRequest, FinishReason, SamplingParams
from eoq.errors import InvalidArgument

log = logging.getLogger(__name__)


def history_turns(path: list[StoredMessage], token_model: str | None = None,
                  vocab_size: int | None = None) -> list[Turn]:
    """Pair the messages of a branch (root first, ending with an answer) into (question, answer) turns. A
    message's stored token ids are reused only when they are this model's — tagged with ``token_model`` (the
    prompt builder's fingerprint) and every id below ``vocab_size`` —, else its text is tokenized again: ids of
    another model never reach the engine."""

    def own(m: StoredMessage) -> tuple[int, ...] | None:
        ids = m.token_ids
        if not ids or m.token_model != token_model:
            return None
        return ids if vocab_size is None or 0 <= min(ids) <= max(ids) < vocab_size else None

    turns = []
    for i in range(0, len(path) - 1, 2):
        u, a = path[i], path[i + 1]
        if u.role is not Role.USER or a.role is not Role.ASSISTANT:
            log.warning("message %s: unexpected roles on its branch; skipping a turn", u.id)
            continue
        turns.append(Turn(ChatMessage("user", u.content, own(u)), ChatMessage("assistant", a.content, own(a))))
    return turns


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


@dataclass(frozen=True, slots=True)
class Ask:
    """What one answer is for: a new ``question`` after ``parent`` (a ``ChatRequest.parent_message_id``), or,
    with ``regenerate`` set, a new answer to a stored question (its id; '' = the active branch's last)."""

    tenant: str
    conversation_id: str
    sampling: SamplingParams
    question: str = ""
    parent: str = ""
    regenerate: str | None = None
    system_prompt: str = ""
    detach: bool = False
    slot: str = ""  # a detached answer's place in its tenant's count (AnswerLog.start)


class ChatService:
    """The use cases. Prompt building and tokenization run on one worker thread of their own, never on the event
    loop: a big message or a long history never stalls other streams or the health check."""

    def __init__(self, engine: AsyncEngine, store: ConversationStore, prompts: PromptBuilder,
                 limits: ChatLimits, snapshot_interval_seconds: float = 0.25,
                 max_grammar_compile_seconds: float = 10.0) -> None:
        self.engine = engine
        self.store = store
        self.prompts = prompts
        self.limits = limits
        assert engine.info is not None
        self.context_length = engine.info.context_length
        self.vocab_size = engine.info.vocab_size
        self.end_token_ids = frozenset(engine.info.eos_token_ids)  # the model's and the template's (EngineConfig)
        self.snapshot_interval_seconds = snapshot_interval_seconds
        # One thread: the tokenizer is not shared across threads (see PromptBuilder).
        self._prompt_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eoq-prompts")
        self._grammar_checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eoq-grammar-check")
        self.max_grammar_compile_seconds = max_grammar_compile_seconds
        self._token_texts: list[str] | None = None
        self.detached = DetachedAnswers(self)
        self.conversations = Conversations(store, limits)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prompt_worker, functools.partial(fn, *args))

    async def token_texts(self) -> list[str]:
        """Every token id's text (``PromptBuilder.token_texts``), built once on first use, off the loop."""
        if self._token_texts is None:
            self._token_texts = await self._off_loop(self.prompts.token_texts, self.vocab_size)
        return self._token_texts

    async def token_text(self, sampling: SamplingParams):
        """The id -> text lookup a request's logprobs are shown with (its tokens' and its prompt's), or None for a
        request that asked for none."""
        if not (sampling.logprobs or sampling.prompt_logprobs):
            return None
        return (await self.token_texts()).__getitem__

    def close(self) -> None:
        self._prompt_worker.shutdown(wait=False, cancel_futures=True)
        self._grammar_checks.shutdown(wait=False, cancel_futures=True)

    def _with_defaults(self, sampling: SamplingParams) -> SamplingParams:
        if self.prompts.default_stop:
            return replace(sampling, stop=tuple(dict.fromkeys((*sampling.stop, *self.prompts.default_stop))))
        return sampling

    # --- answers ---
    async def chat(self, tenant: str, conversation_id: str, message: str, sampling: SamplingParams,
                   system_prompt: str = "", parent_message_id: str = "",
                   detach: bool = False) -> AsyncIterator[AnswerEvent]:
        """One question in a conversation (a new one if ``conversation_id`` is empty) -> the streamed answer.

        Refusals that cost nothing come first — sizes in characters, the server's and the tenant's places — before
        any store work or tokenization."""
        if not message.strip():
            raise InvalidArgument("the message is empty")
        self.limits.check(message, system_prompt)
        if parent_message_id and not conversation_id:
            raise InvalidArgument("parent_message_id needs the conversation_id it belongs to")
        ask = Ask(tenant, conversation_id, self._with_defaults(sampling), question=message,
                  parent=parent_message_id, system_prompt=system_prompt, detach=detach)
        async with aclosing(self._run(ask)) as events:
            async for event in events:
                yield event

    async def regenerate(self, tenant: str, conversation_id: str, question_id: str, sampling: SamplingParams,
                         detach: bool = False) -> AsyncIterator[AnswerEvent]:
        """A new answer to a stored question (``question_id``; '' = the active branch's last), a sibling of its
        earlier answers."""
        if not conversation_id:
            raise InvalidArgument("conversation_id is required")
        ask = Ask(tenant, conversation_id, self._with_defaults(sampling), regenerate=question_id, detach=detach)
        async with aclosing(self._run(ask)) as events:
            async for event in events:
                yield event

    async def _run(self, ask: Ask) -> AsyncIterator[AnswerEvent]:
        if ask.detach:
            stream = self.detached.run(ask)
        else:
            stream = self.answer(ask)
        async with aclosing(stream) as events:
            async for event in events:
                yield event

    async def answer(self, ask: Ask, on_cancel=None) -> AsyncIterator[AnswerEvent]:
        """Generate and store one answer (the body of Chat and Regenerate, attached or detached): a new
        conversation first when ``ask`` has none (deleted again if refused before any answer)."""
        with self.engine.admission(ask.tenant):
            if ask.conversation_id:
                conv = await self.store.get(ask.tenant, ask.conversation_id)
                async with aclosing(self._answer(replace(ask, conversation_id=conv.id), on_cancel)) as events:
                    async for event in events:
                        yield event
                return
            conv = await self.store.create(ask.tenant, ask.system_prompt or None)
            answered = False
            try:
                async with aclosing(self._answer(replace(ask, conversation_id=conv.id), on_cancel)) as events:
                    async for event in events:
                        answered = True
                        yield event
            except Exception:
                if not answered:  # refused before any answer (too long, server full...): no conversation started
                    await self.conversations.discard(ask.tenant, conv.id)
                raise

    def _plan(self, conv: Conversation, ask: Ask) -> tuple[list[StoredMessage], StoredMessage | None, str,
                                                             str | None]:
        """The branch the prompt renders (root first, ending with an answer or empty), the new question to store
        (None: regenerating a stored one), the question's text and id."""
        messages = conv.messages
        leaf = tree.active_leaf(messages, conv.active_leaf)
        if ask.regenerate is None:
            parent = tree.question_parent(messages, ask.parent, conv.id, leaf)
            user = StoredMessage(Role.USER, ask.question, time.time(), id=tree.new_message_id(conv.id),
                                 parent_id=parent, token_model=self.prompts.fingerprint)
            return tree.path_to(messages, parent), user, ask.question, user.id
        if ask.regenerate:
            question = tree.find(messages, ask.regenerate, conv.id, "question")
            if question.role is not Role.USER:
                raise InvalidArgument(f"message {question.id} is an answer: Regenerate takes a question (to answer "
                                      f"its question again, pass its parent_id {question.parent_id})")
        else:
            question = tree.last_question(messages, leaf, conv.id)
        return tree.path_to(messages, question.parent_id), None, question.content, question.id

    async def _answer(self, ask: Ask, on_cancel) -> AsyncIterator[AnswerEvent]:
        """Hold the conversation, stream the answer, store it (also when cut short)."""
        async with self.store.lock(ask.tenant, ask.conversation_id) as lease:
            conv = await self.store.get(ask.tenant, ask.conversation_id)  # under the lock: the latest history
            conv = await self.conversations.settle(conv, lease)
            path, user, question, question_id = self._plan(conv, ask)
            sampling = ask.sampling
            if sampling.n > 1 and ask.detach:
                raise InvalidArgument("n > 1 cannot be detached: ask for one detached answer at a time "
                                      "(Regenerate adds another)")
            if sampling.prompt_logprobs:
                raise InvalidArgument("prompt_logprobs is for Complete: a Chat prompt is the rendered conversation")
            await self.check_constraint(sampling)
            system = ask.system_prompt or conv.system_prompt
            # Room for the question, the answer (about 4 bytes a token at most) and a new system prompt: refused
            # now rather than after the answer, which could then not be stored.
            new_system_bytes = (text_bytes(ask.system_prompt) - text_bytes(conv.system_prompt)
                                if ask.system_prompt else 0)
            new_bytes = (text_bytes(question) if user else 0) + 4 * sampling.max_tokens + new_system_bytes
            check_room(conv, self.store.limits, new_bytes, 2 if user else 1)
            history = history_turns(path, self.prompts.fingerprint, self.vocab_size)
            prompt = await self._off_loop(self.prompts.build_chat, system, history, question,
                                          self.context_length - sampling.max_tokens)
            if user is not None:
                user = replace(user, token_ids=prompt.question_ids or None)
            write = TurnWrite(ask.tenant, conv.id, secrets.token_hex(16), lease, user, ask.system_prompt or None)
            placeholder = StoredMessage(Role.ASSISTANT, "", time.time(), None, id=tree.new_message_id(conv.id),
                                        parent_id=question_id, token_model=self.prompts.fingerprint)
            sink = (DetachedSink(self.store, write, self.snapshot_interval_seconds, on_cancel, ask.slot) if ask.detach
                    else TurnSink(self.store, write))
            await sink.begin(placeholder)
            request = EngineRequest(self.engine.new_request_id("chat"), prompt.token_ids, sampling,
                                    cache_salt=ask.tenant)
            # n answers: siblings under the question, the first one the active branch (see _store_answers).
            answers = [placeholder] + [replace(placeholder, id=tree.new_message_id(conv.id))
                                       for _ in range(sampling.n - 1)]
            texts: list[list[str]] = [[] for _ in answers]
            ids: list[list[int]] = [[] for _ in answers]
            reasons: list[FinishReason | None] = [None] * len(answers)
            completion = [0] * len(answers)
            sequence = 0
            saved = False

            def event(text: str, token_ids: list[int], index: int = 0) -> AnswerEvent:
                nonlocal sequence
                sequence += 1
                return AnswerEvent(conv.id, text, token_ids, user_message_id=question_id,
                                   message_id=answers[index].id, sequence=sequence, index=index,
                                   dropped_turns=prompt.dropped_turns if sequence == 1 else 0)

            def finals(default: FinishReason | None = None) -> list[StoredMessage]:
                return [self._final(a, texts[i], ids[i], reasons[i] or default) for i, a in enumerate(answers)]

            try:
                async with aclosing(self.engine.generate(request, admitted=True)) as stream:
                    async for out in stream:
                        i = out.index
                        texts[i].append(out.text)
                        ids[i].extend(out.token_ids)
                        e = event(out.text, out.token_ids, i)
                        e.logprobs = out.logprobs
                        if out.finished:
                            reasons[i] = e.finish_reason = out.finish_reason
                            completion[i] = out.num_completion_tokens
                            e.more = not out.last
                        if out.last:
                            e.usage = Usage.of(len(prompt.token_ids), out, sum(completion))
                            # Stored before the last event goes out: a client that saw the end knows it is kept.
                            await self._store_answers(sink, write, finals(FinishReason.CANCELLED), e)
                            saved = True
                        else:
                            sink.add(e)
                        yield e
            except BaseException as e:
                # The client went away (or, detached, the answer was cancelled or the engine failed): keep the
                # answer as far as it got. An attached answer the engine failed is not stored: its client gets
                # the error and asks again.
                gone = isinstance(e, (asyncio.CancelledError, GeneratorExit))
                if not saved and (gone or ask.detach):
                    try:
                        await asyncio.shield(self._store_answers(sink, write, finals(FinishReason.CANCELLED),
                                                                 event("", [])))
                    except Exception:
                        log.exception("could not store the cut-off answer of conversation %s", conv.id)
                raise

    async def _store_answers(self, sink, write: TurnWrite, finals: list[StoredMessage], last: AnswerEvent) -> None:
        """The first answer through its sink (with the question, atomically); the others (``n`` > 1, attached
        only) appended after it as its siblings, and the first made the active branch again."""
        if len(finals) == 1:
            await sink.end(finals[0], last)
            return
        await sink.end(finals[0], replace(last, message_id=finals[0].id, index=0))
        for answer in finals[1:]:
            await self.store.append_turn(write.tenant, write.conversation_id, None, answer,
                                         turn_token=secrets.token_hex(16), lease=write.lease)
        await self.store.set_active_leaf(write.tenant, write.conversation_id, finals[0].id)

    def _final(self, placeholder: StoredMessage, texts: list[str], ids: list[int],
               reason: FinishReason) -> StoredMessage:
        token_ids = self.prompts.answer_token_ids(ids, reason is FinishReason.STOP, reason is FinishReason.LENGTH,
                                                  self.end_token_ids)
        return replace(placeholder, content="".join(texts), created_at=time.time(), finish_reason=reason,
                       token_ids=token_ids)

    async def complete(self, prompt: str, sampling: SamplingParams, tenant: str = "") -> AsyncIterator[AnswerEvent]:
        """A stateless continuation; a prompt ending in <EOQ> is one question rendered with the chat template."""
        self.limits.check(prompt, what="the prompt")
        async with aclosing(self._stateless("complete", tenant, sampling, self.prompts.build_completion,
                                            prompt)) as events:
            async for event in events:
                yield event

    async def complete_messages(self, tenant: str, messages: Sequence[ChatMessage],
                                sampling: SamplingParams) -> AsyncIterator[AnswerEvent]:
        """The answer to a whole conversation the client sends (OpenAI's chat completions), nothing stored; the
        prompt is salted with the tenant in the prefix cache, so a client that resends a growing conversation
        reuses its KV blocks. Raises ``InvalidArgument`` for no message, an unknown role, or a message or system
        prompt over its limit — before any tokenization."""
        if not messages:
            raise InvalidArgument("messages must hold at least one message")
        for i, m in enumerate(messages):
            if m.role not in ("system", "user", "assistant"):
                raise InvalidArgument(f"messages[{i}]: unknown role {m.role!r} (system, user or assistant)")
            if m.role == "system":
                self.limits.check("", m.content)
            else:
                self.limits.check(m.content, what=f"messages[{i}]")
        async with aclosing(self._stateless("messages", tenant, sampling, self.prompts.build_messages, messages,
                                            self.context_length - sampling.max_tokens)) as events:
            async for event in events:
                yield event

    async def _stateless(self, kind: str, tenant: str, sampling: SamplingParams, build, *args) -> AsyncIterator[
            AnswerEvent]:
        """One place of the server (and the tenant's) held for the whole request, the prompt built off the loop
        (``build(*args)``), the engine's answer streamed; the last event has the finish reason and the usage."""
        with self.engine.admission(tenant):
            sampling = self._with_defaults(sampling)
            await self.check_constraint(sampling)
            token_ids = await self._off_loop(build, *args)
            request = EngineRequest(self.engine.new_request_id(kind), token_ids, sampling, cache_salt=tenant)
            completion = [0] * sampling.n
            async with aclosing(self.engine.generate(request, admitted=True)) as stream:
                async for out in stream:
                    event = AnswerEvent("", out.text, out.token_ids, index=out.index, logprobs=out.logprobs,
                                        prompt_logprobs=out.prompt_logprobs)
                    if out.finished:
                        event.finish_reason = out.finish_reason
                        completion[out.index] = out.num_completion_tokens
                        event.more = not out.last
                    if out.last:
                        event.usage = Usage.of(len(token_ids), out, sum(completion))
                    yield event

    async def check_constraint(self, sampling: SamplingParams) -> None:
        """A structured-output constraint that would not compile is refused here, before the engine, with what
        is wrong (``InvalidArgument``); its grammar is built off the event loop, within the compile limit."""
        if sampling.constraint is None:
            return
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._grammar_checks, grammar_of, sampling.constraint)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.max_grammar_compile_seconds)
        except TimeoutError:
            raise InvalidArgument(f"the {sampling.constraint.kind.value} constraint took over "
                                  f"{self.max_grammar_compile_seconds:g} s to build "
                                  "(--max-grammar-compile-seconds): simplify it") from None
