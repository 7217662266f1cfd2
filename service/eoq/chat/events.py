"""What an answer streams: events with a sequence number, their usage, and their JSON form (the answer log's)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from eoq.engine.types import FinishReason, RequestOutput, TokenLogprob


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    time_to_first_token_seconds: float
    total_seconds: float
    queue_seconds: float

    @classmethod
    def of(cls, prompt_len: int, out: RequestOutput, completion_tokens: int | None = None) -> Usage:
        """``out``: the request's last output; ``completion_tokens``: of all its answers (default: ``out``'s)."""
        t = out.timings
        return cls(
            prompt_tokens=prompt_len,
            completion_tokens=out.num_completion_tokens if completion_tokens is None else completion_tokens,
            cached_prompt_tokens=out.num_cached_tokens,
            time_to_first_token_seconds=t.ttft_seconds if t else 0.0,
            total_seconds=t.total_seconds if t else 0.0,
            queue_seconds=t.queue_seconds if t else 0.0,
        )


@dataclass(slots=True)
class AnswerEvent:
    """One streamed piece of an answer; the last has ``finish_reason`` and ``usage``. A Chat or Regenerate
    answer's events name the question they answer and the answer they write, and are numbered from 1
    (``sequence``: WatchAnswer resumes after one of them).

    A request for ``n`` answers streams them interleaved, each event naming its answer (``index``): each answer's
    last event has its ``finish_reason``, with ``more`` set while other answers go on; the stream's last event
    has ``usage`` (the prompt counted once, the completion tokens of all answers)."""

    conversation_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    dropped_turns: int = 0
    user_message_id: str = ""
    message_id: str = ""
    sequence: int = 0
    index: int = 0
    more: bool = False  # finish_reason ends this answer; other answers of the request still stream
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # Complete with prompt_logprobs: on the first event

    @property
    def ends_stream(self) -> bool:
        return self.finish_reason is not None and not self.more

    def to_json(self) -> str:
        data = asdict(self)
        data["finish_reason"] = None if self.finish_reason is None else self.finish_reason.value
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> AnswerEvent:
        data = json.loads(raw)
        reason = data.pop("finish_reason")
        usage = data.pop("usage")
        for key in ("logprobs", "prompt_logprobs"):
            if data.get(key) is not None:
                data[key] = [TokenLogprob(d["token_id"], d["logprob"], tuple(map(tuple, d["top"])))
                             for d in data[key]]
        return cls(**data, finish_reason=None if reason is None else FinishReason(reason),
                   usage=None if usage is None else Usage(**usage))
