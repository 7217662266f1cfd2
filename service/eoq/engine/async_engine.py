"""The engine's asyncio front end: add a request, stream its outputs, abort it.

The engine core runs its loop on its own thread or in its own process (``engine_mode``), so the gRPC event
loop never waits on the model. Commands (add, abort, stop) go to the loop through a queue or a pipe; each step's
result comes back as one message, which ``_dispatch`` routes to the per-request asyncio queues on the event
loop. A stream that is closed before its last output (client cancel, deadline, shutdown) aborts its request:
the loop frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from eoq.engine.types import EngineConfig, EngineRequest, EngineStepResult, ModelInfo, RequestOutput, SchedulerStats
from eoq.errors import InternalError, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class EngineFailed(InternalError):
    """The engine could not serve a request (a failed model step); maps to INTERNAL."""


class EngineObserver(Protocol):
    """Receives the engine's stats; the metrics module implements it."""

    def on_step(self, stats: SchedulerStats) -> None: ...

    def on_request_finished(self, output: RequestOutput, inter_token_seconds: list[float]) -> None: ...


# --- commands to the engine loop ---
@dataclass(slots=True)
class _Add:
    request: EngineRequest


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Stop:
    pass


@dataclass(slots=True)
class _AddEndTokens:
    token_ids: tuple[int, ...]


def run_engine_loop(core, receive: Callable[[bool], list], emit: Callable[[EngineStepResult], None]) -> None:
    """The loop the engine thread/process runs: apply commands, step while there is work, emit results.

    ``receive(block)`` returns the pending commands, waiting for one if ``block``."""
    while True:
        commands = receive(not core.has_work())
        aborted = []
        for cmd in commands:
            if isinstance(cmd, _Stop):
                for rid in list(core.requests):
                    out = core.abort_request(rid)
                    if out is not None:
                        aborted.append(out)
                if aborted:
                    emit(EngineStepResult(aborted, core.snapshot_stats()))
                return
            if isinstance(cmd, _Add):
                try:
                    core.add_request(cmd.request)
                except Exception as e:  # never lose a request silently
                    log.exception("could not add request %s", cmd.request.request_id)
                    aborted.append(RequestOutput(cmd.request.request_id, [], "", finished=True, error=str(e)))
            elif isinstance(cmd, _Abort):
                out = core.abort_request(cmd.request_id)
                if out is not None:
                    aborted.append(out)
            elif isinstance(cmd, _AddEndTokens):
                core.eos_token_ids = core.eos_token_ids | frozenset(cmd.token_ids)
        if aborted:
            emit(EngineStepResult(aborted, core.snapshot_stats()))
        if core.has_work():
            emit(core.step())


class _ThreadBackend:
    def __init__(self, cfg: EngineConfig, on_result: Callable[[EngineStepResult], None]) -> None:
        self._cfg = cfg
        self._on_result = on_result
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.core = None

    def start(self) -> ModelInfo:
        from eoq.engine.builder import build_engine_core  # torch and the model: only where the engine runs

        self.core, info = build_engine_core(self._cfg)
        self._thread = threading.Thread(target=self._run, name="eoq-engine", daemon=True)
        self._thread.start()
        return info

    def _receive(self, block: bool) -> list:
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        try:
            run_engine_loop(self.core, self._receive, self._on_result)
        except Exception:
            log.exception("engine loop died")
            self._on_result(None)

    def send(self, cmd) -> None:
        self._inbox.put(cmd)

    def stop(self, timeout: float) -> None:
        self.send(_Stop())
        if self._thread is not None:
            self._thread.join(timeout)


def _engine_process_main(cfg: EngineConfig, commands, results) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
    try:
        from eoq.engine.builder import build_engine_core

        core, info = build_engine_core(cfg)
    except Exception as e:
        results.send(("error", f"{type(e).__name__}: {e}"))
        return
    results.send(("ready", info))

    def receive(block: bool) -> list:
        items = []
        if block:
            commands.poll(None)
        while commands.poll(0):
            items.append(commands.recv())
        return items

    run_engine_loop(core, receive, lambda r: results.send(("step", r)))
    results.send(("stopped", None))


class _ProcessBackend:
    def __init__(self, cfg: EngineConfig, on_result: Callable[[EngineStepResult | None], None]) -> None:
        ctx = mp.get_context("spawn")
        self._cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._res_recv, self._res_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_process_main, args=(cfg, self._cmd_recv, self._res_send),
                                 name="eoq-engine", daemon=True)
        self._on_result = on_result
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.core = None  # lives in the other process

    def start(self) -> ModelInfo:
        self._proc.start()
        kind, payload = self._res_recv.recv()
        if kind != "ready":
            self._proc.join(5)
            from eoq.errors import ConfigError

            raise ConfigError(f"the engine process failed to start: {payload}")
        self._reader = threading.Thread(target=self._read, name="eoq-engine-reader", daemon=True)
        self._reader.start()
        return payload

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._res_recv.recv()
            except (EOFError, OSError):
                kind, payload = "died", None
            if kind == "step":
                self._on_result(payload)
                continue
            if kind == "died":
                log.error("the engine process exited unexpectedly (exit code %s)", self._proc.exitcode)
                self._on_result(None)
            return

    def send(self, cmd) -> None:
        with self._send_lock:
            self._cmd_send.send(cmd)

    def stop(self, timeout: float) -> None:
        try:
            self.send(_Stop())
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()


def default_num_threads(mode: str) -> int:
    """All cores for an engine in its own process. On a thread, one core is left to the event loop: the loop
    and the engine share the GIL, and an OpenMP worker spinning while its master waits for the GIL wastes a
    core (measured through the server at 32 streams on 2 cores: 2 threads gave 433 tokens/s, 1 gave 460;
    the engine in its own process with 2 threads gave 731)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if mode == "process" else max(1, cores - 1)


class AsyncEngine:
    """Requests in, streams of ``RequestOutput`` out. All methods are called on the event loop."""

    def __init__(self, cfg: EngineConfig, mode: str = "process", max_queue_size: int = 256,
                 observer: EngineObserver | None = None) -> None:
        if cfg.num_threads is None:
            cfg = dataclasses.replace(cfg, num_threads=default_num_threads(mode))
        self.cfg = cfg
        self.mode = mode
        self.max_queue_size = max_queue_size
        self.observer = observer
        self.info: ModelInfo | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backend: _ThreadBackend | _ProcessBackend | None = None
        self._ids = itertools.count()
        self._dead = False
        self.last_stats = SchedulerStats()

    async def start(self) -> ModelInfo:
        """Load the model (in the engine thread's or process's context) and start the loop."""
        self._loop = asyncio.get_running_loop()
        backend_cls = _ProcessBackend if self.mode == "process" else _ThreadBackend
        self._backend = backend_cls(self.cfg, self._from_engine)
        self.info = await asyncio.to_thread(self._backend.start)
        return self.info

    @property
    def core(self):
        """The engine core when it runs in this process (thread mode), for tests and introspection."""
        return self._backend.core if self._backend else None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ``InvalidArgument`` if a prompt of this length and this many new tokens exceed the context."""
        assert self.info is not None
        ctx = self.info.context_length
        if prompt_len == 0:
            raise InvalidArgument("the prompt is empty")
        if prompt_len + max_tokens > ctx:
            raise InvalidArgument(
                f"the prompt is {prompt_len} tokens; with max_tokens {max_tokens} it needs {prompt_len + max_tokens}, "
                f"beyond the context window of {ctx} tokens (shorten the prompt or lower max_tokens)"
            )

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has ``finished=True``. Closing the stream early aborts it."""
        if self._dead or self._backend is None:
            raise Unavailable("the engine is not running")
        self.check_request(len(request.prompt_token_ids), request.sampling.max_tokens)
        capacity = self.cfg.max_num_seqs + self.max_queue_size
        if len(self._streams) >= capacity:
            raise ResourceExhausted(
                f"the server is full: {len(self._streams)} requests running or waiting (limit {capacity}); retry later"
            )
        if request.request_id in self._streams:
            raise InvalidArgument(f"duplicate request id {request.request_id!r}")
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request.request_id] = q
        self._backend.send(_Add(request))
        finished = False
        itl: list[float] = []
        last = None
        try:
            while True:
                out = await q.get()
                now = time.monotonic()
                if last is not None and out.token_ids:
                    itl.append(now - last)
                if out.token_ids:
                    last = now
                if out.finished:
                    finished = True
                    if self.observer is not None:
                        self.observer.on_request_finished(out, itl)
                    if out.error:
                        raise EngineFailed(out.error)
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished and not self._dead:
                self._backend.send(_Abort(request.request_id))

    def add_end_tokens(self, token_ids: tuple[int, ...]) -> None:
        """More tokens that end an answer (e.g. the chat template's end-of-turn), for requests added from now on.

        Lets the server start the engine before its tokenizer and chat template are loaded."""
        if self._backend is None or self.info is None:
            raise RuntimeError("start the engine first")
        self._backend.send(_AddEndTokens(tuple(token_ids)))
        self.info = dataclasses.replace(self.info, eos_token_ids=tuple(sorted({*self.info.eos_token_ids, *token_ids})))

    def abort(self, request_id: str) -> None:
        """End a request now: its stream gets a last output with finish reason CANCELLED."""
        if self._backend is not None and request_id in self._streams:
            self._backend.send(_Abort(request_id))

    def abort_all(self) -> int:
        """Abort every running or waiting request (e.g. a drain's grace period is over); returns how many."""
        ids = list(self._streams)
        for rid in ids:
            self.abort(rid)
        return len(ids)

    def _from_engine(self, result: EngineStepResult | None) -> None:
        """Called on the engine thread / reader thread: hop onto the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, result)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _dispatch(self, result: EngineStepResult | None) -> None:
        if result is None:  # the engine loop died: fail everyone, refuse new work
            self._dead = True
            for rid, q in self._streams.items():
                q.put_nowait(RequestOutput(rid, [], "", finished=True, error="the engine stopped"))
            return
        for out in result.outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if result.stats is not None:
            self.last_stats = result.stats
            if self.observer is not None:
                self.observer.on_step(result.stats)

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self._backend is not None:
            await asyncio.to_thread(self._backend.stop, timeout)
            self._dead = True
