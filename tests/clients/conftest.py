"""An eoq server with the real default model, in this process on a free port, for the sample clients' tests.

It runs on its own event loop in a background thread, so the tests can drive the clients synchronously: as a
subprocess (`.venv/bin/eoq chat ...`) or through ``eoq.cli.main([...])`` (whose ``eoq bench`` runs its own loop).
The conversations are kept in the in-process store.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

EOQ = Path(sys.executable).with_name("eoq")  # the console script next to this interpreter


class ServerThread:
    """``start_server`` on a private event loop in a daemon thread; ``stop`` drains it and ends the loop."""

    def __init__(self, **settings: object) -> None:
        self.settings = settings  # on top of an in-process server's (127.0.0.1, a free port, no metrics port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="eoq-test-server", daemon=True)
        self.running = None

    def start(self, timeout: float = 300.0) -> None:
        from eoq.api.server import start_server
        from eoq.config import load_settings
        from tests.conftest import model_cache_dir

        self.thread.start()
        settings = load_settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0,
                                    "cache_dir": model_cache_dir(), **self.settings})
        self.running = asyncio.run_coroutine_threadsafe(start_server(settings), self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        try:
            if self.running is not None:
                asyncio.run_coroutine_threadsafe(self.running.drain_and_stop(0), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="session")
def eoq_server() -> Iterator[ServerThread]:
    server = ServerThread()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_eoq(*args: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``eoq ARGS`` as a subprocess; a wide terminal so rich does not wrap the lines the tests read."""
    return subprocess.run([str(EOQ), *args], check=False, input=input, capture_output=True, text=True, timeout=timeout,
                          env={**_env(), "COLUMNS": "200"})


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("EOQ_")}
