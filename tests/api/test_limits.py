"""A small server (256-token context, one sequence at a time, one waiting): histories longer than the context
window and the bounded waiting queue."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from eoq.chat.prompt import ChatMessage
from tests.api.client import (
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
