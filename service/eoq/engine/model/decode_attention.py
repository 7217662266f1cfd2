"""Decode attention: how a step's decoding sequences (one query token each) attend to their paged KV cache.

A *backend* is chosen once at load (``ops.decode_attention``): ``KernelDecode`` with eoq's CPU kernels,
``TorchDecode`` without them (or off the CPU); ``DecodeGraphs`` holds a ``PaddedDecode`` for the steps it pads to
a captured shape. Once a step, the runner hands the backend the step's block tables and lengths (``plan``) and
gets that step's ``DecodeAttention``, the one strategy every layer then calls with its queries and caches:
- ``PagedKernel``: one call of eoq's C++ kernel (``csrc/paged_decode.cpp``) for all of them, reading each
  sequence's blocks where they lie (measured per layer, 32 sequences of ~110 tokens: 0.45 ms vs 1.1 ms for the
  gather and SDPA below; one sequence of 350: 86 vs 149 us);
- ``PerSequenceSDPA`` (torch, up to ``SMALL_DECODE_BATCH`` sequences): each attends with one SDPA over exactly
  its tokens;
- ``GatheredSDPA`` (up to ``MID_DECODE_BATCH``) and ``BatchedMatmul`` (beyond): all their blocks gathered in one
  ``index_select`` into (kv_heads, D, max_blocks * block_size, head_dim), padding masked out by an additive bias
  (``padding_bias``), then one SDPA or batched matmuls. The block gather is what makes this fast on the CPU: SDPA
  over an advanced-indexing gather was ~10x slower (measured at 32 sequences of ~320 tokens: 0.8 ms vs 6.5-12 ms
  per layer). Padded steps (CUDA graphs) always take one of these two: their shapes are fixed, and the bias is
  computed from the lengths inside the graph.

A new strategy: a ``DecodeAttention`` subclass (its inputs as fields, built once a step; ``__call__`` per layer),
and the backend's ``plan`` choosing it (a new backend: a ``DecodeBackend`` subclass returned by an ops class's
``decode_attention``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eoq.engine.model.kernels.bindings import CpuKernels

# Up to this many decoding sequences, each attends on its own with SDPA over exactly its tokens (no padding,
# no mask; its query heads sharing a KV head are SDPA's query rows): one op per sequence. Batched matmuls over
# padded blocks have a fixed cost that dominates such tiny work (measured on this 2-core machine, one sequence
# of ~150 tokens: 18 us with SDPA, ~88 us batched); beyond it one call over the gathered blocks wins.
SMALL_DECODE_BATCH = 4
# Up to this many, the gathered blocks go to one SDPA call with the padding mask; beyond it, to batched
# matmuls. Measured per layer on this 2-core machine (bf16, 3 KV heads x 3 queries, 64-dim heads), SDPA vs
# matmuls: 8 sequences of 80 tokens 99 vs 191 us, 16 x 160: 422 vs 505 us, 32 x 80: 510 vs 660 us; equal from
# ~32 x 240 on, and ~4 % slower at 64 x 160.
MID_DECODE_BATCH = 32


class DecodeAttention(ABC):
    """One step's decode attention: its inputs, built once a step (``DecodeBackend.plan``), and the computation
    every layer calls."""

    __slots__ = ()

    @property
    @abstractmethod
    def num_seqs(self) -> int:
        """The decoding sequences: the step's first ``num_seqs`` tokens."""

    @abstractmethod
    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q (D, nh, hd), the new tokens' K/V already in the caches (nkv, num_blocks, bs, hd; in q's dtype or a
        narrower one) -> (D, nh, hd)."""


@dataclass(slots=True)
class PagedKernel(DecodeAttention):
    """eoq's C++ kernel, reading each sequence's blocks where they lie."""

    kernels: CpuKernels
    block_tables: torch.Tensor  # (D * width,) int64
    context_lens: torch.Tensor  # (D,) int64

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.kernels.paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens)


@dataclass(slots=True)
class PerSequenceSDPA(DecodeAttention):
    """One SDPA per sequence over exactly its tokens."""

    tables: list[torch.Tensor]  # each sequence's blocks, (ceil(len / bs),) int64
    lens: list[int]  # tokens each sequence attends to

    @property
    def num_seqs(self) -> int:
        return len(self.lens)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        _, nh, hd = q.shape
        nkv = k_cache.shape[0]
        outs = []
        for i, (blocks, ctx) in enumerate(zip(self.tables, self.lens)):
            k = k_cache.index_select(1, blocks).view(nkv, -1, hd)[:, :ctx].unsqueeze(0).to(q.dtype)  # (1, nkv, ctx, hd)
            v = v_cache.index_select(1, blocks).view(nkv, -1, hd)[:, :ctx].unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(q[i].view(1, nkv, nh // nkv, hd), k, v)  # (1, nkv, G, hd)
            outs.append(o.view(nh, hd))
        return torch.stack(outs)  # (D, nh, hd)


@dataclass(slots=True)
class GatheredSDPA(DecodeAttention):
    """Every sequence's blocks gathered to one width, one SDPA with the padding masked by ``bias``."""

    block_tables: torch.Tensor  # (D * width,) int64, padded
    bias: torch.Tensor  # (1, D, 1, width * bs) model dtype: 0, or -inf past a sequence's length

    @property
    def num_seqs(self) -> int:
        return self.bias.shape[1]

    def gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences' keys and values, (nkv, D, width * bs, hd) each, in ``dtype`` (the queries')."""
        nkv, hd = k_cache.shape[0], k_cache.shape[-1]
        shape = (nkv, self.bias.shape[1], self.bias.shape[-1], hd)
        return (k_cache.index_select(1, self.block_tables).view(shape).to(dtype),
                v_cache.index_select(1, self.block_tables).view(shape).to(dtype))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        D, nh, hd = q.shape
        nkv = k_cache.shape[0]
        k, v = self.gather(k_cache, v_cache, q.dtype)
        # Each sequence's query heads sharing a KV head are SDPA's query rows; padding masked by the bias.
        o = F.scaled_dot_product_attention(q.view(D, nkv, nh // nkv, hd), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=self.bias.transpose(0, 1))  # (D, nkv, G, hd)
        return o.reshape(D, nh, hd)


class BatchedMatmul(GatheredSDPA):
    """As ``GatheredSDPA``, with batched matmuls and a float32 softmax in place of SDPA."""

    __slots__ = ()

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        D, nh, hd = q.shape
        nkv = k_cache.shape[0]
        k, v = self.gather(k_cache, v_cache, q.dtype)
        qh = (q * hd**-0.5).view(D, nkv, nh // nkv, hd).transpose(0, 1)  # (nkv, D, G, hd)
        scores = torch.matmul(qh, k.transpose(-1, -2))  # (nkv, D, G, L)
        scores += self.bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (nkv, D, G, L)
        o = torch.matmul(probs, v)  # (nkv, D, G, hd)
        return o.transpose(0, 1).reshape(D, nh, hd)


def padding_bias(lens: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of decodes attending over ``length`` gathered positions: (1, D, 1, length), 0 where a
    position is below the sequence's length (``lens`` (D,) int64), -inf from it on."""
    beyond = torch.arange(length, device=lens.device) >= lens.unsqueeze(1)  # (D, length)
    bias = torch.zeros(beyond.shape, dtype=dtype, device=lens.device).masked_fill_(beyond, float("-inf"))
    return bias.view(1, -1, 1, length)


class DecodeBackend(ABC):
    """Chooses each step's ``DecodeAttention``; one is chosen at load."""

    @abstractmethod
    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
             host_lens: Sequence[int] | None) -> DecodeAttention:
        """The decode attention of a step of D sequences: ``block_tables`` (D * width,) int64, each sequence's
        blocks padded to one width; ``context_lens`` (D,) int64, the tokens each attends to (both on the model's
        device); ``host_lens`` the same lengths on the host (None inside a CUDA graph, where they are not known)."""


class KernelDecode(DecodeBackend):
    """eoq's CPU kernel for every step."""

    def __init__(self, kernels: CpuKernels) -> None:
        self.kernels = kernels

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
             host_lens: Sequence[int] | None) -> DecodeAttention:
        return PagedKernel(self.kernels, block_tables, context_lens)


class TorchDecode(DecodeBackend):
    """torch's ops: per sequence for a few sequences, over the gathered blocks for more."""

    def __init__(self, block_size: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.dtype = dtype  # the queries' (the cache's is theirs or narrower; the bias is added to their scores)

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
             host_lens: Sequence[int] | None) -> DecodeAttention:
        if host_lens is not None and len(host_lens) <= SMALL_DECODE_BATCH:
            width, bs = block_tables.numel() // len(host_lens), self.block_size
            tables = [block_tables[i * width : i * width + -(-n // bs)] for i, n in enumerate(host_lens)]
            return PerSequenceSDPA(tables, list(host_lens))
        return self.gathered(block_tables, context_lens)

    def gathered(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> GatheredSDPA:
        D = context_lens.shape[0]
        bias = padding_bias(context_lens, block_tables.numel() // D * self.block_size, self.dtype)
        return (GatheredSDPA if D <= MID_DECODE_BATCH else BatchedMatmul)(block_tables, bias)


class PaddedDecode(TorchDecode):
    """Steps padded to a CUDA graph's shape: always over the gathered blocks (a graph fixes every shape; the
    padding mask is computed from the lengths within it)."""

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
             host_lens: Sequence[int] | None) -> DecodeAttention:
        return self.gathered(block_tables, context_lens)
