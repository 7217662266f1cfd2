"""Fixtures shared by every test layer.

``redis_server``: a real ``redis-server`` that the test controls (never a fake): started on a free port in a
temporary data dir, with an append-only file fsynced on every write, so ``stop()`` (SIGKILL, as a crash) then
``start()`` (same port, same data dir) brings back every acknowledged write; ``pause()``/``resume()`` freeze
it, for timeouts rather than refused connections. Service tests use it for "Redis
killed mid-conversation → UNAVAILABLE, restarted → works, history intact".
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A redis-server (or sentinel) process on 127.0.0.1 whose files and log are in ``data_dir``: what
    ``RedisServer`` and the deploy tests' ``RedisNode`` share. ``kill()`` SIGKILLs it, like a crash (nothing
    saved; it also ends a paused process); ``stop()`` kills it and forgets it. Both may be repeated."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        self._process = None

    def log_tail(self, lines: int) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RedisServer(RedisProcess):
    """One ``redis-server`` process on 127.0.0.1. ``start()`` waits until it answers PING (after replaying its
    append-only file); ``stop()`` kills it without a chance to save, like a crash. Both may be repeated."""

    def __init__(self, executable: str, data_dir: Path, port: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.executable = executable

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_seconds: float = 10.0) -> None:
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Empty config values must be one argv entry each: "--save ''" would be taken literally.
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_seconds
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited at start (port {self.port}):\n{self.log_tail(20)}"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:  # refused, or still loading the append-only file
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server not ready after {timeout_seconds}s:\n{self.log_tail(20)}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections still open, nothing answers, so clients time out."""
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause`` (SIGCONT). Commands sent meanwhile may still run now, as after a real stall."""
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain synchronous client, for tests that look at or plant keys directly."""
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)


@contextmanager
def running_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A started, controllable redis-server (see ``RedisServer``), killed when the block ends: for fixtures of
    any scope."""
    executable = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(executable).exists():
        pytest.fail(
            "redis-server not found: install it (apt-get install redis-server); these tests need a real one"
        )
    server = RedisServer(executable, data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def redis_fixture(scope: str, doc: str):
    """A fixture of ``scope`` (named by the attribute it is assigned to): a started, controllable redis-server
    (``running_redis``) in a fresh temporary dir, killed when the scope ends. ``doc`` is its docstring."""

    def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
        with running_redis(tmp_path_factory.mktemp("redis")) as server:
            yield server

    started.__doc__ = doc
    return pytest.fixture(scope=scope)(started)


redis_server = redis_fixture("function", "A fresh, controllable redis-server for this test; killed at the end.")


# --- the real default model ---------------------------------------------------------------------------------


def model_cache_dir() -> Path:
    """Where converted checkpoints are cached for the test run: the user's eoq cache, so a machine converts the
    default GGUF file once (about 20 s) across test runs and `eoq serve` starts."""
    from eoq.config import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def default_checkpoint():
    """The default model (SmolLM2-135M-Instruct) as a transformers-format checkpoint folder."""
    from eoq.engine.model.checkpoint import resolve_checkpoint

    return resolve_checkpoint("default", model_cache_dir())
