"""Where the engine loop runs: on a thread of the server's process, or in a child process of its own.

Both backends run ``run_engine_loop`` over an ``EngineCore``: commands (add, abort, stop) come in through a queue
(thread) or a pipe (process), each step's result goes out through ``on_result``, and ``on_result(None)`` says the
engine died. The process backend keeps only its own ends of the two pipes, so the child's death is an end of file
for its reader thread, and sends through a writer thread, so a full or broken pipe never blocks its caller.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from eoq.engine.types import EngineConfig, EngineRequest, EngineStepResult, ModelInfo, RequestOutput
from eoq.errors import InvalidArgument

log = logging.getLogger(__name__)


# Steps that fail one after another before the engine is taken for broken and restarted (a failed step fails only
# its own requests; a run of them means the engine's state is bad, e.g. a device error).
MAX_FAILED_STEPS = 3


class EngineUnhealthy(RuntimeError):
    """Raised out of the engine loop: its core cannot go on (``MAX_FAILED_STEPS``)."""


# --- commands to the engine loop ---
@dataclass(slots=True)
class Add:
    request: EngineRequest


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Stop:
    pass


def run_engine_loop(core, receive: Callable[[bool], list], emit: Callable[[EngineStepResult], None]) -> None:
    """The loop the engine thread/process runs: apply commands, step while there is work, emit results.

    ``receive(block)`` returns the pending commands, waiting for one if ``block``."""
    while True:
        commands = receive(not core.has_work())
        aborted = []
        for cmd in commands:
            if isinstance(cmd, Stop):
                for rid in core.request_ids():
                    aborted += core.abort_request(rid)
                if aborted:
                    emit(EngineStepResult(aborted, core.snapshot_stats()))
                return
            if isinstance(cmd, Add):
                try:
                    core.add_request(cmd.request)
                except Exception as e:  # never lose a request silently
                    log.exception("could not add request %s", cmd.request.request_id)
                    aborted.append(RequestOutput(cmd.request.request_id, [], "", finished=True, error=str(e),
                                                 error_is_invalid_argument=isinstance(e, InvalidArgument),
                                                 last=True))
            elif isinstance(cmd, Abort):
                aborted += core.abort_request(cmd.request_id)
        if aborted:
            emit(EngineStepResult(aborted, core.snapshot_stats()))
        if core.has_work():
            emit(core.step())
            if core.num_failed_steps >= MAX_FAILED_STEPS:
                raise EngineUnhealthy(f"{core.num_failed_steps} engine steps failed in a row")


class ThreadBackend:
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
            log.exception("the engine loop died")
            self._on_result(None)

    def send(self, cmd) -> None:
        self._inbox.put(cmd)

    def stop(self, timeout: float) -> None:
        self.send(Stop())
        if self._thread is not None:
            self._thread.join(timeout)


def _engine_process_main(cfg: EngineConfig, commands, results) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server drains on it and then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while it started us
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
        try:
            if block:
                commands.poll(None)
            while commands.poll(0):
                items.append(commands.recv())
        except (EOFError, OSError):  # the server is gone (killed): nobody is left to answer
            items.append(Stop())
        return items

    try:
        run_engine_loop(core, receive, lambda r: results.send(("step", r)))
    except EngineUnhealthy as e:
        log.error("%s: exiting for a restart", e)
        os._exit(3)
    results.send(("stopped", None))


class ProcessBackend:
    """The engine in a child process (spawned: no inherited torch state). The parent keeps only its own ends of the
    two pipes, so the child's death is an end of file for the reader thread; commands go out through a writer
    thread, so a full or broken pipe never blocks the caller."""

    def __init__(self, cfg: EngineConfig, on_result: Callable[[EngineStepResult | None], None]) -> None:
        ctx = mp.get_context("spawn")
        self._cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._res_recv, self._res_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_process_main, args=(cfg, self._cmd_recv, self._res_send),
                                 name="eoq-engine", daemon=True)
        self._on_result = on_result
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._died = threading.Event()  # reported once, by whichever thread notices first
        self.core = None  # lives in the other process

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self) -> ModelInfo:
        from eoq.errors import ConfigError

        # The child must not take the terminal's Ctrl-C before it can ignore it: it inherits this thread's mask.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._cmd_recv.close()  # the child's ends: without closing them here, its death is never an EOF
        self._res_send.close()
        ready = mpc.wait([self._res_recv, self._proc.sentinel])
        message = None
        if self._res_recv in ready:
            try:
                message = self._res_recv.recv()
            except (EOFError, OSError):
                message = None
        if message is None or message[0] != "ready":
            self._proc.join(5)
            why = message[1] if message else f"it exited while loading (exit code {self._proc.exitcode})"
            self._close()
            raise ConfigError(f"the engine process failed to start: {why}")
        self._reader = threading.Thread(target=self._read, name="eoq-engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="eoq-engine-writer", daemon=True)
        self._reader.start()
        self._writer.start()
        return message[1]

    def _report_death(self, why: str) -> None:
        if self._died.is_set():
            return
        self._died.set()
        self._proc.join(1.0)
        log.error("the engine process %s (exit code %s)", why, self._proc.exitcode)
        self._on_result(None)

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._res_recv.recv()
            except (EOFError, OSError):
                self._report_death("exited unexpectedly")
                return
            if kind == "step":
                self._on_result(payload)
            else:  # "stopped": a shutdown asked for
                return

    def _write(self) -> None:
        while True:
            cmd = self._outbox.get()
            if cmd is None:
                return
            try:
                self._cmd_send.send(cmd)
            except (OSError, ValueError):  # broken pipe, or closed: the child is gone
                self._report_death("stopped taking commands")
                return

    def send(self, cmd) -> None:
        self._outbox.put(cmd)

    def stop(self, timeout: float) -> None:
        self._died.set()  # from here on, an exit is expected: not a death to report
        self.send(Stop())
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._outbox.put(None)
        self._close()

    def _close(self) -> None:
        for conn in (self._cmd_send, self._res_recv):
            try:
                conn.close()
            except OSError:
                pass
