"""The Grafana dashboard has the panels the issue asks for, over the right series, and Grafana's provisioning
files point at what the compose stack mounts and runs."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from . import promql
from .files import DEPLOY, compose_volume

GRAFANA = DEPLOY / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "eoq.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
QUANTILES = {0.5, 0.95, 0.99}


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [promql.substitute(t["expr"]) for t in panel["targets"]]


def panels_over(metric: str) -> list[dict[str, Any]]:
    """Panels with a query that selects ``metric``."""
    return [p for p in PANELS if any(s.metric == metric for e in panel_exprs(p) for s in promql.selectors(e))]


@pytest.mark.parametrize(
    "histogram",
    [
        "eoq_time_to_first_token_seconds",
        "eoq_inter_token_latency_seconds",
        "eoq_e2e_request_latency_seconds",
        "eoq_queue_wait_seconds",
    ],
)
def test_latency_panels_show_p50_p95_p99(histogram: str) -> None:
    panels = panels_over(f"{histogram}_bucket")
    assert len(panels) == 1, f"one panel for {histogram}"
    calls = [c for e in panel_exprs(panels[0]) for c in promql.quantile_calls(e)]
    assert {phi for phi, _ in calls} == QUANTILES
    assert {m for _, m in calls} == {f"{histogram}_bucket"}
    assert panels[0]["fieldConfig"]["defaults"]["unit"] == "s"


def test_generated_tokens_per_second() -> None:
    panels = panels_over("eoq_generation_tokens_total")
    assert any("rate(eoq_generation_tokens_total" in e for p in panels for e in panel_exprs(p))
    assert any(p["type"] == "timeseries" for p in panels)


def test_running_and_waiting_requests_share_a_panel() -> None:
    assert {p["id"] for p in panels_over("eoq_requests_running")} & {
        p["id"] for p in panels_over("eoq_requests_waiting")
    }


def test_kv_cache_usage_is_a_ratio() -> None:
    panels = panels_over("eoq_kv_cache_usage_ratio")
    assert panels and all(p["fieldConfig"]["defaults"]["unit"] == "percentunit" for p in panels)


def test_prefix_cache_hit_rate_is_hits_over_queries() -> None:
    (panel,) = panels_over("eoq_prefix_cache_hits_total")
    (expr,) = panel_exprs(panel)
    node = promql.parse(expr)
    assert str(node.op) == "/"
    assert promql.selectors(str(node.lhs))[0].metric == "eoq_prefix_cache_hits_total"
    assert promql.selectors(str(node.rhs))[0].metric == "eoq_prefix_cache_queries_total"


def test_requests_and_errors_by_status_code() -> None:
    by_code = [
        p
        for p in panels_over("eoq_requests_total")
        if any("code" in promql.grouping_labels(e) for e in panel_exprs(p))
    ]
    assert by_code, "a panel of eoq_requests_total broken down by code"
    ratios = [
        p for p in panels_over("eoq_requests_total") if p["fieldConfig"]["defaults"]["unit"] == "percentunit"
    ]
    assert ratios, "an error-ratio panel"


def test_redis_latency_by_operation_and_preemptions() -> None:
    (latency,) = panels_over("eoq_redis_operation_seconds_bucket")
    assert all("operation" in promql.grouping_labels(e) for e in panel_exprs(latency))
    assert panels_over("eoq_redis_errors_total")
    assert panels_over("eoq_preemptions_total")


def test_every_target_uses_the_datasource_variable_and_a_unique_ref() -> None:
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert 'job="eoq"' in target["expr"] and 'instance=~"$instance"' in target["expr"], target["expr"]


def test_instance_variable_reads_a_contract_metric() -> None:
    (var,) = [v for v in DASHBOARD["templating"]["list"] if v["name"] == "instance"]
    query = var["query"]["query"]
    assert query.startswith("label_values(") and query.endswith(", instance)")
    inner = query[len("label_values(") : -len(", instance)")]
    assert promql.selectors(inner)[0].metric == "eoq_model_info"


def test_panel_ids_unique_and_grid_does_not_overlap() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_identity() -> None:
    assert DASHBOARD["uid"] == "eoq" and DASHBOARD["title"] == "eoq"
    assert isinstance(DASHBOARD["schemaVersion"], int)


def test_datasource_provisioning_points_at_the_compose_prometheus(compose: dict[str, Any]) -> None:
    provisioning = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = provisioning["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    assert any(p.endswith(":9090") for p in compose["services"]["prometheus"]["ports"])


def test_dashboard_provider_reads_the_mounted_folder(compose: dict[str, Any]) -> None:
    provisioning = yaml.safe_load((GRAFANA / "provisioning/dashboards/eoq.yml").read_text())
    (provider,) = provisioning["providers"]
    mounts = {src: dst for src, dst, _ in map(compose_volume, compose["services"]["grafana"]["volumes"])}
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/eoq.json"
