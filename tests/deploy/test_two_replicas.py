"""Scale-out: two ``eoq serve`` processes (real default model) on one real redis-server behave as one service.

Conversations live in Redis, so a conversation begun on one replica continues on the other with its whole
history; the per-conversation lock lives there too, so a turn streaming on one replica makes the other refuse
the same conversation (ABORTED) until it is stored; and a client balancing calls round-robin over both sees no
errors while both replicas serve. The replicas start in parallel, with one torch thread each (two cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from tests.conftest import running_redis

from .live import CALL_TIMEOUT_SECONDS, Answer, EoqServer, bearer, chat

pytestmark = pytest.mark.e2e

API_KEY = "replica-key"
AUTH = bearer(API_KEY)
STORY = "Tell me a long story about a lighthouse keeper."


@dataclass(frozen=True)
class Replicas:
    a: EoqServer
    b: EoqServer


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    work = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(work / "redis"))
        servers = [
            EoqServer(
                work, name, redis_url=redis.url, api_keys=f"{API_KEY}:team", extra_args=["--num-threads", "1"]
            )
            for name in ("a", "b")
        ]
        for server in servers:
            stack.callback(server.stop)
            server.start()
        for server in servers:
            server.wait_serving()
        yield Replicas(*servers)


@pytest.fixture(scope="module")
def stubs(
    replicas: Replicas,
) -> Iterator[tuple[chat_pb2_grpc.ChatServiceStub, chat_pb2_grpc.ChatServiceStub]]:
    """One stub per replica, each on its own channel."""
    with grpc.insecure_channel(replicas.a.address) as a, grpc.insecure_channel(replicas.b.address) as b:
        yield chat_pb2_grpc.ChatServiceStub(a), chat_pb2_grpc.ChatServiceStub(b)


def get_conversation(stub: chat_pb2_grpc.ChatServiceStub, conversation_id: str) -> pb.Conversation:
    return stub.GetConversation(pb.GetConversationRequest(id=conversation_id), metadata=AUTH, timeout=30)


def turns(conversation: pb.Conversation) -> list[tuple[int, str]]:
    return [(m.role, m.content) for m in conversation.messages]


def test_a_conversation_begun_on_one_replica_continues_on_the_other(stubs) -> None:
    stub_a, stub_b = stubs
    first = chat(stub_a, "What is the capital of France?", metadata=AUTH, max_tokens=32)
    second = chat(stub_b, "And of Germany?", first.conversation_id, metadata=AUTH, max_tokens=32)
    assert "Paris" in first.text
    assert "Berlin" in second.text  # only with the first turn as context is "And of Germany?" about capitals
    # B's prompt is the whole history: the first question and answer, then the new question.
    first_usage = first.last.usage
    assert second.last.usage.prompt_tokens > first_usage.prompt_tokens + first_usage.completion_tokens
    expected = [
        (pb.ROLE_USER, "What is the capital of France?"), (pb.ROLE_ASSISTANT, first.text),
        (pb.ROLE_USER, "And of Germany?"), (pb.ROLE_ASSISTANT, second.text),
    ]  # fmt: skip
    assert turns(get_conversation(stub_a, first.conversation_id)) == expected
    assert turns(get_conversation(stub_b, first.conversation_id)) == expected


def test_a_turn_streaming_on_one_replica_makes_the_other_refuse_the_conversation(stubs) -> None:
    stub_a, stub_b = stubs
    request = pb.ChatRequest(message=STORY, sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True))
    stream = stub_a.Chat(request, metadata=AUTH, timeout=CALL_TIMEOUT_SECONDS)
    events = iter(stream)
    first = next(events)  # A holds the conversation's lock from here until the answer is stored
    with pytest.raises(grpc.RpcError) as refused:
        chat(stub_b, "Shorter, please.", first.conversation_id, metadata=AUTH)
    assert refused.value.code() == grpc.StatusCode.ABORTED, refused.value.details()
    answer = Answer([first, *events])
    assert stream.code() == grpc.StatusCode.OK
    assert (answer.last.finish_reason, answer.last.usage.completion_tokens) == (pb.FINISH_REASON_LENGTH, 200)

    stored = get_conversation(stub_b, first.conversation_id)
    assert turns(stored) == [(pb.ROLE_USER, STORY), (pb.ROLE_ASSISTANT, answer.text)]
    assert stored.messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # The lock went with the stored answer: B now continues the conversation.
    chat(stub_b, "Shorter, please.", first.conversation_id, metadata=AUTH, max_tokens=4)
    assert get_conversation(stub_a, first.conversation_id).message_count == 4


def test_a_round_robin_channel_spreads_chats_over_both_replicas(replicas: Replicas) -> None:
    before = {r.name: r.ok_chats() for r in (replicas.a, replicas.b)}
    target = f"ipv4:{replicas.a.address},{replicas.b.address}"
    with grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        # 20 sequential Chats: ten conversations of two turns, each turn wherever the balancer sends it.
        conversation_ids = []
        for i in range(10):
            first = chat(stub, f"Name a colour. ({i})", metadata=AUTH, max_tokens=4)
            chat(stub, "Another one?", first.conversation_id, metadata=AUTH, max_tokens=4)
            conversation_ids.append(first.conversation_id)
        # 6 concurrent Chats, each starting its own conversation.
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(
                pool.map(lambda i: chat(stub, f"Count to {i}.", metadata=AUTH, max_tokens=4), range(6))
            )
        assert len({a.conversation_id for a in answers}) == 6
        assert all(a.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED for a in answers)
        for conversation_id in conversation_ids:
            assert get_conversation(stub, conversation_id).message_count == 4
    served = {r.name: r.ok_chats() - before[r.name] for r in (replicas.a, replicas.b)}
    assert sum(served.values()) == 26, served
    assert min(served.values()) >= 1, f"one replica served nothing: {served}"
