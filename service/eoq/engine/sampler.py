"""Per-request sampling inside one batch: greedy, temperature, top-k, top-p, repetition / presence / frequency
penalties, logit bias, min_tokens, grammar masks (structured output), logprobs, seeds.

All rows are processed together; only the random draws of seeded rows are per row, each from the request's
own generator, so a seeded request samples the same tokens whatever else is in the batch. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p with one vector of noise, and
whose winner moves only when two tokens' p / E nearly tie: a seeded answer stays the same under the small logit
differences of a prompt computed with or without its prefix cache (bf16). Inverting the cumulative distribution
at one uniform a row is cheaper but moves with the sum of every earlier token's error, and failed that test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eoq.engine.model.ops import TORCH_OPS, TorchOps
from eoq.engine.structured import Matcher, allocate_bitmask, apply_bitmask
from eoq.engine.types import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs of one row of the step's logits (one answer that samples its next token)."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    end_token_ids: frozenset[int]  # masked while fewer than ``params.min_tokens`` are out
    generator: torch.Generator | None  # None = the shared generator
    matcher: Matcher | None = None  # the row's grammar (structured output)


@dataclass(slots=True)
class SamplingBatch:
    """The sampling parameters of the rows of one step's logits, as tensors on the logits' device. Each part is
    None when no row uses it, so a batch of plain rows pays for nothing else."""

    temperature: torch.Tensor  # (S,) float32; 0 = greedy
    top_k: torch.Tensor | None  # (S,) int64, 0 = off
    top_p: torch.Tensor | None  # (S,) float32, 1 = off
    repetition_penalty: torch.Tensor | None  # (S,) float32, 1 = off
    seen_token_ids: torch.Tensor | None  # (S, L) int64 prompt + output ids, padded with -1
    generators: list[torch.Generator | None]  # per row; None = the shared generator
    all_greedy: bool
    # (rows, token ids, values) added to the logits: logit_bias, and -inf on end tokens before min_tokens
    additive: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # presence / frequency penalties: (rows, their output ids padded with -1, presence, frequency)
    output_penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    matchers: list[tuple[int, Matcher]] = field(default_factory=list)  # (row, its grammar)
    logprob_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, how many top logprobs)

    @classmethod
    def build(cls, rows: list[SamplingRow], device: torch.device) -> SamplingBatch:
        params = [r.params for r in rows]
        all_greedy = all(p.is_greedy for p in params)
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_k = top_p = penalty = seen = None
        if not all_greedy and any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
        if not all_greedy and any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
            seen = _padded([r.token_ids if r.params.repetition_penalty != 1.0 else [] for r in rows]).to(device)
        batch = cls(temperature, top_k, top_p, penalty, seen, [r.generator for r in rows], all_greedy)
        batch.additive = _additive(rows, device)
        batch.output_penalties = _output_penalties(rows, device)
        batch.matchers = [(i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        batch.logprob_rows = [(i, r.params.top_logprobs) for i, r in enumerate(rows) if r.params.logprobs]
        return batch


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(t) for t in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, ids in enumerate(rows):
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def _additive(rows: list[SamplingRow], device: torch.device):
    r_idx: list[int] = []
    t_idx: list[int] = []
    vals: list[float] = []
    for i, r in enumerate(rows):
        for t, b in r.params.logit_bias:
            r_idx.append(i)
            t_idx.append(t)
            vals.append(b)
        if len(r.token_ids) - r.num_prompt_tokens < r.params.min_tokens:
            for t in r.end_token_ids:
                r_idx.append(i)
                t_idx.append(t)
                vals.append(float("-inf"))
    if not r_idx:
        return None
    return (torch.tensor(r_idx, dtype=torch.int64, device=device), torch.tensor(t_idx, dtype=torch.int64, device=device),
            torch.tensor(vals, dtype=torch.float32, device=device))


def _output_penalties(rows: list[SamplingRow], device: torch.device):
    which = [i for i, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if not which:
        return None
    outputs = _padded([rows[i].token_ids[rows[i].num_prompt_tokens :] for i in which]).to(device)
    presence = torch.tensor([rows[i].params.presence_penalty for i in which], dtype=torch.float32, device=device)
    frequency = torch.tensor([rows[i].params.frequency_penalty for i in which], dtype=torch.float32, device=device)
    return torch.tensor(which, dtype=torch.int64, device=device), outputs, presence, frequency


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]  # per row
    logprobs: list[TokenLogprob | None]  # per row: set for rows that asked for logprobs


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, ops: TorchOps = TORCH_OPS) -> None:
        """``ops``: the model's (their ``argmax``: eoq's CPU kernel, or torch's)."""
        self.device = device
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)
        self._argmax = ops.argmax  # x (S, V) -> the index of each row's first largest value

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        """logits (S, V) float32 -> each row's next token (and its logprobs where asked).

        Order: logit bias and min_tokens, repetition / presence / frequency penalties, the grammar mask -> the
        greedy choice; then temperature -> logprobs (of the distribution sampled from, after temperature and
        before top-k / top-p truncation, as vLLM and OpenAI report them; a greedy row's are at temperature 1)
        -> top-k / top-p -> the sampled choice."""
        logits = self._process(logits, batch)
        greedy = self._argmax(logits)  # (S,)
        t = batch.temperature
        scaled = logits if batch.all_greedy else logits / torch.where(t > 0, t, 1.0).unsqueeze(1)  # (S, V)
        if batch.all_greedy:
            chosen = greedy
        else:
            if batch.top_k is not None or batch.top_p is not None:
                truncated = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
            else:
                truncated = scaled
            probs = truncated.softmax(dim=-1)  # (S, V)
            sampled = self._draw(probs, batch.generators)  # (S,)
            chosen = torch.where(t > 0, sampled, greedy)
        token_ids = chosen.tolist()
        return SampleResult(token_ids, self._logprobs(scaled, token_ids, batch.logprob_rows))

    def _process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The logits after bias, penalties and the grammar (a copy when anything applies: the input may be a
        decode graph's output buffer)."""
        if batch.repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, batch.repetition_penalty, batch.seen_token_ids)
        if batch.additive is None and batch.output_penalties is None and not batch.matchers:
            return logits
        if batch.repetition_penalty is None:
            logits = logits.clone()
        if batch.additive is not None:
            rows, ids, vals = batch.additive
            logits.index_put_((rows, ids), vals, accumulate=True)
        if batch.output_penalties is not None:
            apply_output_penalties(logits, *batch.output_penalties)
        if batch.matchers:
            mask = allocate_bitmask(logits.shape[0], logits.shape[1])
            for i, m in batch.matchers:
                m.fill_mask(mask, i)
            apply_bitmask(logits, mask, [i for i, _ in batch.matchers])
        return logits

    @staticmethod
    def _logprobs(scaled: torch.Tensor, chosen: list[int], rows: list[tuple[int, int]]) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(chosen)
        if not rows:
            return out
        idx = [i for i, _ in rows]
        lp = scaled[idx].log_softmax(dim=-1)  # (R, V)
        picked = lp.gather(1, torch.tensor([[chosen[i]] for i in idx], device=lp.device)).squeeze(1).tolist()
        k = max(n for _, n in rows)
        top_vals = top_ids = None
        if k:
            top_vals, top_ids = lp.topk(k, dim=-1)  # (R, k) most likely first
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for j, (i, n) in enumerate(rows):
            top = tuple(zip(top_ids[j][:n], top_vals[j][:n])) if n else ()
            out[i] = TokenLogprob(chosen[i], picked[j], top)
        return out

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row of ``probs`` (S, V), drawn exactly from it by the exponential race: the argmax of
        p / E with E = -log(U), U uniform — the row's own generator's, or the shared one's. A token of probability
        0 is never drawn. (``exponential_`` draws the same E at 20 ns a value, -log of ``rand`` at 3.5: a 32-row
        step of the 49k vocabulary spends 5 ms on its noise instead of 30.)"""
        S, V = probs.shape
        shared_rows = [i for i, g in enumerate(generators) if g is None]
        if len(shared_rows) == S:
            u = torch.rand(S, V, generator=self.shared_generator, device=self.device)
        else:
            u = torch.empty(S, V, dtype=torch.float32, device=self.device)
            if shared_rows:
                u[shared_rows] = torch.rand(len(shared_rows), V, generator=self.shared_generator,
                                            device=self.device)
        for i, g in enumerate(generators):
            if g is not None:
                u[i] = torch.rand(V, generator=g, device=self.device)
        noise = u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()  # (S, V) ~ Exp(1)
        return self._argmax(probs / noise)


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """transformers' semantics: a seen token's logit is divided by the penalty if positive, else multiplied."""
    S, V = logits.shape
    mask = torch.zeros(S, V + 1, dtype=torch.bool, device=logits.device)  # column V absorbs the -1 padding
    mask.scatter_(1, torch.where(seen < 0, V, seen), True)
    mask = mask[:, :V]
    p = penalty.unsqueeze(1)  # (S, 1)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(mask, penalized, logits)


def apply_output_penalties(logits: torch.Tensor, rows: torch.Tensor, outputs: torch.Tensor, presence: torch.Tensor,
                           frequency: torch.Tensor) -> None:
    """OpenAI's semantics, in place on ``rows``: logit -= frequency * count + presence * (count > 0), counting
    each token's occurrences in the answer so far (``outputs`` (R, L), padded with -1)."""
    V = logits.shape[1]
    counts = torch.zeros(rows.shape[0], V + 1, dtype=torch.float32, device=logits.device)  # column V: padding
    counts.scatter_add_(1, torch.where(outputs < 0, V, outputs), torch.ones_like(outputs, dtype=torch.float32))
    counts = counts[:, :V]
    logits[rows] -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0)


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
