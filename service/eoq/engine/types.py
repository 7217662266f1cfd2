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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(
        self, *, max_tokens_limit: int, max_stop_strings: int = MAX_STOP_STRINGS, max_stop_length: int = 256
    ) -> SamplingParams:
        """Raise ``InvalidArgument`` naming the first bad field; otherwise return the parameters to run with:
        these, except that a temperature in (0, ``MIN_TEMPERATURE``) becomes 0 (greedy). ``repetition_penalty``
        must lie in [``MIN_REPETITION_PENALTY``, ``MAX_REPETITION_PENALTY``]."""
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
        if 0 < self.temperature < MIN_TEMPERATURE:
            return replace(self, temperature=0.0)
        return self


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
    cpu_kernels: bool = True  # CPU: eoq's C++ kernels (model.kernels), built on first use
    kernel_cache_dir: Path | None = None  # where built kernels are kept (default: <eoq cache>/kernels)
    # -march of those kernels: this CPU's, or an older level (x86-64-v3 = AVX2) to run that branch (tests)
    kernel_march: str = "native"
    decode_graphs: str = "auto"  # auto (CUDA graphs on CUDA) | off | eager (padded steps, no graphs: tests)
    extra_eos_token_ids: tuple[int, ...] = ()  # e.g. the chat template's end-of-turn token


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
    eos_token_ids: tuple[int, ...] = field(default=())
