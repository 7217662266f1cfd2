"""A server SIGKILLed while it generates a detached answer: the conversation is unlocked within the lease, the
answer as far as it got is stored as CANCELLED, a watcher on another replica ends it, the conversation goes on."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from tests.api.client import FRANCE, ask, connect, sampling, serving
from tests.chaos.conftest import eoq_serve

pytestmark = pytest.mark.slow

LEASE_SECONDS = 2.0


async def test_a_server_killed_mid_answer_leaves_it_stored_cancelled_and_the_conversation_free(
    redis_server, tmp_path: Path
) -> None:
    async with serving(redis_url=redis_server.url) as survivor, connect(survivor) as other:
        async with eoq_serve(tmp_path, "--redis-url", redis_server.url, "--lock-ttl-seconds", str(LEASE_SECONDS),
                             "--answer-snapshot-interval-seconds", "0.1", new_session=True) as doomed:
            call = doomed.stub.Chat(pb.ChatRequest(message="Write a long story about a lighthouse.", detach=True,
                                                   sampling=sampling(2000, ignore_eos=True)))
            seen = [await call.read() for _ in range(30)]
            await asyncio.sleep(0.3)  # a snapshot or two of the text so far is in the store
            os.killpg(doomed.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            await doomed.proc.wait()
        cid, answer_id = seen[0].conversation_id, seen[0].message_id
        # A watcher on the surviving replica: it gets what was published, then a cancelled end once the dead
        # server's lock expires.
        events = [e async for e in other.WatchAnswer(pb.WatchAnswerRequest(conversation_id=cid,
                                                                          message_id=answer_id))]
        assert time.monotonic() - killed < LEASE_SECONDS + 3
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert [e.delta for e in events[:30]] == [e.delta for e in seen]
        conv = await other.GetConversation(pb.GetConversationRequest(id=cid))
        stored = conv.messages[1]
        assert (stored.id, stored.finish_reason, stored.generating) == (answer_id, pb.FINISH_REASON_CANCELLED, False)
        assert stored.content == "".join(e.delta for e in events) and len(stored.content) > 0
        # Unlocked: the conversation takes the next question, on the survivor.
        follow = await ask(other, FRANCE, cid)
        assert follow.last.finish_reason == pb.FINISH_REASON_STOP
        messages = (await other.GetConversation(pb.GetConversationRequest(id=cid))).messages
        assert [m.id for m in messages][:2] == [seen[0].user_message_id, answer_id]
        assert messages[1].finish_reason == pb.FINISH_REASON_CANCELLED
