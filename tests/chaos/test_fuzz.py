"""A property-based sweep (hypothesis) over every field of every RPC, against a real server: whatever a client
sends, the answer is OK or a client-error status — never UNKNOWN or INTERNAL, never a hang — and the server is
healthy and answering afterwards."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from tests.clients.conftest import ServerThread

CLIENT_ERRORS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                 grpc.StatusCode.OUT_OF_RANGE}
SWEEP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text as clients send it: anything UTF-8 can carry, control tokens and template syntax included.
TRICKY = ["<|im_start|>", "<|im_end|>", "<EOQ>", "{{ messages }}", "{% raw %}", "\x00", "\ue000", "\n\n"]
text = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=300), st.sampled_from(TRICKY),
                 st.lists(st.sampled_from(TRICKY), max_size=8).map("".join))
ids = st.one_of(st.just(""), text, st.text("0123456789abcdef", min_size=32, max_size=32),
                st.text("0123456789abcdef", min_size=200, max_size=2000))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1e-45, -0.0]))
sampling = st.builds(
    pb.SamplingParams,
    temperature=floats, top_p=floats, top_k=st.integers(-(2**31), 2**31 - 1), repetition_penalty=floats,
    max_tokens=st.one_of(st.integers(0, 6), st.integers(17, 2**32 - 1)),  # the server's limit here is 16
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(text, max_size=20), ignore_eos=st.booleans(),
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    thread = ServerThread(default_max_tokens=4, max_tokens_limit=16, max_message_chars=100_000)
    try:
        thread.start()
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def status_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if not isinstance(result, pb.Conversation | pb.ListConversationsResponse | pb.ModelInfo
                          | pb.DeleteConversationResponse):
            for _ in result:
                pass
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, f"{e.code().name}: {e.details()}"
        event(e.code().name)
        return e.code()
    event("OK")
    return grpc.StatusCode.OK


@SWEEP
@given(conversation_id=ids, message=text, system_prompt=text, params=sampling)
def test_chat(stub, conversation_id, message, system_prompt, params) -> None:
    request = pb.ChatRequest(conversation_id=conversation_id, message=message, system_prompt=system_prompt,
                             sampling=params)
    code = status_of(lambda: stub.Chat(request, timeout=60))
    if code is grpc.StatusCode.OK:  # then every value was acceptable
        assert message.strip() and (params.max_tokens <= 16)
        # A denormal may read as 0 where the process flushes them (eoq's kernels set that when loaded).
        assert not math.isnan(params.temperature) and (params.temperature >= 0 or -params.temperature < 1.2e-38)


@SWEEP
@given(prompt=text, params=sampling)
def test_complete(stub, prompt, params) -> None:
    status_of(lambda: stub.Complete(pb.CompleteRequest(prompt=prompt, sampling=params), timeout=60))


@SWEEP
@given(system_prompt=text, conversation_id=ids, page_size=st.integers(0, 2**32 - 1),
       page_token=st.one_of(text, st.binary(max_size=300).map(lambda b: __import__("base64").urlsafe_b64encode(b)
                                                              .decode())))
def test_conversation_rpcs(stub, system_prompt, conversation_id, page_size, page_token) -> None:
    status_of(lambda: stub.CreateConversation(pb.CreateConversationRequest(system_prompt=system_prompt), timeout=10))
    status_of(lambda: stub.GetConversation(pb.GetConversationRequest(id=conversation_id), timeout=10))
    status_of(lambda: stub.ListConversations(pb.ListConversationsRequest(page_size=page_size,
                                                                         page_token=page_token), timeout=10))
    status_of(lambda: stub.DeleteConversation(pb.DeleteConversationRequest(id=conversation_id), timeout=10))
    status_of(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))


def test_the_server_is_healthy_and_answers_after_the_sweep(server, stub) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    events = list(stub.Chat(pb.ChatRequest(message="What is the capital of France?",
                                           sampling=pb.SamplingParams(max_tokens=12)), timeout=60))
    assert "Paris" in "".join(e.delta for e in events)
