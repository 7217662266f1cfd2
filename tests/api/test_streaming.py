"""A conversation's answers one at a time (also across replicas), cancels and deadlines that free the engine
and keep the partial answer, and many conversations at once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, ask, connect, engine_idle, rpc_error, sampling, serving, wait_for
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

LONG = 64  # tokens of a long answer (ignore_eos): seconds of streaming, against milliseconds for a refusal
STORY = "Tell me a long story about a lighthouse keeper."


def requests_counted(server: RunningServer, code: str) -> float:
    return server.metrics.registry.get_sample_value("eoq_requests_total", {"rpc": "Chat", "code": code}) or 0.0


async def start_long_answer(stub, conversation_id: str, max_tokens: int = LONG):
    """A Chat whose answer streams for a while; returns the call, its iterator and its first event."""
    call = stub.Chat(pb.ChatRequest(conversation_id=conversation_id, message=STORY,
                                    sampling=sampling(max_tokens, ignore_eos=True)))
    events = call.__aiter__()
    return call, events, await events.__anext__()


async def stored(stub, conversation_id: str, num_messages: int, timeout: float = 5.0) -> pb.Conversation:
    """The conversation once it has ``num_messages`` (a cancelled call's turn is stored as its handler ends)."""
    conv = None

    async def has() -> bool:
        nonlocal conv
        conv = await stub.GetConversation(pb.GetConversationRequest(id=conversation_id))
        return conv.message_count >= num_messages

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await has():
        assert loop.time() < deadline, f"conversation {conversation_id}: {conv.message_count} messages"
        await asyncio.sleep(0.02)
    assert conv.message_count == num_messages == len(conv.messages)
    return conv


async def start_while_streaming(server: RunningServer, stub):
    """A conversation of one turn whose next, long answer is now streaming: its id, then ``start_long_answer``'s
    call, iterator and first event."""
    cid = (await ask(stub, FRANCE, max_tokens=8)).conversation_id
    call, events, first = await start_long_answer(stub, cid)
    assert server.servicer.num_streaming == 1
    return cid, call, events, first


async def assert_busy(stub, cid: str) -> None:
    """A question to ``cid`` (through ``stub``) while its answer streams is refused ABORTED, saying why."""
    error = await rpc_error(ask(stub, "And of Germany?", cid))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.ABORTED, f"conversation {cid} is busy: another answer is still streaming")


async def finish_and_check(stub, call, events, first: pb.ChatEvent, cid: str, num_messages: int) -> None:
    """The long answer completes unaffected and is stored whole."""
    rest = [e async for e in events]
    text = first.delta + "".join(e.delta for e in rest)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == LONG
    assert await call.code() == grpc.StatusCode.OK
    conv = await stored(stub, cid, num_messages)
    assert [(m.content, m.finish_reason) for m in conv.messages[-2:]] == [
        (STORY, pb.FINISH_REASON_UNSPECIFIED), (text, pb.FINISH_REASON_LENGTH)]


async def test_second_question_while_an_answer_streams_is_aborted(server: RunningServer, stub) -> None:
    cid, call, events, first = await start_while_streaming(server, stub)
    await assert_busy(stub, cid)
    await finish_and_check(stub, call, events, first, cid, 4)
    # Free again once the answer is over.
    assert (await ask(stub, "And of Germany?", cid)).last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert engine_idle(server)


async def test_busy_across_two_servers_sharing_redis(server: RunningServer, stub, shared_redis: RedisServer) -> None:
    async with serving(redis_url=shared_redis.url) as replica, connect(replica) as replica_stub:
        cid, call, events, first = await start_while_streaming(server, stub)
        await assert_busy(replica_stub, cid)
        assert replica.engine.num_unfinished == 0  # refused before it reached the engine
        await finish_and_check(stub, call, events, first, cid, 4)
        # The replica continues the conversation with the whole history.
        await ask(replica_stub, "And of Germany?", cid, max_tokens=8)
        conv = await stored(replica_stub, cid, 6)
        assert [m.content for m in conv.messages[::2]] == [FRANCE, STORY, "And of Germany?"]


async def test_cancel_mid_stream_aborts_the_engine_request_and_stores_the_partial_answer(
    server: RunningServer, stub
) -> None:
    cid = (await ask(stub, FRANCE, max_tokens=8)).conversation_id
    cancelled_before = requests_counted(server, "CANCELLED")
    call, _, first = await start_long_answer(stub, cid, max_tokens=2000)
    assert not engine_idle(server)
    call.cancel()
    await wait_for(lambda: engine_idle(server), 3.0, "the engine aborted the request and freed its KV blocks")
    conv = await stored(stub, cid, 4)
    partial = conv.messages[3]
    assert partial.finish_reason == pb.FINISH_REASON_CANCELLED
    assert partial.content.startswith(first.delta)
    assert conv.messages[2].content == STORY
    await wait_for(lambda: requests_counted(server, "CANCELLED") == cancelled_before + 1, 3.0, "counted")
    # Not left locked: the next question is answered.
    answer = await ask(stub, "What is the capital of Germany?", cid, max_tokens=32)
    assert answer.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    await stored(stub, cid, 6)


async def test_passed_deadline_aborts_the_engine_request_and_stores_the_partial_answer(
    server: RunningServer, stub
) -> None:
    cid = (await ask(stub, FRANCE, max_tokens=8)).conversation_id
    counted_before = requests_counted(server, "DEADLINE_EXCEEDED")
    error = await rpc_error(ask(stub, STORY, cid, timeout=1.5, max_tokens=2000, ignore_eos=True))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(lambda: engine_idle(server), 3.0, "the engine aborted the request and freed its KV blocks")
    conv = await stored(stub, cid, 4)
    assert (conv.messages[2].content, conv.messages[3].finish_reason) == (STORY, pb.FINISH_REASON_CANCELLED)
    await wait_for(lambda: requests_counted(server, "DEADLINE_EXCEEDED") == counted_before + 1, 3.0, "counted")
    answer = await ask(stub, "What is the capital of Germany?", cid, max_tokens=32)
    assert answer.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def test_fifty_conversations_at_once(server: RunningServer, stub) -> None:
    steps = server.metrics.registry.get_sample_value("eoq_batch_size_count")
    questions = [f"What is {i} plus {i}?" for i in range(50)]
    answers = await asyncio.gather(*(ask(stub, q, max_tokens=8) for q in questions))
    assert len({a.conversation_id for a in answers}) == 50
    for question, answer in zip(questions, answers):
        assert answer.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        conv = await stub.GetConversation(pb.GetConversationRequest(id=answer.conversation_id))
        assert [(m.role, m.content, m.finish_reason) for m in conv.messages] == [
            (pb.ROLE_USER, question, pb.FINISH_REASON_UNSPECIFIED),
            (pb.ROLE_ASSISTANT, answer.text, answer.last.finish_reason),
        ]
    tokens = sum(a.last.usage.completion_tokens for a in answers)
    # Batched: far fewer engine steps than tokens.
    assert server.metrics.registry.get_sample_value("eoq_batch_size_count") - steps < tokens / 4
    assert engine_idle(server)
