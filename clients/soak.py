"""``eoq soak``: N streams against a server for M minutes, mixing new conversations, follow-ups, cancels and
sampling settings; then what an operator wants to know.

    eoq soak --address localhost:50051 --streams 48 --minutes 10 --server-pid $(pgrep -f 'eoq serve') \
        --metrics-url http://localhost:9400/metrics

Each stream loops until the time is up: it starts a new conversation (1 in 4), asks a follow-up in one of its
own (1 in 2, at most ``--max-turns`` a conversation), or starts an answer and cancels it after a few tokens (the
rest); greedy or sampled (temperature 0.8, a seed), 8 to ``--max-tokens`` tokens. At the end it prints
- calls by status code (OK, and every error code seen);
- turns lost: every answer whose last event arrived (or that was cancelled after its first event) must be in
  the server's conversation when read back with GetConversation; a shortfall is a lost turn;
- the server's RSS (its process and its children: the engine) at the start, the peak and the end, with
  ``--server-pid`` (read from /proc, so on the same machine);
- the KV cache and the batch once the load is gone (``eoq_kv_cache_usage_ratio`` and ``eoq_requests_running``
  from ``--metrics-url``): both must be back to 0.
Exit status 0 when no turn was lost, no call ended UNKNOWN or INTERNAL, and the cache emptied; else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq_clients.common import TransportSecurity, add_connection_flags, aio_stub, metadata

QUESTIONS = ["What is the capital of France?", "Tell me a story about a lighthouse.", "Name three colors.",
             "How do I boil an egg?", "What is 12 times 12?", "Write a haiku about rain.", "Why is the sky blue?"]
FOLLOW_UPS = ["Tell me more.", "And why is that?", "Say it in one sentence.", "Give an example."]
SERVER_ERRORS = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS"})


def add_parser(sub) -> None:
    p = sub.add_parser("soak", help="N streams for M minutes: errors by code, turns lost, RSS, KV cache after",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_flags(p)
    p.add_argument("--streams", type=int, default=48, help="concurrent streams (default 48)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens an answer asks for (default 64)")
    p.add_argument("--max-turns", type=int, default=8, help="most turns a conversation gets (default 8)")
    p.add_argument("--seed", type=int, default=0, help="of the mix of actions")
    p.add_argument("--server-pid", type=int, help="the server's pid, for its RSS (and its children's)")
    p.add_argument("--metrics-url", help="the server's /metrics URL, for the KV cache once the load is gone")
    p.set_defaults(func=run)


@dataclass
class Tally:
    codes: collections.Counter = field(default_factory=collections.Counter)
    expected_turns: dict[str, int] = field(default_factory=dict)  # conversation id -> turns that must be stored
    tokens: int = 0
    rss: list[int] = field(default_factory=list)  # bytes, sampled


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its children, from /proc."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def metric(url: str, name: str) -> float | None:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _turn(stub, args, rng: random.Random, tally: Tally, conversation_id: str, cancel_after: int | None,
                after_own_cancel: bool = False) -> tuple[str, bool]:
    """One Chat call: the conversation id ('' if none was created) and whether the soak cancelled the answer.
    ``after_own_cancel``: this stream cancelled the conversation's last answer, whose cut-off text the server
    may still be storing (the conversation busy: ABORTED); an ABORTED before any event is then retried, as by a
    client that just pressed stop, for up to a second."""
    message = rng.choice(FOLLOW_UPS if conversation_id else QUESTIONS)
    params = pb.SamplingParams(max_tokens=rng.randint(8, args.max_tokens))
    if rng.random() < 0.5:
        params.temperature = 0.8
        params.seed = rng.randrange(1 << 31)
    for attempt in range(10):
        try:
            return await _call(stub, args, tally, conversation_id, message, params, cancel_after)
        except grpc.aio.AioRpcError as e:
            if not (after_own_cancel and e.code() is grpc.StatusCode.ABORTED and attempt < 9):
                tally.codes[e.code().name] += 1
                return conversation_id, False
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def _call(stub, args, tally: Tally, conversation_id: str, message: str, params: pb.SamplingParams,
                cancel_after: int | None) -> tuple[str, bool]:
    """The Chat call of ``_turn``; raises its error status if it fails before any event."""
    call = stub.Chat(pb.ChatRequest(conversation_id=conversation_id, message=message, sampling=params),
                     metadata=metadata(args.api_key, conversation_id), timeout=120)
    cid, events, finished = conversation_id, 0, False
    try:
        async for event in call:
            cid = event.conversation_id
            events += 1
            tally.tokens += len(event.token_ids)
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                finished = True
            if cancel_after is not None and events >= cancel_after and not finished:
                call.cancel()
                break
    except grpc.aio.AioRpcError as e:
        if not events:
            raise
        tally.codes[e.code().name] += 1
        return cid, False
    if finished or events:  # an answer that ended, or was cancelled after its first event, is stored
        tally.expected_turns[cid] = tally.expected_turns.get(cid, 0) + 1
    tally.codes["OK" if finished else "CANCELLED (by the soak)"] += 1
    return cid, not finished


async def _stream(stub, args, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    mine: dict[str, int] = {}  # conversation -> turns asked
    cancelled: set[str] = set()  # conversations whose last answer this stream cancelled
    while time.monotonic() < deadline:
        roll = rng.random()
        open_ones = [c for c, n in mine.items() if n < args.max_turns]
        cid = "" if roll < 0.25 or not open_ones else rng.choice(open_ones)
        cancel_after = rng.randint(1, 4) if roll >= 0.75 else None
        cid, was_cancelled = await _turn(stub, args, rng, tally, cid, cancel_after, cid in cancelled)
        (cancelled.add if was_cancelled else cancelled.discard)(cid)
        if cid:
            mine[cid] = mine.get(cid, 0) + 1


async def _sample_rss(pid: int, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        tally.rss.append(rss_bytes(pid))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def _soak(args: argparse.Namespace) -> int:
    tally = Tally()
    channel, stub = aio_stub(args.address, TransportSecurity.from_args(args))
    stop = asyncio.Event()
    sampler = asyncio.get_running_loop().create_task(_sample_rss(args.server_pid, tally, stop)) \
        if args.server_pid else None
    start = time.monotonic()
    deadline = start + args.minutes * 60
    async with channel:
        await asyncio.gather(*(_stream(stub, args, args.seed * 1000 + i, deadline, tally)
                               for i in range(args.streams)))
        seconds = time.monotonic() - start
        await asyncio.sleep(1.0)  # cancelled turns are stored in the background
        stop.set()
        if sampler is not None:
            await sampler
        lost = 0
        for cid, turns in tally.expected_turns.items():
            try:
                conv = await stub.GetConversation(pb.GetConversationRequest(id=cid),
                                                  metadata=metadata(args.api_key, cid), timeout=10)
            except grpc.aio.AioRpcError:
                lost += turns
                continue
            lost += max(0, turns - conv.message_count // 2)
    print(f"{args.streams} streams for {seconds / 60:.1f} min: {sum(tally.codes.values())} calls, "
          f"{tally.tokens} tokens ({tally.tokens / seconds:.0f} tok/s), {len(tally.expected_turns)} conversations")
    for code, n in sorted(tally.codes.items(), key=lambda kv: -kv[1]):
        print(f"  {code}: {n}")
    print(f"turns lost: {lost} of {sum(tally.expected_turns.values())}")
    if tally.rss:
        mib = [r / 2**20 for r in tally.rss]
        print(f"server RSS (with the engine): start {mib[0]:.0f} MiB, peak {max(mib):.0f} MiB, end {mib[-1]:.0f} MiB")
    kv_ok = True
    if args.metrics_url:
        usage = metric(args.metrics_url, "eoq_kv_cache_usage_ratio")
        running = metric(args.metrics_url, "eoq_requests_running")
        kv_ok = usage == 0 and running == 0
        print(f"after the load: KV cache usage {usage}, running requests {running} ({'ok' if kv_ok else 'NOT FREED'})")
    errors = sum(n for code, n in tally.codes.items() if code in SERVER_ERRORS)
    return 0 if lost == 0 and errors == 0 and kv_ok else 1


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_soak(args))
