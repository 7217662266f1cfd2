"""Races against a real server and a real redis-server: a lock lost mid-answer, a storm of cancels, and an answer
under ignore_eos whose tokens run past the end-of-answer token."""

from __future__ import annotations

import asyncio

import grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.chat.redis_store import RedisConversationStore
from tests.api.client import FRANCE, ask, engine_idle, rpc_error, sampling, serving, wait_for

STORY = "Tell me a long story about a lighthouse keeper."


async def test_an_answer_whose_lock_was_lost_is_refused_aborted_and_not_stored(redis_server) -> None:
    """The lease expired mid-answer (say Redis stalled past its renewals) and another replica took the
    conversation: the final write checks the lock and refuses, so two answers never interleave."""
    async with serving(redis_url=redis_server.url) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            first = await ask(stub, FRANCE, max_tokens=16)
            cid = first.conversation_id
            call = stub.Chat(pb.ChatRequest(conversation_id=cid, message=STORY,
                                            sampling=sampling(64, ignore_eos=True)))
            events = call.__aiter__()
            await events.__anext__()
            with redis_server.client() as r:
                r.set(f"eoq:conv:{cid}:lock", "another-replica", px=30_000)
            error = await rpc_error(lambda: _drain(events))
            assert error.code() == grpc.StatusCode.ABORTED
            assert "its lock expired before the answer was stored" in error.details()
            with redis_server.client() as r:
                r.delete(f"eoq:conv:{cid}:lock")
            conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
            assert [m.content for m in conv.messages] == [FRANCE, first.text]


async def _drain(events) -> None:
    async for _ in events:
        pass


async def test_a_cancel_storm_stores_every_answer_once_and_frees_the_engine(redis_server) -> None:
    async with serving(redis_url=redis_server.url) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            async def cancelled_after(n: int) -> str:
                call = stub.Chat(pb.ChatRequest(message=STORY, sampling=sampling(64, ignore_eos=True)))
                cid, seen = "", 0
                async for event in call:
                    cid, seen = event.conversation_id, seen + 1
                    if seen >= n:
                        call.cancel()
                        break
                return cid

            ids = await asyncio.gather(*(cancelled_after(1 + i % 4) for i in range(24)))
            await wait_for(lambda: engine_idle(running), 10, "the engine idle after the cancels")
    store = RedisConversationStore(redis_server.url, ttl_seconds=3600)
    try:
        for cid in ids:
            conv = await store.get("public", cid)
            assert conv.message_count == 2, cid  # stored once: never twice, never lost
            assert conv.messages[1].finish_reason.value == "cancelled"
    finally:
        await store.close()


async def test_an_answer_past_the_end_of_answer_token_is_stored_without_its_ids(redis_server) -> None:
    """Under ignore_eos an answer may run past <|im_end|>: its ids are not kept (replayed next turn they would be
    a control token inside the history); the next turn tokenizes its text."""
    async with serving(redis_url=redis_server.url) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            answer = await ask(stub, FRANCE, max_tokens=48, ignore_eos=True)
            end_ids = set(running.engine.info.eos_token_ids)
            assert end_ids & set(answer.token_ids), "the answer should run past an end-of-answer token"
            conv = await running.store.get("public", answer.conversation_id)
            assert conv.messages[1].token_ids is None
            plain = await ask(stub, FRANCE, max_tokens=48)
            stored = await running.store.get("public", plain.conversation_id)
            assert stored.messages[1].token_ids is not None  # a normal answer keeps its ids
