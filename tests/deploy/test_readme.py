"""deploy/README.md documents what deploy/ actually ships: every metric, alert and dashboard query, and only
paths that exist."""

from __future__ import annotations

import json
import re

import pytest

from . import contract, promql
from .files import DEPLOY

README = (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("metric", contract.metric_names())
def test_every_metric_is_explained(metric: str) -> None:
    row = next((line for line in README.splitlines() if line.startswith(f"| `{metric}` |")), None)
    assert row, f"no row for {metric} in the metrics table"
    assert len(row.split("|")[-2].strip()) > 10, f"{metric}: say what it means"


@pytest.mark.parametrize("alert", sorted({q.name for q in promql.rule_queries()}))
def test_every_alert_is_listed(alert: str) -> None:
    assert f"| `{alert}` |" in README


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(promql.DASHBOARD_PATH.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize(("title", "expr"), dashboard_targets(), ids=lambda v: v if len(v) < 40 else "")
def test_every_panel_query_is_in_the_readme(title: str, expr: str) -> None:
    assert f"**{title}**" in README
    assert expr in README, "README's dashboard section is out of date: regenerate it from eoq.json"


def test_paths_mentioned_exist() -> None:
    mentioned = set(re.findall(r"`((?:k8s|prometheus|grafana)/[\w./-]*)`", README))
    assert len(mentioned) > 5
    missing = {m for m in mentioned if not (DEPLOY / m.split()[0]).exists()}
    assert not missing


def test_what_to_open_after_compose_up() -> None:
    assert "http://localhost:3000" in README and "http://localhost:9090" in README


def test_kv_bytes_per_token_of_the_default_model(default_checkpoint) -> None:
    """The README's sizing figures follow from the default model's own config (not numbers copied here)."""
    import torch
    from transformers import AutoConfig

    from eoq.engine.model.base import KVSpec

    cfg = AutoConfig.from_pretrained(default_checkpoint.path)
    spec = KVSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    per_token = spec.bytes_per_token(torch.bfloat16)
    assert f"{per_token:,} bytes per token" in README
    # The sizing table's first row: 1 GiB of bf16 KV cache.
    assert f"| 1 GiB | {2**30 // per_token:,} | {2**30 // per_token // 2048} |" in README
