"""The engine core: ``step()`` is schedule -> run -> postprocess, nothing else.

Synchronous and single-threaded: the async front end (``async_engine``) drives it from its own thread or
process and is the only caller.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from eoq.engine.detokenizer import TextStream
from eoq.engine.runner import ModelRunner, SampledToken
from eoq.engine.scheduler import Scheduler, SchedulerOutput
from eoq.engine.sequence import Sequence, SequenceStatus
from eoq.engine.structured import GrammarCompiler, Matcher
from eoq.engine.types import (
    EngineRequest,
    EngineStepResult,
    FinishReason,
    RequestOutput,
    SchedulerStats,
)
from eoq.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Request:
    """A request's answers: the first is a sequence from the start; the other ``n - 1`` fork off it when its
    prompt has been computed. ``live``: the engine keys of its answers still running."""

    request: EngineRequest
    live: set[str] = field(default_factory=set)
    compiled: object | None = None  # the compiled grammar (structured output)
    compiling: concurrent.futures.Future | None = None
    compile_deadline: float = 0.0


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase,
                 eos_token_ids: frozenset[int], grammars: GrammarCompiler | None = None,
                 max_grammar_compile_seconds: float = 10.0) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids  # the model's end-of-answer tokens
        self.requests: dict[str, Sequence] = {}  # every live answer by its engine key (Sequence.request_id)
        self._groups: dict[str, _Request] = {}  # by request id
        self._compiling: dict[str, Sequence] = {}  # first answers waiting for their grammar, by request id
        self.grammars = grammars
        self.max_grammar_compile_seconds = max_grammar_compile_seconds
        self.num_failed_steps = 0  # model steps that failed one after another (0 after a good one)

    # --- requests in and out ---
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. It must already be validated (non-empty, fits the context window)."""
        if request.request_id in self._groups:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        group = _Request(request)
        seq = self._new_answer(group, 0)
        self._groups[request.request_id] = group
        constraint = request.sampling.constraint
        if constraint is None:
            self.scheduler.add(seq)
            return
        if self.grammars is None:
            raise InvalidArgument("this engine has no grammar compiler: structured output is off")
        seq.status = SequenceStatus.COMPILING  # scheduled once its grammar is compiled (off this thread)
        group.compiling = self.grammars.submit(constraint)
        group.compile_deadline = time.monotonic() + self.max_grammar_compile_seconds
        self._compiling[request.request_id] = seq

    def _new_answer(self, group: _Request, index: int) -> Sequence:
        request = group.request
        sp = request.sampling
        end_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_token_ids)
        text = TextStream(self.tokenizer, sp.stop, request.prompt_token_ids)
        seq = Sequence(request, text, end_ids, index)
        if group.compiled is not None:
            seq.matcher = Matcher(group.compiled, end_ids)
        self.requests[seq.request_id] = seq
        group.live.add(seq.request_id)
        return seq

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """End a request (all its answers) now; its blocks are free when this returns. Empty if it is unknown or
        already over."""
        group = self._groups.get(request_id)
        if group is None:
            return []
        return [self._finish(self.requests[key], FinishReason.CANCELLED) for key in sorted(group.live)]

    def request_ids(self) -> list[str]:
        """The requests not over yet."""
        return list(self._groups)

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._compiling)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedule the answers whose grammar has compiled; fail those whose grammar failed or ran out of time.
        With nothing else to do, waits a little for a compile (the loop would spin otherwise)."""
        if not self._compiling:
            return []
        if self.scheduler.num_unfinished == 0:
            futures = [self._groups[rid].compiling for rid in self._compiling]
            concurrent.futures.wait(futures, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        outputs = []
        now = time.monotonic()
        for rid, seq in list(self._compiling.items()):
            group = self._groups[rid]
            future = group.compiling
            if not future.done():
                if now > group.compile_deadline:
                    del self._compiling[rid]
                    outputs.append(self._finish(seq, FinishReason.CANCELLED, (
                        f"the {group.request.sampling.constraint.kind.value} constraint took over "
                        f"{self.max_grammar_compile_seconds:g} s to compile (--max-grammar-compile-seconds): "
                        "simplify it"), invalid=True))
                continue
            del self._compiling[rid]
            group.compiling = None
            try:
                group.compiled = future.result()
            except Exception as e:
                outputs.append(self._finish(seq, FinishReason.CANCELLED, str(e),
                                            invalid=isinstance(e, InvalidArgument)))
                continue
            seq.matcher = Matcher(group.compiled, seq.end_token_ids)
            self.scheduler.add(seq)
        return outputs

    def snapshot_stats(self) -> SchedulerStats:
        """The engine's state between steps (nothing computed): e.g. after aborts, so usage reads 0 again."""
        return SchedulerStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                              kv_cache_usage=self.scheduler.blocks.usage)

    # --- the step ---
    def step(self) -> EngineStepResult:
        t0 = time.monotonic()
        outputs: list[RequestOutput] = self._admit_compiled()
        sched = self.scheduler.schedule()
        sampled: list[SampledToken] = []
        if not sched.is_empty:
            try:
                sampled, prompt_logprobs = self.runner.execute(sched)
            except Exception as e:  # a failed step fails its requests; a run of them, the engine (async_engine)
                log.exception("engine step failed; failing its %d requests", sched.num_seqs)
                self.num_failed_steps += 1
                return EngineStepResult(outputs + self._fail(sched, e), self._stats(sched, 0))
            self.num_failed_steps = 0
            for seq, first, values in prompt_logprobs:
                if len(seq.prompt_logprobs) + 1 == first:  # in order (a recompute repeats none)
                    seq.prompt_logprobs.extend(values)
            self.scheduler.update_computed(sched)
            outputs += self._postprocess(sched, sampled, t0)
        return EngineStepResult(outputs, self._stats(sched, len(sampled)))

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """Answer ``index`` of ``parent``'s request, starting from its computed prompt (shared KV blocks)."""
        child = self._new_answer(self._groups[parent.output_id], index)
        child.timings.first_scheduled = parent.timings.first_scheduled
        copy = self.scheduler.fork(parent, child)
        if copy is not None:
            self.runner.copy_block(*copy)
        return child

    def _postprocess(self, sched: SchedulerOutput, sampled: list[SampledToken],
                     now: float) -> list[RequestOutput]:
        outputs = []
        for seq in [*sched.decodes, *(c.seq for c in sched.prefills)]:
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = now
        # Forks first: the new answers exist before any answer of theirs can finish (the request's last output).
        for i, st in enumerate(sampled):
            if st.fork:
                sampled[i] = SampledToken(self._fork(st.seq, st.fork), st.token_id, st.logprob)
        for seq, token, logprob, _ in sampled:
            seq.num_forks = 0
            if seq.timings.first_token is None:
                seq.timings.first_token = time.monotonic()
            seq.token_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            if seq.matcher is not None and not seq.matcher.accept(token):
                log.error("request %s: sampled token %d that its grammar does not allow", seq.request_id, token)
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
        out = RequestOutput(
            request_id=seq.output_id,
            token_ids=ids,
            text=text,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_completion_tokens=seq.num_output_tokens,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            index=seq.answer_index,
        )
        if seq.sampling.logprobs:
            out.logprobs, seq.logprobs[: len(ids)] = seq.logprobs[: len(ids)], []
        if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == seq.num_prompt_tokens - 1:
            out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # once, on the first output
        return out

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                invalid: bool = False) -> RequestOutput:
        self.scheduler.finish(seq)
        self.runner.release(seq.request_id)
        del self.requests[seq.request_id]
        group = self._groups[seq.output_id]
        group.live.discard(seq.request_id)
        self._compiling.pop(seq.output_id, None)
        seq.finish_reason = reason
        seq.timings.finished = time.monotonic()
        text, ids = seq.text.finish()
        out = self._output(seq, text, ids)
        out.finished = True
        out.finish_reason = reason
        out.timings = seq.timings
        out.error = error
        out.error_is_invalid_argument = invalid
        if not group.live:
            out.last = True
            del self._groups[seq.output_id]
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
