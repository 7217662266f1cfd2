"""The dashboard and the alert rules against a real Prometheus scraping a real, freshly used ``eoq serve``.

One module-wide setup: a redis-server, ``eoq serve`` (real default model) and ``/usr/bin/prometheus`` scraping
its metrics port as ``job="eoq"`` every second with ``deploy/prometheus/rules.yml`` loaded. Traffic: a two-turn
conversation (the second turn hits the prefix cache), a Complete, a GetConversation, a Chat with an empty
message (INVALID_ARGUMENT) and one Chat while Redis is down (UNAVAILABLE, a Redis error). Then, once Prometheus holds two scrapes taken after the traffic, every expression of
every dashboard panel and every alert (threshold stripped, ``promql.live_queries``) is evaluated at one instant
through ``/api/v1/query`` and must return a series with a real number: an empty answer means a metric, label or
job the server does not export; NaN only, a histogram or ratio that never saw an observation.

``$__rate_interval`` spans the whole traffic (it is measured, at least 5 s), so that every rate() window holds
the traffic's increase whatever the machine's speed; the rules keep their own 5m/10m windows.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from tests.conftest import RedisServer, redis_fixture

from . import promql
from .live import Answer, EoqServer, Prometheus, chat, complete, is_number

pytestmark = pytest.mark.e2e

SCRAPED = 'eoq_serving{job="eoq"}'  # a series every scrape of eoq stores
LIVE_QUERIES = promql.live_queries()  # for the test ids; the fixture substitutes the measured rate window


@dataclass(frozen=True)
class Scraped:
    """Prometheus after the traffic, and the instant and variables to evaluate the dashboard with."""

    prometheus: Prometheus
    target: str  # the eoq scrape target, which Prometheus puts in the instance label
    at: float
    variables: dict[str, str]
    turns: tuple[Answer, Answer]

    def query(self, expr: str) -> list[dict]:
        return self.prometheus.query(expr, at=self.at)

    def dashboard(self, name: str) -> list[dict]:
        """The series of one dashboard target, e.g. ``"Instances up / A"`` (panels of one title share it)."""
        [expr] = {q.expr for q in promql.dashboard_queries(variables=self.variables) if q.name == name}
        return self.query(expr)


@pytest.fixture(scope="module")
def prometheus_executable() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).exists():
        pytest.fail("prometheus not found: `make install-test` installs it (Debian package 'prometheus')")
    return path


module_redis = redis_fixture("module", "The redis-server of this module's eoq serve.")


def drive_traffic(address: str, redis: RedisServer) -> tuple[Answer, Answer]:
    """Chats (two turns of one conversation), a Complete, a GetConversation, one INVALID_ARGUMENT and one
    UNAVAILABLE (Redis stopped for one call, then started again with its data)."""
    with grpc.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        first = chat(stub, "What is the capital of France?")
        second = chat(stub, "And of Germany?", first.conversation_id)
        complete(stub, "The capital of Italy is")
        stub.GetConversation(pb.GetConversationRequest(id=first.conversation_id), timeout=30)
        with pytest.raises(grpc.RpcError) as bad:
            chat(stub, "")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        redis.stop()
        try:
            with pytest.raises(grpc.RpcError) as outage:
                chat(stub, "Are you there?", first.conversation_id)
            assert outage.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            redis.start()
    return first, second


@pytest.fixture(scope="module")
def scraped(
    tmp_path_factory: pytest.TempPathFactory, prometheus_executable: str, module_redis: RedisServer
) -> Iterator[Scraped]:
    work = tmp_path_factory.mktemp("live")
    server = EoqServer(work, "live", redis_url=module_redis.url)
    target = f"127.0.0.1:{server.metrics_port}"
    prometheus = Prometheus(prometheus_executable, work / "prometheus", [target], [promql.RULES_PATH])
    with ExitStack() as stack:
        stack.callback(server.stop)
        server.start()
        stack.callback(prometheus.stop)
        prometheus.start()  # while the model loads
        server.wait_serving()
        serving = time.time()
        prometheus.wait_for_scrapes(SCRAPED, after=serving, count=1)  # a sample from before the traffic
        traffic_start = time.time()
        turns = drive_traffic(server.address, module_redis)
        prometheus.wait_for_scrapes(SCRAPED, after=time.time(), count=2)
        at = time.time()
        window = max(5, math.ceil(at - traffic_start) + 3)
        yield Scraped(prometheus, target, at, {"instance": ".*", "__rate_interval": f"{window}s"}, turns)


def test_the_second_turn_reused_the_first_turns_kv_blocks(scraped: Scraped) -> None:
    first, second = scraped.turns
    assert second.last.usage.cached_prompt_tokens > 0
    assert (
        second.last.usage.prompt_tokens > first.last.usage.prompt_tokens + first.last.usage.completion_tokens
    )


@pytest.mark.parametrize(
    "index", range(len(LIVE_QUERIES)),
    ids=[f"{q.source}:{q.name}{':stripped' if q.stripped else ''}" for q in LIVE_QUERIES],
)  # fmt: skip
def test_query_returns_a_number(scraped: Scraped, index: int) -> None:
    query = promql.live_queries(scraped.variables)[index]
    series = scraped.query(query.expr)
    assert series, f"no series for {query.expr}"
    values = [s["value"][1] for s in series]
    assert any(is_number(v) for v in values), f"{query.expr} has only {values}"


def by_labels(series: list[dict], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s["metric"].get(label, "") for label in labels): float(s["value"][1]) for s in series}


def test_requests_by_status_code_shows_every_method_and_code_used(scraped: Scraped) -> None:
    rates = by_labels(scraped.dashboard("Requests by status code / A"), "rpc", "code")
    for key in [("Chat", "OK"), ("Complete", "OK"), ("GetConversation", "OK")]:
        assert rates.get(key, 0) > 0, f"{key} not counted: {rates}"
    # Listed, but see the next test for their rates.
    assert {("Chat", "INVALID_ARGUMENT"), ("Chat", "UNAVAILABLE")} <= set(rates)


def test_server_error_ratio_counts_the_first_unavailable(scraped: Scraped) -> None:
    [ratio] = by_labels(scraped.dashboard("Server error ratio / A")).values()
    assert ratio > 0


def test_redis_errors_panel_shows_the_outage(scraped: Scraped) -> None:
    rates = by_labels(scraped.dashboard("Redis errors/s / A"), "operation")
    assert max(rates.values()) > 0, rates


def test_overview_counts_the_one_instance_and_its_model(scraped: Scraped) -> None:
    assert by_labels(scraped.dashboard("Instances up / A")) == {(): 1.0}
    assert by_labels(scraped.dashboard("Instances up / B")) == {(): 1.0}
    [model] = scraped.dashboard("Model / A")
    assert "SmolLM2-135M" in model["metric"]["model"] and model["metric"]["architecture"] == "llama"


def test_prefix_cache_hit_rate_is_above_zero(scraped: Scraped) -> None:
    [rate] = by_labels(scraped.dashboard("Prefix cache hit rate / A")).values()
    assert 0 < rate <= 1


def test_instance_variable_lists_the_target(scraped: Scraped) -> None:
    """The dashboard's ``instance`` variable (``label_values(<selector>, instance)``) offers the scraped server."""
    dashboard = json.loads(promql.DASHBOARD_PATH.read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"]).groups()
    assert {s["metric"][label] for s in scraped.query(selector)} == {scraped.target}


def test_rules_are_loaded_and_evaluate_without_errors(scraped: Scraped) -> None:
    groups = scraped.prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {q.name for q in promql.rule_queries()}
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (
            f"{name}: {rule['health']} {rule.get('lastError')}"
        )
        assert not rule["lastEvaluation"].startswith("0001-"), f"{name} was never evaluated"
