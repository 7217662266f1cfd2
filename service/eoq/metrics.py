"""Prometheus metrics: the only module that imports prometheus_client.

The engine hands over ``SchedulerStats`` per step and finished requests' outputs; the stores report operation
latencies; the gRPC interceptor counts requests by method and status code. No label names a conversation,
tenant or request. Latency buckets follow vLLM's, from milliseconds to minutes.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from eoq.engine.types import FinishReason, RequestOutput, SchedulerStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STORE_OPERATIONS = ("create", "get", "list", "delete", "append_turn", "lock", "unlock", "renew", "ping")
RPCS = ("Chat", "Complete", "CreateConversation", "GetConversation", "ListConversations", "DeleteConversation",
        "GetModelInfo", "Regenerate", "SetActiveBranch", "DeleteMessage", "WatchAnswer", "CancelAnswer")
# The HTTP API's routes (eoq.api.http.app), counted under the same status-code names as the RPCs.
HTTP_ROUTES = ("GET /v1/models", "GET /v1/models/{model}", "POST /v1/chat/completions", "POST /v1/completions",
               "POST /v1/responses", "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
               "POST /v1/responses/{response_id}/cancel", "GET /v1/conversations", "POST /v1/conversations",
               "GET /v1/conversations/{conversation_id}", "DELETE /v1/conversations/{conversation_id}",
               "GET /v1/conversations/{conversation_id}/items", "POST /v1/conversations/{conversation_id}/regenerate",
               "POST /v1/conversations/{conversation_id}/active")


ADMISSION_REJECTIONS = ("server_full", "tenant_limit")  # never a tenant's name: bounded cardinality


class Metrics:
    """All eoq series, in their own registry (so tests can build several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("eoq_time_to_first_token_seconds", "Time from a request's arrival at the engine to "
                              "its first generated token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("eoq_inter_token_latency_seconds", "Time between streamed outputs of one request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("eoq_e2e_request_latency_seconds", "End-to-end duration of a generation request, "
                             "from arrival at the engine to its last token.", buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("eoq_queue_wait_seconds", "Time a request waited for a place in the running batch.",
                               buckets=REQUEST_BUCKETS, registry=r)
        self.redis = Histogram("eoq_redis_operation_seconds", "Latency of conversation-store operations.",
                               ["operation"], buckets=REDIS_BUCKETS, registry=r)
        self.batch_size = Histogram("eoq_batch_size", "Sequences computed per engine step.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("eoq_batch_tokens", "Tokens computed per engine step.",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.requests = Counter("eoq_requests", "Requests by gRPC method or HTTP route ('POST /v1/completions') "
                                "and status code (gRPC's names, for HTTP too).", ["rpc", "code"], registry=r)
        self.prompt_tokens = Counter("eoq_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("eoq_generation_tokens", "Generated tokens.", registry=r)
        self.prefix_queries = Counter("eoq_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter("eoq_prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.preemptions = Counter("eoq_preemptions", "Sequences preempted (to be recomputed) for lack of KV "
                                   "cache.", registry=r)
        self.redis_errors = Counter("eoq_redis_errors", "Conversation-store operations that failed to reach the "
                                    "backend.", ["operation"], registry=r)
        self.finished = Counter("eoq_request_finished", "Finished generation requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.running = Gauge("eoq_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("eoq_requests_waiting", "Requests waiting for a place in the batch.", registry=r)
        self.kv_usage = Gauge("eoq_kv_cache_usage_ratio", "Used KV-cache blocks / all blocks (0..1).", registry=r)
        self.serving = Gauge("eoq_serving", "1 while serving, 0 while starting, restarting the engine or "
                             "draining.", registry=r)
        self.engine_restarts = Counter("eoq_engine_restarts", "Times the engine died and was started again.",
                                       registry=r)
        self.admission_rejections = Counter(
            "eoq_admission_rejections", "Requests refused RESOURCE_EXHAUSTED before any work, by which limit: "
            "server_full (the batch and the queue) or tenant_limit (--max-requests-per-tenant).", ["reason"],
            registry=r)
        self.model_info = Gauge("eoq_model_info", "The served model (value 1).",
                                ["model", "architecture", "dtype", "device"], registry=r)
        # Series exist before any traffic, so dashboards and alerts always have something to read.
        for op in STORE_OPERATIONS:
            self.redis.labels(op)
            self.redis_errors.labels(op)
        for reason in FinishReason:
            self.finished.labels(reason.value)
        for reason in ADMISSION_REJECTIONS:
            self.admission_rejections.labels(reason)
        # Every (method, status code) from the start: rate() over a series needs a sample before its first
        # increment, or the first error of each kind would never be counted.
        for rpc in (*RPCS, *HTTP_ROUTES):
            for code in grpc.StatusCode:
                self.requests.labels(rpc, code.name)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP on its own thread."""
        start_http_server(port, addr=host, registry=self.registry)

    # --- engine observer ---
    def on_step(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        if stats.num_batched_seqs:
            self.batch_size.observe(stats.num_batched_seqs)
            self.batch_tokens.observe(stats.num_batched_tokens)
        if stats.num_preemptions:
            self.preemptions.inc(stats.num_preemptions)
        if stats.prefix_cache_queries:
            self.prefix_queries.inc(stats.prefix_cache_queries)
            self.prefix_hits.inc(stats.prefix_cache_hits)
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generated_tokens:
            self.generation_tokens.inc(stats.num_generated_tokens)

    def on_request_finished(self, output: RequestOutput, inter_token_seconds: list[float]) -> None:
        t = output.timings
        if t is not None:
            if t.first_token is not None:
                self.ttft.observe(t.ttft_seconds)
            if t.first_scheduled is not None:
                self.queue.observe(t.queue_seconds)
            if t.finished is not None:
                self.e2e.observe(t.total_seconds)
        for s in inter_token_seconds:
            self.itl.observe(s)
        if output.finish_reason is not None:
            self.finished.labels(output.finish_reason.value).inc()

    def on_engine_restart(self) -> None:
        self.engine_restarts.inc()

    def on_admission_rejected(self, reason: str) -> None:
        self.admission_rejections.labels(reason).inc()

    # --- store observer ---
    def on_store_operation(self, operation: str, seconds: float | None) -> None:
        if seconds is None:
            self.redis_errors.labels(operation).inc()
        else:
            self.redis.labels(operation).observe(seconds)

    # --- gRPC ---
    def on_rpc(self, rpc: str, code: str) -> None:
        self.requests.labels(rpc, code).inc()
