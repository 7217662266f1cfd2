"""Bad requests are refused with the right status code and a message that says what was wrong."""

from __future__ import annotations

import base64
import json
import logging
import re

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from eoq.errors import InternalError
from tests.api.client import FRANCE, ask, collect, rpc_error, sampling
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
# Far below the range, yet a normal float32: a denormal (1e-45) reads as 0 (= off, the default) in a process whose
# floating point flushes denormals (eoq's CPU kernels are built with -ffast-math, which sets that when loaded).
TINY = pb.SamplingParams(repetition_penalty=1e-30).repetition_penalty


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
        ({"repetition_penalty": -1.0}, "repetition_penalty must be in [0.01, 100] (0 = off), got -1.0"),
        ({"repetition_penalty": 1e-30}, f"repetition_penalty must be in [0.01, 100] (0 = off), got {TINY}"),
        ({"repetition_penalty": 101}, "repetition_penalty must be in [0.01, 100] (0 = off), got 101.0"),
        ({"max_tokens": 8192}, "max_tokens must be <= 8191, got 8192"),
        ({"stop": [f"s{i}" for i in range(17)]}, "at most 16 stop strings are allowed, got 17"),
        ({"stop": ["ok", ""]}, "stop strings must not be empty"),
    ],
    ids=["temperature<0", "top_p>1", "top_p<0", "top_k<0", "repetition_penalty<0", "repetition_penalty=1e-30",
         "repetition_penalty>100", "max_tokens>limit", "17 stop strings", "empty stop string"],
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


async def assert_every_conversation_rpc_refuses(stub, cid: str, expected: tuple[grpc.StatusCode, str]) -> None:
    """Chat, GetConversation and DeleteConversation on ``cid`` all end with ``expected`` (code, details)."""
    for call in (ask(stub, FRANCE, cid), stub.GetConversation(pb.GetConversationRequest(id=cid)),
                 stub.DeleteConversation(pb.DeleteConversationRequest(id=cid))):
        error = await rpc_error(call)
        assert (error.code(), error.details()) == expected


async def test_unknown_conversation_is_not_found(stub) -> None:
    for cid in (UNKNOWN_ID, "not-an-id", UNKNOWN_ID + ":messages"):
        await assert_every_conversation_rpc_refuses(stub, cid, (grpc.StatusCode.NOT_FOUND,
                                                                f"conversation {cid} not found"))


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


async def test_a_temperature_too_small_to_divide_by_is_greedy(stub) -> None:
    """Logits divided by 1e-45 (or 2e-38, not flushed to zero as a denormal may be) overflowed to infinities and
    NaN probabilities: a garbage answer. Now such a temperature is greedy."""
    prompt = "The capital of France is"
    greedy = await collect(stub.Complete(pb.CompleteRequest(prompt=prompt, sampling=sampling(12))))
    for temperature in (1e-45, 2e-38, 1e-6):
        tiny = await collect(stub.Complete(pb.CompleteRequest(prompt=prompt,
                                                              sampling=sampling(12, temperature=temperature))))
        assert tiny.token_ids == greedy.token_ids and tiny.text == greedy.text
        assert tiny.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    answer = await ask(stub, FRANCE, max_tokens=16, temperature=1e-45)
    assert "Paris" in answer.text


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


@pytest.mark.parametrize(
    ("token", "details"),
    [
        (b64("[" * 100_000 + "]" * 100_000), "invalid page_token (266668 characters, at most 512)"),
        ("A" * 600, "invalid page_token (600 characters, at most 512)"),
        (b64(f'[{"9" * 350}, "x"]'), "invalid page_token 'Wzk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5'"),
        ("WzEsIngiXQ==\u00e9", "invalid page_token (not ASCII)"),
    ],
    ids=["deeply nested", "too long", "huge number", "not ASCII"],
)
async def test_hostile_page_tokens_are_invalid_argument(stub, token: str, details: str) -> None:
    """Nested JSON (RecursionError) and huge numbers (OverflowError) were INTERNAL; long tokens were echoed."""
    error = await rpc_error(stub.ListConversations(pb.ListConversationsRequest(page_token=token)))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"{details}: pass the next_page_token of a previous page"
    )


async def test_over_long_ids_are_invalid_argument_without_echo(stub) -> None:
    await assert_every_conversation_rpc_refuses(stub, "ab" * 5000, (
        grpc.StatusCode.INVALID_ARGUMENT, "conversation id too long (10000 characters; ids are 32 hex digits)"))


def internal_error_id(error: grpc.aio.AioRpcError, rpc: str) -> str:
    assert error.code() == grpc.StatusCode.INTERNAL
    match = re.fullmatch(rf"internal error in {rpc} \(request id ([0-9a-f]{{12}})\)", error.details())
    assert match, error.details()
    return match.group(1)


async def test_a_bug_answers_internal_with_a_request_id_in_the_log(stub, shared_redis: RedisServer,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Real corrupt data in Redis makes decoding fail: the client gets only the id, the log the traceback."""
    cid = "c0ffee" + "0" * 26
    with shared_redis.client() as r:
        r.hset(f"eoq:conv:{cid}", mapping={"tenant": "public", "created_at": "1", "updated_at": "1",
                                           "message_count": "1", "num_bytes": "0"})
        r.rpush(f"eoq:conv:{cid}:messages", "{not json at /srv/secret")
    try:
        with caplog.at_level(logging.ERROR, logger="eoq.api.errors"):
            error = await rpc_error(stub.GetConversation(pb.GetConversationRequest(id=cid)))
    finally:
        with shared_redis.client() as r:
            r.delete(f"eoq:conv:{cid}", f"eoq:conv:{cid}:messages")
    request_id = internal_error_id(error, "GetConversation")
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert record.levelname == "ERROR" and "JSONDecodeError" in record.getMessage()
    assert record.exc_info is not None and "_decode_message" in caplog.text  # the traceback


async def test_internal_error_details_stay_in_the_log(server: RunningServer, stub, monkeypatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def failing_get(tenant: str, conversation_id: str):
        raise InternalError("model step failed on cuda:0 reading /models/secret.safetensors")

    monkeypatch.setattr(server.servicer.chat.store, "get", failing_get)  # fault injection
    with caplog.at_level(logging.ERROR, logger="eoq.api.errors"):
        error = await rpc_error(stub.GetConversation(pb.GetConversationRequest(id=UNKNOWN_ID)))
        other = await rpc_error(stub.GetConversation(pb.GetConversationRequest(id=UNKNOWN_ID)))
    request_id = internal_error_id(error, "GetConversation")
    assert internal_error_id(other, "GetConversation") != request_id  # one id per failure
    assert "secret" not in error.details() and "cuda" not in error.details()
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert "InternalError: model step failed on cuda:0 reading /models/secret.safetensors" in record.getMessage()
