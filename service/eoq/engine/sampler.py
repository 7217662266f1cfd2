"""Per-request sampling inside one batch: greedy, temperature, top-k, top-p, repetition penalty, seeds.

All rows are processed together; only the random draws of seeded rows are per row, each from the request's
own generator, so a seeded request samples the same tokens whatever else is in the batch. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p with one vector of noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eoq.engine.model.ops import TORCH_OPS, TorchOps
from eoq.engine.types import SamplingParams


@dataclass(slots=True)
class SamplingBatch:
    """The sampling parameters of the rows of one step's logits, as tensors on the logits' device."""

    temperature: torch.Tensor  # (S,) float32; 0 = greedy
    top_k: torch.Tensor | None  # (S,) int64, 0 = off; None when no row uses it
    top_p: torch.Tensor | None  # (S,) float32, 1 = off; None when no row uses it
    repetition_penalty: torch.Tensor | None  # (S,) float32, 1 = off; None when no row uses it
    seen_token_ids: torch.Tensor | None  # (S, L) int64 prompt + output ids, padded with -1
    generators: list[torch.Generator | None]  # per row; None = the shared generator
    all_greedy: bool

    @classmethod
    def build(cls, params: list[SamplingParams], token_ids: list[list[int]], generators: list[torch.Generator | None],
              device: torch.device) -> SamplingBatch:
        S = len(params)
        all_greedy = all(p.is_greedy for p in params)
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_k = top_p = penalty = seen = None
        if not all_greedy and any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
        if not all_greedy and any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
            width = max(len(t) for t in token_ids)
            seen = torch.full((S, width), -1, dtype=torch.int64)
            for i, (p, ids) in enumerate(zip(params, token_ids)):
                if p.repetition_penalty != 1.0:
                    seen[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            seen = seen.to(device)
        return cls(temperature, top_k, top_p, penalty, seen, generators, all_greedy)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, ops: TorchOps = TORCH_OPS) -> None:
        """``ops``: the model's (their ``argmax``: eoq's CPU kernel, or torch's)."""
        self.device = device
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)
        self._argmax = ops.argmax  # x (S, V) -> the index of each row's first largest value

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits (S, V) float32 -> next token ids (S,) int64."""
        if batch.repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, batch.repetition_penalty, batch.seen_token_ids)
        greedy = self._argmax(logits)  # (S,)
        if batch.all_greedy:
            return greedy
        t = batch.temperature
        logits = logits / torch.where(t > 0, t, 1.0).unsqueeze(1)  # (S, V)
        if batch.top_k is not None or batch.top_p is not None:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = logits.softmax(dim=-1)  # (S, V)
        sampled = self._argmax(probs / self._exponential_noise(probs.shape, batch.generators))  # (S,)
        return torch.where(t > 0, sampled, greedy)

    def _exponential_noise(self, shape: torch.Size, generators: list[torch.Generator | None]) -> torch.Tensor:
        S, V = shape
        noise = torch.empty(S, V, dtype=torch.float32, device=self.device)
        shared_rows = [i for i, g in enumerate(generators) if g is None]
        if shared_rows:
            if len(shared_rows) == S:
                noise.exponential_(generator=self.shared_generator)
            else:
                rows = torch.empty(len(shared_rows), V, dtype=torch.float32, device=self.device)
                rows.exponential_(generator=self.shared_generator)
                noise[shared_rows] = rows
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return noise


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """transformers' semantics: a seen token's logit is divided by the penalty if positive, else multiplied."""
    S, V = logits.shape
    mask = torch.zeros(S, V + 1, dtype=torch.bool, device=logits.device)  # column V absorbs the -1 padding
    mask.scatter_(1, torch.where(seen < 0, V, seen), True)
    mask = mask[:, :V]
    p = penalty.unsqueeze(1)  # (S, 1)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(mask, penalized, logits)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) every token outside each row's top-k and top-p nucleus. The most likely token always stays."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (S, V)
    V = logits.shape[1]
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)  # (1, V)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, V).unsqueeze(1)  # (S, 1)
        drop |= ranks >= k
    if top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
        drop |= before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
