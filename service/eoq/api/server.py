"""Server assembly: settings -> model, engine, store, servicer, health, reflection, metrics; and the drain.

``start_server`` returns a running server (tests start one in-process on a free port); ``serve`` runs one until
SIGTERM/SIGINT, then drains: health goes NOT_SERVING, new calls are refused, streaming answers get the grace
period to finish (and are stored), then the rest are cancelled (stored as far as they got) and the process
exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eoq._proto.chat.v1 import chat_pb2, chat_pb2_grpc
from eoq.api.adapter import SamplingPolicy, model_info_to_pb
from eoq.api.auth import ApiKeys
from eoq.api.errors import ErrorInterceptor
from eoq.api.http.app import HttpApi
from eoq.api.http.server import HttpServer, open_http_socket, start_http
from eoq.api.servicer import ChatServicer
from eoq.api.tls import is_loopback, server_credentials, transport_name
from eoq.chat.answers import AnswerLogSettings
from eoq.chat.memory_store import MemoryConversationStore
from eoq.chat.prompt import PromptBuilder
from eoq.chat.redis_client import parse_sentinels
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.service import ChatLimits, ChatService
from eoq.chat.store import ConversationLimits, ConversationStore
from eoq.config import Settings, engine_config
from eoq.engine.async_engine import AsyncEngine, EngineState
from eoq.engine.model.checkpoint import load_tokenizer, resolve_checkpoint
from eoq.errors import ConfigError, Unavailable
from eoq.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    engine: AsyncEngine
    store: ConversationStore
    servicer: ChatServicer
    health: health.aio.HealthServicer
    metrics: Metrics
    settings: Settings
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API (--http-port)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def num_answering(self) -> int:
        """Answers in flight on either port: gRPC streams, HTTP requests generating."""
        return self.servicer.num_streaming + (self.http.api.num_active if self.http is not None else 0)

    async def wait_answers(self, timeout: float) -> bool:
        """Wait until no answer is in flight on either port (True) or ``timeout`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        done = await self.servicer.wait_streams(timeout)
        if self.http is not None:
            done = await self.http.api.wait_active(max(0.0, deadline - loop.time())) and done
        return done

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.serving.set(1 if serving else 0)

    def on_engine_state(self, state: EngineState) -> None:
        """Health follows the engine: NOT_SERVING for every service name while it restarts (or has failed),
        SERVING again when it is back — unless the server is draining."""
        if state is EngineState.STOPPED or (self.servicer.draining and state is EngineState.SERVING):
            return
        serving = state is EngineState.SERVING
        if not serving:  # the status must change at once, not when a task gets to run
            self.metrics.serving.set(0)
        asyncio.get_running_loop().create_task(self.set_serving(serving))

    async def drain_and_stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let streaming answers finish for ``grace`` seconds, then stop."""
        grace = self.settings.grace_period_seconds if grace is None else grace
        await self.set_serving(False)
        self.servicer.draining = True
        if self.http is not None:
            self.http.api.draining = True  # new HTTP requests: 503 with Retry-After
        n = self.num_answering
        if n:
            log.info("draining: %d answer(s) streaming; waiting up to %.0f s", n, grace)
        if not await self.wait_answers(grace):
            log.warning("grace period over: cancelling %d answer(s) (stored as far as they got)",
                        self.num_answering)
            # Their streams end with a last event saying CANCELLED, and their turns are stored so.
            self.engine.abort_all()
            await self.wait_answers(5.0)
            self.servicer.chat.detached.cancel_all()  # still running (a store call hanging): stored as cancelled
        await self.server.stop(1.0)  # whatever is still left is cancelled; its handler stores what it has
        if self.http is not None:
            await self.http.stop()
        await self.servicer.wait_streams(5.0)
        await self.engine.shutdown()
        self.servicer.chat.close()
        await self.store.close()


def make_store(settings: Settings, metrics: Metrics) -> ConversationStore:
    limits = ConversationLimits(max_messages=settings.max_conversation_messages,
                                max_bytes=settings.max_conversation_bytes,
                                max_conversations_per_tenant=settings.max_conversations_per_tenant)
    answers = AnswerLogSettings(max_detached_per_tenant=settings.max_detached_answers_per_tenant,
                                retention_seconds=settings.answer_retention_seconds,
                                lease_seconds=settings.lock_ttl_seconds)
    if settings.redis_url or settings.redis_sentinels:
        return RedisConversationStore(
            settings.redis_url or "",
            ttl_seconds=settings.conversation_ttl_seconds,
            lock_ttl_seconds=settings.lock_ttl_seconds,
            timeout_seconds=settings.redis_timeout_seconds,
            observer=metrics.on_store_operation,
            limits=limits,
            answers=answers,
            sentinels=parse_sentinels(settings.redis_sentinels) if settings.redis_sentinels else (),
            sentinel_master=settings.redis_sentinel_master,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
    return MemoryConversationStore(ttl_seconds=settings.conversation_ttl_seconds,
                                   lock_ttl_seconds=settings.lock_ttl_seconds, limits=limits, answers=answers)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    opts = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
    ]
    if settings.max_connection_age_seconds:
        opts.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)))
        opts.append(("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * 1000)))
    return opts


async def start_server(settings: Settings, metrics: Metrics | None = None,
                       http_socket: socket.socket | None = None) -> RunningServer:
    """Load the model, start the engine, the gRPC server and the HTTP API; returns once it is SERVING.
    ``http_socket``: a bound socket for the HTTP API instead of ``--http-port`` (tests: port 0)."""
    metrics = metrics or Metrics()
    auth = ApiKeys.load(settings.api_keys_file, settings.api_keys)
    if not auth.enabled:
        log.warning("no API keys configured: auth is OFF and every caller shares the tenant 'public'")
    else:
        log.info("auth on: %d API key(s)", len(auth))
    credentials = server_credentials(settings)  # before the model loads: a bad TLS file stops the start at once
    # Bound now too (it listens once serving): a port in use stops the start before the model loads.
    http_sock = http_socket if http_socket is not None else open_http_socket(settings)
    if auth.enabled and credentials is None and not is_loopback(settings.host):
        log.warning("API keys are on but TLS is off on %s: keys would cross the network in clear; set "
                    "--tls-cert-file/--tls-key-file (unless a mesh or proxy in front terminates TLS)", settings.host)
    checkpoint = await asyncio.to_thread(resolve_checkpoint, settings.model, settings.cache_dir)
    # The chat template's end-of-turn tokens end answers too: the engine knows them from its start (one set,
    # ModelInfo.eos_token_ids, the model's and the template's), so the tokenizer is loaded first (~0.3 s).
    prompts = PromptBuilder(await asyncio.to_thread(load_tokenizer, checkpoint.path))
    engine_cfg = engine_config(settings, checkpoint.path, checkpoint.name,
                               tuple(sorted(prompts.end_of_turn_token_ids)))
    engine = AsyncEngine(engine_cfg, settings.engine_mode, settings.max_queue_size, observer=metrics,
                         max_restarts=settings.engine_max_restarts,
                         restart_window_seconds=settings.engine_restart_window_seconds,
                         max_requests_per_tenant=settings.max_requests_per_tenant if auth.enabled else None)
    info = await engine.start()
    limit = settings.max_tokens_limit or info.context_length - 1
    if limit >= info.context_length:
        raise ConfigError(f"--max-tokens-limit {limit} must be below the context window ({info.context_length})")
    if settings.default_max_tokens > limit:
        raise ConfigError(f"--default-max-tokens {settings.default_max_tokens} is above the max_tokens limit {limit}")
    policy = SamplingPolicy.from_settings(settings, limit)
    store = make_store(settings, metrics)
    log.info("conversations: %s", store.description)
    try:
        await store.ping()
    except Unavailable as e:
        log.warning("%s; serving anyway: Chat answers UNAVAILABLE until it is reachable", e)

    metrics.model_info.labels(info.name, info.architecture, info.dtype, info.device).set(1)
    limits = ChatLimits(max_message_chars=settings.max_message_chars,
                        max_system_prompt_chars=settings.max_system_prompt_chars)
    chat = ChatService(engine, store, prompts, limits,
                       snapshot_interval_seconds=settings.answer_snapshot_interval_seconds,
                       max_grammar_compile_seconds=settings.max_grammar_compile_seconds)
    servicer = ChatServicer(chat, auth, policy,
                            model_info_to_pb(info, policy, prompts.end_of_question_marker))
    server = grpc.aio.server(interceptors=[ErrorInterceptor(SERVICE_NAME, metrics.on_rpc)],
                             options=grpc_options(settings))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (in use?); change --host/--port")
    await server.start()
    http = None
    if http_sock is not None:
        api = HttpApi(servicer.chat, auth, policy, info, metrics, settings.max_http_body_bytes)
        http = await start_http(settings, http_sock, api)
    running = RunningServer(server, port, engine, store, servicer, health_servicer, metrics, settings, http)
    engine.add_state_listener(running.on_engine_state)
    await running.set_serving(True)
    log.info("serving %s on %s:%d (gRPC, health, reflection; %s)", SERVICE_NAME, settings.host, port,
             transport_name(settings))
    if http is not None:
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", http.scheme, settings.host, http.port)
    return running


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain (exit status 0), or until the engine gives up restarting (1)."""
    metrics = Metrics()
    metrics.serving.set(0)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    running = await start_server(settings, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(running.engine.wait_failed())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        log.error("the engine keeps dying (%d restarts): exiting for the orchestrator to restart the server",
                  running.engine.num_restarts)
        await running.drain_and_stop(grace=0)
        return 1
    stopped.cancel()
    failed.cancel()
    log.info("shutting down: draining for up to %.0f s", settings.grace_period_seconds)
    await running.drain_and_stop()
    log.info("stopped")
    return 0
