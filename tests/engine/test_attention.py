"""Decode attention over the paged KV cache equals plain attention over each sequence's tokens, on every path
(eoq's C++ kernel; one SDPA per sequence, one masked SDPA over the gathered blocks, batched matmuls; the padded
steps of CUDA graphs), with grouped-query heads, in float32 and bfloat16."""

from __future__ import annotations

import math

import pytest
import torch

from eoq.engine.model import decode_attention as attention
from eoq.engine.model.attention import AttentionMetadata, paged_attention
from eoq.engine.model.decode_attention import (
    BatchedMatmul,
    DecodeBackend,
    GatheredSDPA,
    KernelDecode,
    PaddedDecode,
    PagedKernel,
    PerSequenceSDPA,
    TorchDecode,
)

NKV, GROUP, HD, BS, NUM_BLOCKS = 2, 3, 16, 4, 400


@pytest.fixture(scope="module")
def kernel(cpu_kernels_lib):
    """The C++ kernel, built from its source into a fresh folder (the machine's compiler must build it)."""
    return cpu_kernels_lib.paged_decode_attention


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q (nh, hd), keys/values (ctx, nkv, hd) -> (nh, hd): softmax(q K^T / sqrt(hd)) V, head h on KV head h // G."""
    kv_head = torch.arange(NKV * GROUP) // GROUP
    k, v = keys[:, kv_head].transpose(0, 1), values[:, kv_head].transpose(0, 1)  # (nh, ctx, hd)
    probs = torch.softmax((q.unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) / math.sqrt(HD), dim=-1)  # (nh, ctx)
    return (probs.unsqueeze(1) @ v).squeeze(1)


DECODE_COUNTS = sorted({1, attention.SMALL_DECODE_BATCH, attention.SMALL_DECODE_BATCH + 1, attention.MID_DECODE_BATCH,
                        attention.MID_DECODE_BATCH + 1, 45})


@pytest.mark.parametrize("num_decodes", DECODE_COUNTS)
def test_decode_attention_kernel_equals_plain_attention(num_decodes: int, cpu_kernels_lib) -> None:
    _check_decode_attention(num_decodes, KernelDecode(cpu_kernels_lib))


@pytest.mark.parametrize("num_decodes", DECODE_COUNTS)
def test_decode_attention_in_torch_equals_plain_attention(num_decodes: int) -> None:
    _check_decode_attention(num_decodes, TorchDecode(BS, torch.float32))


@pytest.mark.parametrize("num_decodes", DECODE_COUNTS)
def test_padded_decode_attention_equals_plain_attention(num_decodes: int) -> None:
    _check_decode_attention(num_decodes, PaddedDecode(BS, torch.float32))


def test_each_backend_picks_its_strategy_once_a_step(cpu_kernels_lib) -> None:
    """The kernel for every step; in torch one SDPA per sequence for a few, the gathered blocks for more (SDPA,
    then batched matmuls); padded steps always the gathered blocks."""
    def strategy(backend: DecodeBackend, d: int) -> type:
        return type(backend.plan(torch.zeros(d, dtype=torch.int64), torch.ones(d, dtype=torch.int64), [1] * d))

    small, mid = attention.SMALL_DECODE_BATCH, attention.MID_DECODE_BATCH
    assert strategy(KernelDecode(cpu_kernels_lib), 1) is PagedKernel
    torch_backend, padded = TorchDecode(BS, torch.float32), PaddedDecode(BS, torch.float32)
    assert [strategy(torch_backend, d) for d in (1, small, small + 1, mid, mid + 1)] == [
        PerSequenceSDPA, PerSequenceSDPA, GatheredSDPA, GatheredSDPA, BatchedMatmul]
    assert [strategy(padded, d) for d in (1, mid, mid + 1)] == [GatheredSDPA, GatheredSDPA, BatchedMatmul]


def _check_decode_attention(num_decodes: int, backend: DecodeBackend) -> None:
    gen = torch.Generator().manual_seed(num_decodes)
    D = num_decodes
    k_cache = torch.randn(NKV, NUM_BLOCKS, BS, HD, generator=gen)
    v_cache = torch.randn(NKV, NUM_BLOCKS, BS, HD, generator=gen)
    lengths = torch.randint(1, 30, (D,), generator=gen).tolist()  # tokens each sequence attends to, the new one too
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1  # block 0 is the padding block: never a sequence's
    tables, start = [], 0
    for n in lengths:
        tables.append(free[start : start + -(-n // BS)].tolist())
        start += len(tables[-1])
    width = max(len(t) for t in tables)

    q = torch.randn(D, NKV * GROUP, HD, generator=gen)
    k_new = torch.randn(D, NKV, HD, generator=gen)
    v_new = torch.randn(D, NKV, HD, generator=gen)
    slots = [tables[i][(n - 1) // BS] * BS + (n - 1) % BS for i, n in enumerate(lengths)]
    blocks = torch.tensor([b for t in tables for b in t + [0] * (width - len(t))])
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots),
                             decode=backend.plan(blocks, torch.tensor(lengths), lengths))
    assert meta.num_decodes == D

    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta).view(D, NKV * GROUP, HD)

    for i, (n, table) in enumerate(zip(lengths, tables)):
        blocks = torch.tensor(table)
        keys = k_cache[:, blocks].reshape(NKV, -1, HD)[:, :n].transpose(0, 1)  # (n, nkv, hd), the new token written
        values = v_cache[:, blocks].reshape(NKV, -1, HD)[:, :n].transpose(0, 1)
        assert torch.equal(keys[-1], k_new[i]) and torch.equal(values[-1], v_new[i])
        torch.testing.assert_close(out[i], _reference(q[i], keys, values), atol=1e-5, rtol=1e-5)


def _scattered_tables(gen: torch.Generator, num_blocks: int, lengths: list[int], stride: int,
                      bs: int) -> tuple[list[list[int]], torch.Tensor]:
    """Each sequence's blocks, drawn from a random permutation of the cache's (``stride`` apart per sequence), as
    lists and as the kernel's flat (D * width,) table padded with block 0."""
    width = -(-max(lengths) // bs)
    blocks = torch.randperm(num_blocks, generator=gen)
    tables = [blocks[i * stride : i * stride + -(-n // bs)].tolist() for i, n in enumerate(lengths)]
    return tables, torch.tensor([b for t in tables for b in t + [0] * (width - len(t))])


def _grouped_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: list[int], n: int,
                       group: int) -> torch.Tensor:
    """One sequence's attention in float32: q (nh, hd) over the first n tokens of its blocks ``table`` in caches
    (nkv, num_blocks, bs, hd), query head h on KV head h // group -> (nh, hd)."""
    nkv, hd = k_cache.shape[0], k_cache.shape[-1]
    kv_head = torch.arange(q.shape[0]) // group
    keys = k_cache[:, table].reshape(nkv, -1, hd)[kv_head, :n].float()  # (nh, n, hd)
    values = v_cache[:, table].reshape(nkv, -1, hd)[kv_head, :n].float()
    probs = torch.softmax((q.float().unsqueeze(1) @ keys.transpose(1, 2)).squeeze(1) / hd**0.5, dim=-1)
    return (probs.unsqueeze(1) @ values).squeeze(1)


@pytest.mark.parametrize("group", [1, GROUP])
def test_kernel_in_bfloat16_over_long_contexts(kernel, group: int) -> None:
    """bfloat16 cache and queries, contexts up to 150 blocks, heads grouped or not, queries taken as a strided
    view (as the decoder hands them over): within bfloat16 rounding of float32 attention."""
    gen = torch.Generator().manual_seed(group)
    nh, hd, bs, num_blocks = NKV * group, 64, 16, 600
    k_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen).bfloat16()
    v_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen).bfloat16()
    lengths = [1, 17, 2400, 999]
    tables, flat = _scattered_tables(gen, num_blocks, lengths, 150, bs)
    qk = torch.randn(len(lengths), nh + NKV, hd, generator=gen).bfloat16()  # q and k side by side, as in Llama
    q = qk[:, :nh]
    out = kernel(q, k_cache, v_cache, flat, torch.tensor(lengths))
    for i, (n, table) in enumerate(zip(lengths, tables)):
        ref = _grouped_reference(q[i], k_cache, v_cache, table, n, group)
        torch.testing.assert_close(out[i].float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("hd", [32, 64, 128, 80])  # the vectorized head sizes, and one taking the plain loop
def test_kernel_in_float32_for_each_head_size(kernel, hd: int) -> None:
    """float32, blocks of 16: contexts of one token, part of a block, whole blocks and many blocks (the vectorized
    scoring takes 16 keys at a time and must ignore a block's unused slots, filled here with huge values)."""
    gen = torch.Generator().manual_seed(hd)
    nh, bs, num_blocks = NKV * GROUP, 16, 200
    k_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen)
    v_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen)
    lengths = [1, 15, 16, 17, 100, 333]
    width = -(-max(lengths) // bs)
    blocks = torch.randperm(num_blocks, generator=gen)
    tables = [blocks[i * 30 : i * 30 + -(-n // bs)].tolist() for i, n in enumerate(lengths)]
    for n, table in zip(lengths, tables):  # slots past the context: stale data must not leak in
        if n % bs:
            k_cache[:, table[-1], n % bs :] = 1e30
            v_cache[:, table[-1], n % bs :] = 1e30
    q = torch.randn(len(lengths), nh, hd, generator=gen)
    out = kernel(q, k_cache, v_cache, torch.tensor([b for t in tables for b in t + [0] * (width - len(t))]),
                 torch.tensor(lengths))
    for i, (n, table) in enumerate(zip(lengths, tables)):
        torch.testing.assert_close(out[i], _grouped_reference(q[i], k_cache, v_cache, table, n, GROUP),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [2, 4, 5, 8])  # the values pass takes up to 4 heads at once: 5 and 8 take two
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_kernel_for_each_query_group_size(kernel, group: int, cache_dtype: torch.dtype) -> None:
    """Query heads per KV head from 2 to 8, float32 queries beside a float32 or bfloat16 cache (each key and value
    is read once for the whole group): plain attention of each head on its KV head."""
    gen = torch.Generator().manual_seed(group)
    nh, hd, bs, num_blocks = NKV * group, 64, 16, 120
    k_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen).to(cache_dtype)
    v_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen).to(cache_dtype)
    lengths = [1, 9, 16, 50, 301]
    tables, flat = _scattered_tables(gen, num_blocks, lengths, 20, bs)
    q = torch.randn(len(lengths), nh, hd, generator=gen)
    out = kernel(q, k_cache, v_cache, flat, torch.tensor(lengths))
    for i, (n, table) in enumerate(zip(lengths, tables)):
        torch.testing.assert_close(out[i], _grouped_reference(q[i], k_cache, v_cache, table, n, group),
                                   atol=1e-5, rtol=1e-5)


def test_without_a_compiler_the_engine_falls_back_to_torch(monkeypatch, tmp_path, caplog) -> None:
    from eoq.engine.model.kernels import load_cpu_kernels

    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with caplog.at_level("WARNING"):
        assert load_cpu_kernels(tmp_path) is None
    assert "torch's ops run instead" in caplog.text and "no-such-c++-compiler" in caplog.text
    assert not list(tmp_path.iterdir())


def test_a_cache_that_cannot_be_written_builds_the_kernels_in_the_temporary_directory(tmp_path, monkeypatch) -> None:
    from eoq.engine.model.kernels import load_cpu_kernels

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache folder would be inside a file: mkdir fails, as on a read-only filesystem
    assert load_cpu_kernels(blocked / "kernels") is not None
    assert list((tmp_path / "tmp").glob("eoq-kernels-*/eoq_cpu-*.so"))


def test_kernel_with_peaked_attention(kernel) -> None:
    """Scores hundreds apart (softmax nearly one-hot, most weights underflow): still plain attention."""
    gen = torch.Generator().manual_seed(7)
    nh, hd, bs, num_blocks = NKV * GROUP, 32, 16, 40
    k_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen)
    v_cache = torch.randn(NKV, num_blocks, bs, hd, generator=gen)
    n = 150
    table = torch.randperm(num_blocks, generator=gen)[: -(-n // bs)]
    q = torch.randn(1, nh, hd, generator=gen) * 40
    out = kernel(q, k_cache, v_cache, table, torch.tensor([n]))
    keys = k_cache[:, table].reshape(NKV, -1, hd)[:, :n].transpose(0, 1)  # (n, nkv, hd)
    values = v_cache[:, table].reshape(NKV, -1, hd)[:, :n].transpose(0, 1)
    kv_head = torch.arange(nh) // GROUP
    k, v = keys[:, kv_head].transpose(0, 1), values[:, kv_head].transpose(0, 1)  # (nh, n, hd)
    probs = torch.softmax((q[0].unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) / hd**0.5, dim=-1)
    torch.testing.assert_close(out[0], (probs.unsqueeze(1) @ v).squeeze(1), atol=1e-4, rtol=1e-4)


def test_kernel_reads_a_bfloat16_cache_beside_float32_queries(kernel) -> None:
    """A float32 model's cache held in bfloat16 (``--kv-cache-dtype``): the kernel widens each key and value exactly
    and computes in float32 as over a float32 cache holding the same values, so the two give the same result."""
    gen = torch.Generator().manual_seed(5)
    nh, hd, bs, num_blocks = NKV * GROUP, 64, 16, 120
    k16 = torch.randn(NKV, num_blocks, bs, hd, generator=gen).bfloat16()
    v16 = torch.randn(NKV, num_blocks, bs, hd, generator=gen).bfloat16()
    lengths = [1, 16, 37, 400]
    _, flat = _scattered_tables(gen, num_blocks, lengths, 30, bs)
    q = torch.randn(len(lengths), nh, hd, generator=gen)
    out = kernel(q, k16, v16, flat, torch.tensor(lengths))
    assert out.dtype == torch.float32
    assert torch.equal(out, kernel(q, k16.float(), v16.float(), flat, torch.tensor(lengths)))


def test_rope_writes_a_bfloat16_cache_rounded_from_float32(cpu_kernels_lib) -> None:
    """RoPE with the cache writes, a float32 step into a bfloat16 cache: the queries and keys come back in float32,
    the cache holds them (and the values) rounded to bfloat16 as torch rounds them."""
    gen = torch.Generator().manual_seed(6)
    nh, hd, T, positions = NKV * GROUP, 16, 5, 64
    qkv = torch.randn(T, (nh + 2 * NKV) * hd, generator=gen)
    angles = torch.rand(positions, hd, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    k_cache = torch.zeros(NKV, 10, BS, hd, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 17, 18, 30, 39])
    pos = torch.tensor([0, 5, 9, 33, 63])
    qk = cpu_kernels_lib.rope_and_store(qkv, cos, sin, pos, slots, k_cache, v_cache, nh, NKV, hd)
    wide = cpu_kernels_lib.rope_and_store(qkv, cos, sin, pos, slots, torch.zeros_like(k_cache, dtype=torch.float32),
                                          torch.zeros_like(v_cache, dtype=torch.float32), nh, NKV, hd)
    assert qk.dtype == torch.float32 and torch.equal(qk, wide)
    v = qkv[:, (nh + NKV) * hd :].view(T, NKV, hd)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache.view(NKV, -1, hd)[:, slot], qk[t, nh:].bfloat16())
        assert torch.equal(v_cache.view(NKV, -1, hd)[:, slot], v[t].bfloat16())


@pytest.mark.parametrize("backend", ["kernel", "torch", "padded"])
def test_decode_attention_over_a_bfloat16_cache_of_float32_tokens(backend: str, cpu_kernels_lib) -> None:
    """Every decode path over a bfloat16 cache beside float32 queries: the new tokens' K/V are rounded into it, and
    the result is plain float32 attention over the values the cache holds."""
    gen = torch.Generator().manual_seed(7)
    ops = {"kernel": KernelDecode(cpu_kernels_lib), "torch": TorchDecode(BS, torch.float32),
           "padded": PaddedDecode(BS, torch.float32)}[backend]
    lengths = [3, 9, 22]
    D, nh = len(lengths), NKV * GROUP
    k_cache = torch.randn(NKV, NUM_BLOCKS, BS, HD, generator=gen).bfloat16()
    v_cache = torch.randn(NKV, NUM_BLOCKS, BS, HD, generator=gen).bfloat16()
    width = -(-max(lengths) // BS)
    tables = [list(range(i * 10, i * 10 + -(-n // BS))) for i, n in enumerate(lengths)]
    slots = torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lengths)])
    q = torch.randn(D, nh, HD, generator=gen)
    k_new, v_new = torch.randn(D, NKV, HD, generator=gen), torch.randn(D, NKV, HD, generator=gen)
    flat = torch.tensor([b for t in tables for b in t + [0] * (width - len(t))])
    meta = AttentionMetadata(slot_mapping=slots, decode=ops.plan(flat, torch.tensor(lengths), lengths))
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta).view(D, nh, HD)
    assert out.dtype == torch.float32
    for i, (n, table) in enumerate(zip(lengths, tables)):
        keys = k_cache[:, table].reshape(NKV, -1, HD)[:, :n].transpose(0, 1)  # (n, nkv, hd) bfloat16
        values = v_cache[:, table].reshape(NKV, -1, HD)[:, :n].transpose(0, 1)
        assert torch.equal(keys[-1], k_new[i].bfloat16()) and torch.equal(values[-1], v_new[i].bfloat16())
        torch.testing.assert_close(out[i], _reference(q[i], keys.float(), values.float()), atol=1e-5, rtol=1e-5)
