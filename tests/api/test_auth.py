"""API keys over gRPC: no or unknown key -> UNAUTHENTICATED, tenants isolated, read-only keys, and health and
reflection open to all (probes carry no key)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, SERVICE, ask, assert_health_serving, collect, connect, rpc_error, sampling, serving
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

# api_keys="k1:alice,k2:bob"; the keys file adds k3 (alice, read-only) and k4 (carol).
ALICE = [("authorization", "Bearer k1")]
BOB = [("authorization", "Bearer k2")]
ALICE_READ_ONLY = [("authorization", "Bearer k3")]


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def auth_server(shared_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
                      ) -> AsyncIterator[RunningServer]:
    keys_file: Path = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text("# key tenant [read-only]\nk3 alice read-only\nk4 carol  # a comment\n")
    async with serving(redis_url=shared_redis.url, api_keys="k1:alice,k2:bob", api_keys_file=keys_file) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def auth_stub(auth_server: RunningServer):
    async with connect(auth_server) as s:
        yield s


async def every_call_fails(stub, metadata, code: grpc.StatusCode, details: str) -> None:
    calls = [
        lambda: collect(stub.Chat(pb.ChatRequest(message=FRANCE, sampling=sampling()), metadata=metadata)),
        lambda: collect(stub.Complete(pb.CompleteRequest(prompt="Hi", sampling=sampling()), metadata=metadata)),
        lambda: stub.CreateConversation(pb.CreateConversationRequest(), metadata=metadata),
        lambda: stub.GetConversation(pb.GetConversationRequest(id="0" * 32), metadata=metadata),
        lambda: stub.ListConversations(pb.ListConversationsRequest(), metadata=metadata),
        lambda: stub.DeleteConversation(pb.DeleteConversationRequest(id="0" * 32), metadata=metadata),
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert (error.code(), error.details()) == (code, details)


async def test_no_key_unknown_key_and_malformed_are_unauthenticated(auth_stub) -> None:
    await every_call_fails(auth_stub, None, grpc.StatusCode.UNAUTHENTICATED,
                           "missing API key: send metadata 'authorization: Bearer <key>'")
    await every_call_fails(auth_stub, [("authorization", "Bearer nope")], grpc.StatusCode.UNAUTHENTICATED,
                           "unknown API key")
    await every_call_fails(auth_stub, [("authorization", "k1")], grpc.StatusCode.UNAUTHENTICATED,
                           "malformed authorization metadata: expected 'Bearer <key>'")


async def test_tenants_are_isolated(auth_stub) -> None:
    answer = await ask(auth_stub, FRANCE, max_tokens=32, metadata=ALICE)
    assert "Paris" in answer.text
    cid = answer.conversation_id
    not_found = (grpc.StatusCode.NOT_FOUND, f"conversation {cid} not found")

    error = await rpc_error(auth_stub.GetConversation(pb.GetConversationRequest(id=cid), metadata=BOB))
    assert (error.code(), error.details()) == not_found
    error = await rpc_error(ask(auth_stub, "And of Germany?", cid, metadata=BOB))
    assert (error.code(), error.details()) == not_found
    error = await rpc_error(auth_stub.DeleteConversation(pb.DeleteConversationRequest(id=cid), metadata=BOB))
    assert (error.code(), error.details()) == not_found

    bobs = await auth_stub.CreateConversation(pb.CreateConversationRequest(), metadata=BOB)
    alice_list = await auth_stub.ListConversations(pb.ListConversationsRequest(), metadata=ALICE)
    bob_list = await auth_stub.ListConversations(pb.ListConversationsRequest(), metadata=BOB)
    alice_ids, bob_ids = [c.id for c in alice_list.conversations], [c.id for c in bob_list.conversations]
    assert (alice_ids[0], bob_ids[0]) == (cid, bobs.id)  # each one's newest
    assert not set(alice_ids) & set(bob_ids)

    # Alice's conversation is untouched by Bob's attempts.
    conv = await auth_stub.GetConversation(pb.GetConversationRequest(id=cid), metadata=ALICE)
    assert [m.content for m in conv.messages] == [FRANCE, answer.text]


async def test_read_only_key_reads_but_cannot_write(auth_stub) -> None:
    created = await auth_stub.CreateConversation(pb.CreateConversationRequest(system_prompt="ro"), metadata=ALICE)
    denied = (grpc.StatusCode.PERMISSION_DENIED,
              "this API key is read-only: it may list and read conversations only")
    for call in (
        lambda: ask(auth_stub, FRANCE, created.id, metadata=ALICE_READ_ONLY),
        lambda: collect(auth_stub.Complete(pb.CompleteRequest(prompt="Hi", sampling=sampling()),
                                           metadata=ALICE_READ_ONLY)),
        lambda: auth_stub.CreateConversation(pb.CreateConversationRequest(), metadata=ALICE_READ_ONLY),
        lambda: auth_stub.DeleteConversation(pb.DeleteConversationRequest(id=created.id), metadata=ALICE_READ_ONLY),
    ):
        error = await rpc_error(call)
        assert (error.code(), error.details()) == denied
    # Reads as alice: her conversations.
    listed = await auth_stub.ListConversations(pb.ListConversationsRequest(), metadata=ALICE_READ_ONLY)
    assert listed.conversations[0].id == created.id
    assert listed == await auth_stub.ListConversations(pb.ListConversationsRequest(), metadata=ALICE)
    got = await auth_stub.GetConversation(pb.GetConversationRequest(id=created.id), metadata=ALICE_READ_ONLY)
    assert (got.id, got.system_prompt) == (created.id, "ro")
    info = await auth_stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=ALICE_READ_ONLY)
    assert info.architecture == "llama"
    # A file key without read-only writes.
    carol = [("authorization", "Bearer k4")]
    assert (await auth_stub.CreateConversation(pb.CreateConversationRequest(), metadata=carol)).id


async def test_health_and_reflection_need_no_key(auth_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        await assert_health_serving(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
        assert SERVICE in [s.name for s in reply.list_services_response.service]
