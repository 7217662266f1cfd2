"""Causal self-attention over the paged KV cache.

Tokens of one engine step are flattened into one dimension, decodes first (one token each), then prefill
chunks sequence by sequence. Every layer writes the new tokens' K/V into their cache slots, then:
- decodes, on a CPU: one call of eoq's C++ kernel (``csrc/paged_decode.cpp``) for all of them, reading each
  sequence's blocks where they lie (measured per layer, 32 sequences of ~110 tokens: 0.45 ms vs 1.1 ms for the
  gather and SDPA below; one sequence of 350: 86 vs 149 us);
- decodes elsewhere, or without a compiler: up to ``SMALL_DECODE_BATCH`` sequences each attend with one SDPA over
  exactly their tokens; more attend together: all their blocks are gathered in one ``index_select`` into
  (kv_heads, D, max_blocks * block_size, head_dim), padding masked out by an additive bias, then one SDPA (up to
  ``MID_DECODE_BATCH``) or batched matmuls. The block gather is what makes this fast on the CPU: SDPA over an
  advanced-indexing gather was ~10x slower (measured at 32 sequences of ~320 tokens: 0.8 ms vs 6.5-12 ms per
  layer);
- each prefill chunk attends to its sequence's earlier tokens (cached prefix or earlier chunks) plus itself,
  causally, with SDPA; a chunk with no earlier tokens attends to its own K/V, with no gather.
The cache of one layer is head-major, (num_kv_heads, num_blocks, block_size, head_dim), so a gather of
blocks is contiguous per head; slot = block * block_size + offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the step's flattened tokens
    query_len: int
    context_start: int  # this sequence's tokens already in the cache before the chunk (its first position)
    block_ids: torch.Tensor | None = None  # (n_blocks,) blocks covering context_start + query_len; None if start 0
    mask: torch.Tensor | None = None  # (query_len, context_start + query_len) bool, True = attend


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token
    num_decodes: int = 0
    decode_blocks: torch.Tensor | None = None  # (D * max_blocks,) int64: block tables, padded with block 0
    decode_bias: torch.Tensor | None = None  # (1, D, 1, max_blocks * block_size) model dtype: 0 or -inf (padding)
    decode_context_lens: list[int] = field(default_factory=list)  # (D,) tokens each decode attends to
    prefills: list[PrefillChunk] = field(default_factory=list)
    # A kernel attending straight from the paged cache (model.kernels.CpuKernels): when set, decodes
    # use it with decode_blocks and decode_lens, and decode_bias is not needed.
    decode_kernel: Callable[..., torch.Tensor] | None = None
    decode_lens: torch.Tensor | None = None  # (D,) int64: decode_context_lens as a tensor, for the kernel
    # Shapes fixed for a CUDA graph (cuda_graphs.py): decodes always attend over the gathered blocks with
    # decode_bias, never per sequence (decode_context_lens is not read).
    padded: bool = False


def padding_bias(lens: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of decodes attending over ``length`` gathered positions: (1, D, 1, length), 0 where a
    position is below the sequence's length (``lens`` (D,) int64), -inf from it on."""
    beyond = torch.arange(length, device=lens.device) >= lens.unsqueeze(1)  # (D, length)
    bias = torch.zeros(beyond.shape, dtype=dtype, device=lens.device).masked_fill_(beyond, float("-inf"))
    return bias.view(1, -1, 1, length)


def paged_attention(
    q: torch.Tensor,  # (T, nh, hd)
    k: torch.Tensor,  # (T, nkv, hd)
    v: torch.Tensor,  # (T, nkv, hd)
    k_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd)
    v_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd)
    meta: AttentionMetadata,
    stored: bool = False,  # the new tokens' k and v are in the cache already (written by a fused kernel)
) -> torch.Tensor:  # (T, nh * hd)
    T, nh, hd = q.shape
    nkv = k.shape[1]
    gqa = nkv != nh
    if not stored:
        k_cache.view(nkv, -1, hd).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.view(nkv, -1, hd).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    D = meta.num_decodes
    if not meta.prefills:  # decodes only: the common step
        return _decode_attention(q, k_cache, v_cache, meta).view(T, nh * hd)
    out = torch.empty(T, nh, hd, dtype=q.dtype, device=q.device)
    if D:
        out[:D] = _decode_attention(q[:D], k_cache, v_cache, meta)

    for p in meta.prefills:
        s, n = p.query_start, p.query_len
        qp = q[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, nh, n, hd)
        if p.context_start == 0:
            kp = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, nkv, n, hd)
            vp = v[s : s + n].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
        else:
            assert p.block_ids is not None
            ctx = p.context_start + n
            kp = k_cache.index_select(1, p.block_ids).view(nkv, -1, hd)[:, :ctx].unsqueeze(0)  # (1, nkv, ctx, hd)
            vp = v_cache.index_select(1, p.block_ids).view(nkv, -1, hd)[:, :ctx].unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, enable_gqa=gqa)
        out[s : s + n] = op[0].transpose(0, 1)  # (n, nh, hd)
    return out.view(T, nh * hd)


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


def _decode_attention(
    q: torch.Tensor,  # (D, nh, hd)
    k_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # (D, nh, hd)
    if meta.decode_kernel is not None:
        return meta.decode_kernel(q, k_cache, v_cache, meta.decode_blocks, meta.decode_lens)
    D, nh, hd = q.shape
    nkv, _, bs, _ = k_cache.shape
    G = nh // nkv
    assert meta.decode_blocks is not None and meta.decode_bias is not None
    L = meta.decode_bias.shape[-1]
    if D <= SMALL_DECODE_BATCH and not meta.padded:
        width = L // bs
        outs = []
        for i, ctx in enumerate(meta.decode_context_lens):
            blocks = meta.decode_blocks[i * width : i * width + -(-ctx // bs)]
            k = k_cache.index_select(1, blocks).view(nkv, -1, hd)[:, :ctx].unsqueeze(0)  # (1, nkv, ctx, hd)
            v = v_cache.index_select(1, blocks).view(nkv, -1, hd)[:, :ctx].unsqueeze(0)  # (1, nkv, ctx, hd)
            o = F.scaled_dot_product_attention(q[i].view(1, nkv, G, hd), k, v)  # (1, nkv, G, hd)
            outs.append(o.view(nh, hd))
        return torch.stack(outs)  # (D, nh, hd)
    k = k_cache.index_select(1, meta.decode_blocks).view(nkv, D, L, hd)  # (nkv, D, L, hd)
    v = v_cache.index_select(1, meta.decode_blocks).view(nkv, D, L, hd)  # (nkv, D, L, hd)
    if D <= MID_DECODE_BATCH:
        # Each sequence's query heads sharing a KV head are SDPA's query rows; padding masked by the bias.
        o = F.scaled_dot_product_attention(q.view(D, nkv, G, hd), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=meta.decode_bias.transpose(0, 1))  # (D, nkv, G, hd)
        return o.reshape(D, nh, hd)
    qh = (q * hd**-0.5).view(D, nkv, G, hd).transpose(0, 1)  # (nkv, D, G, hd)
    scores = torch.matmul(qh, k.transpose(-1, -2))  # (nkv, D, G, L)
    scores += meta.decode_bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (nkv, D, G, L)
    o = torch.matmul(probs, v)  # (nkv, D, G, hd)
    return o.transpose(0, 1).reshape(D, nh, hd)
