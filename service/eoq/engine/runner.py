"""The model runner: owns the device tensors (weights, KV cache), turns a scheduler output into model inputs,
runs the decoder and samples.

It reads sequences (tokens, positions, block tables) but never changes them: the engine core applies the
results.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from eoq.engine.cuda_graphs import DecodeGraphs
from eoq.engine.model.attention import AttentionMetadata, PrefillChunk
from eoq.engine.model.base import DecoderModel
from eoq.engine.sampler import Sampler, SamplingBatch, SamplingRow
from eoq.engine.scheduler import SchedulerOutput
from eoq.engine.sequence import Sequence
from eoq.engine.step_inputs import DecodeInputs, StepInputs
from eoq.engine.types import TokenLogprob

log = logging.getLogger(__name__)


class SampledToken(NamedTuple):
    """A token a step sampled, with the sequence it extends — or, with ``fork`` > 0, the first token of that
    sequence's request's answer number ``fork``, sampled from the same logits (``n`` answers, one prefill)."""

    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None = None
    fork: int = 0


class StepOutput(NamedTuple):
    """What one step produced: the sampled tokens, and prompt logprobs (sequence, first position, values)."""

    sampled: list[SampledToken]
    prompt_logprobs: list[tuple[Sequence, int, list[TokenLogprob]]]


def fork_seed(seed: int, index: int) -> int:
    """Answer ``index``'s seed, derived from the request's: answers differ, and the same seed reproduces them."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, decode_graphs: str = "off", max_num_seqs: int = 64,
                 kv_dtype: torch.dtype | None = None) -> None:
        """``model``: prepared, with the ops chosen at load (``model.ops``: its decode attention and argmax come
        from them). ``decode_graphs``: ``cuda`` replays decode steps from CUDA graphs (``cuda_graphs.py``),
        ``eager`` runs the same padded steps without graphs (tests), ``off`` neither. With graphs the cache holds
        one block more than ``num_blocks``, the null block that padding rows write to. ``kv_dtype``: the cache's
        element type (default ``dtype``; bfloat16 beside float32: ``device.select_kv_cache_dtype``)."""
        self.model = model
        self.decode_attention = model.ops.decode_attention(block_size, dtype)  # the eager steps' backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        spec = model.kv_spec
        # One allocation for the whole cache: (layers, K/V, kv_heads, blocks, block_size, head_dim).
        null_blocks = 0 if decode_graphs == "off" else 1
        self.kv_dtype = kv_dtype or dtype
        self.kv_cache = torch.zeros(spec.num_layers, 2, spec.num_kv_heads, num_blocks + null_blocks, block_size,
                                    spec.head_dim, dtype=self.kv_dtype, device=device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(spec.num_layers)]
        self.graphs: DecodeGraphs | None = None
        if decode_graphs != "off":
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, null_block=num_blocks,
                                       max_batch=max_num_seqs, max_width=-(-model.max_positions // block_size),
                                       dtype=dtype, device=device, capture=decode_graphs == "cuda")
        self.sampler = Sampler(device, seed, model.ops)
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepOutput:
        """Run one step: each sampling sequence with its sampled token, and the prompt logprobs computed."""
        decodes = DecodeInputs.of(out.decodes, self.block_size) if out.decodes else None
        logits = self._run_graph(out, decodes)
        prompt_logprobs = []
        if logits is not None:
            sampling = list(out.decodes)
        else:
            step = self._prepare(out, decodes)
            sampling = step.sampling
            logits = self.model(step.input_ids, step.positions, self.kv_caches, step.meta,
                                step.logits_indices)  # (S + R, V)
            if step.prompt_rows:
                prompt_logprobs = self._prompt_logprobs(logits[len(sampling) :], step.prompt_rows)
                logits = logits[: len(sampling)]
        if not sampling:
            return StepOutput([], prompt_logprobs)
        rows: list[SamplingRow] = []
        owners: list[tuple[Sequence, int]] = []  # each row's sequence and fork index
        for s in sampling:
            for fork in range(s.num_forks + 1):  # num_forks > 0 only on the step that ends a prompt of n answers
                key = s.request_id if fork == 0 else f"{s.request_id}#{fork}"
                rows.append(SamplingRow(s.sampling, s.token_ids, s.num_prompt_tokens, s.end_token_ids,
                                        self._generator(key, s, fork), s.matcher))
                owners.append((s, fork))
        if len(rows) > len(sampling):
            logits = logits[torch.tensor([i for i, s in enumerate(sampling) for _ in range(s.num_forks + 1)],
                                         device=logits.device)]
        result = self.sampler(logits, SamplingBatch.build(rows, self.device))
        return StepOutput([SampledToken(s, t, lp, fork)
                           for (s, fork), t, lp in zip(owners, result.token_ids, result.logprobs)], prompt_logprobs)

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int, int]]):
        """The log-probabilities (the model's distribution, temperature 1) of the prompt tokens each row predicts,
        with each sequence's ``top_logprobs`` most likely alternatives."""
        lp = logits.float().log_softmax(dim=-1)  # (R, V)
        out = []
        r = 0
        for seq, first, count in rows:
            block = lp[r : r + count]  # (count, V)
            targets = torch.tensor(seq.token_ids[first : first + count], device=lp.device)
            picked = block.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            k = seq.sampling.top_logprobs
            if k:
                vals, ids = block.topk(k, dim=-1)
                tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            else:
                tops = [()] * count
            out.append((seq, first, [TokenLogprob(t, p, top) for t, p, top in zip(targets.tolist(), picked, tops)]))
            r += count
        return out

    def release(self, request_id: str) -> None:
        """Forget per-request state (its generator) once the request has ended."""
        self._generators.pop(request_id, None)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block's contents (every layer, K and V): a forked answer's own copy of a partial block."""
        self.kv_cache[:, :, :, dst].copy_(self.kv_cache[:, :, :, src])

    def _run_graph(self, out: SchedulerOutput, inputs: DecodeInputs | None) -> torch.Tensor | None:
        """The logits of a decode-only step replayed from a graph, or None when the step has prefill chunks or a
        shape beyond the graphs'. A graph that fails to capture turns graphs off (logged); the step runs eagerly."""
        if self.graphs is None or out.prefills or inputs is None:
            return None
        if not self.graphs.fits(len(out.decodes), inputs.width):
            return None
        try:
            return self.graphs.run(inputs)
        except RuntimeError:
            log.exception("decode graphs failed: decode steps run eagerly from now on")
            self.graphs = None
            return None

    def _generator(self, key: str, seq: Sequence, fork: int) -> torch.Generator | None:
        """The generator of the answer keyed ``key`` (a seeded request's; answer ``i`` > 0 of it is seeded
        ``fork_seed(seed, i)``). Forked answers' generators are made here and kept under their own keys."""
        seed = seq.sampling.seed
        if seed is None or seq.sampling.is_greedy:
            return None
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(fork_seed(seed, seq.answer_index + fork))
            self._generators[key] = g
        return g

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """The inputs an eager step of ``out`` runs the model on (tests compare paths with them)."""
        return self._prepare(out, DecodeInputs.of(out.decodes, self.block_size) if out.decodes else None)

    def _prepare(self, out: SchedulerOutput, dec: DecodeInputs | None) -> StepInputs:
        """The eager step's inputs: decodes first (``dec``, built once a step), then the prefill chunks."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling: list[Sequence] = []

        dev = self.device
        decode = None
        if out.decodes:
            assert dec is not None
            ids.extend(dec.token_ids)
            pos.extend(dec.positions)
            slots.extend(dec.slots)
            blocks = torch.tensor(dec.padded_tables(dec.width, 0), dtype=torch.int64, device=dev)  # (D * width,)
            lens = torch.tensor(dec.context_lens, dtype=torch.int64, device=dev)
            decode = self.decode_attention.plan(blocks, lens, dec.context_lens)
            logits_indices.extend(range(len(out.decodes)))
            sampling.extend(out.decodes)

        chunks: list[PrefillChunk] = []
        prompt_rows: list[tuple[Sequence, int, int]] = []
        prompt_indices: list[int] = []
        for c in out.prefills:
            seq, n = c.seq, c.num_new_tokens
            start = seq.num_computed_tokens
            q0 = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            p = torch.arange(start, start + n)
            pos.extend(range(start, start + n))
            nb = -(-(start + n) // bs)
            table = torch.tensor(seq.block_ids[:nb], dtype=torch.int64)
            slots.extend((table[p // bs] * bs + p % bs).tolist())
            chunk = PrefillChunk(q0, n, start)
            if start > 0:
                chunk.block_ids = table.to(self.device)
                chunk.mask = (torch.arange(start + n).unsqueeze(0) <= p.unsqueeze(1)).to(self.device)  # (n, start+n)
            chunks.append(chunk)
            if c.samples:
                logits_indices.append(q0 + n - 1)
                sampling.append(seq)
            if seq.prompt_logprobs is not None:  # rows predicting prompt tokens start+1 .. (not yet computed)
                first = max(start + 1, len(seq.prompt_logprobs) + 1)
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last >= first:
                    prompt_rows.append((seq, first, last - first + 1))
                    prompt_indices.extend(range(q0 + first - 1 - start, q0 + last - start))

        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), decode, chunks)
        return StepInputs(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(logits_indices + prompt_indices, dtype=torch.int64, device=dev),
            sampling,
            prompt_rows,
        )
