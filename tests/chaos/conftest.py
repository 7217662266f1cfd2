"""Chaos tests: real processes (``eoq serve``, the engine's child process, redis-server) killed, flooded and
raced, each bounded in time. What they share: finding the engine's process, and a real ``eoq serve``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2_grpc
from tests.api.client import SERVICE
from tests.conftest import _free_port, model_cache_dir

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def engine_children(pid: int | None = None) -> list[psutil.Process]:
    """The engine processes started by process ``pid`` (this one by default): multiprocessing's spawned children."""
    parent = psutil.Process(pid or os.getpid())
    return [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]


async def health_of(health: health_pb2_grpc.HealthStub) -> list[int]:
    """The status of the whole server and of the chat service."""
    return [(await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status for s in ("", SERVICE)]


async def wait_health(health: health_pb2_grpc.HealthStub, status: int, timeout: float) -> float:
    """Seconds until both health names report ``status``; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            if await health_of(health) == [status, status]:
                return loop.time() - start
        except grpc.aio.AioRpcError:
            pass
        if loop.time() - start > timeout:
            raise AssertionError(f"health not {status} within {timeout} s")
        await asyncio.sleep(0.02)


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    stub: chat_pb2_grpc.ChatServiceStub
    health: health_pb2_grpc.HealthStub

    def engine(self) -> psutil.Process:
        children = engine_children(self.proc.pid)
        assert len(children) == 1, f"engine processes of the server: {children}"
        return children[0]


@asynccontextmanager
async def eoq_serve(tmp_path: Path, *args: str, new_session: bool = False) -> AsyncIterator[ServeProcess]:
    """A real ``eoq serve`` on a free port, SERVING when the block starts; killed after it if still running."""
    port = _free_port()
    log_path = tmp_path / f"serve-{port}.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eoq.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--http-port", "0", "--kv-cache-memory-gb", "0.4",  # 8192 tokens in float32
            "--cache-dir", str(model_cache_dir()), *args,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session,
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            served = ServeProcess(proc, port, log_path, chat_pb2_grpc.ChatServiceStub(channel),
                                  health_pb2_grpc.HealthStub(channel))
            try:
                await wait_health(served.health, SERVING, 120)
            except AssertionError:
                raise AssertionError(f"eoq serve did not start: {log_path.read_text()[-3000:]}") from None
            yield served
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
