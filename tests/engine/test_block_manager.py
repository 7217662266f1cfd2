"""The KV block manager on its own: exact block ids, reference counts, prefix hits, LRU eviction, tenant salt."""

from __future__ import annotations

from dataclasses import dataclass, field

from eoq.engine.block_manager import BlockManager


@dataclass
class Seq:
    token_ids: list[int]
    cache_salt: str = ""
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)


def admit(bm: BlockManager, seq: Seq) -> int:
    """Take the prefix hits and allocate the rest; mark everything computed and cached. Returns the hit tokens."""
    hits, n = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, len(seq.token_ids) - n, hits)
    seq.num_computed_tokens = len(seq.token_ids)
    bm.cache_full_blocks(seq, seq.num_computed_tokens)
    return n


def test_allocate_and_free_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq(list(range(10)))
    assert bm.allocate_slots(a, 10)
    assert a.block_ids == [0, 1, 2]
    b = Seq(list(range(100, 105)))
    assert bm.allocate_slots(b, 5)
    assert b.block_ids == [3, 4]
    assert bm.num_free_blocks == 3
    assert not bm.can_allocate(Seq(list(range(13))), 13)  # needs 4 blocks, 3 free
    bm.free(a)
    assert bm.num_free_blocks == 6 and a.block_ids == []


def test_grow_by_one_token_allocates_only_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Seq([1, 2, 3, 4])
    assert bm.allocate_slots(s, 4)
    s.num_computed_tokens = 4
    assert s.block_ids == [0]
    s.token_ids.append(5)
    assert bm.allocate_slots(s, 1)
    assert s.block_ids == [0, 1]
    s.num_computed_tokens = 5
    s.token_ids.append(6)
    assert bm.allocate_slots(s, 1)
    assert s.block_ids == [0, 1]


def test_prefix_hits_share_blocks_and_leave_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Seq(list(range(12)))
    assert admit(bm, a) == 0
    assert a.block_ids == [0, 1, 2]
    b = Seq(list(range(10)) + [99, 98])
    assert admit(bm, b) == 8  # two full blocks shared; the third differs
    assert b.block_ids[:2] == [0, 1] and b.block_ids[2] == 3
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    c = Seq(list(range(12)))  # identical to a: at most 11 tokens may hit, in whole blocks -> 8
    assert admit(bm, c) == 8


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Seq([1, 2, 3, 4, 5])
    admit(bm, a)
    assert a.block_ids == [0, 1, 2]
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2  # blocks 0,1 full and hashed; 2 is partial
    # the unhashed block is handed out first, then never-used ones, then cached ones, a's tail block first
    b = Seq([7, 8, 9])
    assert bm.allocate_slots(b, 3)
    assert b.block_ids == [2, 3]
    again = Seq([1, 2, 3, 4, 5])
    assert bm.get_computed_blocks(again) == ([0, 1], 4)  # still cached
    d = Seq([20, 21])
    assert bm.allocate_slots(d, 2)
    assert d.block_ids == [1]  # evicts a's second block, keeps its first
    assert bm.get_computed_blocks(Seq([1, 2, 3, 4, 5])) == ([0], 2)


def test_eviction_forgets_the_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = Seq([1, 2, 3, 4, 5])
    hits, _ = bm.get_computed_blocks(a)
    assert bm.allocate_slots(a, 4, hits) and bm.num_free_blocks == 0
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a, 4)
    bm.free(a)
    b = Seq([9, 9, 9, 9])
    admit(bm, b)  # takes both blocks: a's prefix is evicted
    c = Seq([1, 2, 3, 4, 5])
    bm.free(b)
    assert bm.get_computed_blocks(c) == ([], 0)


def test_tenant_salt_prevents_cross_tenant_hits():
    bm = BlockManager(num_blocks=10, block_size=4)
    admit(bm, Seq(list(range(9)), cache_salt="alice"))
    assert admit(bm, Seq(list(range(9)), cache_salt="bob")) == 0
    assert admit(bm, Seq(list(range(9)), cache_salt="alice")) == 8


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    admit(bm, Seq(list(range(9))))
    assert admit(bm, Seq(list(range(9)))) == 0
    assert bm.num_cached_blocks == 0


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = Seq(list(range(8)))
    admit(bm, a)
    b = Seq(list(range(8)) + list(range(50, 58)))  # 2 cached hits + needs 2 more, only 1 free
    hits, n = bm.get_computed_blocks(b)
    assert n == 8
    assert not bm.allocate_slots(b, 8, hits)
    assert b.block_ids == [] and [bm.blocks[i].ref_count for i in range(3)] == [1, 1, 0]
