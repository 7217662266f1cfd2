"""Causal self-attention over the paged KV cache.

Tokens of one engine step are flattened into one dimension, decodes first (one token each), then prefill
chunks sequence by sequence. Every layer writes the new tokens' K/V into their cache slots (``store_kv``, or a
kernel that does it with RoPE), then:
- the decodes attend with the step's ``DecodeAttention`` (``decode_attention.py``: the strategy chosen for the
  step by the backend chosen at load);
- each prefill chunk attends to its sequence's earlier tokens (cached prefix or earlier chunks) plus itself,
  causally, with SDPA; a chunk with no earlier tokens attends to its own K/V, with no gather.
The cache of one layer is head-major, (num_kv_heads, num_blocks, block_size, head_dim), so a gather of
blocks is contiguous per head; slot = block * block_size + offset. Its dtype is the queries' or a narrower one
(``--kv-cache-dtype``: bfloat16 beside float32): keys and values are rounded to it when written and widened back to
the queries' dtype where they are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eoq.engine.model.decode_attention import DecodeAttention


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the step's flattened tokens
    query_len: int
    context_start: int  # this sequence's tokens already in the cache before the chunk (its first position)
    block_ids: torch.Tensor | None = None  # (n_blocks,) blocks covering context_start + query_len; None if start 0
    mask: torch.Tensor | None = None  # (query_len, context_start + query_len) bool, True = attend


@dataclass(slots=True)
class AttentionMetadata:
    """A step's attention inputs: where its new tokens' K/V go, how its decodes attend, its prefill chunks."""

    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token
    decode: DecodeAttention | None = None  # the decodes (the step's first decode.num_seqs tokens), if any
    prefills: list[PrefillChunk] = field(default_factory=list)

    @property
    def num_decodes(self) -> int:
        return self.decode.num_seqs if self.decode is not None else 0

    @property
    def decode_only(self) -> bool:
        """The step carries no prompt token (only decodes; what ``Int8Activations.DECODE_STEPS`` takes)."""
        return not self.prefills


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The new tokens' keys and values (T, nkv, hd) into their slots of the caches (nkv, num_blocks, bs, hd; in
    their dtype, or a narrower one: rounded to it)."""
    nkv, hd = k.shape[1], k.shape[2]
    k_cache.view(nkv, -1, hd).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(nkv, -1, hd).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # (T, nh, hd)
    k: torch.Tensor,  # (T, nkv, hd)
    v: torch.Tensor,  # (T, nkv, hd)
    k_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd)
    v_cache: torch.Tensor,  # (nkv, num_blocks, bs, hd)
    meta: AttentionMetadata,
    stored: bool = False,  # the new tokens' k and v are in the cache already (written with RoPE)
) -> torch.Tensor:  # (T, nh * hd)
    T, nh, hd = q.shape
    nkv = k.shape[1]
    gqa = nkv != nh
    if not stored:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    D = meta.num_decodes
    if not meta.prefills:  # decodes only: the common step
        return meta.decode(q, k_cache, v_cache).view(T, nh * hd)
    out = torch.empty(T, nh, hd, dtype=q.dtype, device=q.device)
    if D:
        out[:D] = meta.decode(q[:D], k_cache, v_cache)

    for p in meta.prefills:
        s, n = p.query_start, p.query_len
        qp = q[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, nh, n, hd)
        if p.context_start == 0:
            kp = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, nkv, n, hd)
            vp = v[s : s + n].transpose(0, 1).unsqueeze(0)
            if k_cache.dtype != q.dtype:  # as the cache holds them: the same whether a prompt was split or cached
                kp, vp = kp.to(k_cache.dtype).to(q.dtype), vp.to(v_cache.dtype).to(q.dtype)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
        else:
            assert p.block_ids is not None
            ctx = p.context_start + n
            # (1, nkv, ctx, hd) in q's dtype
            kp = k_cache.index_select(1, p.block_ids).view(nkv, -1, hd)[:, :ctx].unsqueeze(0).to(q.dtype)
            vp = v_cache.index_select(1, p.block_ids).view(nkv, -1, hd)[:, :ctx].unsqueeze(0).to(q.dtype)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, enable_gqa=gqa)
        out[s : s + n] = op[0].transpose(0, 1)  # (n, nh, hd)
    return out.view(T, nh * hd)
