"""Device and dtype selection, decided once when the model loads."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

import torch

from eoq.engine.model.linear import Int8Activations
from eoq.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(setting: str) -> torch.device:
    """'auto' = the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as e:
        raise ConfigError(f"--device {setting!r} is not a device (use auto, cpu, cuda or cuda:N): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {setting}: CUDA is not available here; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda:0")
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {setting}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"--device {setting}: only cpu and cuda are supported")
    return device


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once a process (the CPU's flags do not change)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 GEMMs run several times faster than fp32 there (oneDNN uses them)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """AMX's bfloat16 tiles, which oneDNN's bfloat16 GEMMs run on."""
    return "amx_bf16" in _cpuinfo()


def select_dtype(setting: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on CUDA (fp16 where the GPU lacks bf16) and on CPUs with fast bf16, else float32."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ConfigError(f"--dtype {setting!r}: use auto, float32, bfloat16 or float16")
        dtype = DTYPES[setting]
        if device.type == "cpu" and dtype == torch.float16:
            log.warning("float16 on the CPU is slow; bfloat16 or float32 is better here")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


ACTIVATION_QUANTIZATION = ("auto", "int8", "off")


def select_int8_activations(setting: str, device: torch.device, dtype: torch.dtype,
                            cpu_fast_bf16: bool) -> Int8Activations:
    """Which steps of the low-bit weight copies quantize their activations to int8 (``--activation-quantization``).

    'auto':
    - on a CPU without fast bfloat16 running float32: the decode steps (those without a prompt token), where the
      integer dot products do less work per weight than float32's FMAs;
    - on a CPU with AVX-512 BF16 running bfloat16: the decode steps bigger than the row kernels', which then run
      the panels with VNNI's integer dot products instead of oneDNN's bfloat16 GEMM (on a Zen 5 all of the
      default model's layers at 32 rows ~8.4 ms against 13.3, and 1.26x the tokens a second at 32 streams; on a
      Zen 4 whole decode steps at 32 rows 53 ms against 74 and 1.37x the tokens a second at 32 streams), all of
      them in one kernel call; with AMX only up to ``decode_panels_max_tokens`` rows; the small steps keep the
      row kernels' float32 arithmetic, prompts oneDNN's bfloat16 (faster there for both);
    - else none (CUDA).
    A prompt's own steps never take int8 under 'auto' (int8 there flipped the default model's near-tie France
    answer). 'int8' = every step, on any CPU; 'off' = none (float32 stays exact to the checkpoint's values). Only
    weights with a low-bit copy are affected: without one (a checkpoint that is not low-bit, no CPU kernels) nothing
    changes. ``cpu_fast_bf16``: ``cpu_has_fast_bf16()``, passed in so the decision can be tested for every CPU
    kind."""
    if setting not in ACTIVATION_QUANTIZATION:
        raise ConfigError(f"--activation-quantization {setting!r}: use auto, int8 or off")
    if device.type != "cpu" or setting == "off":
        return Int8Activations.OFF
    if setting == "int8":
        return Int8Activations.ALL_STEPS
    if dtype == torch.float32 and not cpu_fast_bf16:
        return Int8Activations.DECODE_STEPS
    if dtype == torch.bfloat16 and cpu_fast_bf16:
        return Int8Activations.DECODE_PANELS
    return Int8Activations.OFF


# AMX: the decode steps of up to this many rows run the int8 panels (every layer in one kernel call), bigger ones
# oneDNN's bfloat16 tiles, layer by layer. Measured on a 2-core Intel Xeon with AMX (the default model, a step of
# that many sequences at 100 tokens of context, against --activation-quantization off): 8 rows 13 ms against 30,
# 16 rows 21 against 33, 32 rows 38 against 46, 48 rows 53 against 53, 64 rows 69 against 62 (at 200 tokens the
# same within 2 ms); the server over HTTP (128 tokens each): 8 streams 476 tokens a second against 271, 32 streams
# 723 against 670, 48 streams 761 against 820, 64 streams 902 against 878 (with the panels up to 48 rows).
AMX_DECODE_PANELS_MAX_TOKENS = 32


def decode_panels_max_tokens(int8_activations: Int8Activations, cpu_amx: bool) -> int:
    """The biggest decode step that ``Int8Activations.DECODE_PANELS`` runs on the panels (``Linear.prepare``):
    unbounded without AMX, ``AMX_DECODE_PANELS_MAX_TOKENS`` with it (``cpu_amx``: ``cpu_has_amx()``)."""
    if int8_activations is Int8Activations.DECODE_PANELS and cpu_amx:
        return AMX_DECODE_PANELS_MAX_TOKENS
    return sys.maxsize


KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def select_kv_cache_dtype(setting: str, dtype: torch.dtype, int8_activations_run: bool) -> torch.dtype:
    """The KV cache's element type (``--kv-cache-dtype``). 'auto' = bfloat16 beside a float32 model whose matmuls
    run int8 activations (``int8_activations_run``: some low-bit copy takes them, as ``auto`` does on a CPU without
    fast bfloat16): that engine already trades float32's exactness for speed, and a 16-bit cache halves what decode
    attention reads a step and doubles the tokens a budget holds; else the model's dtype. A cache wider than the
    model (float32 beside bfloat16) gains nothing and is refused."""
    if setting == "auto":
        return torch.bfloat16 if dtype == torch.float32 and int8_activations_run else dtype
    if setting not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {setting!r}: use auto, float32 or bfloat16")
    kv = KV_CACHE_DTYPES[setting]
    if kv.itemsize > dtype.itemsize:
        raise ConfigError(f"--kv-cache-dtype {setting} is wider than the model's {dtype_name(dtype)}: the cache holds "
                          f"what the model computes, so it would only take more memory (use auto or bfloat16)")
    if kv != dtype and dtype != torch.float32:
        raise ConfigError(f"--kv-cache-dtype {setting} beside a {dtype_name(dtype)} model: a narrower cache is "
                          "bfloat16 beside float32 only")
    return kv


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS after every step.

    A decode step allocates and frees the same large temporaries (gathered K/V, attention scores) every layer.
    With glibc's defaults, blocks above the mmap threshold are mapped and unmapped each time, and every first
    touch of a fresh page faults: measured here, 32 sequences' decode attention ran ~10x slower that way.
    Raising the mmap and trim thresholds makes the allocator reuse the memory. glibc only; a no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    return bool(ok)
