"""Bad requests are refused with the right status code and a message that says what was wrong."""

from __future__ import annotations

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, ask, collect, rpc_error, sampling

pytestmark = pytest.mark.asyncio(loop_scope="package")

UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


async def num_conversations(stub) -> int:
    """How many conversations the tenant has (walks every page)."""
    n, token = 0, ""
    while True:
        page = await stub.ListConversations(pb.ListConversationsRequest(page_size=100, page_token=token))
        n += len(page.conversations)
        token = page.next_page_token
        if not token:
            return n


@pytest.mark.parametrize(
    ("params", "details"),
    [
        ({"temperature": -0.5}, "temperature must be >= 0 (0 = greedy), got -0.5"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (0 = off), got 1.5"),
        ({"top_p": -0.1}, "top_p must be in (0, 1] (0 = off), got -0.1"),
        ({"top_k": -1}, "top_k must be >= 0 (0 = off), got -1"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0 (0 = off), got -1.0"),
        ({"max_tokens": 8192}, "max_tokens must be <= 8191, got 8192"),
        ({"stop": [f"s{i}" for i in range(17)]}, "at most 16 stop strings are allowed, got 17"),
        ({"stop": ["ok", ""]}, "stop strings must not be empty"),
    ],
    ids=["temperature<0", "top_p>1", "top_p<0", "top_k<0", "repetition_penalty<0", "max_tokens>limit",
         "17 stop strings", "empty stop string"],
)
async def test_bad_sampling_is_invalid_argument(stub, params: dict, details: str) -> None:
    before = await num_conversations(stub)
    request = pb.ChatRequest(message=FRANCE, sampling=pb.SamplingParams(**params))
    error = await rpc_error(collect(stub.Chat(request)))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    error = await rpc_error(collect(stub.Complete(pb.CompleteRequest(prompt="Hello", sampling=request.sampling))))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    assert await num_conversations(stub) == before  # a refused first question starts no conversation


async def test_empty_message_is_invalid_argument(stub) -> None:
    before = await num_conversations(stub)
    for message in ("", "  \n "):
        error = await rpc_error(ask(stub, message))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "the message is empty")
    error = await rpc_error(collect(stub.Complete(pb.CompleteRequest(prompt="", sampling=sampling()))))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
    error = await rpc_error(collect(stub.Complete(pb.CompleteRequest(prompt=" <EOQ>", sampling=sampling()))))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty before <EOQ>")
    assert await num_conversations(stub) == before


async def test_message_beyond_the_context_window_is_invalid_argument(server: RunningServer, stub) -> None:
    long_message = "hello " * 9000  # one token per word: beyond the 8192-token window
    before = await num_conversations(stub)
    error = await rpc_error(ask(stub, long_message, max_tokens=16))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("the message is too long: the prompt is ")
    assert error.details().endswith(" tokens even without history, and at most 8176 fit "
                                    "(the context window minus max_tokens)")
    assert await num_conversations(stub) == before

    # In an existing conversation: refused, and the conversation is unchanged and not left locked.
    first = await ask(stub, FRANCE)
    error = await rpc_error(ask(stub, long_message, first.conversation_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    conv = await stub.GetConversation(pb.GetConversationRequest(id=first.conversation_id))
    assert conv.message_count == 2
    assert (await ask(stub, "And of Italy?", first.conversation_id, max_tokens=32)).last.finish_reason

    error = await rpc_error(collect(stub.Complete(pb.CompleteRequest(prompt=long_message, sampling=sampling()))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "beyond the context window of 8192 tokens" in error.details()


async def test_unknown_conversation_is_not_found(stub) -> None:
    for cid in (UNKNOWN_ID, "not-an-id", UNKNOWN_ID + ":messages"):
        expected = (grpc.StatusCode.NOT_FOUND, f"conversation {cid} not found")
        error = await rpc_error(ask(stub, FRANCE, cid))
        assert (error.code(), error.details()) == expected
        error = await rpc_error(stub.GetConversation(pb.GetConversationRequest(id=cid)))
        assert (error.code(), error.details()) == expected
        error = await rpc_error(stub.DeleteConversation(pb.DeleteConversationRequest(id=cid)))
        assert (error.code(), error.details()) == expected


async def test_missing_ids_and_bad_pages_are_invalid_argument(stub) -> None:
    error = await rpc_error(stub.GetConversation(pb.GetConversationRequest()))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "id is required")
    error = await rpc_error(stub.DeleteConversation(pb.DeleteConversationRequest()))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "id is required")
    for token in ("garbage!", "WzEsMl0="):  # not base64; base64 of "[1,2]" (no id)
        error = await rpc_error(stub.ListConversations(pb.ListConversationsRequest(page_token=token)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (f"invalid page_token {token!r}: pass the next_page_token of a previous page")
    error = await rpc_error(stub.ListConversations(pb.ListConversationsRequest(page_size=101)))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                               "page_size must be at most 100, got 101")
