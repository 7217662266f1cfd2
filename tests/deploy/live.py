"""Real processes for the live deploy tests: ``eoq serve`` and Prometheus on free loopback ports.

Each runs in its own process group with its output in a log file; ``stop()`` ends the whole group (SIGTERM, then
SIGKILL), and the tests' fixtures always call it, also when a test fails. A thin synchronous gRPC client reads
streamed answers to their end. Nothing here is faked: the server loads the real default model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from tests.conftest import _free_port, model_cache_dir

SERVICE = "chat.v1.ChatService"
START_TIMEOUT_SECONDS = 180.0  # model load on a busy 2-core machine, several processes starting at once
CALL_TIMEOUT_SECONDS = 120.0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class GroupProcess:
    """A command in a new session (its own process group), output to ``log_path``."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"already started: {self.argv[0]}")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    @property
    def exited(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the group, SIGKILL if it is still there after ``timeout``. Safe to repeat."""
        if self._process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self._process.pid, sig)
            except ProcessLookupError:  # the group is gone already
                break
            try:
                self._process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # A SIGKILLed leader may leave children; the group signal above reached them too.
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class EoqServer:
    """``eoq serve`` on 127.0.0.1 with free gRPC and metrics ports, the real default model, a small KV cache."""

    def __init__(
        self,
        log_dir: Path,
        name: str,
        *,
        redis_url: str | None = None,
        api_keys: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = _free_port()
        self.metrics_port = _free_port()
        argv = [
            sys.executable, "-m", "eoq.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--cache-dir", str(model_cache_dir()), "--kv-cache-memory-gb", "0.5", "--grace-period-seconds", "5",
            "--http-port", "0",
        ]  # fmt: skip
        if redis_url is not None:
            argv += ["--redis-url", redis_url]
        if api_keys is not None:
            argv += ["--api-keys", api_keys]
        argv += list(extra_args)
        # Only the flags above configure it: no EOQ_* setting leaks in from the developer's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EOQ_")}
        self.process = GroupProcess(argv, log_dir / f"eoq-{name}.log", env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def is_serving(self) -> bool:
        if self.process.exited:
            raise RuntimeError(f"eoq serve ({self.name}) exited:\n{self.process.log_tail()}")
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
            except grpc.RpcError:  # not listening yet, or the service not registered yet
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        try:
            wait_until(self.is_serving, timeout, f"eoq serve ({self.name}) health SERVING", interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.process.log_tail()}") from None

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of ``/metrics``: (name, labels) -> value."""
        text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics").decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when the series does not exist (a counter never incremented)."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def ok_chats(self) -> float:
        return self.sample("eoq_requests_total", rpc="Chat", code="OK")


# --- a thin synchronous client ------------------------------------------------------------------------------


@dataclass
class Answer:
    """A streamed answer read to its end."""

    events: list[Any] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.delta for e in self.events)

    @property
    def last(self) -> Any:
        return self.events[-1]

    @property
    def conversation_id(self) -> str:
        return self.events[0].conversation_id


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat(
    stub: chat_pb2_grpc.ChatServiceStub,
    message: str,
    conversation_id: str = "",
    *,
    metadata: Iterable[tuple[str, str]] = (),
    max_tokens: int = 16,
    **sampling: Any,
) -> Answer:
    """One Chat turn, greedy unless told otherwise, read to its end (raises ``grpc.RpcError`` on failure)."""
    request = pb.ChatRequest(
        conversation_id=conversation_id,
        message=message,
        sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling),
    )
    return Answer(list(stub.Chat(request, metadata=tuple(metadata), timeout=CALL_TIMEOUT_SECONDS)))


def complete(
    stub: chat_pb2_grpc.ChatServiceStub,
    prompt: str,
    *,
    metadata: Iterable[tuple[str, str]] = (),
    max_tokens: int = 8,
) -> Answer:
    request = pb.CompleteRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
    return Answer(list(stub.Complete(request, metadata=tuple(metadata), timeout=CALL_TIMEOUT_SECONDS)))


# --- Prometheus ---------------------------------------------------------------------------------------------


def is_number(value: str) -> bool:
    """A sample value from Prometheus' API that is a real number (not NaN, not ±Inf)."""
    return math.isfinite(float(value))


class Prometheus:
    """A real Prometheus scraping ``targets`` as ``job="eoq"`` every ``interval``, evaluating ``rule_files``.

    Storage is a fresh directory under ``work_dir``; the web API listens on a free loopback port.
    """

    def __init__(
        self,
        executable: str,
        work_dir: Path,
        targets: Sequence[str],
        rule_files: Sequence[Path],
        interval: str = "1s",
    ) -> None:
        self.port = _free_port()
        work_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": interval,
                "evaluation_interval": interval,
                "scrape_timeout": interval,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "eoq", "static_configs": [{"targets": list(targets)}]}],
        }
        config_path = work_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        argv = [
            executable,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process = GroupProcess(argv, work_dir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.process.start()

        def ready() -> bool:
            if self.process.exited:
                raise RuntimeError(f"prometheus exited:\n{self.process.log_tail()}")
            try:
                return http_get(f"{self.url}/-/ready", timeout=2) is not None
            except OSError:  # refused, or 503 while starting
                return False

        try:
            wait_until(ready, timeout, "prometheus /-/ready")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.process.log_tail()}") from None

    def stop(self) -> None:
        self.process.stop()

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a successful ``/api/v1/<path>`` answer; fails with Prometheus' error otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as e:  # 400/422: bad query; the body says why
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's series, each ``{"metric": {...}, "value": [t, "v"]}`` (a scalar as one series)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def sample_times(self, selector: str, window_seconds: int) -> list[float]:
        """Timestamps of the scraped samples of ``selector`` over the last ``window_seconds``."""
        series = self.query(f"{selector}[{window_seconds}s]")
        return sorted(float(t) for s in series for t, _ in s["values"])

    def wait_for_scrapes(self, selector: str, after: float, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` scrapes that began after ``after`` (a ``time.time()``) are stored."""

        def enough() -> bool:
            window = int(time.time() - after) + 2
            return sum(t > after for t in self.sample_times(selector, window)) >= count

        wait_until(enough, timeout, f"{count} scrapes of {selector} after the traffic", interval=0.5)
