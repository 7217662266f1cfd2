"""``eoq chat``: a terminal chat that streams answers as they arrive, or one question for scripts (``-m``).

The server keeps the conversation; the client sends only the new question and remembers the conversation id.
Commands in the REPL: /new, /history, /system TEXT, /quit.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from rich.console import Console
from rich.markup import escape

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq_clients.common import TransportSecurity, add_connection_flags, metadata, sync_stub

HELP = "/new  start a new conversation   /history  show it   /system TEXT  set its system prompt   /quit"


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
        self.conversation_id = args.conversation
        self.system = args.system

    def ask(self, question: str) -> pb.FinishReason:
        request = pb.ChatRequest(conversation_id=self.conversation_id, message=question,
                                 sampling=_sampling(self.args), system_prompt=self.system)
        finish = pb.FINISH_REASON_UNSPECIFIED
        stream = self.stub.Chat(request, metadata=metadata(self.args.api_key, self.conversation_id))
        try:
            for event in stream:
                self.conversation_id = event.conversation_id
                self.system = ""  # the server has it now and keeps it
                if event.dropped_turns:
                    self.console.print(f"[dim](the {event.dropped_turns} oldest turn(s) no longer fit the "
                                       "context and were left out)[/dim]")
                self.console.out(event.delta, end="", highlight=False)
                if event.finish_reason:
                    finish = event.finish_reason
        except KeyboardInterrupt:
            stream.cancel()
            self.console.print("\n[dim](cancelled)[/dim]")
            return pb.FINISH_REASON_CANCELLED
        self.console.out("")
        if finish == pb.FINISH_REASON_LENGTH:
            self.console.print("[dim](cut at max_tokens)[/dim]")
        elif finish == pb.FINISH_REASON_CANCELLED:
            self.console.print("[dim](the answer was cancelled before its end)[/dim]")
        return finish

    def history(self) -> None:
        if not self.conversation_id:
            self.console.print("[dim](no conversation yet)[/dim]")
            return
        conv = self.stub.GetConversation(pb.GetConversationRequest(id=self.conversation_id),
                                         metadata=metadata(self.args.api_key))
        if conv.system_prompt:
            self.console.print(f"[bold magenta]system:[/] {escape(conv.system_prompt)}")
        for m in conv.messages:
            who = "[bold cyan]you:[/]" if m.role == pb.ROLE_USER else "[bold green]eoq:[/]"
            self.console.print(who, escape(m.content), highlight=False)


def _print_error(err: Console, e: grpc.RpcError) -> None:
    # markup off: details may hold [brackets]; soft wrap: one line a script can grep
    err.print(f"error: {e.code().name}: {e.details()}", style="red", markup=False, highlight=False, soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    err = Console(stderr=True)
    channel, stub = sync_stub(args.address, TransportSecurity.from_args(args))
    session = ChatSession(stub, args, console)
    try:
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
            if line == "/history":
                try:
                    session.history()
                except grpc.RpcError as e:
                    _print_error(err, e)
                continue
            if line.startswith("/system"):
                session.system = line[len("/system"):].strip()
                console.print("[dim](system prompt set for the next question)[/dim]")
                continue
            if line.startswith("/"):
                console.print(f"[dim]{HELP}[/dim]")
                continue
            console.print("[bold green]eoq> [/]", end="")
            try:
                session.ask(line)
            except grpc.RpcError as e:
                console.out("")
                _print_error(err, e)
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
