"""deploy/healthcheck.py (the image's HEALTHCHECK) against a real gRPC health service on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .files import DEPLOY

SCRIPT = DEPLOY / "healthcheck.py"
SERVICE = "chat.v1.ChatService"


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


def run_check(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EOQ_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, check=False, capture_output=True, text=True, timeout=30
    )


def test_serving_exits_zero(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    result = run_check(port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout


def test_not_serving_while_draining_exits_one(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_check(port)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stdout
    # The server as a whole can be asked for explicitly.
    assert run_check(port, f"127.0.0.1:{port}", "").returncode == 0


def test_unknown_service_before_the_model_loads_exits_one(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, _ = health_server
    result = run_check(port)
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stdout


def test_nothing_listening_exits_one() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port was free a moment ago and nothing of ours listens on it now.
    result = run_check(port)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout or "DEADLINE_EXCEEDED" in result.stdout
