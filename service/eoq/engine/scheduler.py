"""Iteration-level continuous batching (Orca / vLLM v1 style).

Every step gets a token budget. Running sequences go first, oldest first: a decode takes one token, a prompt
being prefilled in chunks takes what is left of the budget. Then waiting requests join — round-robin across
tenants, oldest first within a tenant (``fair_queue.FairQueue``) — while the budget, the running-sequence limit
and the KV cache allow; each takes its prefix-cache hits and as much of its
prompt as fits (long prompts are prefilled over several steps, mixed with the others' decodes). Finished
sequences leave at once (``finish``).

A waiting request whose next uncached prompt block is being computed right now by a running sequence (the same
tenant's same prefix: a shared system prompt, or the same question in a burst) waits for it instead of
computing it again: the step after, those blocks are in the prefix cache.

A tenant gets its share of the batch: when the batch is full and the tenant whose turn it is holds fewer running
sequences than ``max_num_seqs`` / (tenants running or waiting), the newest running sequence of the tenant that
holds the most (more than its share) steps back to the queue (``_share_the_batch``, one a step). So a tenant that
flooded the server cannot keep another's request out of the batch for longer than a step or two; its own requests
lose nothing but a recompute of their cached blocks.

When a running sequence cannot get a block for its next token, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed from its tokens later (its
blocks stay in the prefix cache, so the recompute is mostly cache hits). Nobody starves: each tenant's queue is
FCFS and every tenant with waiting requests gets a turn, preempted requests go back to the front, and the oldest
running sequence is always served first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from eoq.engine.block_manager import BlockManager, NoFreeBlock
from eoq.engine.fair_queue import FairQueue
from eoq.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int
    samples: bool  # the chunk reaches the sequence's last token, so the step samples its next token


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner computes in one step: decodes (one token each) first, then prompt chunks."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_cache_queries: int = 0  # prompt tokens of newly admitted sequences
    prefix_cache_hits: int = 0  # of those, taken from the prefix cache
    num_prompt_tokens: int = 0  # prompt tokens of sequences admitted for the first time

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_new_tokens for c in self.prefills)

    @property
    def num_seqs(self) -> int:
        return len(self.decodes) + len(self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admit a new sequence only if this many blocks stay free, so decodes rarely need a preemption.
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting = FairQueue()
        self.running: list[Sequence] = []  # oldest first

    # --- queue changes ---
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out of the scheduler (finished, failed or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.blocks.free(seq)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Start ``child``, a new answer to ``parent``'s prompt, right after the step that computed the prompt:
        it shares the prompt's KV blocks (``BlockManager.fork``) and runs from the next step on. Returns the
        block to copy (see there). With no block free for the copy it waits to be computed like a preempted
        sequence (its prompt's blocks are then prefix-cache hits)."""
        child.num_cached_tokens = parent.num_cached_tokens
        try:
            copy = self.blocks.fork(parent, child)
        except NoFreeBlock:
            child.num_computed_tokens = 0
            child.status = SequenceStatus.WAITING
            self.waiting.appendleft(child, False)
            return None
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        return copy

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # --- the step ---
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        if self.waiting and len(self.running) >= self.max_num_seqs:
            self._share_the_batch(out)
        num_shared = len(out.preempted)

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate_slots(seq, n):
                victim = self.running[-1]
                if id(victim) in scheduled:  # never preempt what this step already computes
                    victim = seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.add(id(seq))
                self._add_to_output(out, seq, n)
                budget -= n
                i += 1
                continue
            # seq itself was preempted: everything after it (newer) is gone too or still unscheduled
            if seq not in self.running:
                continue

        if len(out.preempted) > num_shared:
            return out  # the cache is tight: admit nobody new this step

        inflight = self._inflight_hashes() if self.blocks.enable_prefix_caching else set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            # A prompt whose logprobs are asked for is computed in full (cached blocks have no logits).
            hits, num_hit = ([], 0) if seq.sampling.prompt_logprobs else self.blocks.get_computed_blocks(seq)
            if len(hits) < len(seq.block_hashes) and seq.block_hashes[len(hits)] in inflight:
                break  # a running sequence is computing this prefix now: take it from the cache next step
            n = min(seq.num_tokens - num_hit, budget)
            needed = self.blocks.blocks_needed(num_hit + n) - len(hits)
            if self.running and self.blocks.num_free_blocks - needed < self.watermark_blocks:
                break
            if not self.blocks.allocate_slots(seq, n, hits):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_hit
            if seq.num_cached_tokens < 0:  # first admission (not a recompute after preemption)
                seq.num_cached_tokens = num_hit
                out.prefix_cache_queries += seq.num_tokens
                out.prefix_cache_hits += num_hit
                out.num_prompt_tokens += seq.num_prompt_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_output(out, seq, n)
            budget -= n
            if self.blocks.enable_prefix_caching:
                inflight.update(seq.block_hashes[len(hits) :])
        return out

    def _share_the_batch(self, out: SchedulerOutput) -> None:
        """The batch is full: the first waiting tenant (in turn order) holding less than its share gets the next
        turn, and the newest running sequence of the tenant holding the most, beyond its share, steps back for it
        (see the module docstring)."""
        running = Counter(seq.cache_salt for seq in self.running)
        waiting = self.waiting.tenants()
        share = max(1, self.max_num_seqs // len(running.keys() | set(waiting)))
        short = next((t for t in waiting if running[t] < share), None)
        if short is None:
            return
        tenant, held = running.most_common(1)[0]
        if held <= share:
            return
        victim = next(seq for seq in reversed(self.running) if seq.cache_salt == tenant)
        self._preempt(victim, take_turn=False)
        out.preempted.append(victim)
        self.waiting.give_turn(short)

    def _inflight_hashes(self) -> set:
        """Hashes of full prompt blocks that running sequences hold but have not computed yet."""
        bs = self.blocks.block_size
        inflight = set()
        for seq in self.running:
            if seq.num_computed_tokens < seq.num_tokens - 1:  # still prefilling
                inflight.update(seq.block_hashes[seq.num_computed_tokens // bs :])
        return inflight

    def _add_to_output(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        if n == 1 and seq.num_computed_tokens == seq.num_tokens - 1:
            out.decodes.append(seq)
        else:
            out.prefills.append(ScheduledChunk(seq, n, seq.num_computed_tokens + n == seq.num_tokens))

    def _preempt(self, seq: Sequence, take_turn: bool = True) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq, take_turn)

    def update_computed(self, out: SchedulerOutput) -> None:
        """After the runner ran ``out``: the scheduled tokens are now in the cache; full blocks become cacheable."""
        for seq in out.decodes:
            seq.num_computed_tokens += 1
            self.blocks.cache_full_blocks(seq, seq.num_computed_tokens)
        for chunk in out.prefills:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
            self.blocks.cache_full_blocks(chunk.seq, chunk.seq.num_computed_tokens)
