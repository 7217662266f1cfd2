"""Plain data passed into and out of the engine. No torch, no protobuf.

The engine's contract: ``EngineRequest`` goes in; a stream of ``RequestOutput`` comes out, one per engine step
that produced something for the request, the last one with ``finished=True``. ``SchedulerStats`` describe one
step; the metrics module turns them (and finished requests' ``RequestTimings``) into Prometheus series.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from eoq.errors import InvalidArgument


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-answer token or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # aborted: client cancel, deadline, shutdown


DEFAULT_MAX_TOKENS = 512  # a request's max_tokens when it leaves it 0 (the server's --default-max-tokens)
MAX_STOP_STRINGS = 16  # stop strings a request may send (--max-stop-strings)
# A positive temperature below this is greedy: dividing logits by it overflows float32 (1e-45 gave inf logits
# and NaN probabilities), and at 1e-5 sampling is already argmax for any realistic logit gap.
MIN_TEMPERATURE = 1e-5
# Outside this range a repetition penalty overflows or flushes logits (1e-45 turned them into +inf).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# OpenAI's ranges: presence/frequency penalties in [-2, 2], a logit bias in [-100, 100], up to 20 top logprobs.
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
MAX_TOP_LOGPROBS = 20
MAX_N = 8  # answers one request may ask for (--max-n)
MAX_LOGIT_BIAS_ENTRIES = 300  # token ids one request may bias (--max-logit-bias-entries), OpenAI's limit
MAX_STOP_TOKEN_IDS = 16  # extra end tokens one request may name


class ConstraintKind(str, enum.Enum):
    """What a structured-output constraint holds (``Constraint.value``)."""

    JSON_SCHEMA = "json_schema"  # a JSON Schema document (its JSON text)
    JSON_OBJECT = "json_object"  # any JSON value that is an object; value unused
    REGEX = "regex"  # a regular expression the whole answer matches
    GRAMMAR = "grammar"  # an EBNF grammar (xgrammar's dialect: GBNF-like, rule ``root``)
    CHOICE = "choice"  # one of ``choices``, exactly


@dataclass(frozen=True, slots=True)
class Constraint:
    """The language an answer must belong to. The engine compiles it once per distinct constraint (cached) into a
    token mask applied while sampling; the end-of-answer token is allowed only where the language accepts."""

    kind: ConstraintKind
    value: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability and, when asked for, the most likely tokens at its position (most likely
    first). ``logprob`` is -inf for a token the distribution excluded (a prompt token under no constraint never
    is)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. ``validate`` checks it once, at the door, with messages that say what is wrong, and
    returns the parameters to run with."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats (HF semantics)
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens beyond the model's end-of-answer tokens
    ignore_eos: bool = False  # benchmarks: the model's end-of-answer tokens do not stop generation
    n: int = 1  # answers to sample from the one prompt (prefilled once; its KV blocks shared)
    logprobs: bool = False  # each generated token's log-probability
    top_logprobs: int = 0  # and the most likely tokens at its position (0..MAX_TOP_LOGPROBS); needs logprobs
    # The prompt tokens' log-probabilities too (under the model's own distribution, temperature 1; with
    # top_logprobs alternatives). Such a prompt is computed in full: it skips the prefix cache.
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already in the answer
    frequency_penalty: float = 0.0  # subtracted per occurrence in the answer
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # the end-of-answer tokens (and stop token ids) are masked until this many are out
    constraint: Constraint | None = None  # structured output

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(
        self, *, max_tokens_limit: int, max_stop_strings: int = MAX_STOP_STRINGS, max_stop_length: int = 256,
        max_n: int = MAX_N, max_logit_bias_entries: int = MAX_LOGIT_BIAS_ENTRIES,
    ) -> SamplingParams:
        """Raise ``InvalidArgument`` naming the first bad field; otherwise return the parameters to run with:
        these, except that a temperature in (0, ``MIN_TEMPERATURE``) becomes 0 (greedy). ``repetition_penalty``
        must lie in [``MIN_REPETITION_PENALTY``, ``MAX_REPETITION_PENALTY``]. Token ids (``logit_bias``,
        ``stop_token_ids``) are checked against the vocabulary by the engine (``AsyncEngine.generate``)."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1] (0 = off), got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty)
                and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise InvalidArgument(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                                  f"{MAX_REPETITION_PENALTY:g}] (0 = off), got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_tokens > max_tokens_limit:
            raise InvalidArgument(f"max_tokens must be <= {max_tokens_limit}, got {self.max_tokens}")
        if len(self.stop) > max_stop_strings:
            raise InvalidArgument(f"at most {max_stop_strings} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidArgument("stop strings must not be empty")
            if len(s) > max_stop_length:
                raise InvalidArgument(f"stop strings must be at most {max_stop_length} characters, got {len(s)}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"seed must be in [0, 2**64), got {self.seed}")
        self._validate_output_control(max_n, max_logit_bias_entries)
        if 0 < self.temperature < MIN_TEMPERATURE:
            return replace(self, temperature=0.0)
        return self

    def _validate_output_control(self, max_n: int, max_logit_bias_entries: int) -> None:
        if not 1 <= self.n <= max_n:
            raise InvalidArgument(f"n must be in [1, {max_n}] (--max-n), got {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise InvalidArgument("top_logprobs needs logprobs (or prompt_logprobs) to be set")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -MAX_ABS_PENALTY <= v <= MAX_ABS_PENALTY):
                raise InvalidArgument(f"{name} must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}], got {v}")
        if len(self.logit_bias) > max_logit_bias_entries:
            raise InvalidArgument(f"logit_bias may name at most {max_logit_bias_entries} tokens "
                                  f"(--max-logit-bias-entries), got {len(self.logit_bias)}")
        seen = set()
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise InvalidArgument(f"logit_bias: token id {token_id} is negative")
            if token_id in seen:
                raise InvalidArgument(f"logit_bias: token id {token_id} appears twice")
            seen.add(token_id)
            if not (math.isfinite(bias) and -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS):
                raise InvalidArgument(f"logit_bias of token {token_id} must be in [-{MAX_ABS_LOGIT_BIAS:g}, "
                                      f"{MAX_ABS_LOGIT_BIAS:g}], got {bias}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, "
                                  f"got {len(self.stop_token_ids)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidArgument("stop_token_ids must not be negative")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgument(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        c = self.constraint
        if c is not None and self.ignore_eos:
            raise InvalidArgument("ignore_eos cannot be combined with a constraint: the answer ends where its "
                                  "language is complete")
        if c is not None and self.min_tokens:
            raise InvalidArgument("min_tokens cannot be combined with a constraint: the constraint's language says "
                                  "where the answer may end")
        if c is not None:
            if c.kind is ConstraintKind.CHOICE:
                if not c.choices or any(not x for x in c.choices):
                    raise InvalidArgument("choice must hold at least one string, none of them empty")
            elif c.kind is not ConstraintKind.JSON_OBJECT and not c.value.strip():
                raise InvalidArgument(f"the {c.kind.value} constraint is empty")

    def token_ids_named(self) -> set[int]:
        """The token ids this request names (for the engine's vocabulary check)."""
        return {t for t, _ in self.logit_bias} | set(self.stop_token_ids)


@dataclass(slots=True)
class EngineRequest:
    """One generation request. ``cache_salt`` keeps tenants' prefix caches apart (it enters every block hash)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_salt: str = ""
    arrival_time: float = 0.0  # time.monotonic(); set by the engine when added if 0


@dataclass(slots=True)
class RequestTimings:
    """Monotonic timestamps of one request's life, reported with its last output."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.first_scheduled - self.arrival) if self.first_scheduled is not None else 0.0

    @property
    def ttft_seconds(self) -> float:
        return (self.first_token - self.arrival) if self.first_token is not None else 0.0

    @property
    def total_seconds(self) -> float:
        return (self.finished - self.arrival) if self.finished is not None else 0.0


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request.

    ``token_ids`` are the tokens whose text is in ``text`` (text held back for a possible stop string holds its
    tokens back too). The last output has ``finished=True`` and a ``finish_reason``.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    timings: RequestTimings | None = None  # on the last output
    error: str | None = None  # set when the request failed inside the engine
    error_is_invalid_argument: bool = False  # the request itself was at fault (e.g. its grammar did not compile)
    index: int = 0  # which of the request's ``n`` answers this output belongs to
    last: bool = False  # the request's last output: every answer has finished (``finished`` is per answer)
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when the request asked for them
    # With prompt_logprobs, on the request's first output: prompt tokens 1.. (the first has no context)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class SchedulerStats:
    """One engine step, for the metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # used blocks / all blocks, 0..1
    num_batched_seqs: int = 0
    num_batched_tokens: int = 0
    num_preemptions: int = 0  # in this step
    prefix_cache_queries: int = 0  # prompt tokens looked up in this step
    prefix_cache_hits: int = 0  # of those, found in the cache
    num_prompt_tokens: int = 0  # prompt tokens of requests admitted in this step
    num_generated_tokens: int = 0  # tokens sampled in this step


@dataclass(slots=True)
class EngineStepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    stats: SchedulerStats | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine needs, picklable (the engine may run in its own process)."""

    checkpoint: Path  # a transformers-format folder (see model.checkpoint.resolve_checkpoint)
    model_name: str
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory_gb: float | None = None
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
    quantized_weights: str = "auto"  # auto | int4 | never (see model.base.DecoderModel.quantize)
    quantized_max_tokens: int = 4
    # auto | int8 | off: int8 activations for the low-bit copies' matmuls (see device.select_int8_activations)
    activation_quantization: str = "auto"
    # auto | float32 | bfloat16: the KV cache's element type (see device.select_kv_cache_dtype)
    kv_cache_dtype: str = "auto"
    cpu_kernels: bool = True  # CPU: eoq's C++ kernels (model.kernels), built on first use
    kernel_cache_dir: Path | None = None  # where built kernels are kept (default: <eoq cache>/kernels)
    # -march of those kernels: this CPU's, or an older level (x86-64-v3 = AVX2) to run that branch (tests)
    kernel_march: str = "native"
    decode_graphs: str = "auto"  # auto (CUDA graphs on CUDA) | off | eager (padded steps, no graphs: tests)
    extra_eos_token_ids: tuple[int, ...] = ()  # e.g. the chat template's end-of-turn token
    grammar_cache_mb: int = 256  # compiled grammars kept (structured output), least recently used evicted
    max_grammar_compile_seconds: float = 10.0  # a constraint that takes longer to compile is refused


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    architecture: str
    context_length: int
    dtype: str
    device: str
    vocab_size: int
    kv_cache_tokens: int
    kv_bytes_per_token: int
    kv_cache_dtype: str = ""  # the KV cache's element type (the model's dtype, or bfloat16 beside float32)
    eos_token_ids: tuple[int, ...] = field(default=())
