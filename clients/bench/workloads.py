"""The benchmark workloads (``clients/bench/WORKLOADS.md``) and the figures computed from what a client saw.

Pure Python: no gRPC, no torch. A target (``targets.py``, ``peers.py``) turns each request into a
``RequestRecord``: when it was sent and when each piece of the answer arrived with how many tokens it held. The
figures are computed here from those records alone, the same way for every target:

- TTFT: first event that carries tokens, minus the time the request was sent (client side, queueing included);
- inter-token latency (ITL): the gap between two consecutive events divided by the tokens in the later event,
  counted once per token (an event with 3 tokens after a 30 ms gap is three 10 ms latencies);
- decode tokens/s of one stream: tokens after the first event over the time from the first to the last event;
- aggregate tokens/s of a batch: all generated tokens over the wall time from the first send to the last token;
- prefill tokens/s: a long prompt's tokens not found in the prefix cache over its TTFT (one forced token).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Short everyday questions; requests cycle through them (request i asks QUESTIONS[i % len]).
QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain attention in transformers in simple words.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "What should I pack for a weekend hiking trip?",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a small coffee shop.",
    "What is a prime number?",
    "How can I learn to cook on a budget?",
)

CONCURRENCY_LEVELS: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
WORKLOAD_KINDS: tuple[str, ...] = ("single", "conc", "turns", "prefill")


def question(i: int) -> str:
    return QUESTIONS[i % len(QUESTIONS)]


def prefill_prompt(seed: str, words: int) -> str:
    """A long question of ``words`` random words ("w" and 9 digits: ~10 tokens each with the default model's
    tokenizer), different for every ``seed``: a prompt no cache holds, whichever target saw the run's others."""
    rnd = random.Random(seed)
    return " ".join(f"w{rnd.randrange(10**9):09d}" for _ in range(words))


@dataclass(frozen=True, slots=True)
class BenchPlan:
    """What one ``eoq bench`` run does, validated once from the command line."""

    workloads: tuple[str, ...] = WORKLOAD_KINDS  # a subset of WORKLOAD_KINDS, in this order
    max_tokens: int = 128  # forced tokens per request in `single` and `conc-N`
    concurrency: tuple[int, ...] = CONCURRENCY_LEVELS
    num_conversations: int = 8
    num_turns: int = 6
    turn_max_tokens: int = 64  # an upper bound: answers in `turns` stop at the end-of-answer token
    repeat: int = 1  # runs of each workload; the figures reported are the medians over the runs
    warmup_tokens: int = 8  # one short request per target before measuring (0 = none)
    prefill_words: int = 110  # `prefill`: the prompt's random words (~1,130 tokens with the chat template)
    prefill_requests: int = 3  # `prefill`: prompts sent one after another; the figures are their medians

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOAD_KINDS]
        if unknown:
            raise ValueError(f"unknown workload(s) {unknown}: choose from {', '.join(WORKLOAD_KINDS)}")
        for name in ("max_tokens", "num_conversations", "num_turns", "turn_max_tokens", "repeat", "prefill_words",
                     "prefill_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")

    @classmethod
    def quick(cls, workloads: tuple[str, ...] = WORKLOAD_KINDS) -> BenchPlan:
        """A smoke run: every workload, small N, few tokens (seconds, not minutes)."""
        return cls(workloads=workloads, max_tokens=16, concurrency=(1, 4), num_conversations=2, num_turns=3,
                   turn_max_tokens=16, repeat=1, warmup_tokens=4, prefill_words=24, prefill_requests=2)

    def workload_names(self) -> list[str]:
        names: list[str] = []
        for kind in self.workloads:
            if kind == "conc":
                names.extend(f"conc-{n}" for n in self.concurrency)
            else:
                names.append(kind)
        return names


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. Times are ``time.perf_counter()`` seconds.

    ``events`` holds only the events that carried tokens, in arrival order. ``sent`` is when the request was
    handed to the target: for targets that run requests one after another it is the start of the whole batch,
    so their TTFT includes the wait, as a queue would."""

    sent: float
    events: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in the event)
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    completion_tokens: int | None = None  # as the target reported it; else the events' tokens
    server_ttft_seconds: float | None = None  # as the target measured it itself, when it says

    def add(self, t: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.events.append((t, num_tokens))

    @property
    def num_tokens(self) -> int:
        if self.completion_tokens is not None:
            return self.completion_tokens
        return sum(n for _, n in self.events)

    @property
    def ttft(self) -> float | None:
        return self.events[0][0] - self.sent if self.events else None

    @property
    def last_token_time(self) -> float | None:
        return self.events[-1][0] if self.events else None

    def inter_token_latencies(self) -> list[float]:
        """One latency per token after the first event: each gap divided by the tokens it delivered."""
        out: list[float] = []
        for (t0, _), (t1, n) in zip(self.events, self.events[1:]):
            out.extend([(t1 - t0) / n] * n)
        return out

    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first event over the time from the first event to the last; None with one event."""
        if len(self.events) < 2:
            return None
        span = self.events[-1][0] - self.events[0][0]
        after_first = sum(n for _, n in self.events[1:])
        return after_first / span if span > 0 else None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _defined(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize_single(record: RequestRecord, wall_seconds: float) -> dict:
    return {
        "ttft_s": record.ttft,
        "decode_tokens_per_s": record.decode_tokens_per_second(),
        "completion_tokens": record.num_tokens,
        "prompt_tokens": record.prompt_tokens,
        "server_ttft_s": record.server_ttft_seconds,
        "wall_s": wall_seconds,
    }


def summarize_batch(records: Sequence[RequestRecord], started: float, concurrency: int) -> dict:
    """conc-N figures: aggregate tokens/s over the wall time from ``started`` to the last token of any request."""
    ends = _defined(r.last_token_time for r in records)
    wall = (max(ends) - started) if ends else 0.0
    total = sum(r.num_tokens for r in records)
    ttfts = _defined(r.ttft for r in records)
    itls = [x for r in records for x in r.inter_token_latencies()]
    server_ttfts = _defined(r.server_ttft_seconds for r in records)
    return {
        "concurrency": concurrency,
        "num_requests": len(records),
        "completion_tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "itl_p50_s": percentile(itls, 50) if itls else None,
        "itl_p99_s": percentile(itls, 99) if itls else None,
        # the target's own TTFT (from the request's arrival at the engine), where it reports one
        "server_ttft_p50_s": percentile(server_ttfts, 50) if server_ttfts else None,
    }


def summarize_turns(by_turn: Sequence[Sequence[RequestRecord]], wall_seconds: float) -> dict:
    """``by_turn[i]`` holds turn i+1 of every conversation. Medians per turn index."""
    turns = []
    for i, records in enumerate(by_turn):
        ttfts = _defined(r.ttft for r in records)
        cached = _defined(r.cached_prompt_tokens for r in records)
        prompt = _defined(r.prompt_tokens for r in records)
        turns.append({
            "turn": i + 1,
            "num_requests": len(records),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "cached_prompt_tokens_p50": statistics.median(cached) if cached else None,
            "prompt_tokens_p50": statistics.median(prompt) if prompt else None,
            "completion_tokens": sum(r.num_tokens for r in records),
        })
    return {
        "num_conversations": len(by_turn[0]) if by_turn else 0,
        "num_turns": len(by_turn),
        "wall_s": wall_seconds,
        "by_turn": turns,
    }


def summarize_prefill(records: Sequence[RequestRecord]) -> dict:
    """`prefill` figures, medians over its requests: each request's prompt tokens not found in the prefix cache
    (all of them where the target does not say) over its TTFT."""
    rates, ttfts, prompt, cached = [], [], [], []
    for r in records:
        if r.ttft is None or r.prompt_tokens is None:
            continue
        new = r.prompt_tokens - (r.cached_prompt_tokens or 0)
        rates.append(new / r.ttft if r.ttft > 0 else None)
        ttfts.append(r.ttft)
        prompt.append(r.prompt_tokens)
        cached.append(r.cached_prompt_tokens or 0)
    rates = _defined(rates)
    server_ttfts = _defined(r.server_ttft_seconds for r in records)
    return {
        "num_requests": len(records),
        "prompt_tokens_p50": statistics.median(prompt) if prompt else None,
        "cached_prompt_tokens_p50": statistics.median(cached) if cached else None,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "prefill_tokens_per_s": statistics.median(rates) if rates else None,
        "server_ttft_p50_s": statistics.median(server_ttfts) if server_ttfts else None,
    }


def median_of_runs(runs: Sequence[dict]) -> dict:
    """One summary from several runs of a workload: the median of each number, the first run's other values.

    ``by_turn`` lists are merged entry by entry the same way."""
    if len(runs) == 1:
        return dict(runs[0])
    merged: dict = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if key == "by_turn":
            merged[key] = [median_of_runs([v[i] for v in values]) for i in range(len(first))]
        elif values.count(first) == len(values):  # e.g. the concurrency, or forced token counts: kept as they are
            merged[key] = first
        elif isinstance(first, (int, float)) and not isinstance(first, bool) and all(
                isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)
        else:
            merged[key] = first
    return merged
