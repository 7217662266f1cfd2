"""``eoq chat`` against a real server with the default model: one-shot questions, continuing a conversation,
exit codes on errors, and the REPL's commands driven through stdin."""

from __future__ import annotations

import re

import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq_clients.common import sync_stub
from tests.clients.conftest import ServerThread, free_port, run_eoq

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def conversation(server: ServerThread, conversation_id: str) -> pb.Conversation:
    channel, stub = sync_stub(server.address)
    with channel:
        return stub.GetConversation(pb.GetConversationRequest(id=conversation_id), timeout=10)


def test_one_question_then_continue_the_conversation(eoq_server: ServerThread) -> None:
    first = run_eoq("chat", "--address", eoq_server.address, "-m", "What is the capital of France?", "--show-id")
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    conversation_id = first.stderr.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", conversation_id), first.stderr

    second = run_eoq("chat", "--address", eoq_server.address, "-c", conversation_id, "-m", "And of Germany?")
    assert second.returncode == 0, second.stderr
    assert "Berlin" in second.stdout

    # Both questions went into the one conversation the server keeps.
    conv = conversation(eoq_server, conversation_id)
    assert [m.role for m in conv.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT] * 2
    assert conv.messages[2].content == "And of Germany?"
    assert conv.messages[3].content.strip() == second.stdout.strip()


def test_max_tokens_cut_is_reported(eoq_server: ServerThread) -> None:
    r = run_eoq("chat", "--address", eoq_server.address, "-m", "Write a short poem about the sea.",
                "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "(cut at max_tokens)" in r.stdout


def test_unknown_conversation_exits_non_zero_with_not_found(eoq_server: ServerThread) -> None:
    r = run_eoq("chat", "--address", eoq_server.address, "-c", "0" * 32, "-m", "Hello?")
    assert r.returncode == 1
    assert "NOT_FOUND" in r.stderr
    assert r.stdout.strip() == ""


def test_empty_message_exits_non_zero_with_invalid_argument(eoq_server: ServerThread) -> None:
    r = run_eoq("chat", "--address", eoq_server.address, "-m", "")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr


def test_unreachable_server_exits_non_zero() -> None:
    r = run_eoq("chat", "--address", f"127.0.0.1:{free_port()}", "-m", "Hello?")
    assert r.returncode == 1
    assert "UNAVAILABLE" in r.stderr


def test_repl_commands_through_stdin(eoq_server: ServerThread) -> None:
    script = (
        "What is the capital of France?\n"
        "/history\n"
        "/new\n"
        "/system You are a pirate.\n"
        "Hello\n"
        "/history\n"
        "/quit\n"
        "What is the capital of Spain?\n"  # after /quit: never sent
    )
    r = run_eoq("chat", "--address", eoq_server.address, "--max-tokens", "24", input=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Paris" in out
    assert out.count("eoq> ") == 2, out  # two questions answered; the line after /quit was not
    assert "Spain" not in out and "Madrid" not in out

    first_history, second_history = _histories(out)
    assert "you: What is the capital of France?" in first_history
    assert "eoq: " in first_history and "Paris" in first_history
    assert "(new conversation)" in out
    # After /new the history is the new conversation's alone, with the system prompt /system set.
    assert "system: You are a pirate." in second_history
    assert "you: Hello" in second_history
    assert "France" not in second_history


def _histories(out: str) -> tuple[str, str]:
    """The two /history listings: from the line starting "you: " after each answer, to the next prompt."""
    blocks = re.findall(r"you> ((?:system: |you: ).*?)(?=you> )", out, flags=re.DOTALL)
    assert len(blocks) == 2, out
    return blocks[0], blocks[1]


def test_repl_ends_at_end_of_input_and_on_errors_keeps_going() -> None:
    # No server: each question fails with UNAVAILABLE, the REPL reports it and reads on; EOF ends it with 0.
    r = run_eoq("chat", "--address", f"127.0.0.1:{free_port()}", input="Hello\n/history\nHello again\n")
    assert r.returncode == 0
    assert r.stderr.count("UNAVAILABLE") == 2, r.stderr  # both questions; /history has no conversation yet
    assert "(no conversation yet)" in r.stdout



def test_repl_regenerate_switch_and_edit(eoq_server: ServerThread) -> None:
    script = (
        "What is the capital of France?\n"
        "/regen\n"
        "/branches\n"
        "/switch 2 1\n"
        "/edit 1 What is the capital of Germany?\n"
        "/branches\n"
        "/switch 9 1\n"
        "/quit\n"
    )
    r = run_eoq("chat", "--address", eoq_server.address, "--max-tokens", "24", "--seed", "3", input=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("eoq> ") == 3, out  # the question, the regenerated answer, the edited question
    # After /regen the second answer is shown as alternative 2 of 2; /switch 2 1 goes back to the first.
    assert re.search(r"2\. eoq \[2/2\]: ", out), out
    assert re.search(r"2\. eoq \[1/2\]: .*Paris", out), out
    # The edit is a second first question, with its own answer.
    assert re.search(r"1\. you \[2/2\]: What is the capital of Germany\?", out), out
    assert "Berlin" in out
    assert "(no message 9: the branch has 2 (see /branches))" in out


def test_resume_follows_a_detached_answer_after_the_connection_dropped(eoq_server: ServerThread) -> None:
    channel, stub = sync_stub(eoq_server.address)
    with channel:
        call = stub.Chat(pb.ChatRequest(message="Tell me a long story.", detach=True,
                                        sampling=pb.SamplingParams(max_tokens=150, ignore_eos=True)))
        first = next(call)
        call.cancel()  # the client is gone; the answer goes on on the server
    r = run_eoq("chat", "--address", eoq_server.address, "--resume", first.conversation_id, input="/quit\n")
    assert r.returncode == 0, r.stderr
    stored = conversation(eoq_server, first.conversation_id).messages[1]
    assert stored.finish_reason == pb.FINISH_REASON_LENGTH and not stored.generating
    assert stored.content.strip() and stored.content.strip() in r.stdout
