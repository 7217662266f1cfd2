"""Health, reflection, model info and the Prometheus series a chat leaves behind."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, SERVICE, ask, assert_health_serving, rpc_error

pytestmark = pytest.mark.asyncio(loop_scope="package")

HISTOGRAMS = ("eoq_time_to_first_token_seconds", "eoq_inter_token_latency_seconds",
              "eoq_e2e_request_latency_seconds", "eoq_queue_wait_seconds")


class Samples:
    """The server's metrics as /metrics shows them (the exposition text, parsed), by name and labels."""

    def __init__(self, server: RunningServer) -> None:
        text = generate_latest(server.metrics.registry).decode()
        self.values: dict[tuple[str, frozenset], float] = {}
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.values[(name, frozenset(labels.items()))]

    def count(self, name: str, **labels: str) -> float:
        """A counter's value; 0 while the labelled series does not exist yet (nothing counted)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)


async def test_health_serving_for_the_server_and_the_service(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = await assert_health_serving(channel)
        error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="no.Such")))
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
        listed, described = [r async for r in reflection.ServerReflectionInfo(iter(requests))]
    assert sorted(s.name for s in listed.list_services_response.service) == [
        SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    [chat_file] = [f for f in files if f.package == "chat.v1"]
    [service] = chat_file.service
    assert sorted(m.name for m in service.method) == sorted(
        ["Chat", "Complete", "CreateConversation", "GetConversation", "ListConversations", "DeleteConversation",
         "GetModelInfo", "Regenerate", "SetActiveBranch", "DeleteMessage", "WatchAnswer", "CancelAnswer"])


async def test_model_info(server: RunningServer, stub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.architecture, info.context_length, info.vocab_size) == (
        "SmolLM2-135M-Instruct", "llama", 8192, 49152)
    assert info.dtype in ("bfloat16", "float32")  # auto: bfloat16 where the CPU computes it natively
    assert info.dtype == server.engine.info.dtype
    assert info.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert (info.max_tokens_limit, info.default_max_tokens) == (8191, 512)
    assert info.end_of_question_marker == "<|im_start|>assistant\n"
    # auto: a bfloat16 cache, beside bfloat16 models and float32 ones running int8 activations (CPUs without fast
    # bfloat16). The tests' 0.5 GiB at 30 layers x 3 KV heads x 64 x 2 (K, V) x 2 bytes a token, whole blocks.
    assert info.kv_cache_dtype == server.engine.info.kv_cache_dtype == "bfloat16"
    bytes_per_token = 30 * 3 * 64 * 2 * 2
    assert info.kv_bytes_per_token == bytes_per_token
    assert info.kv_cache_tokens == int(0.5 * 2**30 // (bytes_per_token * 16)) * 16


async def test_a_chat_is_counted_in_every_series(server: RunningServer, stub) -> None:
    before = Samples(server)
    answer = await ask(stub, FRANCE, max_tokens=32)
    after = Samples(server)

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    usage = answer.last.usage
    assert delta("eoq_requests_total", rpc="Chat", code="OK") == 1
    for name in HISTOGRAMS[0], HISTOGRAMS[2], HISTOGRAMS[3]:
        assert delta(f"{name}_count") == 1, name
    # One inter-token gap between consecutive outputs that carry tokens.
    assert delta("eoq_inter_token_latency_seconds_count") == sum(bool(e.token_ids) for e in answer.events) - 1
    assert delta("eoq_time_to_first_token_seconds_sum") == pytest.approx(usage.time_to_first_token_seconds)
    assert delta("eoq_e2e_request_latency_seconds_sum") == pytest.approx(usage.total_seconds)
    assert delta("eoq_prompt_tokens_total") == usage.prompt_tokens
    assert delta("eoq_generation_tokens_total") == usage.completion_tokens
    assert delta("eoq_prefix_cache_queries_total") == usage.prompt_tokens
    assert delta("eoq_prefix_cache_hits_total") == usage.cached_prompt_tokens
    assert delta("eoq_request_finished_total", finish_reason="stop") == 1
    assert delta("eoq_batch_size_count") >= usage.completion_tokens  # a step per token at least
    # A new conversation: create, lock, read the history, store the turn, unlock.
    for op in ("create", "lock", "get", "append_turn", "unlock"):
        assert delta("eoq_redis_operation_seconds_count", operation=op) == 1, op
    assert delta("eoq_redis_errors_total", operation="append_turn") == 0

    assert after("eoq_serving") == 1
    assert after("eoq_model_info", model="SmolLM2-135M-Instruct", architecture="llama",
                 dtype=server.engine.info.dtype, device=server.engine.info.device) == 1
    assert (after("eoq_requests_running"), after("eoq_requests_waiting")) == (0, 0)
    assert 0 <= after("eoq_kv_cache_usage_ratio") <= 1
    assert after.families["eoq_requests"] == "counter"
    assert {after.families[name] for name in HISTOGRAMS} == {"histogram"}


async def test_a_refused_call_is_counted_with_its_code(server: RunningServer, stub) -> None:
    before = Samples(server)
    error = await rpc_error(ask(stub, FRANCE, temperature=-1.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(stub.GetConversation(pb.GetConversationRequest(id="0" * 32)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    after = Samples(server)

    def delta(rpc: str, code: str) -> float:
        return after.count("eoq_requests_total", rpc=rpc, code=code) - before.count("eoq_requests_total", rpc=rpc,
                                                                                   code=code)

    assert delta("Chat", "INVALID_ARGUMENT") == 1
    assert delta("GetConversation", "NOT_FOUND") == 1
    assert delta("Chat", "OK") == 0
