"""Every PromQL expression that deploy/ ships, as plain data, for the static tests here and the live test.

Sources: the Grafana dashboard's panel targets (with Grafana's variables substituted) and the alert rules.
For an alert, :func:`rule_queries` yields its expression as written and, marked ``stripped``, the same
expression with the threshold taken off (``A > 2`` -> ``A``; ``A > 2 and B > 0`` -> ``A``): that one returns a
series whether or not the alert fires, which is what a live Prometheus scraping a freshly used server checks.

Parsing uses promql-parser (a port of Prometheus' parser); ``promtool check rules`` remains the authority on
syntax, and the tests put every expression through it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD_PATH = DEPLOY_DIR / "grafana" / "dashboards" / "eoq.json"
RULES_PATH = DEPLOY_DIR / "prometheus" / "rules.yml"

# Values for the dashboard's Grafana variables: every instance, and a rate window of four 15 s scrapes.
DEFAULT_VARIABLES: Mapping[str, str] = {"instance": ".*", "__rate_interval": "1m"}

COMPARISONS = frozenset({">", "<", ">=", "<=", "==", "!="})
GUARDS = frozenset({"and", "unless"})
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


class PromQLError(ValueError):
    """An expression that cannot be parsed, uses an unknown variable, or has no threshold to strip."""


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression and where it comes from."""

    source: str  # "dashboard" or "rules"
    name: str  # "<panel title> / <refId>" or the alert or record name
    expr: str
    stripped: bool = False  # an alert expression with its threshold taken off


@dataclass(frozen=True, slots=True)
class Selector:
    """A vector selector in an expression: metric name and the label names it matches on."""

    metric: str
    labels: frozenset[str] = field(default_factory=frozenset)


def substitute(expr: str, variables: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
    """Replace Grafana's ``$name`` / ``${name}`` variables; an unknown one raises :class:`PromQLError`."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise PromQLError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def parse(expr: str) -> promql_parser.Expr:
    try:
        return promql_parser.parse(expr)
    except ValueError as e:
        raise PromQLError(f"cannot parse {expr!r}: {e}") from None


def _unparen(node: promql_parser.Expr) -> promql_parser.Expr:
    while isinstance(node, promql_parser.ParenExpr):
        node = node.expr
    return node


def strip_threshold(expr: str) -> str:
    """The query behind an alert: drop an ``and``/``unless`` guard, then the comparison with a number.

    Raises :class:`PromQLError` when the expression is not ``<query> <comparison> <number>`` (plus guards).
    """
    node = _unparen(parse(expr))
    while isinstance(node, promql_parser.BinaryExpr) and str(node.op) in GUARDS:
        node = _unparen(node.lhs)
    if not (
        isinstance(node, promql_parser.BinaryExpr)
        and str(node.op) in COMPARISONS
        and isinstance(_unparen(node.rhs), promql_parser.NumberLiteral)
    ):
        raise PromQLError(f"no '<query> <comparison> <number>' to strip in {expr!r}")
    return str(node.lhs)


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in ``expr`` (including those inside range selectors), in order."""
    found: list[Selector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names = {m.name for m in node.matchers.matchers}
            found.append(Selector(metric=node.name or "", labels=frozenset(names - {"__name__"})))

    promql_parser.walk(parse(expr), visit)
    return found


def grouping_labels(expr: str) -> set[str]:
    """Label names used in ``by (...)``, ``without (...)``, ``on (...)``, ``ignoring (...)`` and group modifiers."""
    labels: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                labels.update(node.modifier.matching.labels)
            labels.update(node.modifier.group_labels or ())

    promql_parser.walk(parse(expr), visit)
    return labels


def quantile_calls(expr: str) -> list[tuple[float, str]]:
    """``(φ, bucket metric)`` for every ``histogram_quantile(φ, ...)`` in ``expr``."""
    calls: list[tuple[float, str]] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            phi = _unparen(node.args[0])
            inner = [s.metric for s in selectors(str(node.args[1]))]
            if isinstance(phi, promql_parser.NumberLiteral) and len(inner) == 1:
                calls.append((phi.val, inner[0]))

    promql_parser.walk(parse(expr), visit)
    return calls


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries(
    path: Path = DASHBOARD_PATH, variables: Mapping[str, str] = DEFAULT_VARIABLES
) -> list[Query]:
    """Every panel target's ``expr`` (hidden targets included), variables substituted."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                name = f"{panel['title']} / {target.get('refId', '?')}"
                queries.append(Query("dashboard", name, substitute(target["expr"], variables)))
    return queries


def rule_queries(path: Path = RULES_PATH) -> list[Query]:
    """Every rule's expression; for alerts also the threshold-stripped query (``stripped=True``)."""
    rules = yaml.safe_load(path.read_text())
    queries = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            name = rule.get("alert") or rule["record"]
            queries.append(Query("rules", name, expr))
            if "alert" in rule:
                queries.append(Query("rules", name, strip_threshold(expr), stripped=True))
    return queries


def all_queries(variables: Mapping[str, str] = DEFAULT_VARIABLES) -> list[Query]:
    """Dashboard and rule queries together."""
    return dashboard_queries(variables=variables) + rule_queries()


def live_queries(variables: Mapping[str, str] = DEFAULT_VARIABLES) -> list[Query]:
    """What a live Prometheus must answer with at least one series: dashboard queries and stripped alerts.

    An alert's full expression is left out: it returns nothing unless the alert fires.
    """
    return dashboard_queries(variables=variables) + [q for q in rule_queries() if q.stripped]
