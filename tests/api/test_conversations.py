"""The conversations API over gRPC: create, get, list (paged, most recently updated first), delete, and the
system prompt set at creation or replaced by a Chat request."""

from __future__ import annotations

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, ask, capture_requests, rpc_error
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

PIRATE = "You are a pirate. Answer like one."
POET = "You are a poet. Answer in rhyme."


async def all_pages(stub, page_size: int) -> list[list[pb.Conversation]]:
    pages, token = [], ""
    while True:
        page = await stub.ListConversations(pb.ListConversationsRequest(page_size=page_size, page_token=token))
        pages.append(list(page.conversations))
        token = page.next_page_token
        if not token:
            return pages


async def test_create_get_delete(stub) -> None:
    created = await stub.CreateConversation(pb.CreateConversationRequest(system_prompt=PIRATE))
    assert len(created.id) == 32
    assert (created.system_prompt, created.message_count, list(created.messages)) == (PIRATE, 0, [])
    assert created.created_at == created.updated_at
    got = await stub.GetConversation(pb.GetConversationRequest(id=created.id))
    assert got == created

    await stub.DeleteConversation(pb.DeleteConversationRequest(id=created.id))
    error = await rpc_error(stub.GetConversation(pb.GetConversationRequest(id=created.id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(stub.DeleteConversation(pb.DeleteConversationRequest(id=created.id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert created.id not in [c.id for page in await all_pages(stub, 100) for c in page]


async def test_list_pages_newest_first(stub, shared_redis: RedisServer) -> None:
    ids = [(await stub.CreateConversation(pb.CreateConversationRequest())).id for _ in range(3)]
    pages = await all_pages(stub, 2)
    listed = [c for page in pages for c in page]
    with shared_redis.client() as r:
        assert len(listed) == r.zcard("eoq:tenant:public:conversations")  # every one, once
    assert [len(p) for p in pages[:-1]] == [2] * (len(pages) - 1)
    assert 1 <= len(pages[-1]) <= 2
    assert len({c.id for c in listed}) == len(listed)
    assert [c.id for c in listed[:3]] == ids[::-1]
    keys = [(c.updated_at.ToNanoseconds(), c.id) for c in listed]
    assert keys == sorted(keys, reverse=True)
    assert all(not c.messages for c in listed)  # listed without their messages

    # A turn makes the oldest of the three the most recently updated.
    answer = await ask(stub, FRANCE, ids[0], max_tokens=8)
    first_page = (await all_pages(stub, 2))[0]
    assert [c.id for c in first_page] == [ids[0], ids[2]]
    assert first_page[0].message_count == 2
    assert answer.conversation_id == ids[0]


async def test_system_prompt_set_at_creation_and_replaced_by_chat(server: RunningServer, stub, monkeypatch) -> None:
    requests = capture_requests(monkeypatch, server)
    tok = server.servicer.chat.prompts.tokenizer

    created = await stub.CreateConversation(pb.CreateConversationRequest(system_prompt=PIRATE))
    await ask(stub, FRANCE, created.id, max_tokens=8)
    assert tok.decode(requests[-1].prompt_token_ids).startswith(f"<|im_start|>system\n{PIRATE}<|im_end|>\n")

    await ask(stub, "And of Spain?", created.id, max_tokens=8, system_prompt=POET)
    assert tok.decode(requests[-1].prompt_token_ids).startswith(f"<|im_start|>system\n{POET}<|im_end|>\n")
    conv = await stub.GetConversation(pb.GetConversationRequest(id=created.id))
    assert (conv.system_prompt, conv.message_count) == (POET, 4)

    # From then on the replaced one is used without being sent again.
    await ask(stub, "And of Peru?", created.id, max_tokens=8)
    assert tok.decode(requests[-1].prompt_token_ids).startswith(f"<|im_start|>system\n{POET}<|im_end|>\n")

    # A first Chat may set it too; without one, the model's default is used and nothing is stored.
    answer = await ask(stub, FRANCE, max_tokens=8, system_prompt=PIRATE)
    assert tok.decode(requests[-1].prompt_token_ids).startswith(f"<|im_start|>system\n{PIRATE}<|im_end|>\n")
    assert (await stub.GetConversation(pb.GetConversationRequest(id=answer.conversation_id))).system_prompt == PIRATE
    answer = await ask(stub, FRANCE, max_tokens=8)
    assert tok.decode(requests[-1].prompt_token_ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert (await stub.GetConversation(pb.GetConversationRequest(id=answer.conversation_id))).system_prompt == ""


async def test_list_carries_a_bounded_preview_of_the_system_prompt(stub) -> None:
    long_prompt = "Ω" * 200 + "You are a pirate. " * 20  # 560 characters
    created = await stub.CreateConversation(pb.CreateConversationRequest(system_prompt=long_prompt))
    short = await stub.CreateConversation(pb.CreateConversationRequest(system_prompt=PIRATE))
    assert not created.system_prompt_truncated and created.system_prompt == long_prompt
    rows = {c.id: c for c in (await stub.ListConversations(pb.ListConversationsRequest(page_size=2))).conversations}
    assert (rows[created.id].system_prompt, rows[created.id].system_prompt_truncated) == (long_prompt[:256], True)
    assert (rows[short.id].system_prompt, rows[short.id].system_prompt_truncated) == (PIRATE, False)
    got = await stub.GetConversation(pb.GetConversationRequest(id=created.id))
    assert (got.system_prompt, got.system_prompt_truncated) == (long_prompt, False)
