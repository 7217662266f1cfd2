"""One request's state inside the engine."""

from __future__ import annotations

import enum

from eoq.engine.block_manager import BlockHash
from eoq.engine.detokenizer import TextStream
from eoq.engine.types import EngineRequest, FinishReason, RequestTimings, SamplingParams


class SequenceStatus(enum.Enum):
    COMPILING = "compiling"  # its grammar is compiling (structured output); not in the scheduler yet
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
        "answer_index",
        "block_hashes",
        "logprobs",
        "matcher",
        "num_forks",
        "output_id",
        "prompt_logprobs",
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

    def __init__(self, request: EngineRequest, text: TextStream, end_token_ids: frozenset[int],
                 answer_index: int = 0) -> None:
        # The engine's key; the request's own id for its first answer, "<id>#<index>" for the others.
        self.request_id = request.request_id if answer_index == 0 else f"{request.request_id}#{answer_index}"
        self.output_id = request.request_id  # what its outputs are addressed to
        self.answer_index = answer_index
        # Answers still to fork off this one when its prompt's last chunk samples (n - 1 for the first answer)
        self.num_forks = request.sampling.n - 1 if answer_index == 0 else 0
        self.matcher = None  # structured output: the answer's place in its grammar (eoq.engine.structured)
        self.logprobs: list = []  # TokenLogprob of tokens pushed but not yet sent (aligned with the text's tokens)
        # prompt_logprobs: TokenLogprob of prompt tokens 1.. computed so far; None once sent (or not asked)
        self.prompt_logprobs: list | None = [] if request.sampling.prompt_logprobs and answer_index == 0 else None
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
