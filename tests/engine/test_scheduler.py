"""The scheduler on its own (no model): budgets, chunked prefill, admission, preemption, fairness."""

from __future__ import annotations

from eoq.engine.block_manager import BlockManager
from eoq.engine.scheduler import Scheduler
from eoq.engine.sequence import Sequence, SequenceStatus
from eoq.engine.types import EngineRequest, SamplingParams


def seq(rid: str, n: int) -> Sequence:
    return Sequence(EngineRequest(rid, list(range(1000, 1000 + n)), SamplingParams()), text=None,
                    end_token_ids=frozenset())


def run_step(s: Scheduler):
    """Schedule, then pretend the runner ran it: computed tokens advance, samplers get one new token."""
    out = s.schedule()
    samplers = [*out.decodes, *(c.seq for c in out.prefills if c.samples)]
    s.update_computed(out)
    for q in samplers:
        q.token_ids.append(7)
    return out


def two_in_a_small_cache(num_blocks: int, a_tokens: int, b_tokens: int):
    """Blocks of 2 tokens (no prefix caching), no watermark, and sequences a then b (their prompt lengths) added:
    returns the block manager, the scheduler, a and b."""
    blocks = BlockManager(num_blocks, 2, enable_prefix_caching=False)
    s = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100, watermark=0.0)
    a, b = seq("a", a_tokens), seq("b", b_tokens)
    s.add(a)
    s.add(b)
    return blocks, s, a, b


def test_long_prompt_is_prefilled_in_chunks_alongside_decodes():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = seq("a", 3)
    s.add(a)
    out = run_step(s)
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.prefills] == [("a", 3)]
    b = seq("b", 25)
    s.add(b)
    out = run_step(s)
    assert [q.request_id for q in out.decodes] == ["a"]
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.prefills] == [("b", 9)]  # budget 10 - 1 decode
    out = run_step(s)
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.prefills] == [("b", 9)]
    out = run_step(s)
    assert [(c.seq.request_id, c.num_new_tokens, c.samples) for c in out.prefills] == [("b", 7, True)]
    out = run_step(s)
    assert sorted(q.request_id for q in out.decodes) == ["a", "b"] and not out.prefills


def test_running_limit_and_fcfs_admission():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        s.add(seq(rid, 4))
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefills] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]
    s.finish(s.running[0])
    out = run_step(s)
    assert [q.request_id for q in out.decodes] == ["b"]
    assert [c.seq.request_id for c in out.prefills] == ["c"]


def test_preempts_the_newest_when_a_running_sequence_cannot_grow():
    blocks, s, a, b = two_in_a_small_cache(4, 3, 3)  # 2 blocks each: the cache is full
    run_step(s)  # both prefilled: 4 tokens each now, 3 computed
    run_step(s)  # both decode their 4th token: 5 tokens, 4 computed, 2 blocks each
    assert blocks.num_free_blocks == 0
    out = run_step(s)  # a needs a 3rd block for its 5th token -> b (newest) is preempted
    assert [q.request_id for q in out.decodes] == ["a"]
    assert out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert list(s.waiting) == [b] and b.num_preemptions == 1
    s.finish(a)
    out = run_step(s)  # b is recomputed from all its tokens (prompt + the two it had generated)
    assert [(c.seq.request_id, c.num_new_tokens, c.samples) for c in out.prefills] == [("b", 5, True)]


def test_the_newest_sequence_that_cannot_grow_preempts_itself():
    _, s, a, b = two_in_a_small_cache(3, 3, 2)
    run_step(s)  # a: 2 blocks (4 tokens, 3 computed); b: 1 block (3 tokens, 2 computed); cache full
    out = run_step(s)  # a's 4th token fits its blocks; b's 3rd needs a block: b, the newest, steps back
    assert [q.request_id for q in out.decodes] == ["a"]
    assert out.preempted == [b]
    assert a.status is SequenceStatus.RUNNING and list(s.waiting) == [b]


def test_no_admission_in_a_step_that_preempted():
    _, s, a, b = two_in_a_small_cache(4, 3, 3)
    run_step(s)
    run_step(s)
    s.add(seq("c", 1))
    out = run_step(s)
    assert out.preempted == [b]
    assert [c.seq.request_id for c in out.prefills] == []
    assert [q.request_id for q in s.waiting] == ["b", "c"]  # the preempted one first: nobody starves


def test_prefix_hits_are_counted_once_at_first_admission():
    blocks = BlockManager(16, 4)
    s = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100)
    a = seq("a", 10)
    s.add(a)
    out = run_step(s)
    assert (out.prefix_cache_queries, out.prefix_cache_hits) == (10, 0)
    s.finish(a)
    b = seq("b", 10)  # same tokens
    s.add(b)
    out = run_step(s)
    assert (out.prefix_cache_queries, out.prefix_cache_hits) == (10, 8)
    assert b.num_cached_tokens == 8
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.prefills] == [("b", 2)]


def test_a_prefix_being_computed_is_waited_for_not_computed_twice():
    blocks = BlockManager(32, 4)
    s = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = seq("a", 10), seq("b", 10), seq("c", 10)  # same tokens: a burst of one question
    for q in (a, b, c):
        s.add(q)
    out = run_step(s)
    assert [(ch.seq.request_id, ch.num_new_tokens) for ch in out.prefills] == [("a", 10)]  # b, c wait for a's blocks
    out = run_step(s)
    assert [q.request_id for q in out.decodes] == ["a"]
    assert [(ch.seq.request_id, ch.num_new_tokens) for ch in out.prefills] == [("b", 2), ("c", 2)]
    assert (out.prefix_cache_queries, out.prefix_cache_hits) == (20, 16)
    assert b.num_cached_tokens == c.num_cached_tokens == 8


def test_different_prefixes_are_admitted_together():
    s = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = seq("a", 10)
    b = Sequence(EngineRequest("b", list(range(2000, 2010)), SamplingParams()), text=None, end_token_ids=frozenset())
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [ch.seq.request_id for ch in out.prefills] == ["a", "b"]


def tenant_seq(rid: str, tenant: str, n: int = 4) -> Sequence:
    """A request of ``tenant`` whose prompt shares no block with the others'."""
    first = 1000 + 100 * sum(map(ord, rid))
    return Sequence(EngineRequest(rid, list(range(first, first + n)), SamplingParams(), cache_salt=tenant),
                    text=None, end_token_ids=frozenset())


def test_waiting_requests_are_admitted_round_robin_across_tenants():
    """Tenant A queues 6 requests, then B 2 and C 1: with one place free a step, admission alternates A, B, C, A,
    B, A, ... — B's first waits for one of A's, not for A's backlog; within a tenant the order stays FCFS."""
    s = Scheduler(BlockManager(256, 4), max_num_seqs=1, max_num_batched_tokens=100)
    for i in range(6):
        s.add(tenant_seq(f"a{i}", "A"))
    s.add(tenant_seq("b0", "B"))
    s.add(tenant_seq("b1", "B"))
    s.add(tenant_seq("c0", "C"))
    assert [q.request_id for q in s.waiting] == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]
    admitted = []
    while s.waiting or s.running:
        for q in list(s.running):
            s.finish(q)
        out = run_step(s)
        admitted += [c.seq.request_id for c in out.prefills]
    assert admitted == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_a_preempted_sequence_goes_first_whatever_its_tenant():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = tenant_seq("a", "A"), tenant_seq("b", "B"), tenant_seq("c", "C")
    s.add(b)
    s.add(c)
    s.waiting.appendleft(a)  # as _preempt puts it back
    assert [q.request_id for q in s.waiting] == ["a", "b", "c"]
    s.waiting.remove(b)  # aborted while waiting
    assert [q.request_id for q in s.waiting] == ["a", "c"] and len(s.waiting) == 2
    assert s.waiting.popleft() is a and s.waiting.peek() is c


def test_a_full_batch_makes_room_for_a_tenant_below_its_share():
    """Tenant A fills the batch (4 of 4); B's request arrives: the step after, A's newest running sequence steps
    back (to the front of A's queue, behind B's turn) and B's is admitted; then, with 2 tenants, each keeps 2."""
    s = Scheduler(BlockManager(256, 4), max_num_seqs=4, max_num_batched_tokens=100)
    for i in range(6):
        s.add(tenant_seq(f"a{i}", "A"))
    run_step(s)
    assert [q.request_id for q in s.running] == ["a0", "a1", "a2", "a3"]
    s.add(tenant_seq("b0", "B"))
    s.add(tenant_seq("b1", "B"))
    out = run_step(s)
    assert [q.request_id for q in out.preempted] == ["a3"]
    assert [c.seq.request_id for c in out.prefills] == ["b0"]
    assert [q.request_id for q in s.waiting] == ["a3", "b1", "a4", "a5"]  # turns alternate; A keeps its order
    out = run_step(s)
    assert [q.request_id for q in out.preempted] == ["a2"] and [c.seq.request_id for c in out.prefills] == ["b1"]
    out = run_step(s)  # 2 and 2: each has its share, nobody steps back
    assert out.preempted == [] and sorted(q.request_id for q in s.running) == ["a0", "a1", "b0", "b1"]
    assert a3_recomputed_later(s)


def a3_recomputed_later(s: Scheduler) -> bool:
    """Once B's are done, A's stepped-back sequences come back before A's newer ones, mostly from the prefix
    cache (a2 recomputes its last partial block; a3's blocks were all cached: one token, a decode)."""
    for q in [q for q in s.running if q.cache_salt == "B"]:
        s.finish(q)
    run_step(s)
    return [q.request_id for q in s.running] == ["a0", "a1", "a2", "a3"]


def test_a_lone_tenant_keeps_the_whole_batch():
    s = Scheduler(BlockManager(256, 4), max_num_seqs=4, max_num_batched_tokens=100)
    for i in range(8):
        s.add(tenant_seq(f"a{i}", "A"))
    for _ in range(3):
        out = run_step(s)
        assert out.preempted == [] and len(s.running) == 4
