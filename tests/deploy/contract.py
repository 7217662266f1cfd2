"""The server's metrics contract, as the deploy files may rely on it (names, types, labels).

Kept in one place so the dashboard, the alert rules, the autoscaler queries and the README are checked against
the same list. When the server adds or renames a metric, change it here first.
"""

from __future__ import annotations

from collections.abc import Mapping

HISTOGRAMS: Mapping[str, frozenset[str]] = {
    "eoq_time_to_first_token_seconds": frozenset(),
    "eoq_inter_token_latency_seconds": frozenset(),
    "eoq_e2e_request_latency_seconds": frozenset(),
    "eoq_queue_wait_seconds": frozenset(),
    "eoq_redis_operation_seconds": frozenset({"operation"}),
    "eoq_batch_size": frozenset(),
    "eoq_batch_tokens": frozenset(),
}
COUNTERS: Mapping[str, frozenset[str]] = {
    "eoq_requests_total": frozenset({"rpc", "code"}),
    "eoq_prompt_tokens_total": frozenset(),
    "eoq_generation_tokens_total": frozenset(),
    "eoq_prefix_cache_queries_total": frozenset(),
    "eoq_prefix_cache_hits_total": frozenset(),
    "eoq_preemptions_total": frozenset(),
    "eoq_redis_errors_total": frozenset({"operation"}),
    "eoq_request_finished_total": frozenset({"finish_reason"}),
    "eoq_engine_restarts_total": frozenset(),
    "eoq_admission_rejections_total": frozenset({"reason"}),
}
GAUGES: Mapping[str, frozenset[str]] = {
    "eoq_requests_running": frozenset(),
    "eoq_requests_waiting": frozenset(),
    "eoq_kv_cache_usage_ratio": frozenset(),
    "eoq_serving": frozenset(),
    "eoq_model_info": frozenset({"model", "architecture", "dtype", "device"}),
}

# Labels Prometheus adds to every scraped series: job/instance always; the rest under Kubernetes
# (prometheus-operator's ServiceMonitor), which the autoscaler queries select on.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name a query may select, with the labels it may match or group on."""
    names: dict[str, frozenset[str]] = {"up": TARGET_LABELS}
    for name, labels in HISTOGRAMS.items():
        names[f"{name}_bucket"] = labels | {"le"} | TARGET_LABELS
        names[f"{name}_sum"] = labels | TARGET_LABELS
        names[f"{name}_count"] = labels | TARGET_LABELS
    for table in (COUNTERS, GAUGES):
        for name, labels in table.items():
            names[name] = labels | TARGET_LABELS
    return names


def metric_names() -> list[str]:
    """The metric (family) names as the README documents them: histograms without their suffixes."""
    return [*HISTOGRAMS, *COUNTERS, *GAUGES]
