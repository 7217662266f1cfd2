"""The engine's asyncio front end: add a request, stream its outputs, abort it.

The engine core runs its loop on its own thread or in its own process (``engine_mode``), so the gRPC event
loop never waits on the model. Commands (add, abort, stop) go to the loop through a queue or a pipe; each step's
result comes back as one message, which ``_dispatch`` routes to the per-request asyncio queues on the event
loop. A stream that is closed before its last output (client cancel, deadline, shutdown) aborts its request:
the loop frees its KV blocks before the next step.

The engine is supervised. Its death — the process killed (the OOM killer), an exception escaping the loop,
``MAX_FAILED_STEPS`` failed steps in a row — is noticed at once (the pipe's end of file, the process sentinel, a
failed send); every running and waiting request then ends with ``EngineRestarted`` (UNAVAILABLE: retry), listeners
hear ``EngineState.RESTARTING`` (health NOT_SERVING), and a new engine is started with the same config, after a
backoff. ``EngineState.SERVING`` follows when it is ready; past ``max_restarts`` within
``restart_window_seconds`` the engine gives up (``EngineState.FAILED``, ``wait_failed`` returns) and the server
exits so that its orchestrator restarts it. Nothing on the event loop ever blocks on the pipe: a writer thread
sends the commands.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

from eoq.engine.backends import Abort, Add, ProcessBackend, ThreadBackend
from eoq.engine.types import EngineConfig, EngineRequest, EngineStepResult, ModelInfo, RequestOutput, SchedulerStats
from eoq.errors import InternalError, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class EngineFailed(InternalError):
    """The engine could not serve a request (a failed model step); maps to INTERNAL."""


class EngineRestarted(Unavailable):
    """The engine died while the request ran or waited; a new one is starting. Safe to retry."""


class Overloaded(ResourceExhausted):
    """No place for the request now (the server's or its tenant's limit); ``retry_after_seconds`` estimates when
    one frees up, from the queue and how long requests take."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EngineState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"  # the engine died; a new one is loading
    FAILED = "failed"  # too many restarts: the server should exit
    STOPPED = "stopped"  # shut down on purpose


class EngineObserver(Protocol):
    """Receives the engine's stats; the metrics module implements it."""

    def on_step(self, stats: SchedulerStats) -> None: ...

    def on_request_finished(self, output: RequestOutput, inter_token_seconds: list[float]) -> None: ...

    def on_engine_restart(self) -> None: ...

    def on_admission_rejected(self, reason: str) -> None: ...


def default_num_threads(mode: str) -> int:
    """All cores for an engine in its own process. On a thread, one core is left to the event loop: the loop
    and the engine share the GIL, and an OpenMP worker spinning while its master waits for the GIL wastes a
    core (measured through the server at 32 streams on 2 cores: 2 threads gave 433 tokens/s, 1 gave 460;
    the engine in its own process with 2 threads gave 731)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if mode == "process" else max(1, cores - 1)


# Waits before the first, second, ... restart of a dead engine (the last repeats).
RESTART_BACKOFF_SECONDS = (0.2, 1.0, 5.0)


class AsyncEngine:
    """Requests in, streams of ``RequestOutput`` out. All methods are called on the event loop.

    ``max_restarts`` deaths within ``restart_window_seconds`` are restarted from (see the module docstring); one
    more and the engine gives up. ``add_state_listener``'s listeners hear every ``EngineState`` change, on the
    event loop."""

    def __init__(self, cfg: EngineConfig, mode: str = "process", max_queue_size: int = 256,
                 observer: EngineObserver | None = None, max_restarts: int = 3,
                 restart_window_seconds: float = 600.0, max_requests_per_tenant: int | None = None) -> None:
        if cfg.num_threads is None:
            cfg = dataclasses.replace(cfg, num_threads=default_num_threads(mode))
        self.cfg = cfg
        self.mode = mode
        self.max_queue_size = max_queue_size
        self.observer = observer
        self.max_restarts = max_restarts
        # Running + waiting requests of one tenant (None: only the server's limit), so one cannot take every place.
        self.max_requests_per_tenant = max_requests_per_tenant
        self._admitted: collections.Counter[str] = collections.Counter()  # tenant -> requests holding a place
        self._mean_request_seconds = 1.0  # a moving average of finished requests' durations (retry estimates)
        self.restart_window_seconds = restart_window_seconds
        self.info: ModelInfo | None = None
        self.state = EngineState.STARTING
        self.num_restarts = 0
        self._listeners: list[Callable[[EngineState], None]] = []
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backend: ThreadBackend | ProcessBackend | None = None
        self._generation = 0  # of the backend: results of an older (dead) one are dropped
        self._deaths: collections.deque[float] = collections.deque()
        self._restarter: asyncio.Task | None = None
        self._failed = asyncio.Event()
        self._ids = itertools.count()
        self.last_stats = SchedulerStats()

    async def start(self) -> ModelInfo:
        """Load the model (in the engine thread's or process's context) and start the loop. Raises
        ``ConfigError`` when the engine cannot start (a process that dies while loading included)."""
        self._loop = asyncio.get_running_loop()
        self._backend, self.info = await self._start_backend()
        self._set_state(EngineState.SERVING)
        return self.info

    async def _start_backend(self) -> tuple[ThreadBackend | ProcessBackend, ModelInfo]:
        self._generation += 1
        backend_cls = ProcessBackend if self.mode == "process" else ThreadBackend
        backend = backend_cls(self.cfg, functools.partial(self._from_engine, self._generation))
        info = await asyncio.to_thread(backend.start)
        return backend, info

    def add_state_listener(self, listener: Callable[[EngineState], None]) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: EngineState) -> None:
        if state is self.state:
            return
        self.state = state
        for listener in self._listeners:
            listener(state)

    @property
    def serving(self) -> bool:
        return self.state is EngineState.SERVING

    async def wait_failed(self) -> None:
        """Returns once the engine has given up restarting (``EngineState.FAILED``)."""
        await self._failed.wait()

    @property
    def engine_pid(self) -> int | None:
        """The engine process's pid (process mode), for operators and tests."""
        return getattr(self._backend, "pid", None)

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

    @property
    def capacity(self) -> int:
        """Requests that may run or wait at once (the batch and the queue)."""
        return self.cfg.max_num_seqs + self.max_queue_size

    def retry_after_seconds(self) -> float:
        """When a place is likely to free up: the requests ahead of a new one, each batch place turning over
        once per average request duration."""
        ahead = max(0, self._admitted.total() - self.cfg.max_num_seqs) + 1
        return min(30.0, max(0.05, self._mean_request_seconds * ahead / self.cfg.max_num_seqs))

    def check_admission(self, tenant: str = "") -> None:
        """Raise ``Unavailable`` while the engine is not serving, ``Overloaded`` (RESOURCE_EXHAUSTED) when the
        server or ``tenant`` has no place left. Costs no tokenization and no store work: call it first."""
        self._check_serving()
        admitted = self._admitted.total()
        if admitted >= self.capacity:
            self._rejected("server_full")
            raise Overloaded(f"the server is full: {admitted} requests running or waiting (limit "
                             f"{self.capacity}); retry later", self.retry_after_seconds())
        limit = self.max_requests_per_tenant
        if limit is not None and self._admitted[tenant] >= limit:
            self._rejected("tenant_limit")
            raise Overloaded(f"too many requests of this tenant at once: {self._admitted[tenant]} running or waiting "
                             f"(limit {limit} per tenant); retry later", self.retry_after_seconds())

    def _check_serving(self) -> None:
        if self.state is not EngineState.SERVING or self._backend is None:
            raise Unavailable(f"the engine is {self.state.value}; retry shortly")

    def _rejected(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.on_admission_rejected(reason)

    @contextlib.contextmanager
    def admission(self, tenant: str = "") -> Iterator[None]:
        """Hold one of the server's places (and one of ``tenant``'s) for the block: taken before any work on the
        request (tokenization, the store), so a burst is refused at once instead of piling up behind it.
        ``generate`` inside the block uses this place; outside one it takes its own."""
        self.check_admission(tenant)
        self._admitted[tenant] += 1
        try:
            yield
        finally:
            self._admitted[tenant] -= 1
            if not self._admitted[tenant]:
                del self._admitted[tenant]

    async def generate(self, request: EngineRequest, admitted: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (of all its ``n`` answers: ``RequestOutput.index``); each answer's last
        has ``finished=True``, the request's last ``last=True``. Closing the stream early aborts it.
        ``admitted``: the caller holds an ``admission`` for it (else the request takes one, for its tenant, the
        cache salt). Raises ``EngineRestarted`` if the engine dies meanwhile."""
        if not admitted:
            with self.admission(request.cache_salt):
                async with contextlib.aclosing(self.generate(request, admitted=True)) as stream:
                    async for out in stream:
                        yield out
            return
        self._check_serving()  # again: the engine may have died since the caller's admission
        self.check_request(len(request.prompt_token_ids), request.sampling.max_tokens)
        assert self.info is not None
        vocab = self.info.vocab_size
        if request.prompt_token_ids and not 0 <= min(request.prompt_token_ids) <= max(request.prompt_token_ids) < vocab:
            raise InvalidArgument(f"the prompt holds token ids outside this model's vocabulary (0..{vocab - 1})")
        named = request.sampling.token_ids_named()
        if named and max(named) >= vocab:
            raise InvalidArgument(f"logit_bias / stop_token_ids name token {max(named)}, outside this model's "
                                  f"vocabulary (0..{vocab - 1})")
        if request.request_id in self._streams:
            raise InvalidArgument(f"duplicate request id {request.request_id!r}")
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        q: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request.request_id] = q
        backend = self._backend
        backend.send(Add(request))
        finished = False
        itl: list[float] = []
        last = None
        try:
            while True:
                out = await q.get()
                if isinstance(out, Exception):
                    finished = True  # nothing to abort: that engine is gone
                    raise out
                now = time.monotonic()
                if last is not None and out.token_ids:
                    itl.append(now - last)
                if out.token_ids:
                    last = now
                if out.finished:  # one answer (of n) is over; the request is when ``last`` says so
                    finished = out.last
                    if out.timings is not None and out.timings.finished is not None:
                        self._mean_request_seconds += 0.1 * (out.timings.total_seconds - self._mean_request_seconds)
                    if self.observer is not None and out.last:
                        self.observer.on_request_finished(out, itl)
                    if out.error:
                        if not finished:
                            self._backend.send(Abort(request.request_id))  # its other answers too
                            finished = True
                        raise InvalidArgument(out.error) if out.error_is_invalid_argument else EngineFailed(out.error)
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished and backend is self._backend and self.serving:
                backend.send(Abort(request.request_id))

    def abort(self, request_id: str) -> None:
        """End a request now: its stream gets a last output with finish reason CANCELLED."""
        if self._backend is not None and request_id in self._streams and self.serving:
            self._backend.send(Abort(request_id))

    def abort_all(self) -> int:
        """Abort every running or waiting request (e.g. a drain's grace period is over); returns how many."""
        ids = list(self._streams)
        for rid in ids:
            self.abort(rid)
        return len(ids)

    def _from_engine(self, generation: int, result: EngineStepResult | None) -> None:
        """Called on the engine thread / reader thread: hop onto the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, generation, result)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _dispatch(self, generation: int, result: EngineStepResult | None) -> None:
        if generation != self._generation:
            return  # from an engine that has been replaced
        if result is None:
            self._on_death()
            return
        for out in result.outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if result.stats is not None:
            self.last_stats = result.stats
            if self.observer is not None:
                self.observer.on_step(result.stats)

    def _on_death(self) -> None:
        """The engine died: fail every request it held (retry-safe), and restart it (or give up)."""
        if self.state in (EngineState.STOPPED, EngineState.FAILED, EngineState.RESTARTING):
            return
        for q in self._streams.values():
            q.put_nowait(EngineRestarted("the engine restarted; retry"))
        self._streams.clear()
        self.last_stats = SchedulerStats()
        if not self._count_death():
            return
        self._set_state(EngineState.RESTARTING)
        self._restarter = asyncio.get_running_loop().create_task(self._restart())

    def _count_death(self) -> bool:
        """Count a death (a failed restart counts as one) in the window; give up past the budget. Returns whether
        another start is allowed."""
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.restart_window_seconds:
            self._deaths.popleft()
        if len(self._deaths) <= self.max_restarts:
            return True
        log.error("the engine died %d times in %.0f s (limit %d restarts): giving up", len(self._deaths),
                  self.restart_window_seconds, self.max_restarts)
        self._set_state(EngineState.FAILED)
        self._failed.set()
        return False

    async def _restart(self) -> None:
        old = self._backend
        if old is not None:
            await asyncio.to_thread(old.stop, 1.0)  # whatever is left of it (kills a hung process)
        while True:
            attempt = len(self._deaths)  # this window's deaths: the n-th restart waits the n-th backoff
            delay = RESTART_BACKOFF_SECONDS[min(attempt, len(RESTART_BACKOFF_SECONDS)) - 1]
            log.warning("restarting the engine in %.1f s (restart %d of at most %d in %.0f s)", delay, attempt,
                        self.max_restarts, self.restart_window_seconds)
            await asyncio.sleep(delay)
            if self.state is not EngineState.RESTARTING:
                return  # shut down meanwhile
            t0 = time.monotonic()
            try:
                backend, info = await self._start_backend()
            except Exception as e:  # ConfigError from a failed load, or anything else: another attempt, or give up
                log.error("the engine failed to restart: %s", e)
                if not self._count_death():
                    return
                continue
            if self.state is not EngineState.RESTARTING:
                await asyncio.to_thread(backend.stop, 5.0)
                return
            self._backend, self.info = backend, info
            self.num_restarts += 1
            if self.observer is not None:
                self.observer.on_engine_restart()
            log.warning("the engine is back after %.1f s of loading (restart %d)", time.monotonic() - t0,
                        self.num_restarts)
            self._set_state(EngineState.SERVING)
            return

    async def shutdown(self, timeout: float = 10.0) -> None:
        self._set_state(EngineState.STOPPED)
        if self._restarter is not None and not self._restarter.done():
            self._restarter.cancel()
        if self._backend is not None:
            await asyncio.to_thread(self._backend.stop, timeout)
        for q in self._streams.values():
            q.put_nowait(Unavailable("the engine stopped"))
