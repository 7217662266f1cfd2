"""``eoq chat``: a terminal chat that streams answers as they arrive, or one question for scripts (``-m``).

The server keeps the conversation; the client sends only the new question and remembers the conversation id.
Commands in the REPL: /new, /history, /system TEXT, /regen, /edit N TEXT, /branches, /switch N K, /quit.

Answers are detached (``--no-detach`` to turn it off): when the connection drops mid-answer the server goes on,
and the client resumes it with WatchAnswer from the last event it printed; Ctrl-C cancels it on the server.
``--resume ID`` reopens a conversation and prints its last answer, following it live if it is still generating.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import grpc
from rich.console import Console
from rich.markup import escape

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq_clients.common import TransportSecurity, add_connection_flags, metadata, sync_stub

HELP = ("/new  start a new conversation   /history  show it   /system TEXT  set its system prompt   "
        "/regen  answer the last question again   /edit N TEXT  ask TEXT in place of question N   "
        "/branches  the branch with its alternatives   /switch N K  show alternative K of message N   /quit")
RESUME_SECONDS = 30.0  # how long a dropped answer is retried (WatchAnswer) before giving up


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a server in the terminal (or -m for one question)")
    add_connection_flags(p)
    p.add_argument("-m", "--message", help="ask this one question, print the answer, exit (non-zero on error)")
    p.add_argument("-c", "--conversation", default="", help="continue this conversation id")
    p.add_argument("--system", default="", help="system prompt of a new conversation")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show-id", action="store_true", help="with -m: print the conversation id on stderr")
    p.add_argument("--resume", default="", metavar="ID",
                   help="reopen this conversation: print its last answer (following it if still generating)")
    p.add_argument("--no-detach", dest="detach", action="store_false",
                   help="answers end when the connection does (default: they go on and are resumed)")
    p.set_defaults(func=run)


def _sampling(args: argparse.Namespace) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        s.seed = args.seed
    return s


class ChatSession:
    """One conversation with the server, streamed to a console."""

    def __init__(self, stub, args: argparse.Namespace, console: Console) -> None:
        self.stub = stub
        self.args = args
        self.console = console
        self.conversation_id = args.resume or args.conversation
        self.system = args.system

    def _md(self) -> list[tuple[str, str]]:
        return metadata(self.args.api_key, self.conversation_id)

    def ask(self, question: str, parent_message_id: str = "") -> pb.FinishReason:
        request = pb.ChatRequest(conversation_id=self.conversation_id, message=question,
                                 sampling=_sampling(self.args), system_prompt=self.system,
                                 parent_message_id=parent_message_id, detach=self.args.detach)
        return self._show(self.stub.Chat(request, metadata=self._md()))

    def regenerate(self) -> pb.FinishReason:
        sampling = _sampling(self.args)
        if sampling.temperature == 0:  # greedy would give the same answer again
            sampling.temperature = 0.8
        if not sampling.HasField("seed"):
            sampling.seed = random.getrandbits(32)
        request = pb.RegenerateRequest(conversation_id=self.conversation_id, sampling=sampling,
                                       detach=self.args.detach)
        return self._show(self.stub.Regenerate(request, metadata=self._md()))

    def _show(self, stream) -> pb.FinishReason:
        """Print an answer's events to its end; a detached answer whose stream breaks is resumed (WatchAnswer
        after the last event printed), one cancelled with Ctrl-C is cancelled on the server too."""
        finish = pb.FINISH_REASON_UNSPECIFIED
        last: pb.ChatEvent | None = None
        deadline = None
        while True:
            try:
                for event in stream:
                    last, deadline = event, None
                    self.conversation_id = event.conversation_id
                    self.system = ""  # the server has it now and keeps it
                    if event.dropped_turns:
                        self.console.print(f"[dim](the {event.dropped_turns} oldest turn(s) no longer fit the "
                                           "context and were left out)[/dim]")
                    self.console.out(event.delta, end="", highlight=False)
                    if event.finish_reason:
                        finish = event.finish_reason
                break
            except KeyboardInterrupt:
                stream.cancel()
                if last is not None and last.message_id:
                    try:
                        self.stub.CancelAnswer(pb.CancelAnswerRequest(conversation_id=last.conversation_id,
                                                                      message_id=last.message_id),
                                               metadata=self._md(), timeout=5)
                    except grpc.RpcError:
                        pass  # an attached answer ends with its stream anyway
                self.console.print("\n[dim](cancelled)[/dim]")
                return pb.FINISH_REASON_CANCELLED
            except grpc.RpcError as e:
                # A replica that died mid-stream behind a proxy reads as a reset stream (INTERNAL RST_STREAM).
                broken = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
                    e.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (e.details() or ""))
                resumable = self.args.detach and last is not None and last.message_id and broken
                if not resumable:
                    raise
                deadline = deadline or time.monotonic() + RESUME_SECONDS
                if time.monotonic() > deadline:
                    raise
                self.console.print("\n[dim](connection lost; resuming the answer)[/dim]")
                time.sleep(0.5)
                stream = self.stub.WatchAnswer(pb.WatchAnswerRequest(
                    conversation_id=last.conversation_id, message_id=last.message_id,
                    after_sequence=last.sequence), metadata=self._md())
        self.console.out("")
        if finish == pb.FINISH_REASON_LENGTH:
            self.console.print("[dim](cut at max_tokens)[/dim]")
        elif finish == pb.FINISH_REASON_CANCELLED:
            self.console.print("[dim](the answer was cancelled before its end)[/dim]")
        return finish

    def _branch(self) -> pb.Conversation:
        return self.stub.GetConversation(pb.GetConversationRequest(id=self.conversation_id), metadata=self._md())

    def history(self) -> None:
        if not self.conversation_id:
            self.console.print("[dim](no conversation yet)[/dim]")
            return
        conv = self._branch()
        if conv.system_prompt:
            self.console.print(f"[bold magenta]system:[/] {escape(conv.system_prompt)}")
        for m in conv.messages:
            who = "[bold cyan]you:[/]" if m.role == pb.ROLE_USER else "[bold green]eoq:[/]"
            self.console.print(who, escape(m.content), highlight=False)

    def branches(self) -> None:
        """The active branch, numbered, with "k/n" where a message has alternatives (for /switch and /edit)."""
        if not self.conversation_id:
            self.console.print("[dim](no conversation yet)[/dim]")
            return
        for i, m in enumerate(self._branch().messages, 1):
            who = "you" if m.role == pb.ROLE_USER else "eoq"
            alternatives = ""
            if len(m.sibling_ids) > 1:
                alternatives = f" [{list(m.sibling_ids).index(m.id) + 1}/{len(m.sibling_ids)}]"
            text = m.content if len(m.content) <= 70 else m.content[:67] + "..."
            self.console.print(f"{i:>3}. {who}{alternatives}: {escape(text)}", highlight=False)

    def _message(self, n: int) -> pb.Message:
        messages = list(self._branch().messages)
        if not 1 <= n <= len(messages):
            raise ValueError(f"no message {n}: the branch has {len(messages)} (see /branches)")
        return messages[n - 1]

    def switch(self, n: int, k: int) -> None:
        message = self._message(n)
        if not 1 <= k <= len(message.sibling_ids):
            raise ValueError(f"message {n} has {len(message.sibling_ids)} alternative(s)")
        self.stub.SetActiveBranch(pb.SetActiveBranchRequest(conversation_id=self.conversation_id,
                                                            message_id=message.sibling_ids[k - 1]),
                                  metadata=self._md())
        self.branches()

    def edit(self, n: int, text: str) -> pb.FinishReason:
        """Ask ``text`` in place of question ``n`` of the branch (a new branch from the message before it)."""
        questions = [m for m in self._branch().messages if m.role == pb.ROLE_USER]
        if not 1 <= n <= len(questions):
            raise ValueError(f"no question {n}: the branch has {len(questions)}")
        return self.ask(text, questions[n - 1].parent_id or self.conversation_id)

    def resume(self) -> pb.FinishReason:
        """Print the conversation's last answer; one still generating is followed to its end."""
        messages = list(self._branch().messages)
        if not messages or messages[-1].role != pb.ROLE_ASSISTANT:
            self.console.print("[dim](no answer to resume)[/dim]")
            return pb.FINISH_REASON_UNSPECIFIED
        last = messages[-1]
        if not last.generating:
            self.console.out(last.content, highlight=False)
            return last.finish_reason
        self.console.print("[dim](resuming the answer being generated)[/dim]")
        return self._show(self.stub.WatchAnswer(pb.WatchAnswerRequest(conversation_id=self.conversation_id,
                                                                      message_id=last.id), metadata=self._md()))


def _print_error(err: Console, e: grpc.RpcError) -> None:
    # markup off: details may hold [brackets]; soft wrap: one line a script can grep
    err.print(f"error: {e.code().name}: {e.details()}", style="red", markup=False, highlight=False, soft_wrap=True)


def _command(session: ChatSession, console: Console, line: str) -> None:
    """One REPL line that talks to the server: a question or a command on the conversation."""
    command, _, rest = line.partition(" ")
    if command == "/history":
        session.history()
    elif command == "/branches":
        session.branches()
    elif command == "/switch":
        n, k = _ints(rest, 2, "/switch N K")
        session.switch(n, k)
    elif command in ("/regen", "/edit"):
        if not session.conversation_id:
            raise ValueError("no conversation yet")
        if command == "/edit":
            number, _, text = rest.strip().partition(" ")
            (n,) = _ints(number, 1, "/edit N TEXT")
            if not text.strip():
                raise ValueError("usage: /edit N TEXT")
            console.print("[bold green]eoq> [/]", end="")
            session.edit(n, text.strip())
        else:
            console.print("[bold green]eoq> [/]", end="")
            session.regenerate()
    elif command.startswith("/"):
        console.print(f"[dim]{HELP}[/dim]")
    else:
        console.print("[bold green]eoq> [/]", end="")
        session.ask(line)


def _ints(text: str, count: int, usage: str) -> list[int]:
    parts = text.split()
    if len(parts) != count or not all(p.isdigit() for p in parts):
        raise ValueError(f"usage: {usage}")
    return [int(p) for p in parts]


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    err = Console(stderr=True)
    channel, stub = sync_stub(args.address, TransportSecurity.from_args(args))
    session = ChatSession(stub, args, console)
    try:
        if args.resume:
            session.resume()
        if args.message is not None:
            finish = session.ask(args.message)
            if args.show_id:
                err.print(session.conversation_id, markup=False, highlight=False, soft_wrap=True)
            # An answer cut short by a cancel (ours or the server's) is not a success for a script.
            return 130 if finish == pb.FINISH_REASON_CANCELLED else 0
        console.print(f"[dim]eoq chat with {args.address}. {HELP}[/dim]")
        while True:
            try:
                line = console.input("[bold cyan]you> [/]").strip()
            except (EOFError, KeyboardInterrupt):
                console.print()
                return 0
            if not line:
                continue
            if line == "/quit":
                return 0
            if line == "/new":
                session.conversation_id = ""
                console.print("[dim](new conversation)[/dim]")
                continue
            if line.startswith("/system"):
                session.system = line[len("/system"):].strip()
                console.print("[dim](system prompt set for the next question)[/dim]")
                continue
            try:
                _command(session, console, line)
            except grpc.RpcError as e:
                console.out("")
                _print_error(err, e)
            except ValueError as e:
                console.print(f"[dim]({escape(str(e))})[/dim]")
    except grpc.RpcError as e:
        _print_error(err, e)
        return 1
    finally:
        channel.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="eoq-chat")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    a = parser.parse_args(["chat", *sys.argv[1:]])
    sys.exit(a.func(a))
