"""ctypes bindings of eoq's CPU kernels: the library ``build`` makes, one method per entry point, for float32 and
bfloat16 tensors on the CPU.

The entry points' C signatures are declared once, in ``csrc/eoq_kernels.h``; ``SIGNATURES`` says the same to
ctypes, and ``tests/engine/test_kernel_header.py`` parses the header to check that the two agree.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eoq.engine.model.kernels.formats import LowBitPanels

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' dtype argument (csrc/bf16.h)


class LlamaShape(ctypes.Structure):
    """``EoqLlamaShape`` of ``csrc/eoq_kernels.h``."""

    _fields_ = [(n, ctypes.c_int64) for n in ("hidden", "num_heads", "num_kv_heads", "head_dim", "inter",
                                               "block_size", "num_blocks")] + [("eps", ctypes.c_float),
                                                                               ("scale", ctypes.c_float)]


class Int4Projection(ctypes.Structure):
    """``EoqInt4Projection`` of ``csrc/eoq_kernels.h``: a projection's 4-bit weight in rows (q, s) and panels (pq, ps),
    by address."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "s", "pq", "ps")]


PROJECTIONS = ("qkv", "o", "gate_up", "down")  # a Llama layer's, as EoqLlamaLayer names them


class LlamaLayerWeights(ctypes.Structure):
    """``EoqLlamaLayer`` of ``csrc/eoq_kernels.h``: one layer's tensors, by address."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("input_norm", "post_norm")]
                + [(n, Int4Projection) for n in PROJECTIONS] + [(n, ctypes.c_void_p) for n in ("k_cache", "v_cache")])


@dataclass(frozen=True, slots=True)
class LlamaLayersInt4:
    """A decoder's layers as ``CpuKernels.llama_layers_int4`` takes them, with up to how many tokens they run the
    row kernels (the panels beyond), whether the row kernels and the panels take int8 activations, and the KV
    cache's dtype. It holds addresses only: the model's tensors and the KV cache it names must outlive it."""

    array: ctypes.Array
    shape: LlamaShape
    row_tokens: int
    int8_rows: bool
    int8_panels: bool
    cache_dtype: torch.dtype

    @classmethod
    def of(cls, layers: list[dict[str, torch.Tensor | None]], shape: LlamaShape, row_tokens: int, int8_rows: bool,
           int8_panels: bool) -> LlamaLayersInt4:
        """``layers``: per layer the tensors named as ``LlamaLayerWeights``' fields, each contiguous, a projection's
        as the tuple of ``Int4Projection``'s (its panels may be None: then only steps of up to ``row_tokens`` tokens
        can run)."""
        array = (LlamaLayerWeights * len(layers))()

        def address(name: str, t: torch.Tensor) -> int:
            if not t.is_contiguous():
                raise ValueError(f"{name} is not contiguous")
            return t.data_ptr()

        for entry, tensors in zip(array, layers):
            for name, t in tensors.items():
                if name in PROJECTIONS:
                    projection = getattr(entry, name)  # a view of the entry's own bytes
                    for (part, _), tp in zip(Int4Projection._fields_, t):
                        if tp is not None:
                            setattr(projection, part, address(f"{name}.{part}", tp))
                else:
                    setattr(entry, name, address(name, t))
        cache_dtypes = {tensors[name].dtype for tensors in layers for name in ("k_cache", "v_cache")}
        if len(cache_dtypes) != 1:
            raise ValueError(f"the layers' caches differ in dtype: {cache_dtypes}")
        return cls(array, shape, row_tokens, int8_rows, int8_panels, cache_dtypes.pop())


_int, _ptr, _i64, _f32 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

# Every entry point of csrc/eoq_kernels.h as ctypes calls it: (restype, argtypes), every pointer a void*.
SIGNATURES: dict[str, tuple[type, list[type]]] = {
    "eoq_add_rms_norm": (_int, [_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32]),
    "eoq_rope_and_store": (_int, [_int, _int] + [_ptr] * 8 + [_i64] * 5),
    "eoq_paged_decode_attention": (_int, [_int, _int, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr] + [_i64] * 7 + [_f32]),
    "eoq_silu_mul": (_int, [_int, _ptr, _ptr, _i64, _i64]),
    "eoq_int4_matmul": (_int, [_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_int8_matmul": (_int, [_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_int4_matmul_x8": (_int, [_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_int8_matmul_x8": (_int, [_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_gemm_f32": (_int, [_ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_gemm_q4": (_int, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_gemm_q8": (_int, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_gemm_q4_x8": (_int, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_gemm_q8_x8": (_int, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]),
    "eoq_argmax": (_int, [_ptr, _ptr, _i64, _i64]),
    "eoq_llama_layers_int4": (_int, [_int, _int, _ptr, _i64, LlamaShape] + [_ptr] * 8 + [_i64] * 3 + [_int]),
    "eoq_simd_isa": (ctypes.c_char_p, []),
    "eoq_int8_dot_isa": (ctypes.c_char_p, []),
}


def _checked(name: str, fn: ctypes._CFuncPtr) -> Callable[..., None]:
    """``fn``, which returns 0 or a non-zero code for arguments it cannot take, raising on the code."""

    def call(*args) -> None:
        rc = fn(*args)
        if rc:
            raise RuntimeError(f"eoq's CPU kernel {name} refused its arguments (code {rc})")

    return call


def _row_kernel(kernel: Callable[..., None], x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The row kernels' shared call (``int4_matmul``, ``int8_matmul``): x (rows, in) @ W^T for W of ``q.shape[0]``
    outputs, returned in x's dtype."""
    x = x.contiguous()
    rows, in_f = x.shape
    out = torch.empty(rows, q.shape[0], dtype=x.dtype)
    kernel(_DTYPES[x.dtype], x.data_ptr(), q.data_ptr(), scales.data_ptr(), out.data_ptr(), rows, in_f, q.shape[0])
    return out


class CpuKernels:
    """The library's entry points, for float32 and bfloat16 tensors on the CPU."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        self.path = library
        self.functions: dict[str, ctypes._CFuncPtr] = {}  # each entry point as SIGNATURES declares it to ctypes
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = self.functions[name] = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        checked = {name: _checked(name, fn) for name, fn in self.functions.items()
                   if fn.restype is not ctypes.c_char_p}
        self._norm = checked["eoq_add_rms_norm"]
        self._rope = checked["eoq_rope_and_store"]
        self._decode = checked["eoq_paged_decode_attention"]
        self._silu_mul = checked["eoq_silu_mul"]
        # The row kernels and the low-bit panel kernels by int8_activations (False: float32 activations).
        self._int4 = {False: checked["eoq_int4_matmul"], True: checked["eoq_int4_matmul_x8"]}
        self._int8 = {False: checked["eoq_int8_matmul"], True: checked["eoq_int8_matmul_x8"]}
        self._gemm = checked["eoq_gemm_f32"]
        self._gemm_lowbit = {(4, False): checked["eoq_gemm_q4"], (8, False): checked["eoq_gemm_q8"],
                             (4, True): checked["eoq_gemm_q4_x8"], (8, True): checked["eoq_gemm_q8_x8"]}
        self._argmax = checked["eoq_argmax"]
        self._llama_int4 = checked["eoq_llama_layers_int4"]
        self.isa: str = self.functions["eoq_simd_isa"]().decode()  # the vectors the kernels use: avx512, avx2, generic
        # the int8-activation kernels' integer dot product: avx512-vnni, avx-vnni, avx2 (vpmaddubsw), generic
        self.int8_dot_isa: str = self.functions["eoq_int8_dot_isa"]().decode()

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
        rotated keys and the values written to ``slots`` of the caches (nkv, num_blocks, bs, hd; in qkv's dtype, or
        bfloat16 beside float32: rounded once more). The tables are float32 (positions, hd) with sin's first half
        negated (``csrc/rope.cpp``)."""
        qkv = qkv.contiguous()
        T = qkv.shape[0]
        out = torch.empty(T, num_heads + num_kv_heads, head_dim, dtype=qkv.dtype)
        cache_slots = k_cache.shape[1] * k_cache.shape[2]
        self._rope(_DTYPES[qkv.dtype], _DTYPES[k_cache.dtype], qkv.data_ptr(), cos_table.data_ptr(),
                   sin_table.data_ptr(), positions.data_ptr(), slots.data_ptr(), out.data_ptr(), k_cache.data_ptr(),
                   v_cache.data_ptr(), T, num_heads, num_kv_heads, head_dim, cache_slots)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for ``gate_up`` (T, 2 inter) = [gate | up]; returns (T, inter) (``csrc/silu_mul.cpp``)."""
        gate_up = gate_up.contiguous()
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(_DTYPES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def int8_matmul(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                    int8_activations: bool = False) -> torch.Tensor:
        """x (rows <= 8, in) @ W^T with W int8 (out, in) in groups of 32 inputs, each with a float32 scale
        (``scales`` (out, in / 32)); returned in x's dtype (``csrc/lowbit_rows.cpp``). ``int8_activations``: x
        quantized to int8 per block of 32, integer dot products (``csrc/x8_rows.cpp``; lossy)."""
        return _row_kernel(self._int8[int8_activations], x, weight, scales)

    def int4_matmul(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                    int8_activations: bool = False) -> torch.Tensor:
        """x (rows <= 8, in) @ W^T with W 4-bit in groups of 32 inputs: ``q`` uint8 (out, in / 32, 16) holding
        q[i] | q[i + 16] << 4, ``scales`` float32 (out, in / 32, 2) = (step, min), w = step * q + min; returned in
        x's dtype (``csrc/lowbit_rows.cpp``; ``int8_activations``: as ``int8_matmul``)."""
        return _row_kernel(self._int4[int8_activations], x, q, scales)

    def gemm(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """x (rows, in) float32 @ W^T for W packed by ``formats.pack_gemm_weight`` (``csrc/gemm.cpp``)."""
        x = x.contiguous()
        rows, in_f = x.shape
        out = torch.empty(rows, out_features, dtype=torch.float32)
        self._gemm(x.data_ptr(), packed.data_ptr(), out.data_ptr(), rows, out_features, in_f)
        return out

    def gemm_lowbit(self, x: torch.Tensor, panels: LowBitPanels, out_features: int,
                    int8_activations: bool = False) -> torch.Tensor:
        """x (rows, in) float32 @ W^T for a 4- or 8-bit W packed by ``formats.pack_int4_panels`` /
        ``pack_int8_panels``: float32 arithmetic (``csrc/gemm.cpp``), or with ``int8_activations`` x quantized to
        int8 per block of 32 and integer dot products (``csrc/x8_gemm.cpp``; lossy)."""
        x = x.contiguous()
        rows, in_f = x.shape
        out = torch.empty(rows, out_features, dtype=torch.float32)
        self._gemm_lowbit[panels.bits, int8_activations](x.data_ptr(), panels.values.data_ptr(),
                                                         panels.scales.data_ptr(), out.data_ptr(), rows,
                                                         out_features, in_f)
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The index of each row's first largest value, for x (rows, n) float32 (``csrc/argmax.cpp``)."""
        x = x.contiguous()
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
        return out

    def llama_layers_int4(self, layers: LlamaLayersInt4, x: torch.Tensor, pending: torch.Tensor,
                          cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
                          slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        """Every layer of a Llama-family decoder for a decode step of T tokens in one call
        (``csrc/llama_small.cpp``; beyond ``layers.row_tokens`` tokens on the layers' panels): x
        (T, hidden) float32, the residual stream (the embeddings), updated in place;
        pending (T, hidden) in the model's dtype receives the last layer's MLP output, not yet added to x.
        positions, slots, context_lens (T,) and block_tables (T * width,) int64, as for ``rope_and_store`` and
        ``paged_decode_attention``."""
        T = x.shape[0]
        self._llama_int4(_DTYPES[pending.dtype], _DTYPES[layers.cache_dtype], ctypes.addressof(layers.array),
                         len(layers.array), layers.shape, x.data_ptr(), pending.data_ptr(), cos_table.data_ptr(),
                         sin_table.data_ptr(), positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(),
                         context_lens.data_ptr(), block_tables.numel() // max(T, 1), T, layers.row_tokens,
                         int(layers.int8_rows) | int(layers.int8_panels) << 1)

    def paged_decode_attention(
        self,
        q: torch.Tensor,  # (D, nh, hd); heads contiguous, any stride between sequences
        k_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd) contiguous, in q's dtype or bfloat16
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
        self._decode(_DTYPES[q.dtype], _DTYPES[k_cache.dtype], q.data_ptr(), q.stride(0), k_cache.data_ptr(),
                     v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), D, nh,
                     nkv, hd, bs, num_blocks, block_tables.numel() // max(D, 1), hd**-0.5)
        return out
