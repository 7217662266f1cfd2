"""Prometheus config and alert rules: promtool accepts them, the rule unit tests pass, the alerts asked for exist."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from .files import DEPLOY

PROMETHEUS = DEPLOY / "prometheus"
RULES = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
ALERTS = {rule["alert"]: rule for group in RULES["groups"] for rule in group["rules"] if "alert" in rule}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=60)


def test_promtool_check_config(promtool: str) -> None:
    result = run(promtool, "check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # It also loaded the rule file the config names (relative to the config, as in the container).
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", PROMETHEUS / "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ALERTS)} rules found" in result.stdout


def test_promtool_rule_unit_tests(promtool: str) -> None:
    result = run(promtool, "test", "rules", PROMETHEUS / "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(ALERTS), f"alerts never shown firing: {set(ALERTS) - firing}"
    assert quiet == set(ALERTS), f"alerts never shown quiet: {set(ALERTS) - quiet}"


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The checks above can fail: the same command on a rule with a syntax error exits non-zero."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(rate(up[5m])"}]}]})
    )
    assert run(promtool, "check", "rules", bad).returncode != 0


@pytest.mark.parametrize(
    ("concept", "metric"),
    [
        ("TTFT p99 high", "eoq_time_to_first_token_seconds_bucket"),
        ("queue growing", "eoq_requests_waiting"),
        ("error ratio high", "eoq_requests_total"),
        ("KV cache saturated", "eoq_kv_cache_usage_ratio"),
        ("instance down", "up"),
        ("Redis errors", "eoq_redis_errors_total"),
        ("engine restarts", "eoq_engine_restarts_total"),
    ],
)
def test_required_alert_exists(concept: str, metric: str) -> None:
    assert any(metric + "{" in rule["expr"] for rule in ALERTS.values()), (
        f"no alert for {concept} on {metric}"
    )


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_is_actionable(name: str) -> None:
    rule = ALERTS[name]
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule.get("for"), "an alert without `for` pages on a single bad scrape"
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert 'job="eoq"' in rule["expr"], "select the eoq job, as the scrape configs name it"


def test_scrape_job_is_the_one_rules_select() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "eoq" in jobs
    names = jobs["eoq"]["dns_sd_configs"][0]["names"]
    assert names == ["eoq"] and jobs["eoq"]["dns_sd_configs"][0]["port"] == 9400
