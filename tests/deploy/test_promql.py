"""Every PromQL expression deploy/ ships parses (Prometheus' own parser, via promtool) and uses only the
metrics and labels of the server's contract; the extraction helper in promql.py does what it says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from . import contract, promql
from .files import K8S

SERIES = contract.series_labels()
QUERIES = promql.all_queries()


def promtool_parses(promtool: str, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``promtool check rules`` on ``exprs`` as recording rules: Prometheus' parser and type checks."""
    rules = [{"record": f"eoq_check:expr{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return subprocess.run(
        [promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True, timeout=60
    )


def test_queries_were_found() -> None:
    sources = {q.source for q in QUERIES}
    assert sources == {"dashboard", "rules"}
    assert sum(q.stripped for q in QUERIES) == sum(q.source == "rules" and not q.stripped for q in QUERIES)


def test_every_expression_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    result = promtool_parses(promtool, [q.expr for q in QUERIES], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(QUERIES)} rules found" in result.stdout


def test_promtool_harness_rejects_a_bad_expression(promtool: str, tmp_path: Path) -> None:
    result = promtool_parses(promtool, ["sum(rate(eoq_requests_total[5m])"], tmp_path)
    assert result.returncode != 0


@pytest.mark.parametrize(
    "query", QUERIES, ids=lambda q: f"{q.source}:{q.name}{':stripped' if q.stripped else ''}"
)
def test_expression_uses_contract_metrics_and_labels(query: promql.Query) -> None:
    selectors = promql.selectors(query.expr)
    assert selectors, "an expression that selects no series"
    allowed_for_grouping: set[str] = set()
    for selector in selectors:
        assert selector.metric in SERIES, f"{selector.metric!r} is not a metric of the server's contract"
        unknown = selector.labels - SERIES[selector.metric]
        assert not unknown, f"{selector.metric} has no label {sorted(unknown)}"
        allowed_for_grouping |= SERIES[selector.metric]
    unknown = promql.grouping_labels(query.expr) - allowed_for_grouping
    assert not unknown, f"grouping by labels no selected metric has: {sorted(unknown)}"


@pytest.mark.parametrize(
    "query", QUERIES, ids=lambda q: f"{q.source}:{q.name}{':stripped' if q.stripped else ''}"
)
def test_histograms_are_read_through_their_series(query: promql.Query) -> None:
    """A histogram's base name selects nothing; quantiles come from _bucket with `le` kept."""
    for selector in promql.selectors(query.expr):
        assert selector.metric not in contract.HISTOGRAMS
    for _, metric in promql.quantile_calls(query.expr):
        assert metric.endswith("_bucket")
    if "histogram_quantile" in query.expr:
        assert "le" in promql.grouping_labels(query.expr)


def test_stripped_alerts_keep_their_query_and_drop_only_the_threshold(promtool: str, tmp_path: Path) -> None:
    pairs = {}
    for q in promql.rule_queries():
        pairs.setdefault(q.name, {})[q.stripped] = q.expr
    for name, pair in pairs.items():
        full, stripped = pair[False], pair[True]
        # The stripped query selects the same first metric as the alert, and is not itself a comparison.
        assert promql.selectors(stripped)[0] == promql.selectors(full)[0], name
        with pytest.raises(promql.PromQLError):
            promql.strip_threshold(stripped)
    result = promtool_parses(promtool, [p[True] for p in pairs.values()], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expr", "query"),
    [
        ("up == 0", "up"),
        ('rate(x_total{job="eoq"}[5m]) > 0.5', 'rate(x_total{job="eoq"}[5m])'),
        ("avg_over_time(w[10m]) > 8 and deriv(w[10m]) > 0", "avg_over_time(w[10m])"),
        ("(sum(x) or vector(0)) < 1", "(sum(x) or vector(0))"),
        ("(a / b > bool 0.05)", "a / b"),
        ("a > on() 3 unless b", "a"),
    ],
)
def test_strip_threshold(expr: str, query: str) -> None:
    # Compared as parsed, so that the printer's spacing does not matter.
    assert str(promql.parse(promql.strip_threshold(expr))) == str(promql.parse(query))


@pytest.mark.parametrize("expr", ["up", "a > b", "a and b > 1", "sum(rate(x[5m])", "a + 1"])
def test_strip_threshold_refuses_what_has_no_threshold(expr: str) -> None:
    with pytest.raises(promql.PromQLError):
        promql.strip_threshold(expr)


def test_substitute_grafana_variables() -> None:
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) + rate(y{instance=~"${instance}"}[5m])'
    out = promql.substitute(expr, {"instance": "a|b", "__rate_interval": "2m"})
    assert out == 'rate(x{instance=~"a|b"}[2m]) + rate(y{instance=~"a|b"}[5m])'
    with pytest.raises(promql.PromQLError, match=r"\$cluster"):
        promql.substitute('x{cluster="$cluster"}', {})


def test_live_queries_are_dashboard_and_stripped_alerts() -> None:
    live = promql.live_queries()
    assert all(q.source == "dashboard" or q.stripped for q in live)
    assert {q.name for q in live if q.source == "rules"} == {q.name for q in QUERIES if q.source == "rules"}


def autoscaler_queries() -> list[str]:
    """PromQL in the KEDA ScaledObject and the prometheus-adapter rules (adapter templates filled in)."""
    scaled = yaml.safe_load((K8S / "autoscaling/keda/scaledobject.yaml").read_text())
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    values = yaml.safe_load(
        (K8S / "autoscaling/prometheus-adapter/prometheus-adapter-values.yaml").read_text()
    )
    for rule in values["rules"]["custom"]:
        queries.append(rule["seriesQuery"])
        series = rule["seriesQuery"].split("{")[0]
        filled = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="eoq"')
            .replace("<<.GroupBy>>", "pod")
        )
        queries.append(filled)
    return queries


@pytest.mark.parametrize("expr", autoscaler_queries())
def test_autoscaler_queries_use_contract_metrics(expr: str) -> None:
    for selector in promql.selectors(expr):
        assert selector.metric in SERIES
        assert selector.labels <= SERIES[selector.metric]
