"""The engine core: ``step()`` is schedule -> run -> postprocess, nothing else.

Synchronous and single-threaded: the async front end (``async_engine``) drives it from its own thread or
process and is the only caller.
"""

from __future__ import annotations

import logging
import time

from transformers import PreTrainedTokenizerBase

from eoq.engine.detokenizer import TextStream
from eoq.engine.runner import ModelRunner, SampledToken
from eoq.engine.scheduler import Scheduler, SchedulerOutput
from eoq.engine.sequence import Sequence
from eoq.engine.types import (
    EngineRequest,
    EngineStepResult,
    FinishReason,
    RequestOutput,
    SchedulerStats,
)

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase,
                 eos_token_ids: frozenset[int]) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids  # the model's end-of-answer tokens
        self.requests: dict[str, Sequence] = {}
        self.num_failed_steps = 0  # model steps that failed one after another (0 after a good one)

    # --- requests in and out ---
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. It must already be validated (non-empty, fits the context window)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        sp = request.sampling
        end_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_token_ids)
        text = TextStream(self.tokenizer, sp.stop, request.prompt_token_ids)
        seq = Sequence(request, text, end_ids)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now; its blocks are free when this returns. None if it is unknown or already over."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.CANCELLED)

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def snapshot_stats(self) -> SchedulerStats:
        """The engine's state between steps (nothing computed): e.g. after aborts, so usage reads 0 again."""
        return SchedulerStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                              kv_cache_usage=self.scheduler.blocks.usage)

    # --- the step ---
    def step(self) -> EngineStepResult:
        t0 = time.monotonic()
        sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        sampled: list[SampledToken] = []
        if not sched.is_empty:
            try:
                sampled = self.runner.execute(sched)
            except Exception as e:  # a failed step fails its requests; a run of them, the engine (async_engine)
                log.exception("engine step failed; failing its %d requests", sched.num_seqs)
                self.num_failed_steps += 1
                return EngineStepResult(self._fail(sched, e), self._stats(sched, 0))
            self.num_failed_steps = 0
            self.scheduler.update_computed(sched)
            outputs = self._postprocess(sched, sampled, t0)
        return EngineStepResult(outputs, self._stats(sched, len(sampled)))

    def _postprocess(self, sched: SchedulerOutput, sampled: list[SampledToken],
                     now: float) -> list[RequestOutput]:
        outputs = []
        for seq in [*sched.decodes, *(c.seq for c in sched.prefills)]:
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = now
        for seq, token in sampled:
            if seq.timings.first_token is None:
                seq.timings.first_token = time.monotonic()
            seq.token_ids.append(token)
            reason = None
            if token in seq.end_token_ids:
                seq.text.push_silent(token)  # never detokenized: it ends the answer
                reason = FinishReason.STOP
            elif seq.text.push(token):
                reason = FinishReason.STOP
            elif seq.num_output_tokens >= seq.sampling.max_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                outputs.append(self._finish(seq, reason))
                continue
            text, ids = seq.text.take()
            if text or ids:
                outputs.append(self._output(seq, text, ids))
        return outputs

    def _output(self, seq: Sequence, text: str, ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=ids,
            text=text,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_completion_tokens=seq.num_output_tokens,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
        )

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        self.scheduler.finish(seq)
        self.runner.release(seq.request_id)
        del self.requests[seq.request_id]
        seq.finish_reason = reason
        seq.timings.finished = time.monotonic()
        text, ids = seq.text.finish()
        out = self._output(seq, text, ids)
        out.finished = True
        out.finish_reason = reason
        out.timings = seq.timings
        out.error = error
        return out

    def _fail(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        seqs = list(sched.decodes) + [c.seq for c in sched.prefills]
        return [self._finish(s, FinishReason.CANCELLED, f"engine error: {error}") for s in seqs]

    def _stats(self, sched: SchedulerOutput, num_sampled: int) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.scheduler.blocks.usage,
            num_batched_seqs=sched.num_seqs,
            num_batched_tokens=sched.num_tokens,
            num_preemptions=len(sched.preempted),
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            num_prompt_tokens=sched.num_prompt_tokens,
            num_generated_tokens=num_sampled,
        )
