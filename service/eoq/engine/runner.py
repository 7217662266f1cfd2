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
from eoq.engine.sampler import Sampler, SamplingBatch
from eoq.engine.scheduler import SchedulerOutput
from eoq.engine.sequence import Sequence
from eoq.engine.step_inputs import DecodeInputs, StepInputs

log = logging.getLogger(__name__)


class SampledToken(NamedTuple):
    """A token a step sampled, with the sequence it extends."""

    seq: Sequence
    token_id: int


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, decode_graphs: str = "off", max_num_seqs: int = 64) -> None:
        """``model``: prepared, with the ops chosen at load (``model.ops``: its decode attention and argmax come
        from them). ``decode_graphs``: ``cuda`` replays decode steps from CUDA graphs (``cuda_graphs.py``),
        ``eager`` runs the same padded steps without graphs (tests), ``off`` neither. With graphs the cache holds
        one block more than ``num_blocks``, the null block that padding rows write to."""
        self.model = model
        self.decode_attention = model.ops.decode_attention(block_size, dtype)  # the eager steps' backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        spec = model.kv_spec
        # One allocation for the whole cache: (layers, K/V, kv_heads, blocks, block_size, head_dim).
        null_blocks = 0 if decode_graphs == "off" else 1
        self.kv_cache = torch.zeros(spec.num_layers, 2, spec.num_kv_heads, num_blocks + null_blocks, block_size,
                                    spec.head_dim, dtype=dtype, device=device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(spec.num_layers)]
        self.graphs: DecodeGraphs | None = None
        if decode_graphs != "off":
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, null_block=num_blocks,
                                       max_batch=max_num_seqs, max_width=-(-model.max_positions // block_size),
                                       dtype=dtype, device=device, capture=decode_graphs == "cuda")
        self.sampler = Sampler(device, seed, model.ops)
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run one step. Returns each sampling sequence with its sampled token."""
        decodes = DecodeInputs.of(out.decodes, self.block_size) if out.decodes else None
        logits = self._run_graph(out, decodes)
        if logits is not None:
            sampling = list(out.decodes)
        else:
            step = self._prepare(out, decodes)
            sampling = step.sampling
            logits = self.model(step.input_ids, step.positions, self.kv_caches, step.meta,
                                step.logits_indices)  # (S, V)
        if not sampling:
            return []
        batch = SamplingBatch.build(
            [s.sampling for s in sampling],
            [s.token_ids for s in sampling] if any(s.sampling.repetition_penalty != 1.0 for s in sampling) else [],
            [self._generator(s) for s in sampling],
            self.device,
        )
        return [SampledToken(s, t) for s, t in zip(sampling, self.sampler(logits, batch).tolist())]

    def release(self, request_id: str) -> None:
        """Forget per-request state (its generator) once the request has ended."""
        self._generators.pop(request_id, None)

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

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling.seed
        if seed is None or seq.sampling.is_greedy:
            return None
        g = self._generators.get(seq.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self._generators[seq.request_id] = g
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

        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), decode, chunks)
        return StepInputs(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(logits_indices, dtype=torch.int64, device=dev),
            sampling,
        )
