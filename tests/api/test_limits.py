"""A small server (256-token context, one sequence at a time, one waiting): histories longer than the context
window and the bounded waiting queue. A capped server: full conversations and the tenant quota."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from eoq.chat.prompt import ChatMessage
from eoq.chat.store import ConversationLimits
from tests.api.client import (
    FRANCE,
    ask,
    capture_requests,
    collect,
    connect,
    engine_idle,
    rpc_error,
    sampling,
    serving,
    wait_for,
)
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

CONTEXT, MAX_TOKENS = 256, 16
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def small(shared_redis: RedisServer) -> AsyncIterator[RunningServer]:
    async with serving(redis_url=shared_redis.url, max_model_len=CONTEXT, default_max_tokens=MAX_TOKENS,
                       max_num_seqs=1, max_queue_size=1, kv_cache_memory_gb=0.05) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="package")
async def small_stub(small: RunningServer):
    async with connect(small) as s:
        yield s


def question(i: int) -> str:
    return f"Question {i}: describe the number {i} in detail, with its divisors, its digits and a fun fact about it."


async def test_history_beyond_the_context_window_drops_the_oldest_turns(small: RunningServer, small_stub,
                                                                       monkeypatch) -> None:
    requests = capture_requests(monkeypatch, small)
    prompts = small.servicer.chat.prompts
    tok = prompts.tokenizer
    cid, answers, dropped = "", [], []
    for i in range(7):
        answer = await ask(small_stub, question(i), cid, max_tokens=0)  # 0: the server default (16)
        cid = answer.conversation_id
        assert answer.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert answer.last.usage.completion_tokens <= MAX_TOKENS
        answers.append(answer.text)
        dropped.append(answer.events[0].dropped_turns)
        assert all(e.dropped_turns == 0 for e in answer.events[1:])

        prompt = requests[-1].prompt_token_ids
        assert len(prompt) <= CONTEXT - MAX_TOKENS
        text = tok.decode(prompt)
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")  # always kept
        d = dropped[-1]
        assert all(question(j) not in text for j in range(d))
        assert all(question(j) in text for j in range(d, i + 1))
        if d:  # the fewest: keeping one more turn would not fit
            kept = [ChatMessage(role, content) for j in range(d - 1, i)
                    for role, content in (("user", question(j)), ("assistant", answers[j]))]
            assert len(prompts.render(None, [*kept, ChatMessage("user", question(i))])) > CONTEXT - MAX_TOKENS
    assert dropped[:2] == [0, 0] and dropped[-1] > 0
    assert dropped == sorted(dropped)

    conv = await small_stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert conv.message_count == 14
    assert [m.content for m in conv.messages] == [x for i in range(7) for x in (question(i), answers[i])]


async def test_beyond_the_bounded_queue_is_resource_exhausted_at_once(small: RunningServer, small_stub) -> None:
    long = pb.CompleteRequest(prompt="Once upon a time", sampling=sampling(200, ignore_eos=True))
    running = small_stub.Complete(long)
    events = running.__aiter__()
    await events.__anext__()
    waiting = small_stub.Complete(pb.CompleteRequest(prompt="Hello", sampling=sampling(8, ignore_eos=True)))
    await wait_for(lambda: small.engine.num_unfinished == 2, 5.0, "one request running and one waiting")

    full = "the server is full: 2 requests running or waiting (limit 2); retry later"
    start = time.monotonic()
    error = await rpc_error(collect(small_stub.Complete(pb.CompleteRequest(prompt="Hi", sampling=sampling()))))
    assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, full)
    newest = (await small_stub.ListConversations(pb.ListConversationsRequest(page_size=1))).conversations
    error = await rpc_error(ask(small_stub, "Hi"))
    assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, full)
    assert time.monotonic() - start < 3.0
    # The refused Chat started no conversation.
    assert (await small_stub.ListConversations(pb.ListConversationsRequest(page_size=1))).conversations == newest

    running.cancel()
    answer = await collect(waiting)  # the waiting one is served once the running one is gone
    assert (answer.last.finish_reason, answer.last.usage.completion_tokens) == (pb.FINISH_REASON_LENGTH, 8)
    await wait_for(lambda: engine_idle(small), 3.0, "every request over and every block free")


# --- a server with tiny limits; each test its own tenant ------------------------------------------------------

FULL = [("authorization", "Bearer full-key")]
QUOTA = [("authorization", "Bearer quota-key")]


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def capped(shared_redis: RedisServer) -> AsyncIterator[RunningServer]:
    async with serving(redis_url=shared_redis.url, max_model_len=CONTEXT, default_max_tokens=MAX_TOKENS,
                       kv_cache_memory_gb=0.05, max_conversation_messages=2, max_conversation_bytes=2000,
                       max_conversations_per_tenant=2, api_keys="full-key:full,quota-key:quota") as s:
        yield s


@pytest_asyncio.fixture(loop_scope="package")
async def capped_stub(capped: RunningServer):
    async with connect(capped) as s:
        yield s


async def test_a_full_conversation_is_failed_precondition(capped: RunningServer, capped_stub) -> None:
    assert capped.store.limits == ConversationLimits(max_messages=2, max_bytes=2000, max_conversations_per_tenant=2)
    first = await ask(capped_stub, FRANCE, metadata=FULL, max_tokens=8)
    cid = first.conversation_id
    error = await rpc_error(ask(capped_stub, "And of Germany?", cid, metadata=FULL, max_tokens=8))
    assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION,
                                               "conversation is full (2 messages, limit 2): start a new one")
    conv = await capped_stub.GetConversation(pb.GetConversationRequest(id=cid), metadata=FULL)
    assert [m.content for m in conv.messages] == [FRANCE, first.text]  # the refused turn left nothing
    await wait_for(lambda: engine_idle(capped), 3.0, "every request over and every block free")
    error = await rpc_error(ask(capped_stub, "And of Italy?", cid, metadata=FULL, max_tokens=8))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # refused again, not ABORTED: nothing stayed locked


async def test_a_system_prompt_over_the_byte_limit_is_invalid_argument(capped_stub) -> None:
    error = await rpc_error(capped_stub.CreateConversation(pb.CreateConversationRequest(system_prompt="é" * 1001),
                                                           metadata=FULL))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the system prompt is too long (2002 bytes, a conversation holds at most 2000)"


async def test_the_tenant_quota_is_resource_exhausted(capped_stub) -> None:
    first = (await ask(capped_stub, FRANCE, metadata=QUOTA, max_tokens=8)).conversation_id
    await capped_stub.CreateConversation(pb.CreateConversationRequest(), metadata=QUOTA)
    quota = ("too many conversations: this tenant has 2, its quota (max_conversations_per_tenant) is 2; delete old "
             "conversations (DeleteConversation) to start new ones")
    error = await rpc_error(capped_stub.CreateConversation(pb.CreateConversationRequest(), metadata=QUOTA))
    assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, quota)
    error = await rpc_error(ask(capped_stub, FRANCE, metadata=QUOTA, max_tokens=8))  # a Chat that would start one
    assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, quota)
    listed = await capped_stub.ListConversations(pb.ListConversationsRequest(), metadata=QUOTA)
    assert len(listed.conversations) == 2
    await capped_stub.DeleteConversation(pb.DeleteConversationRequest(id=first), metadata=QUOTA)
    assert (await ask(capped_stub, FRANCE, metadata=QUOTA, max_tokens=8)).last.finish_reason
