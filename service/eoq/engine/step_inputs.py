"""A step's model inputs as the runner builds them, once a step: ``DecodeInputs`` (the decodes, on the host: the
eager step and a CUDA graph's both start from them) and ``StepInputs`` (an eager step's tensors)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from eoq.engine.model.attention import AttentionMetadata
from eoq.engine.sequence import Sequence


@dataclass(slots=True)
class DecodeInputs:
    """One decode step's model inputs, one entry per decoding sequence (host lists)."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # cache slot of each new token
    context_lens: list[int]  # tokens each sequence attends to, the new one included
    block_tables: list[list[int]]  # the blocks holding each sequence's first context_lens tokens

    @classmethod
    def of(cls, decodes: Iterable[Sequence], block_size: int) -> DecodeInputs:
        """The inputs of ``decodes`` (engine sequences, each with one new token to compute)."""
        ids, pos, slots, lens, tables = [], [], [], [], []
        for seq in decodes:
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_ids[p // block_size] * block_size + p % block_size)
            lens.append(p + 1)
            tables.append(seq.block_ids[: p // block_size + 1])
        return cls(ids, pos, slots, lens, tables)

    @property
    def width(self) -> int:
        """Blocks in the longest table."""
        return max((len(t) for t in self.block_tables), default=0)

    def padded_tables(self, width: int, pad_block: int) -> list[int]:
        """The tables flattened to (rows * width,), each padded to ``width`` with ``pad_block``."""
        flat: list[int] = []
        for row in self.block_tables:
            flat.extend(row)
            flat.extend([pad_block] * (width - len(row)))
        return flat


@dataclass(slots=True)
class StepInputs:
    """The model's inputs for one eager step, and the sequences whose rows of logits it samples (in that order)."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (S + R,) int64: the sampling rows, then the prompt-logprob rows
    sampling: list[Sequence]  # (S,)
    # prompt_logprobs: (sequence, first prompt position predicted, how many) for the R rows after the S
    prompt_rows: list[tuple[Sequence, int, int]] = field(default_factory=list)
