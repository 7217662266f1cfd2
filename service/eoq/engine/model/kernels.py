"""eoq's C++ kernels (``csrc/``), built for this machine and called through ctypes.

A kernel is compiled by the machine's C++ compiler (``$CXX``, else ``g++``) the first time an engine needs it —
about a second: it includes no torch headers — with ``-march=native``, into ``<cache>/kernels/`` under a name
that hashes the source, the compiler's version, the flags and the CPU, so a cache shared between machines never
loads a build for another CPU. It links ``libgomp.so.1``, the OpenMP runtime torch has already loaded, so its
threads are torch's threads. Without a compiler, or when the build fails, the engine uses torch's ops instead
(said once in the log).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(lines))  # the first of each kind (every core repeats them)


def build(name: str, cache_dir: Path) -> Path:
    """Compile ``csrc/<name>.cpp`` (once per source, compiler and CPU) and return the shared library's path.

    Raises ``RuntimeError`` with the compiler's message when there is no compiler or the build fails."""
    source = resources.files("eoq.engine.model").joinpath("csrc", f"{name}.cpp").read_bytes()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([source.decode(), cxx, version, " ".join(FLAGS), _cpu_id()]).encode()).hexdigest()
    out = cache_dir / f"{name}-{key[:16]}.so"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        src = Path(tmp) / f"{name}.cpp"
        src.write_bytes(source)
        lib = Path(tmp) / f"{name}.so"
        done = subprocess.run([cxx, *FLAGS, "-o", str(lib), str(src)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {name}.cpp: {done.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: engines starting together never load a half-written file
    log.info("built the %s kernel for this CPU: %s", name, out)
    return out


class PagedDecodeAttention:
    """Decode attention straight from the paged cache (``csrc/paged_decode.cpp``): one call per layer for every
    decoding sequence, no gathered copy of their blocks."""

    def __init__(self, library: Path) -> None:
        fn = ctypes.CDLL(str(library)).eoq_paged_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 7 + [ctypes.c_float]
        self._fn = fn

    @staticmethod
    def supports(device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _DTYPES

    def __call__(
        self,
        q: torch.Tensor,  # (D, nh, hd); heads contiguous, any stride between sequences
        k_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd) contiguous
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # (D * width,) int64
        context_lens: torch.Tensor,  # (D,) int64
    ) -> torch.Tensor:  # (D, nh, hd)
        D, nh, hd = q.shape
        nkv, num_blocks, bs, _ = k_cache.shape
        if q.stride(2) != 1 or q.stride(1) != hd:
            q = q.contiguous()
        out = torch.empty(D, nh, hd, dtype=q.dtype)
        rc = self._fn(_DTYPES[q.dtype], q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                      block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), D, nh, nkv, hd, bs,
                      num_blocks, block_tables.numel() // max(D, 1), hd**-0.5)
        if rc:
            raise ValueError(f"paged decode attention refused its arguments (code {rc})")
        return out


def load_paged_decode_attention(cache_dir: Path) -> PagedDecodeAttention | None:
    """The kernel, or None (logged) when it cannot be built here."""
    try:
        return PagedDecodeAttention(build("paged_decode", cache_dir))
    except (RuntimeError, OSError) as e:
        log.warning("decode attention falls back to torch's SDPA over gathered blocks: %s", e)
        return None
