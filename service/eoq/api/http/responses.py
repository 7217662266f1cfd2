"""OpenAI's Responses and Conversations on eoq's conversation trees: the request bodies and the objects.

The mapping (``eoq.chat.tree``): a *response* is an answer in a conversation's tree, ``resp_<message id>``; its
output message item is ``msg_<message id>``; a *conversation* is ``conv_<conversation id>``. Message ids name
their conversation, so every id finds its conversation without a lookup table.

- ``previous_response_id`` asks the new input after that answer, on its branch (a branch of its own when it
  is not the latest answer there); ``conversation`` asks it after the conversation's active leaf; neither
  starts a conversation. ``instructions`` become the conversation's system prompt from this turn on.
- ``store: false`` answers without storing anything (the prompt is the previous response's branch and the
  input, as a stateless chat completion); such a response cannot be retrieved.
- ``background: true`` is a detached answer: it goes on when the client leaves, ``GET /v1/responses/{id}``
  says how far it is, with ``stream=true&starting_after=N`` it streams every event after sequence number ``N``
  again (on any replica), and ``POST /v1/responses/{id}/cancel`` stops it.

Streamed events are numbered from the answer's own events, so a replay numbers them the same: 0
``response.created``, 1 ``response.in_progress``, 2 ``response.output_item.added``, 3
``response.content_part.added``, ``3 + k`` the ``response.output_text.delta`` of the answer's event ``k`` (an
event without text has no delta: numbers may skip), then ``output_text.done``, ``content_part.done``,
``output_item.done`` and ``response.completed`` (``response.incomplete`` for an answer cut at its token limit,
``response.failed`` for one cancelled).

Extensions (eoq's, for branching clients such as the browser page): ``parent_item_id`` on a response request
(the ``msg_`` id of the answer to ask after, or the ``conv_`` id for a new first question: an edit);
``POST /v1/conversations/{id}/regenerate`` (a new answer to a question, a sibling of the earlier ones) and
``POST /v1/conversations/{id}/active`` (select a branch); ``GET /v1/conversations`` (the caller's
conversations, newest first); conversation items carry ``parent_id``, ``sibling_ids`` and ``response_id``.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from eoq.api.adapter import SamplingPolicy
from eoq.api.http.errors import InvalidParam
from eoq.api.http.schemas import SamplingFields, _Strict, format_constraint, sampling_params, text_content
from eoq.chat.events import AnswerEvent, Usage
from eoq.chat.prompt import ChatMessage
from eoq.chat.store import Conversation, Role, StoredMessage
from eoq.engine.types import Constraint, FinishReason, SamplingParams
from eoq.errors import NotFound

PREAMBLE = 4  # created, in_progress, output_item.added, content_part.added: sequence numbers 0..3


# --- ids ---
def response_id(message_id: str) -> str:
    return f"resp_{message_id}"


def item_id(message_id: str) -> str:
    return f"msg_{message_id}"


def conversation_id(cid: str) -> str:
    return f"conv_{cid}"


def _unwrap(prefix: str, value: str, param: str, what: str) -> str:
    if not isinstance(value, str) or not value.startswith(prefix) or len(value) > 200:
        raise NotFound(f"{what} {str(value)[:60]!r} not found (ids start with {prefix!r})")
    return value[len(prefix):]


def message_of_response(rid: str) -> tuple[str, str]:
    """(conversation id, message id) of a response id."""
    mid = _unwrap("resp_", rid, "response_id", "response")
    return mid.partition("-")[0], mid


def message_of_item(iid: str) -> tuple[str, str]:
    mid = _unwrap("msg_", iid, "item_id", "item")
    return mid.partition("-")[0], mid


def conversation_of(conv: str) -> str:
    return _unwrap("conv_", conv, "conversation", "conversation")


# --- requests ---
_PARTS = ("input_text", "output_text", "text")  # the text parts an input message's content may hold

class _Sampled(SamplingFields):
    """The sampling fields of a Responses request (and of eoq's regenerate)."""

    background: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    text: Any = None  # {"format": ...}: the answer's format (structured output)

    def sampling(self, policy: SamplingPolicy) -> SamplingParams:
        """The chat completions' rule (``schemas.sampling_params``), with ``max_output_tokens`` as the limit."""
        return sampling_params(self, policy, self.max_output_tokens, "max_output_tokens")

    @property
    def text_format(self) -> dict:
        """``text.format`` as given (OpenAI's default: plain text), echoed in the response object."""
        if self.text is None:
            return {"type": "text"}
        if not isinstance(self.text, dict):
            raise InvalidParam("Invalid type for 'text': expected an object", "text", "invalid_type")
        fmt = self.text.get("format")
        return fmt if fmt is not None else {"type": "text"}

    def constraint(self) -> Constraint | None:
        """``text.format``: ``{"type": "json_schema", "name": ..., "schema": {...}, "strict": ...}`` (the schema in the
        format itself, unlike chat completions' ``response_format``), ``{"type": "json_object"}`` or text."""
        fmt = self.text_format
        return format_constraint(fmt, "text.format", fmt, "text.format.schema")


class ResponseRequest(_Sampled):
    input: Any = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    store: bool | None = None
    reasoning: Any = None
    include: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    truncation: str | None = None
    parent_item_id: str | None = None  # eoq: the answer (msg_) to ask after, or the conversation (conv_) = root

    def check(self) -> None:
        self.refuse({"tools": "tools are not supported by this server",
                     "reasoning": "reasoning is not supported by this model",
                     "top_logprobs": "top_logprobs is not supported",
                     "prompt": "prompt templates are not supported"})
        self.refuse_unless("tool_choice", (None, "none", "auto"), "tool_choice is not supported (no tools)")
        self.constraint()  # a format it cannot follow is refused before anything runs
        if self.truncation not in (None, "disabled", "auto"):
            raise InvalidParam("truncation must be 'auto' or 'disabled'", "truncation")
        if self.background and self.store is False:
            raise InvalidParam("background responses must be stored: store cannot be false", "store")
        continuing = [n for n in ("previous_response_id", "conversation") if getattr(self, n) is not None]
        if len(continuing) > 1:
            raise InvalidParam("send previous_response_id or conversation, not both", "conversation")
        if self.parent_item_id is not None and self.previous_response_id is not None:
            raise InvalidParam("send parent_item_id or previous_response_id, not both", "parent_item_id")
        if self.parent_item_id is not None and self.conversation is None:
            raise InvalidParam("parent_item_id needs the conversation it belongs to", "parent_item_id")

    @property
    def conversation_id(self) -> str | None:
        conv = self.conversation
        if isinstance(conv, dict):
            conv = conv.get("id")
        if conv is None:
            return None
        if not isinstance(conv, str):
            raise InvalidParam("Invalid type for 'conversation': expected a string or {\"id\": ...}", "conversation",
                               "invalid_type")
        return conversation_of(conv)

    def messages(self) -> tuple[str | None, list[tuple[str, str]], str]:
        """(the system/developer instructions, earlier (question, answer) turns of the input, the question)."""
        system = [self.instructions] if self.instructions else []
        if isinstance(self.input, str):
            if not self.input.strip():
                raise InvalidParam("input is empty", "input")
            return ("\n\n".join(system) or None), [], self.input
        if not isinstance(self.input, list) or not self.input:
            raise InvalidParam("input must be a string or a non-empty array of messages", "input",
                               "missing_required_parameter" if self.input is None else "invalid_type")
        turns: list[tuple[str, str]] = []
        pending: str | None = None
        question: str | None = None
        for i, item in enumerate(self.input):
            where = f"input[{i}]"
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                raise InvalidParam(f"{where}: only message items are supported", f"{where}.type", "unsupported_value")
            role, text = item.get("role"), text_content(item.get("content"), f"{where}.content", _PARTS)
            if role in ("system", "developer"):
                system.append(text)
            elif role == "user":
                if pending is not None:
                    raise InvalidParam(f"{where}: two user messages in a row (each needs its answer)", where)
                pending = text
            elif role == "assistant":
                if pending is None:
                    raise InvalidParam(f"{where}: an assistant message must follow a user message", where)
                turns.append((pending, text))
                pending = None
            else:
                raise InvalidParam(f"{where}.role {role!r} is not supported (user, assistant, system, developer)",
                                   f"{where}.role", "unsupported_value")
        question = pending
        if question is None or not question.strip():
            raise InvalidParam("the input must end with a user message (the question)", "input")
        return ("\n\n".join(system) or None), turns, question


class RegenerateRequest(_Sampled):
    item_id: str | None = None  # the question (msg_...); none = the active branch's last


class ActiveBranchRequest(_Strict):
    item_id: str


class ConversationCreateRequest(_Strict):
    items: Any = None
    metadata: Any = None

    def turns(self) -> tuple[str | None, list[tuple[str, str]]]:
        if not self.items:
            return None, []
        request = ResponseRequest(model="-", input=[*self.items, {"role": "user", "content": "-"}])
        system, turns, _ = request.messages()
        return system, turns


# --- objects ---
STATUS = {FinishReason.STOP: "completed", FinishReason.LENGTH: "incomplete", FinishReason.CANCELLED: "cancelled"}


def usage_object(u: Usage | None) -> dict | None:
    if u is None:
        return None
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def output_item(message_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id(message_id), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def response_object(*, rid: str, model: str, created_at: float, status: str, text: str | None, message_id: str,
                    conversation: str | None, previous: str | None, usage: Usage | None, background: bool,
                    instructions: str | None, store: bool, max_output_tokens: int | None,
                    text_format: dict | None = None) -> dict:
    item_status = "completed" if status in ("completed", "incomplete", "cancelled") else "in_progress"
    return {
        "id": rid, "object": "response", "created_at": int(created_at), "status": status,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": instructions, "max_output_tokens": max_output_tokens, "model": model,
        "output": [] if text is None else [output_item(message_id, text, item_status)],
        "parallel_tool_calls": False, "previous_response_id": previous, "reasoning": None, "store": store,
        "temperature": None, "text": {"format": text_format or {"type": "text"}}, "tool_choice": "none", "tools": [],
        "top_p": None, "truncation": "disabled", "usage": usage_object(usage), "user": None, "metadata": {},
        "background": background, "conversation": {"id": conversation_id(conversation)} if conversation else None,
    }


def status_of(message: StoredMessage, live: bool) -> str:
    if live:
        return "in_progress"
    return STATUS.get(message.finish_reason or FinishReason.CANCELLED, "completed")


def conversation_object(conv: Conversation) -> dict:
    return {"id": conversation_id(conv.id), "object": "conversation", "created_at": int(conv.created_at),
            "metadata": {}, "updated_at": int(conv.updated_at), "message_count": conv.message_count,
            "system_prompt": conv.system_prompt}


def conversation_item(m: StoredMessage, siblings: tuple[str, ...], live: bool) -> dict:
    user = m.role is Role.USER
    item = {"type": "message", "id": item_id(m.id), "role": "user" if user else "assistant",
            "status": "in_progress" if live else "completed",
            "content": [{"type": "input_text" if user else "output_text", "text": m.content,
                         **({} if user else {"annotations": []})}],
            # eoq's extensions: the tree
            "parent_id": item_id(m.parent_id) if m.parent_id else None,
            "sibling_ids": [item_id(s) for s in siblings]}
    if not user:
        item["response_id"] = response_id(m.id)
        item["finish_reason"] = None if live else (m.finish_reason or FinishReason.CANCELLED).value
    return item


class EventNumbers:
    """The Responses events of one answer, numbered as the module docstring says (the same on every replay)."""

    def __init__(self, base: dict, message_id: str) -> None:
        self.base = base  # the response object, in progress
        self.item = item_id(message_id)
        self.message_id = message_id
        self.texts: list[str] = []
        self.last_sequence = 0

    def preamble(self) -> list[dict]:
        base = {**self.base, "status": "in_progress", "output": []}
        item = output_item(self.message_id, "", "in_progress")
        item["content"] = []
        return [
            {"type": "response.created", "sequence_number": 0, "response": {**base, "status": "queued"}
             if base.get("background") else base},
            {"type": "response.in_progress", "sequence_number": 1, "response": base},
            {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0, "item": item},
            {"type": "response.content_part.added", "sequence_number": 3, "item_id": self.item, "output_index": 0,
             "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}},
        ]

    def of(self, e: AnswerEvent) -> list[dict]:
        """The events of one answer event (its delta; and after the last, the closing ones)."""
        seq = PREAMBLE - 1 + e.sequence
        self.last_sequence = e.sequence
        self.texts.append(e.text)
        out = []
        if e.text:
            out.append({"type": "response.output_text.delta", "sequence_number": seq, "item_id": self.item,
                        "output_index": 0, "content_index": 0, "delta": e.text, "logprobs": []})
        if e.finish_reason is None:
            return out
        text = "".join(self.texts)
        status = STATUS[e.finish_reason]
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        final = {**self.base, "status": status, "output": [output_item(self.message_id, text, "completed")],
                 "usage": usage_object(e.usage),
                 "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}
        closing = {"completed": "response.completed", "incomplete": "response.incomplete",
                   "cancelled": "response.failed"}[status]
        if status == "cancelled":
            final["error"] = {"code": "cancelled", "message": "the response was cancelled before its end"}
        out += [
            {"type": "response.output_text.done", "sequence_number": seq + 1, "item_id": self.item, "output_index": 0,
             "content_index": 0, "text": text, "logprobs": []},
            {"type": "response.content_part.done", "sequence_number": seq + 2, "item_id": self.item,
             "output_index": 0, "content_index": 0, "part": part},
            {"type": "response.output_item.done", "sequence_number": seq + 3, "output_index": 0,
             "item": output_item(self.message_id, text, "completed")},
            {"type": closing, "sequence_number": seq + 4, "response": final},
        ]
        return out


def chat_messages(system: str | None, path: list[StoredMessage], turns: list[tuple[str, str]],
                  question: str) -> list[ChatMessage]:
    """A stateless prompt (``store: false``): the system prompt, a stored branch, the input's turns, the question."""
    messages = [ChatMessage("system", system)] if system else []
    messages += [ChatMessage(m.role.value, m.content) for m in path]
    for q, a in turns:
        messages += [ChatMessage("user", q), ChatMessage("assistant", a)]
    return [*messages, ChatMessage("user", question)]


def now() -> float:
    return time.time()
