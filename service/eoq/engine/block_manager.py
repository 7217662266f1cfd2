"""KV-cache block bookkeeping: which sequence holds which blocks, reference counts, and the prefix cache.

Pure Python (no torch): block ids index the runner's cache tensors, nothing more.

- The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence holds the blocks covering its
  computed tokens (and those being computed this step), in order: its block table.
- A block that is full of computed tokens gets a hash: H(parent block's hash, its tokens), the chain rooted in
  H(cache salt), so equal hashes mean equal prefixes of equal tenants. A later sequence whose prompt starts with
  the same blocks takes them (reference count + 1) instead of computing them: prefix caching, across requests
  and across the turns of a conversation, never across tenants (the salt is the tenant).
- A block whose reference count drops to 0 is free, but keeps its hash and contents until it is reused: free
  blocks form an LRU queue, least recently freed first, and a cached block is evicted (its hash forgotten) only
  when an allocation takes it. Blocks without a hash are handed out first.
Invariants: ref_count > 0 <=> the block is in some sequence's table; a free block is in the free queue exactly
once; every hash in the map names a block whose hash is that hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

BlockHash = bytes


def hash_block(parent: BlockHash, token_ids: list[int] | tuple[int, ...]) -> BlockHash:
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def root_hash(cache_salt: str) -> BlockHash:
    return hashlib.blake2b(b"eoq-prefix:" + cache_salt.encode(), digest_size=16).digest()


class NoFreeBlock(RuntimeError):
    pass


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockManager:
    """Allocates KV blocks to sequences and remembers full blocks by hash for reuse.

    A sequence is anything with ``token_ids`` (list[int]), ``block_ids`` (list[int], its block table),
    ``block_hashes`` (list[BlockHash], hashes of its full blocks so far) and ``cache_salt`` (str).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, front = next to hand out. OrderedDict: O(1) removal when a cached block is reused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    # --- queries ---
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---
    def get_computed_blocks(self, seq) -> tuple[list[int], int]:
        """The cached blocks that start ``seq``'s tokens, and how many tokens they cover.

        At least one token is left uncomputed: the model must run on the last prompt token to sample."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // bs
        self._extend_hashes(seq, max_blocks)
        hits: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * bs

    def _extend_hashes(self, seq, num_full_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else root_hash(seq.cache_salt)
        for i in range(len(hashes), num_full_blocks):
            parent = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)

    def cache_full_blocks(self, seq, num_computed_tokens: int) -> None:
        """Register ``seq``'s blocks that are now full of computed tokens, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_ids))
        self._extend_hashes(seq, num_full)
        for i in range(num_full):
            block = self.blocks[seq.block_ids[i]]
            if block.block_hash is not None:
                continue
            h = seq.block_hashes[i]
            block.block_hash = h
            # If another block already holds this prefix, keep the first: both stay valid for their owners.
            self._cached.setdefault(h, block.block_id)

    # --- allocation ---
    def can_allocate(self, seq, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        total = len(seq.block_ids) + len(computed_blocks)
        need = self.blocks_needed(self._num_tokens_after(seq, num_new_tokens, computed_blocks)) - total
        # Cached blocks taken now that sit in the free queue stop being free.
        reused_free = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - reused_free

    def _num_tokens_after(self, seq, num_new_tokens: int, computed_blocks) -> int:
        computed = seq.num_computed_tokens if not computed_blocks else len(computed_blocks) * self.block_size
        return computed + num_new_tokens

    def allocate_slots(self, seq, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Give ``seq`` the blocks to hold ``num_new_tokens`` more tokens (after taking ``computed_blocks``, the
        prefix-cache hits of a sequence that holds no blocks yet). False, changing nothing, if there is no room."""
        if not self.can_allocate(seq, num_new_tokens, computed_blocks):
            return False
        for b in computed_blocks:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self._free[b]
            block.ref_count += 1
            seq.block_ids.append(b)
        need = self.blocks_needed(self._num_tokens_after(seq, num_new_tokens, computed_blocks)) - len(seq.block_ids)
        for _ in range(need):
            seq.block_ids.append(self._take_free_block())
        return True

    def fork(self, parent, child) -> tuple[int, int] | None:
        """Give ``child`` (holding no blocks) ``parent``'s computed tokens: its full blocks shared (reference
        count + 1, their hashes too), its last, partial block copied into a block of the child's own (the child
        writes its next token there). Returns (source, destination) of the block whose KV the caller must copy,
        None when there is none (the tokens end on a block boundary). Raises ``NoFreeBlock`` when the copy has
        no block to go to (nothing changed)."""
        bs = self.block_size
        n = parent.num_computed_tokens
        full, partial = divmod(n, bs)
        if partial and not self._free:
            raise NoFreeBlock("no free block for the forked answer's last block")
        for b in parent.block_ids[:full]:
            self.blocks[b].ref_count += 1
            child.block_ids.append(b)
        child.block_hashes[:] = parent.block_hashes[:full]
        if not partial:
            return None
        dst = self._take_free_block()
        child.block_ids.append(dst)
        return parent.block_ids[full], dst

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its contents are about to be overwritten
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def free(self, seq) -> None:
        """Release all of ``seq``'s blocks. Hashed ones stay cached (tail blocks are evicted first)."""
        for b in reversed(seq.block_ids):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[b] = None
                if block.block_hash is None:
                    self._free.move_to_end(b, last=False)  # nothing to keep: hand it out first
        seq.block_ids.clear()

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)
