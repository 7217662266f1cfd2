"""eoq's C++ kernels for the CPU (``csrc/``), built for this machine and called through ctypes.

The sources are compiled into one library by the machine's C++ compiler (``$CXX``, else ``g++``) the first time an
engine needs them — 3 to 7 seconds on two cores: they include no torch headers — with ``-march=native``, into
``<cache>/kernels/`` under a name that hashes the sources, the compiler's version, the flags and the CPU, so a cache
shared between machines never loads a build for another CPU. It links ``libgomp.so.1``, the OpenMP runtime torch has
already loaded, so its threads are torch's threads. Without a compiler, or when the build fails, the engine uses
torch's ops instead (said once in the log).
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
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-Wno-psabi", "-shared", "-fPIC", "-std=c++17"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(lines))  # the first of each kind (every core repeats them)


def _sources() -> dict[str, bytes]:
    folder = resources.files("eoq.engine.model").joinpath("csrc")
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith((".cpp", ".h"))}


def build(cache_dir: Path, march: str = "native") -> Path:
    """Compile ``csrc/*.cpp`` into one library (once per source, compiler, CPU and ``march``) and return its path.

    ``march``: the instruction set to build for (``-march=``): this machine's by default; tests also build older
    ones (``x86-64-v3``: AVX2, ``x86-64``: none of the wide vectors) to run each of ``csrc/simd.h``'s branches.
    Raises ``RuntimeError`` with the compiler's message when there is no compiler or the build fails."""
    flags = [*FLAGS, f"-march={march}"]
    sources = _sources()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in [*(n.encode() + b"\0" + b for n, b in sources.items()), cxx.encode(), version.encode(),
                 " ".join(flags).encode(), _cpu_id().encode()]:
        digest.update(part + b"\0")
    out = cache_dir / f"eoq_cpu-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
        lib = Path(tmp) / "eoq_cpu.so"
        cpp = [str(Path(tmp) / n) for n in sources if n.endswith(".cpp")]
        done = subprocess.run([cxx, *flags, "-o", str(lib), *cpp], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build eoq's CPU kernels: {done.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: engines starting together never load a half-written file
    log.info("built eoq's CPU kernels for this CPU (-march=%s): %s", march, out)
    return out


def _entry(lib: ctypes.CDLL, name: str, argtypes: list) -> Callable[..., None]:
    """A library function that returns 0 or a non-zero code for arguments it cannot take (raised here)."""
    fn = getattr(lib, name)
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes

    def call(*args) -> None:
        rc = fn(*args)
        if rc:
            raise RuntimeError(f"eoq's CPU kernel {name} refused its arguments (code {rc})")

    return call


class CpuKernels:
    """The library's entry points, for float32 and bfloat16 tensors on the CPU."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        dt, p, i64, f32 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._decode = _entry(lib, "eoq_paged_decode_attention", [dt, p, i64, p, p, p, p, p] + [i64] * 7 + [f32])
        self._norm = _entry(lib, "eoq_add_rms_norm", [dt, p, p, p, p, i64, i64, f32])
        self._rope = _entry(lib, "eoq_rope_and_store", [dt, p, p, p, p, p, p, p, p] + [i64] * 5)
        self._silu_mul = _entry(lib, "eoq_silu_mul", [dt, p, p, i64, i64])
        self._int8 = _entry(lib, "eoq_int8_matmul", [dt, p, p, p, p, i64, i64, i64])
        self._int4 = _entry(lib, "eoq_int4_matmul", [dt, p, p, p, p, i64, i64, i64])
        self._gemm = _entry(lib, "eoq_gemm_f32", [p, p, p, i64, i64, i64])
        self._argmax = _entry(lib, "eoq_argmax", [p, p, i64, i64])
        self._gemm_lowbit = {bits: _entry(lib, f"eoq_gemm_q{bits}", [p, p, p, p, i64, i64, i64]) for bits in (4, 8)}
        self._llama_int4 = _entry(lib, "eoq_llama_layers_int4", [dt, p, i64, LlamaShape] + [p] * 8 + [i64] * 2)
        lib.eoq_simd_isa.restype = ctypes.c_char_p
        self.isa: str = lib.eoq_simd_isa().decode()  # the vectors the kernels use: avx512, avx2 or generic

    @staticmethod
    def supports(device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _DTYPES

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
        """``x += delta`` in place (x float32 (rows, dim) contiguous; delta in ``out_dtype`` or None), then
        RMSNorm of x times ``weight`` (float32), returned in ``out_dtype`` (``csrc/rms_norm.cpp``)."""
        rows, dim = x.shape
        if delta is not None and not delta.is_contiguous():
            delta = delta.contiguous()
        out = torch.empty(rows, dim, dtype=out_dtype)
        self._norm(_DTYPES[out_dtype], x.data_ptr(), None if delta is None else delta.data_ptr(),
                   weight.data_ptr(), out.data_ptr(), rows, dim, eps)
        return out

    def rope_and_store(self, qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                       positions: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """RoPE on the queries and keys of ``qkv`` (T, (nh + 2 nkv) hd), returned as (T, nh + nkv, hd); the
        rotated keys and the values written to ``slots`` of the caches (nkv, num_blocks, bs, hd). The tables are
        float32 (positions, hd) with sin's first half negated (``csrc/rope.cpp``)."""
        qkv = qkv.contiguous()
        T = qkv.shape[0]
        out = torch.empty(T, num_heads + num_kv_heads, head_dim, dtype=qkv.dtype)
        cache_slots = k_cache.shape[1] * k_cache.shape[2]
        self._rope(_DTYPES[qkv.dtype], qkv.data_ptr(), cos_table.data_ptr(), sin_table.data_ptr(),
                   positions.data_ptr(), slots.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   T, num_heads, num_kv_heads, head_dim, cache_slots)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for ``gate_up`` (T, 2 inter) = [gate | up]; returns (T, inter) (``csrc/silu_mul.cpp``)."""
        gate_up = gate_up.contiguous()
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(_DTYPES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def int8_matmul(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x (rows <= 8, in) @ W^T with W int8 (out, in) in groups of 32 inputs, each with a float32 scale
        (``scales`` (out, in / 32)); returned in x's dtype (``csrc/lowbit_rows.cpp``)."""
        x = x.contiguous()
        rows, in_f = x.shape
        out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
        self._int8(_DTYPES[x.dtype], x.data_ptr(), weight.data_ptr(), scales.data_ptr(), out.data_ptr(), rows,
                   in_f, weight.shape[0])
        return out

    def int4_matmul(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x (rows <= 8, in) @ W^T with W 4-bit in groups of 32 inputs: ``q`` uint8 (out, in / 32, 16) holding
        q[i] | q[i + 16] << 4, ``scales`` float32 (out, in / 32, 2) = (step, min), w = step * q + min; returned in
        x's dtype (``csrc/lowbit_rows.cpp``)."""
        x = x.contiguous()
        rows, in_f = x.shape
        out = torch.empty(rows, q.shape[0], dtype=x.dtype)
        self._int4(_DTYPES[x.dtype], x.data_ptr(), q.data_ptr(), scales.data_ptr(), out.data_ptr(), rows, in_f,
                   q.shape[0])
        return out

    def gemm(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """x (rows, in) float32 @ W^T for W packed by ``pack_gemm_weight`` (``csrc/gemm.cpp``)."""
        x = x.contiguous()
        rows, in_f = x.shape
        out = torch.empty(rows, out_features, dtype=torch.float32)
        self._gemm(x.data_ptr(), packed.data_ptr(), out.data_ptr(), rows, out_features, in_f)
        return out

    def gemm_lowbit(self, x: torch.Tensor, panels: LowBitPanels, out_features: int) -> torch.Tensor:
        """x (rows, in) float32 @ W^T for a 4- or 8-bit W packed by ``pack_int4_panels`` / ``pack_int8_panels``
        (``csrc/gemm.cpp``)."""
        x = x.contiguous()
        rows, in_f = x.shape
        out = torch.empty(rows, out_features, dtype=torch.float32)
        self._gemm_lowbit[panels.bits](x.data_ptr(), panels.values.data_ptr(), panels.scales.data_ptr(),
                                       out.data_ptr(), rows, out_features, in_f)
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The index of each row's first largest value, for x (rows, n) float32 (``csrc/argmax.cpp``)."""
        x = x.contiguous()
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
        return out

    def llama_layers_int4(self, layers: LlamaLayersInt4, x: torch.Tensor, pending: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
                          slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        """Every layer of a Llama-family decoder for a decode step of T tokens in one call
        (``csrc/llama_small.cpp``): x (T, hidden) float32, the residual stream (the embeddings), updated in place;
        pending (T, hidden) in the model's dtype receives the last layer's MLP output, not yet added to x. positions, slots, context_lens (T,) and block_tables (T * width,) int64, as for
        ``rope_and_store`` and ``paged_decode_attention``."""
        T = x.shape[0]
        self._llama_int4(_DTYPES[pending.dtype], ctypes.addressof(layers.array), len(layers.array), layers.shape,
                         x.data_ptr(), pending.data_ptr(), cos_table.data_ptr(), sin_table.data_ptr(),
                         positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
                         block_tables.numel() // max(T, 1), T)

    def paged_decode_attention(
        self,
        q: torch.Tensor,  # (D, nh, hd); heads contiguous, any stride between sequences
        k_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd) contiguous
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # (D * width,) int64
        context_lens: torch.Tensor,  # (D,) int64
    ) -> torch.Tensor:  # (D, nh, hd)
        """Decode attention straight from the paged cache (``csrc/paged_decode.cpp``): one call per layer for every
        decoding sequence, no gathered copy of their blocks."""
        D, nh, hd = q.shape
        nkv, num_blocks, bs, _ = k_cache.shape
        if q.stride(2) != 1 or q.stride(1) != hd:
            q = q.contiguous()
        out = torch.empty(D, nh, hd, dtype=q.dtype)
        self._decode(_DTYPES[q.dtype], q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), D, nh, nkv, hd, bs,
                     num_blocks, block_tables.numel() // max(D, 1), hd**-0.5)
        return out


class LlamaShape(ctypes.Structure):
    """``EoqLlamaShape`` of ``csrc/llama_small.cpp``."""

    _fields_ = [(n, ctypes.c_int64) for n in ("hidden", "num_heads", "num_kv_heads", "head_dim", "inter",
                                               "block_size", "num_blocks")] + [("eps", ctypes.c_float),
                                                                               ("scale", ctypes.c_float)]


class LlamaLayerWeights(ctypes.Structure):
    """``EoqLlamaLayer`` of ``csrc/llama_small.cpp``: one layer's tensors, by address."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("input_norm", "post_norm", "qkv_q", "qkv_s", "o_q", "o_s", "gate_up_q",
                                               "gate_up_s", "down_q", "down_s", "k_cache", "v_cache")]


@dataclass(frozen=True, slots=True)
class LlamaLayersInt4:
    """A decoder's layers as ``CpuKernels.llama_layers_int4`` takes them. It holds addresses only: the model's
    tensors and the KV cache it names must outlive it."""

    array: ctypes.Array
    shape: LlamaShape

    @classmethod
    def of(cls, layers: list[dict[str, torch.Tensor]], shape: LlamaShape) -> LlamaLayersInt4:
        """``layers``: per layer the tensors named as ``LlamaLayerWeights``' fields, each contiguous."""
        array = (LlamaLayerWeights * len(layers))()
        for entry, tensors in zip(array, layers):
            for name, t in tensors.items():
                if not t.is_contiguous():
                    raise ValueError(f"{name} is not contiguous")
                setattr(entry, name, t.data_ptr())
        return cls(array, shape)


GEMM_LANES = 16  # output features per panel of a weight packed for csrc/gemm.cpp


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """t (out, ...) with zero rows added up to a multiple of 16, viewed as (panels, 16, ...)."""
    panels = -(-t.shape[0] // GEMM_LANES)
    padded = torch.zeros(panels * GEMM_LANES, *t.shape[1:], dtype=t.dtype)
    padded[: t.shape[0]] = t
    return padded.view(panels, GEMM_LANES, *t.shape[1:])


def pack_gemm_weight(w: torch.Tensor) -> torch.Tensor:
    """W (out, in) float32 as ``CpuKernels.gemm`` reads it: panels of 16 outputs, (ceil(out / 16), in, 16), the
    last padded with zeros; 64-byte aligned (a fresh tensor)."""
    packed = _padded_rows(w.float()).transpose(1, 2).contiguous()
    if packed.data_ptr() % 64:  # torch's CPU allocator aligns to 64 bytes; never rely on it silently
        raise RuntimeError("the packed weight is not 64-byte aligned")
    return packed


@dataclass(frozen=True, slots=True)
class LowBitPanels:
    """A 4- or 8-bit weight in panels of 16 outputs for ``CpuKernels.gemm_lowbit``."""

    bits: int
    values: torch.Tensor
    scales: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scales))


def pack_int4_panels(q: torch.Tensor, step: torch.Tensor, lo: torch.Tensor) -> LowBitPanels:
    """A 4-bit weight (``q`` (out, in) in 0..15, ``step`` and ``lo`` (out, in / 32): w = step * q + lo): values
    uint8 (ceil(out / 16), in / 2, 16) with inputs 2i and 2i + 1 in the low and high nibble, scales float32
    (ceil(out / 16), in / 32, 2, 16) = each group's steps then minimums; padded outputs are 0."""
    pairs = _padded_rows(q.to(torch.uint8)).unflatten(2, (-1, 2))  # (panels, 16, in / 2, 2)
    values = (pairs[..., 0] | (pairs[..., 1] << 4)).transpose(1, 2).contiguous()
    scales = _padded_rows(torch.stack([step, lo], -1).float()).permute(0, 2, 3, 1).contiguous()
    return LowBitPanels(4, values, scales)


def pack_int8_panels(q: torch.Tensor, scale: torch.Tensor) -> LowBitPanels:
    """An 8-bit weight (``q`` (out, in) int8, ``scale`` (out, in / 32): w = scale * q): values int8
    (ceil(out / 16), in, 16), scales float32 (ceil(out / 16), in / 32, 16); padded outputs are 0."""
    values = _padded_rows(q.to(torch.int8)).transpose(1, 2).contiguous()
    scales = _padded_rows(scale.float()).transpose(1, 2).contiguous()
    return LowBitPanels(8, values, scales)


def load_cpu_kernels(cache_dir: Path, march: str = "native") -> CpuKernels | None:
    """The kernels (built for ``march``, see ``build``), or None (logged) when they cannot be built here. A cache
    that cannot be written (a baked image on a read-only root filesystem) is replaced by a folder under the
    temporary directory."""
    try:
        try:
            return CpuKernels(build(cache_dir, march))
        except OSError as e:
            scratch = Path(tempfile.gettempdir()) / f"eoq-kernels-{os.getuid()}"
            log.info("cannot keep CPU kernels in %s (%s): building them in %s", cache_dir, e, scratch)
            return CpuKernels(build(scratch, march))
    except (RuntimeError, OSError) as e:
        log.warning("eoq's CPU kernels are not available, torch's ops run instead (decode attention by SDPA over "
                    "gathered blocks): %s", e)
        return None
