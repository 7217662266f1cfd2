"""OpenAI request bodies -> internal types, and internal results -> OpenAI response objects.

Requests are parsed with pydantic in strict mode (a string is no number, 1.5 is no integer), as OpenAI's API is
strict. Fields this server ignores because they change nothing it does (``user``, ``metadata``, ``store``,
``service_tier``, ``parallel_tool_calls``...) are accepted and ignored, like any unknown field; fields it
cannot honour (tools, audio, ``echo``...) are refused with a 400 naming the field in ``param`` — never silently
dropped. Output control as OpenAI has it: ``n``, ``logprobs`` / ``top_logprobs``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, ``response_format`` (``json_schema``, ``json_object``). Extensions beyond
OpenAI's fields, as vLLM takes them: ``top_k``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``,
``stop_token_ids``, and ``structured_outputs`` (one of ``json``, ``regex``, ``choice``, ``grammar``).

Sampling fields a request leaves out take the server's defaults (``--default-temperature`` etc.: greedy unless
configured otherwise, where OpenAI's default temperature is 1); the values are then checked by the same
``SamplingParams.validate`` and limits as the gRPC API's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from eoq.api.adapter import SamplingPolicy
from eoq.api.http.errors import InvalidParam
from eoq.chat.events import AnswerEvent, Usage
from eoq.chat.prompt import ChatMessage
from eoq.engine.types import Constraint, ConstraintKind, FinishReason, SamplingParams, TokenLogprob
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


class SamplingFields(_Strict):
    """The sampling fields every generating request has (chat completions, completions, Responses)."""

    model: str
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Any = None
    # Extensions (as vLLM has them); the gRPC API's fields of the same names.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    # OpenAI fields this server cannot honour (no tools; Responses have no top_logprobs): chat completions and
    # Responses refuse them in ``check``; completions, whose API has no such fields, ignore them like any unknown
    tools: Any = None
    tool_choice: Any = None
    top_logprobs: Any = None

    def refuse(self, why: dict[str, str]) -> None:
        """A 400 ``unsupported_parameter`` for the first field of ``why`` the request sets, with its message: the
        fields this server cannot honour are refused, never silently dropped."""
        for name, message in why.items():
            if getattr(self, name):
                raise InvalidParam(message, name, "unsupported_parameter")

    def constraint(self) -> Constraint | None:
        """The structured output the request asks for (None: free text); each API names it its own way."""
        return None

    def refuse_unless(self, name: str, allowed: tuple, message: str) -> None:
        """A 400 ``unsupported_parameter`` when the field ``name`` has a value outside ``allowed``."""
        if getattr(self, name) not in allowed:
            raise InvalidParam(message, name, "unsupported_parameter")


class _Sampling(SamplingFields):
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: Any = None
    # Extensions, as vLLM has them
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidParam(f"logit_bias: the key {key!r} is not a token id", "logit_bias", "invalid_value")
            pairs.append((int(key), bias))
        return tuple(sorted(pairs))

    def constraint(self) -> Constraint | None:
        """``response_format`` (OpenAI's ``json_schema`` / ``json_object`` / ``text``) or ``structured_outputs``
        (vLLM's: ``json``, ``regex``, ``choice``, ``grammar``); one of them at most."""
        rf, so = self.response_format, self.structured_outputs
        c = None
        if rf is not None:
            spec = rf.get("json_schema") if isinstance(rf, dict) else None
            c = format_constraint(rf, "response_format", spec, "response_format.json_schema.schema")
        if so:
            if c is not None:
                raise InvalidParam("send response_format or structured_outputs, not both", "structured_outputs")
            if len(so) != 1:
                raise InvalidParam("structured_outputs takes one of json, regex, choice, grammar",
                                   "structured_outputs", "invalid_value")
            (key, value), = so.items()
            param = f"structured_outputs.{key}"
            if key == "json":
                if not isinstance(value, (dict, str)):
                    raise InvalidParam("structured_outputs.json must be a JSON Schema (object or its text)", param,
                                       "invalid_type")
                c = Constraint(ConstraintKind.JSON_SCHEMA, value if isinstance(value, str) else json.dumps(value))
            elif key in ("regex", "grammar"):
                if not isinstance(value, str):
                    raise InvalidParam(f"{param} must be a string", param, "invalid_type")
                c = Constraint(ConstraintKind(key), value)
            elif key == "choice":
                if not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
                    raise InvalidParam(f"{param} must be an array of strings", param, "invalid_type")
                c = Constraint(ConstraintKind.CHOICE, choices=tuple(value))
            else:
                raise InvalidParam(f"structured_outputs.{key} is not supported (json, regex, choice, grammar)",
                                   param, "unsupported_parameter")
        return c


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def check(self) -> None:
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise InvalidParam("Invalid type for 'logprobs': expected a boolean", "logprobs", "invalid_type")
        if self.top_logprobs is not None and not (isinstance(self.top_logprobs, int)
                                                  and not isinstance(self.top_logprobs, bool)):
            raise InvalidParam("Invalid type for 'top_logprobs': expected an integer", "top_logprobs", "invalid_type")
        self.refuse({name: f"{name} is not supported by this server"
                     for name in ("tools", "functions", "audio", "prediction", "web_search_options")})
        self.refuse_unless("tool_choice", (None, "none"), "tool_choice is not supported (no tools)")
        self.refuse_unless("function_call", (None, "none"), "function_call is not supported (no functions)")
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
            out.append(ChatMessage(role, text_content(m.content, f"{where}.content")))
        return out

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling(self, policy: SamplingPolicy) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return sampling_params(self, policy, max_tokens, self.max_tokens_param, bool(self.logprobs),
                               self.top_logprobs or 0)


class CompletionRequest(_Sampling):
    prompt: Any = None
    echo: bool | None = None
    suffix: Any = None
    best_of: int | None = None

    def check(self) -> None:
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)):
            raise InvalidParam("Invalid type for 'logprobs': expected an integer (how many top tokens)", "logprobs",
                               "invalid_type")
        self.refuse({"echo": "echo is not supported", "suffix": "suffix is not supported"})
        if self.best_of not in (None, 1, self.n):
            raise InvalidParam(f"best_of must equal n ({self.n or 1}): answers are not ranked, got {self.best_of}",
                               "best_of", "unsupported_value")

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
        # OpenAI's legacy logprobs: the number of top tokens per position (0 = the sampled token's only)
        return sampling_params(self, policy, self.max_tokens, "max_tokens", self.logprobs is not None,
                               self.logprobs or 0)


def text_content(content: Any, param: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """A message's content: a string, or a list of text parts ``{"type": <one of kinds>, "text": ...}`` (joined).
    Chat completions' parts are ``text``; the Responses API's are ``input_text`` / ``output_text``."""
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
        if part.get("type") not in kinds:
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


_SAMPLING_FIELD = re.compile(r"\b(temperature|top_p|top_k|repetition_penalty|max_tokens|seed|stop_token_ids|stop|n|"
                             r"top_logprobs|logprobs|presence_penalty|frequency_penalty|logit_bias|min_tokens|"
                             r"choice)\b")


def format_constraint(fmt: Any, param: str, schema_holder: Any, schema_param: str) -> Constraint | None:
    """An OpenAI output format (``{"type": "text" | "json_object" | "json_schema", ...}``, the request's field
    ``param``) as a constraint; a json_schema format's schema is ``schema_holder["schema"]`` (chat completions nest
    it under ``json_schema``, Responses hold it in the format itself), named ``schema_param`` in a refusal."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        schema = schema_holder.get("schema") if isinstance(schema_holder, dict) else None
        if not isinstance(schema, dict):
            raise InvalidParam(f"{schema_param} must be a JSON Schema object", schema_param, "invalid_value")
        return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind != "text":
        raise InvalidParam(f"{param}.type must be text, json_object or json_schema", f"{param}.type", "invalid_value")
    return None


def sampling_params(req: SamplingFields, policy: SamplingPolicy, max_tokens: int | None, max_tokens_param: str,
                    logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
    """The request's sampling, the server's defaults for what it leaves out, checked by the gRPC API's rules
    (``SamplingParams.validate`` with the policy's limits); a refusal names the field in ``param``."""

    def given(value, default):
        return default if value is None else value

    def opt(name: str, default):  # output-control fields: the Responses request has none of them
        return given(getattr(req, name, None), default)

    params = SamplingParams(
        temperature=given(req.temperature, policy.default_temperature),
        top_p=given(req.top_p, policy.default_top_p),
        top_k=given(req.top_k, policy.default_top_k),
        repetition_penalty=given(req.repetition_penalty, policy.default_repetition_penalty),
        max_tokens=given(max_tokens, policy.default_max_tokens),
        seed=req.seed,
        stop=_stop_strings(req.stop),
        ignore_eos=bool(req.ignore_eos),
        n=opt("n", 1),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        logit_bias=req.logit_bias_pairs() if isinstance(req, _Sampling) else (),
        min_tokens=opt("min_tokens", 0),
        stop_token_ids=tuple(opt("stop_token_ids", ())),
        constraint=req.constraint(),
    )
    try:
        return policy.validate(params)
    except InvalidArgument as e:
        match = _SAMPLING_FIELD.search(str(e))
        param = match.group(1) if match else None
        if param == "choice":
            param = "structured_outputs.choice"
        elif param == "top_logprobs" and isinstance(req, CompletionRequest):
            param = "logprobs"
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


LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf (a token the distribution excluded): JSON has no -inf


def _lp(v: float) -> float:
    return max(v, LOGPROB_FLOOR)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(logprobs: list[TokenLogprob], token_text) -> dict:
    """``choices[].logprobs`` of chat completions: ``{"content": [...]}``."""
    content = []
    for lp in logprobs:
        text = token_text(lp.token_id)
        content.append({"token": text, "logprob": _lp(lp.logprob), "bytes": _bytes(text),
                        "top_logprobs": [{"token": token_text(t), "logprob": _lp(v), "bytes": _bytes(token_text(t))}
                                         for t, v in lp.top]})
    return {"content": content, "refusal": None}


def completion_logprobs(logprobs: list[TokenLogprob], token_text, offset: int = 0) -> dict:
    """``choices[].logprobs`` of (legacy) completions: tokens, their logprobs, the top ones, text offsets."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(lp.token_id)
        tokens.append(text)
        values.append(_lp(lp.logprob))
        tops.append({token_text(t): _lp(v) for t, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class Choices:
    """A whole answer set (``n`` answers) gathered from its events, for the non-streamed responses."""

    def __init__(self, events: list[AnswerEvent]) -> None:
        n = max(e.index for e in events) + 1
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob] | None] = [None] * n
        self.finish: list[FinishReason | None] = [None] * n
        for e in events:
            self.texts[e.index] += e.text
            if e.logprobs is not None:
                self.logprobs[e.index] = (self.logprobs[e.index] or []) + e.logprobs
            if e.finish_reason is not None:
                self.finish[e.index] = e.finish_reason
        self.last = events[-1]

    def finish_reason(self, i: int) -> str:
        return FINISH.get(self.finish[i], "stop")


def chat_completion(id_: str, created: int, model: str, choices: Choices, token_text=None) -> dict:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": (None if choices.logprobs[i] is None
                                  else chat_logprobs(choices.logprobs[i], token_text)),
                     "finish_reason": choices.finish_reason(i)} for i, text in enumerate(choices.texts)],
        "usage": usage_object(choices.last.usage),
    }


def chat_chunk(id_: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               usage: Usage | None = None, with_usage: bool = False, index: int = 0,
               logprobs: dict | None = None) -> dict:
    chunk = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}],
    }
    if with_usage:  # stream_options.include_usage: null on every chunk but the last, as OpenAI streams it
        chunk["usage"] = usage_object(usage) if usage is not None else None
    return chunk


def text_completion(id_: str, created: int, model: str, choices: list[dict] | None, usage: Usage | None = None,
                    with_usage: bool = False) -> dict:
    """A completion or one chunk of its stream: ``choices`` from ``text_choice`` (None: the usage chunk)."""
    obj = {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices or [],
    }
    if with_usage:
        obj["usage"] = usage_object(usage) if usage is not None else None
    return obj


def text_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
