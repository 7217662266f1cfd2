"""``eoq bench-trees``: what conversation trees and detached answers cost, measured against running servers.

Two figures (eoq-only: no peer has either):

1. **Branches from the prefix cache.** ``--conversations`` conversations of ``--turns`` turns; at each turn in
   ``--at`` three requests are timed — the turn's question asked as usual (fresh), ``Regenerate`` of its
   answer, and an edit (another question from the answer before it) — and the main branch selected again.
   Reported per kind and turn: median time to first token (client side) and the share of the prompt that came
   from the prefix cache.
2. **WatchAnswer's latency.** ``--answers`` detached answers of ``--watch-tokens`` forced tokens on the first
   address; as soon as each starts, watchers follow it on the same replica and on ``--other-address`` (another
   replica on the same Redis). For every event, the delay of each watcher behind the asker's own stream is
   recorded; reported as p50/p99, with the asker's inter-event gaps for a detached and an attached answer.

Prints one JSON object (and a table on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq_clients.bench.workloads import percentile, question

EDITS = ("Answer in one word instead.", "Say it as a haiku.", "Explain it to a child.")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-trees", help="benchmark branches (Regenerate, edits) and WatchAnswer on a server")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--other-address", default="", help="a second replica on the same Redis (WatchAnswer across)")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--at", default="2,4,6", help="turns at which Regenerate and an edit are timed")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--answers", type=int, default=5, help="detached answers watched")
    p.add_argument("--watch-tokens", type=int, default=128)
    p.set_defaults(func=run)


def _sampling(max_tokens: int, ignore_eos: bool = False) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)


async def _timed(call) -> tuple[float, pb.ChatEvent, float]:
    """(time to the first event carrying tokens, the last event, the start) of a ChatEvent stream."""
    start = time.perf_counter()
    first = None
    last = None
    async for event in call:
        if first is None and event.token_ids:
            first = time.perf_counter() - start
        last = event
    assert last is not None and first is not None
    return first, last, start


async def branches(stub, conversations: int, turns: int, at: set[int], max_tokens: int) -> dict:
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {k: {t: [] for t in sorted(at)}
                                                            for k in ("fresh", "regenerate", "edit")}
    for c in range(conversations):
        cid = ""
        previous_answer = ""
        for t in range(1, turns + 1):
            ask = pb.ChatRequest(conversation_id=cid, message=question(c * turns + t), sampling=_sampling(max_tokens))
            ttft, last, _ = await _timed(stub.Chat(ask))
            cid = last.conversation_id
            if t not in at:
                previous_answer = last.message_id
                continue
            main_leaf = last.message_id
            rows["fresh"][t].append((ttft, last.usage.cached_prompt_tokens / last.usage.prompt_tokens))
            regen = pb.RegenerateRequest(conversation_id=cid, sampling=_sampling(max_tokens))
            ttft, r, _ = await _timed(stub.Regenerate(regen))
            rows["regenerate"][t].append((ttft, r.usage.cached_prompt_tokens / r.usage.prompt_tokens))
            edit = pb.ChatRequest(conversation_id=cid, message=EDITS[t % len(EDITS)], sampling=_sampling(max_tokens),
                                  parent_message_id=previous_answer or cid)
            ttft, e, _ = await _timed(stub.Chat(edit))
            rows["edit"][t].append((ttft, e.usage.cached_prompt_tokens / e.usage.prompt_tokens))
            await stub.SetActiveBranch(pb.SetActiveBranchRequest(conversation_id=cid, message_id=main_leaf))
            previous_answer = main_leaf
        await stub.DeleteConversation(pb.DeleteConversationRequest(id=cid))
    return {kind: {str(t): {"ttft_ms_median": round(1000 * statistics.median(v[0] for v in vals), 1),
                            "cached_share_median": round(statistics.median(v[1] for v in vals), 3)}
                   for t, vals in by_turn.items()}
            for kind, by_turn in rows.items()}


async def _arrivals(call) -> dict[int, float]:
    seen = {}
    async for event in call:
        seen[event.sequence] = time.perf_counter()
    return seen


async def watch_latency(stub, other, answers: int, tokens: int) -> dict:
    behind_same: list[float] = []
    behind_other: list[float] = []
    gaps_detached: list[float] = []
    gaps_attached: list[float] = []
    for i in range(answers):
        call = stub.Chat(pb.ChatRequest(message=question(i), detach=True, sampling=_sampling(tokens, True)))
        first = await call.read()
        asker = {first.sequence: time.perf_counter()}
        request = pb.WatchAnswerRequest(conversation_id=first.conversation_id, message_id=first.message_id,
                                        after_sequence=first.sequence)
        watchers = [asyncio.ensure_future(_arrivals(stub.WatchAnswer(request)))]
        if other is not None:
            watchers.append(asyncio.ensure_future(_arrivals(other.WatchAnswer(request))))
        while (event := await call.read()) is not grpc.aio.EOF:
            asker[event.sequence] = time.perf_counter()
        same, *rest = await asyncio.gather(*watchers)
        seqs = sorted(s for s in asker if s > first.sequence)
        # A watcher started after the first event may replay the first few at once: measure from the tenth on.
        steady = [s for s in seqs if s >= first.sequence + 10]
        behind_same += [same[s] - asker[s] for s in steady if s in same]
        if rest:
            behind_other += [rest[0][s] - asker[s] for s in steady if s in rest[0]]
        gaps_detached += [asker[b] - asker[a] for a, b in zip(seqs, seqs[1:])]
        attached = await _arrivals(stub.Chat(pb.ChatRequest(message=question(i), sampling=_sampling(tokens, True))))
        order = sorted(attached)
        gaps_attached += [attached[b] - attached[a] for a, b in zip(order[1:], order[2:])]
        await stub.DeleteConversation(pb.DeleteConversationRequest(id=first.conversation_id))

    def ms(values: list[float]) -> dict:
        if not values:
            return {}
        return {"p50_ms": round(1000 * percentile(values, 50), 2), "p99_ms": round(1000 * percentile(values, 99), 2),
                "n": len(values)}

    return {"watcher_behind_asker_same_replica": ms(behind_same),
            "watcher_behind_asker_other_replica": ms(behind_other),
            "asker_gap_detached": ms(gaps_detached), "asker_gap_attached": ms(gaps_attached)}


async def _main(args: argparse.Namespace) -> dict:
    at = {int(x) for x in args.at.split(",") if x.strip()}
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        other_channel = grpc.aio.insecure_channel(args.other_address) if args.other_address else None
        other = chat_pb2_grpc.ChatServiceStub(other_channel) if other_channel else None
        try:
            result = {"branches": await branches(stub, args.conversations, args.turns, at, args.max_tokens),
                      "watch": await watch_latency(stub, other, args.answers, args.watch_tokens)}
        finally:
            if other_channel is not None:
                await other_channel.close()
    return result


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(_main(args))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    for kind, by_turn in result["branches"].items():
        print(kind.ljust(11), "  ".join(f"turn {t}: {v['ttft_ms_median']:7.1f} ms ({v['cached_share_median']:.0%} "
                                        "cached)" for t, v in by_turn.items()), file=sys.stderr)
    for name, figures in result["watch"].items():
        print(name.ljust(36), figures, file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0
