"""One request's state inside the engine."""

from __future__ import annotations

import enum

from eoq.engine.block_manager import BlockHash
from eoq.engine.detokenizer import TextStream
from eoq.engine.types import EngineRequest, FinishReason, RequestTimings, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the queue (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # in the batch, holding KV blocks
    FINISHED = "finished"


class Sequence:
    """Tokens (prompt then output), how many of them are in the KV cache, and the blocks holding them.

    ``num_computed_tokens`` tokens have K/V in the cache; the rest are computed by upcoming steps (a prompt
    chunk at a time, then one token per decode step). Invariant while running:
    ``len(block_ids) * block_size >= num_computed_tokens``.
    """

    __slots__ = (
        "block_hashes",
        "block_ids",
        "cache_salt",
        "finish_reason",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "request_id",
        "sampling",
        "status",
        "end_token_ids",
        "text",
        "timings",
        "token_ids",
    )

    def __init__(self, request: EngineRequest, text: TextStream, end_token_ids: frozenset[int]) -> None:
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at the first admission; -1 = not admitted yet
        self.block_ids: list[int] = []
        self.block_hashes: list[BlockHash] = []
        self.sampling: SamplingParams = request.sampling
        self.cache_salt = request.cache_salt
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.timings = RequestTimings(arrival=request.arrival_time)
        self.text = text
        self.num_preemptions = 0
        self.end_token_ids = end_token_ids  # end-of-answer tokens (unless ignore_eos) + the request's own

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
