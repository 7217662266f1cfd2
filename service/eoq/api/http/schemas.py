"""OpenAI request bodies -> internal types, and internal results -> OpenAI response objects.

Requests are parsed with pydantic in strict mode (a string is no number, 1.5 is no integer), as OpenAI's API is
strict. Fields this server ignores because they change nothing it does (``user``, ``metadata``, ``store``,
``service_tier``, ``parallel_tool_calls``...) are accepted and ignored, like any unknown field; fields it
cannot honour (tools, several choices, log probabilities, JSON mode, penalties...) are refused with a 400
naming the field in ``param`` — never silently dropped. Extensions beyond OpenAI's fields, as vLLM takes them:
``top_k``, ``repetition_penalty``, ``ignore_eos``.

Sampling fields a request leaves out take the server's defaults (``--default-temperature`` etc.: greedy unless
configured otherwise, where OpenAI's default temperature is 1); the values are then checked by the same
``SamplingParams.validate`` and limits as the gRPC API's.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from eoq.api.adapter import SamplingPolicy
from eoq.api.http.errors import InvalidParam
from eoq.chat.events import AnswerEvent, Usage
from eoq.chat.prompt import ChatMessage
from eoq.engine.types import FinishReason, SamplingParams
from eoq.errors import InvalidArgument

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class Message(_Strict):
    role: str
    content: Any = None
    tool_calls: Any = None
    function_call: Any = None


class _Sampling(_Strict):
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Any = None
    n: int | None = None
    logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # Extensions (as vLLM has them); the gRPC API's fields of the same names.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidParam(f"n must be 1: this server returns one choice per request, got {self.n}", "n",
                               "unsupported_value")
        if self.logit_bias:
            raise InvalidParam("logit_bias is not supported", "logit_bias", "unsupported_parameter")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise InvalidParam(f"{name} is not supported (repetition_penalty is: a multiplicative penalty, "
                                   "1 = off)", name, "unsupported_parameter")


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def check(self) -> None:
        self._refuse_unsupported()
        if self.logprobs:
            raise InvalidParam("logprobs is not supported", "logprobs", "unsupported_parameter")
        if self.top_logprobs:
            raise InvalidParam("top_logprobs is not supported", "top_logprobs", "unsupported_parameter")
        for name in ("tools", "functions", "audio", "prediction", "web_search_options"):
            if getattr(self, name):
                raise InvalidParam(f"{name} is not supported by this server", name, "unsupported_parameter")
        if self.tool_choice not in (None, "none"):
            raise InvalidParam("tool_choice is not supported (no tools)", "tool_choice", "unsupported_parameter")
        if self.function_call not in (None, "none"):
            raise InvalidParam("function_call is not supported (no functions)", "function_call",
                               "unsupported_parameter")
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise InvalidParam("response_format: only {\"type\": \"text\"} is supported", "response_format",
                               "unsupported_value")
        if self.modalities is not None and self.modalities != ["text"]:
            raise InvalidParam("modalities: only [\"text\"] is supported", "modalities", "unsupported_value")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise InvalidParam("max_tokens and max_completion_tokens disagree: send one of them", "max_tokens")

    def chat_messages(self) -> list[ChatMessage]:
        """The messages as the chat layer takes them: text only, ``developer`` as ``system``."""
        if not self.messages:
            raise InvalidParam("messages must hold at least one message", "messages")
        out = []
        for i, m in enumerate(self.messages):
            where = f"messages[{i}]"
            role = ROLES.get(m.role)
            if role is None:
                raise InvalidParam(f"{where}.role {m.role!r} is not supported (system, developer, user, assistant; "
                                   "no tools or functions)", f"{where}.role", "unsupported_value")
            if m.tool_calls or m.function_call:
                raise InvalidParam(f"{where}: tool and function calls are not supported", f"{where}.tool_calls",
                                   "unsupported_parameter")
            out.append(ChatMessage(role, _text_content(m.content, f"{where}.content")))
        return out

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling(self, policy: SamplingPolicy) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return sampling_params(self, policy, max_tokens, self.max_tokens_param)


class CompletionRequest(_Sampling):
    prompt: Any = None
    echo: bool | None = None
    suffix: Any = None
    best_of: int | None = None

    def check(self) -> None:
        self._refuse_unsupported()
        if self.logprobs is not None and self.logprobs != 0:
            raise InvalidParam("logprobs is not supported", "logprobs", "unsupported_parameter")
        if self.echo:
            raise InvalidParam("echo is not supported", "echo", "unsupported_parameter")
        if self.suffix:
            raise InvalidParam("suffix is not supported", "suffix", "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise InvalidParam(f"best_of must be 1, got {self.best_of}", "best_of", "unsupported_value")

    def prompt_text(self) -> str:
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            return p
        if p is None:
            raise InvalidParam("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        if isinstance(p, list) and all(isinstance(s, str) for s in p):
            raise InvalidParam(f"prompt: one prompt per request is supported, got {len(p)}", "prompt",
                               "unsupported_value")
        if isinstance(p, list):
            raise InvalidParam("prompt: token arrays are not supported; send the prompt as a string", "prompt",
                               "unsupported_value")
        raise InvalidParam("Invalid type for 'prompt': expected a string", "prompt", "invalid_type")

    def sampling(self, policy: SamplingPolicy) -> SamplingParams:
        return sampling_params(self, policy, self.max_tokens, "max_tokens")


def _text_content(content: Any, param: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if content is None:
        raise InvalidParam(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if not isinstance(content, list):
        raise InvalidParam(f"Invalid type for '{param}': expected a string or an array of content parts", param,
                           "invalid_type")
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise InvalidParam(f"Invalid type for '{where}': expected an object", where, "invalid_type")
        if part.get("type") != "text":
            raise InvalidParam(f"{where}.type {part.get('type')!r} is not supported: only text parts are",
                               f"{where}.type", "unsupported_value")
        if not isinstance(part.get("text"), str):
            raise InvalidParam(f"Invalid type for '{where}.text': expected a string", f"{where}.text",
                               "invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidParam("Invalid type for 'stop': expected a string or an array of strings", "stop", "invalid_type")


_SAMPLING_FIELD = re.compile(r"\b(temperature|top_p|top_k|repetition_penalty|max_tokens|seed|stop)\b")


def sampling_params(req: _Sampling, policy: SamplingPolicy, max_tokens: int | None,
                    max_tokens_param: str) -> SamplingParams:
    """The request's sampling, the server's defaults for what it leaves out, checked by the gRPC API's rules
    (``SamplingParams.validate`` with the policy's limits); a refusal names the field in ``param``."""

    def given(value, default):
        return default if value is None else value

    params = SamplingParams(
        temperature=given(req.temperature, policy.default_temperature),
        top_p=given(req.top_p, policy.default_top_p),
        top_k=given(req.top_k, policy.default_top_k),
        repetition_penalty=given(req.repetition_penalty, policy.default_repetition_penalty),
        max_tokens=given(max_tokens, policy.default_max_tokens),
        seed=req.seed,
        stop=_stop_strings(req.stop),
        ignore_eos=bool(req.ignore_eos),
    )
    try:
        return params.validate(max_tokens_limit=policy.max_tokens_limit, max_stop_strings=policy.max_stop_strings)
    except InvalidArgument as e:
        match = _SAMPLING_FIELD.search(str(e))
        param = match.group(1) if match else None
        raise InvalidParam(str(e), max_tokens_param if param == "max_tokens" else param) from None


def _param_of(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def parse(model: type[_Strict], body: bytes) -> Any:
    """The request body as ``model``; raises ``InvalidParam`` naming the first bad field as OpenAI does."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        kind, loc, msg = err["type"], err["loc"], err["msg"]
        param = _param_of(loc)
        if kind == "json_invalid":
            raise InvalidParam(f"We could not parse the JSON body of your request: {msg}", None,
                               "invalid_json") from None
        if param is None:  # a JSON value that is not an object
            raise InvalidParam(f"The request body must be a JSON object: {msg}", None, "invalid_type") from None
        if kind == "missing":
            raise InvalidParam(f"Missing required parameter: '{param}'.", param, "missing_required_parameter") from None
        if kind.endswith(("_type", "_parsing")):
            raise InvalidParam(f"Invalid type for '{param}': {msg}", param, "invalid_type") from None
        raise InvalidParam(f"Invalid value for '{param}': {msg}", param, "invalid_value") from None


# --- responses ---
def usage_object(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


def finish_reason(e: AnswerEvent) -> str:
    return FINISH[e.finish_reason]


def chat_completion(id_: str, created: int, model: str, text: str, last: AnswerEvent) -> dict:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(last)}],
        "usage": usage_object(last.usage),
    }


def chat_chunk(id_: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               usage: Usage | None = None, with_usage: bool = False) -> dict:
    chunk = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:  # stream_options.include_usage: null on every chunk but the last, as OpenAI streams it
        chunk["usage"] = usage_object(usage) if usage is not None else None
    return chunk


def text_completion(id_: str, created: int, model: str, text: str | None, finish: str | None = None,
                    usage: Usage | None = None, with_usage: bool = False) -> dict:
    """A completion (``text`` the whole answer) or one chunk of its stream (``text=None``: the usage chunk)."""
    obj = {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        obj["usage"] = usage_object(usage) if usage is not None else None
    return obj
