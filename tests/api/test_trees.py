"""Conversations as trees over gRPC: ids on events and messages, questions from any answer (edits), Regenerate,
the active branch, deleting a subtree, and their statuses — with the real default model and a real Redis."""

from __future__ import annotations

import uuid

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, Answer, ask, capture_requests, collect, rpc_error, sampling
from tests.conftest import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="package")

GERMANY = "What is the capital of Germany?"
ITALY = "What is the capital of Italy?"


async def branch(stub, conversation_id: str) -> list[pb.Message]:
    return list((await stub.GetConversation(pb.GetConversationRequest(id=conversation_id))).messages)


async def regenerate(stub, conversation_id: str, message_id: str = "", **kwargs) -> Answer:
    return await collect(stub.Regenerate(pb.RegenerateRequest(conversation_id=conversation_id, message_id=message_id,
                                                              sampling=sampling(16, **kwargs))))


async def ask_from(stub, conversation_id: str, parent: str, message: str) -> Answer:
    request = pb.ChatRequest(conversation_id=conversation_id, message=message, parent_message_id=parent,
                             sampling=sampling(16))
    return await collect(stub.Chat(request))


async def test_events_and_messages_carry_ids(stub) -> None:
    first = await ask(stub, FRANCE)
    cid = first.conversation_id
    assert [e.sequence for e in first.events] == list(range(1, len(first.events) + 1))
    assert {(e.user_message_id, e.message_id) for e in first.events} == {(first.events[0].user_message_id,
                                                                         first.events[0].message_id)}
    second = await ask(stub, GERMANY, cid)
    messages = await branch(stub, cid)
    assert [m.id for m in messages] == [first.last.user_message_id, first.last.message_id,
                                        second.last.user_message_id, second.last.message_id]
    assert [m.parent_id for m in messages] == [""] + [m.id for m in messages[:-1]]
    assert all(m.id.startswith(cid + "-") for m in messages)
    assert [list(m.sibling_ids) for m in messages] == [[m.id] for m in messages]
    conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
    assert conv.active_message_id == second.last.message_id and conv.message_count == 4


async def test_regenerate_adds_a_sibling_and_switching_branches(stub) -> None:
    first = await ask(stub, FRANCE)
    cid = first.conversation_id
    again = await regenerate(stub, cid, temperature=1.0, seed=7)
    assert again.last.user_message_id == first.last.user_message_id
    assert again.last.message_id != first.last.message_id
    assert again.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    messages = await branch(stub, cid)
    assert [m.id for m in messages] == [first.last.user_message_id, again.last.message_id]
    assert list(messages[1].sibling_ids) == [first.last.message_id, again.last.message_id]
    assert messages[1].content == again.text
    # Switching back to the first answer's branch, then continuing it.
    switched = await stub.SetActiveBranch(pb.SetActiveBranchRequest(conversation_id=cid,
                                                                    message_id=first.last.message_id))
    assert switched.active_message_id == first.last.message_id
    assert [m.id for m in switched.messages] == [first.last.user_message_id, first.last.message_id]
    follow = await ask(stub, GERMANY, cid)
    assert "Berlin" in follow.text
    assert [m.id for m in await branch(stub, cid)][-2:] == [follow.last.user_message_id, follow.last.message_id]
    tree = await stub.GetConversation(pb.GetConversationRequest(id=cid, tree=True))
    assert len(tree.messages) == tree.message_count == 5  # q1, a1, a1', q2, a2: every message, creation order
    assert [m.id for m in tree.messages][:3] == [first.last.user_message_id, first.last.message_id,
                                                 again.last.message_id]
    # Selecting the question lands on its newest answer's branch (a1', which has nothing below it).
    landed = await stub.SetActiveBranch(pb.SetActiveBranchRequest(conversation_id=cid,
                                                                  message_id=first.last.user_message_id))
    assert landed.active_message_id == again.last.message_id


async def test_an_edit_branches_from_the_edited_questions_parent(stub) -> None:
    first = await ask(stub, FRANCE)
    cid = first.conversation_id
    second = await ask(stub, GERMANY, cid)
    edited = await ask_from(stub, cid, first.last.message_id, ITALY)  # q2 edited: same parent as q2
    assert "Rome" in edited.text
    messages = await branch(stub, cid)
    assert [m.content for m in messages[:2]] == [FRANCE, first.text]
    assert messages[2].content == ITALY and messages[2].parent_id == first.last.message_id
    assert list(messages[2].sibling_ids) == [second.last.user_message_id, edited.last.user_message_id]
    # Editing the first question: the conversation id is the root.
    root = await ask_from(stub, cid, cid, GERMANY)
    messages = await branch(stub, cid)
    assert [m.id for m in messages] == [root.last.user_message_id, root.last.message_id]
    assert messages[0].parent_id == ""
    assert list(messages[0].sibling_ids) == [first.last.user_message_id, root.last.user_message_id]


async def test_a_branchs_prompt_is_the_linear_prompt_of_its_path(stub, server: RunningServer, monkeypatch) -> None:
    """The prompt of a question asked on a branch equals, token for token, the prompt of the same question in a
    linear conversation holding exactly that path — so the prefix cache serves every earlier turn."""
    seen = capture_requests(monkeypatch, server)
    tree_first = await ask(stub, FRANCE)
    cid = tree_first.conversation_id
    await ask(stub, GERMANY, cid)  # a branch we leave
    on_branch = await ask_from(stub, cid, tree_first.last.message_id, ITALY)
    linear_first = await ask(stub, FRANCE)
    linear = await ask(stub, ITALY, linear_first.conversation_id)
    assert seen[2].prompt_token_ids == seen[4].prompt_token_ids
    assert on_branch.text == linear.text
    # Regenerating the answer to ITALY renders the same prompt again.
    await regenerate(stub, cid)
    assert seen[5].prompt_token_ids == seen[2].prompt_token_ids


async def test_regenerate_at_turn_six_comes_from_the_prefix_cache(stub) -> None:
    answer = await ask(stub, "Name a color.", max_tokens=8)
    cid = answer.conversation_id
    for i in range(5):
        answer = await ask(stub, f"Name another color, not number {i}.", cid, max_tokens=8)
    again = await regenerate(stub, cid)
    usage = again.last.usage
    assert usage.cached_prompt_tokens >= 0.9 * usage.prompt_tokens, usage
    fifth_answer = (await branch(stub, cid))[-3]  # the parent of the sixth question: an edit of it hangs there
    edit = await ask_from(stub, cid, fifth_answer.id, "Name a fruit.")
    assert edit.last.usage.cached_prompt_tokens >= 0.8 * edit.last.usage.prompt_tokens, edit.last.usage


async def test_delete_message_removes_its_subtree(stub) -> None:
    first = await ask(stub, FRANCE)
    cid = first.conversation_id
    second = await ask(stub, GERMANY, cid)
    regenerated = await regenerate(stub, cid, second.last.user_message_id)
    reply = await stub.DeleteMessage(pb.DeleteMessageRequest(conversation_id=cid,
                                                             message_id=second.last.user_message_id))
    assert reply.deleted_messages == 3  # q2 and both its answers
    assert reply.active_message_id == first.last.message_id
    conv = await stub.GetConversation(pb.GetConversationRequest(id=cid, tree=True))
    assert [m.id for m in conv.messages] == [first.last.user_message_id, first.last.message_id]
    assert conv.message_count == 2 and conv.active_message_id == first.last.message_id
    error = await rpc_error(stub.SetActiveBranch(pb.SetActiveBranchRequest(conversation_id=cid,
                                                                           message_id=regenerated.last.message_id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # Deleting the only first question empties the conversation; it goes on from the root.
    reply = await stub.DeleteMessage(pb.DeleteMessageRequest(conversation_id=cid,
                                                             message_id=first.last.user_message_id))
    assert (reply.deleted_messages, reply.active_message_id) == (2, "")
    fresh = await ask(stub, ITALY, cid)
    assert [m.parent_id for m in await branch(stub, cid)] == ["", fresh.last.user_message_id]


async def test_tree_statuses(stub, server: RunningServer) -> None:
    first = await ask(stub, FRANCE)
    cid = first.conversation_id
    other = (await ask(stub, GERMANY)).conversation_id
    unknown = f"{cid}-{'0' * 16}"

    async def code(call) -> grpc.StatusCode:
        return (await rpc_error(call)).code()

    assert await code(ask_from(stub, cid, unknown, ITALY)) == grpc.StatusCode.NOT_FOUND
    assert await code(ask_from(stub, cid, f"{other}-{'0' * 16}", ITALY)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(ask_from(stub, cid, first.last.user_message_id, ITALY)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(ask_from(stub, "", first.last.message_id, ITALY)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(regenerate(stub, cid, first.last.message_id)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(regenerate(stub, cid, unknown)) == grpc.StatusCode.NOT_FOUND
    assert await code(regenerate(stub, "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(stub.SetActiveBranch(pb.SetActiveBranchRequest(conversation_id=cid, message_id=unknown))) \
        == grpc.StatusCode.NOT_FOUND
    assert await code(stub.DeleteMessage(pb.DeleteMessageRequest(conversation_id=cid))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(stub.DeleteMessage(pb.DeleteMessageRequest(conversation_id=cid, message_id="x" * 500))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    # Busy: while an answer streams, a Regenerate, a question from another branch and a delete are ABORTED.
    stream = stub.Chat(pb.ChatRequest(conversation_id=cid, message="Count to one hundred.",
                                      sampling=sampling(200, ignore_eos=True)))
    await stream.read()
    assert await code(regenerate(stub, cid)) == grpc.StatusCode.ABORTED
    assert await code(ask_from(stub, cid, cid, ITALY)) == grpc.StatusCode.ABORTED
    assert await code(stub.DeleteMessage(pb.DeleteMessageRequest(conversation_id=cid,
                                                                 message_id=first.last.message_id))) \
        == grpc.StatusCode.ABORTED
    stream.cancel()


async def test_conversations_stored_before_the_tree_read_as_one_branch(stub, shared_redis: RedisServer) -> None:
    """Data in the old layout (messages without ids) reads back as a single branch, continues, regenerates."""
    from tests.chat.test_store import plant_old_format

    cid = uuid.uuid4().hex
    with shared_redis.client() as r:
        plant_old_format(r, cid, "public", None, num_turns=2)
    messages = await branch(stub, cid)
    assert [m.id for m in messages] == [f"{cid}-{i}" for i in range(4)]
    assert [m.content for m in messages] == ["q0 ünï", 'a0 "quoted"\n', "q1 ünï", 'a1 "quoted"\n']
    follow = await ask(stub, FRANCE, cid)
    assert follow.last.finish_reason == pb.FINISH_REASON_STOP
    again = await regenerate(stub, cid, f"{cid}-2")
    messages = await branch(stub, cid)
    assert [m.id for m in messages] == [f"{cid}-0", f"{cid}-1", f"{cid}-2", again.last.message_id]
    assert list(messages[3].sibling_ids) == [f"{cid}-3", again.last.message_id]
