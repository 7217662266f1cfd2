"""Decode steps replayed from CUDA graphs.

On a GPU a decode step of a small model is several hundred kernel launches of a few microseconds of work each:
the launches, not the arithmetic, set the step time. A CUDA graph records one step's launches once and replays
them with a single call. A graph fixes every shape and address, so a decode step is padded to a captured shape
before it runs:
- the batch to the next of ``batch_buckets`` (1, 2, 4, then multiples of 8 up to the most sequences a step holds);
  padded rows decode token 0 at position 0 into the *null block* (one KV-cache block beyond those the block
  manager hands out) and attend to it alone, so they never touch a sequence's cache;
- the block tables to the next power of two of blocks (``width``; capped at a full-length sequence's), padded with
  the null block; decode attention gathers that fixed window and masks what lies beyond each sequence's length
  with a bias the graph computes from the lengths (``decode_attention.PaddedDecode``).
A step's inputs are copied into the graph's own input tensors, the graph is replayed, and the first rows of its
logits are the step's. Each shape is captured the first time a step needs it (logged; a few tens of ms), all in
one memory pool. Steps with prefill chunks, and shapes beyond the buckets, run eagerly as before.

``DecodeGraphs(capture=False)`` runs the same padded step eagerly: the tests check the padding on a CPU, where
there are no graphs.
"""

from __future__ import annotations

import logging

import torch

from eoq.engine.model.attention import AttentionMetadata
from eoq.engine.model.base import DecoderModel
from eoq.engine.model.decode_attention import PaddedDecode
from eoq.engine.step_inputs import DecodeInputs

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, then multiples of 8, the last one ``max_batch``."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


def width_bucket(blocks: int, max_width: int) -> int:
    """The captured table width for ``blocks`` blocks: the next power of two, at most ``max_width``."""
    width = 1 << max(blocks - 1, 0).bit_length()
    return min(width, max_width)


class _Graph:
    """One captured shape: its inputs (written before each replay: views of one tensor), its graph, and the
    logits it fills."""

    def __init__(self, batch: int, width: int, values: torch.Tensor) -> None:
        B = batch
        self.width = width
        self.values = values  # (B * (4 + width),) int64 on the device, laid out as DecodeGraphs._host_values
        self.token_ids, self.positions, self.slots, self.lens, self.blocks = self.values.split([B] * 4 + [B * width])
        self.rows = torch.arange(B, dtype=torch.int64, device=values.device)  # every row's logits
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (B, vocab) float32, written by each replay


class DecodeGraphs:
    """Pads decode steps to captured shapes and replays them (see the module's docstring)."""

    def __init__(self, model: DecoderModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 null_block: int, max_batch: int, max_width: int, dtype: torch.dtype, device: torch.device,
                 capture: bool = True) -> None:
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.null_block = null_block
        self.batches = batch_buckets(max_batch)
        self.max_width = max_width
        self.dtype = dtype
        self.device = device
        self.capture = capture
        self.attention = PaddedDecode(block_size, dtype)  # decode attention of the padded steps
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None  # the graphs' shared memory pool (CUDA), from the first capture on

    def fits(self, num_decodes: int, width: int) -> bool:
        return 0 < num_decodes <= self.batches[-1] and width <= self.max_width

    def shape(self, num_decodes: int, width: int) -> tuple[int, int]:
        """The (batch, width) a step of ``num_decodes`` sequences with tables of ``width`` blocks runs as."""
        batch = next(b for b in self.batches if b >= num_decodes)
        return batch, width_bucket(width, self.max_width)

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """The logits (D, vocab) float32 of a decode step of D = len(inputs.token_ids) sequences."""
        D = len(inputs.token_ids)
        B, W = self.shape(D, inputs.width)
        graph = self._graphs.get((B, W))
        if graph is None:
            graph = self._new_graph(B, W)
        graph.values.copy_(self._host_values(inputs, B, W), non_blocking=True)
        if graph.graph is None:
            graph.logits = self._forward(graph)
        else:
            graph.graph.replay()
        return graph.logits[:D]

    def _host_values(self, inputs: DecodeInputs, B: int, W: int) -> torch.Tensor:
        """All of a step's inputs in one host tensor, in the order of _Graph.values' views (one copy to the device
        a step), its D rows padded to B with rows that decode token 0 into the null block."""
        pad = B - len(inputs.token_ids)
        return torch.tensor(
            inputs.token_ids + [0] * pad
            + inputs.positions + [0] * pad
            + inputs.slots + [self.null_block * self.block_size] * pad
            + inputs.context_lens + [1] * pad
            + inputs.padded_tables(W, self.null_block) + [self.null_block] * (pad * W),
            dtype=torch.int64,
        )

    def _forward(self, g: _Graph) -> torch.Tensor:
        # The decode attention's inputs (the padding mask) are computed from the lengths inside the graph.
        meta = AttentionMetadata(slot_mapping=g.slots, decode=self.attention.plan(g.blocks, g.lens, None))
        return self.model(g.token_ids, g.positions, self.kv_caches, meta, g.rows)

    def _new_graph(self, B: int, W: int) -> _Graph:
        # Padding rows only until a step writes them: the warm-up and the capture touch only the null block.
        g = _Graph(B, W, self._host_values(DecodeInputs([], [], [], [], []), B, W).to(self.device))
        if self.capture:
            self._capture(g)
        self._graphs[(B, W)] = g
        return g

    def _capture(self, g: _Graph) -> None:
        """Record the padded step of ``g``'s shape. Its inputs hold padding rows only (null block): the warm-up
        runs and the capture write nothing into any sequence's cache."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the main stream: lazy inits and autotuning happen here
            for _ in range(2):
                self._forward(g)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            g.logits = self._forward(g)
        if self._pool is None:
            self._pool = graph.pool()
        g.graph = graph
        log.info("captured a CUDA graph for decode steps of %d sequences x %d blocks (%d graphs)",
                 g.token_ids.shape[0], g.width, len(self._graphs) + 1)
