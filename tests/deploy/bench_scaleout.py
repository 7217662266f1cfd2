"""Scale-out measurements, run by hand (not a test: numbers depend on the machine). Real processes only.

    .venv/bin/python -m tests.deploy.bench_scaleout affinity [--runs 2]   # turns through nginx: hash vs round-robin
    .venv/bin/python -m tests.deploy.bench_scaleout failover [--runs 3]   # Sentinel failover: kill -> writes resume
    .venv/bin/python -m tests.deploy.bench_scaleout wait [--turns 500]    # a turn's write, WAIT 0 vs 1 replica

``affinity`` starts one redis-server, three ``eoq serve`` (one torch thread each) and nginx with
deploy/nginx/nginx.conf, then runs ``eoq bench --workloads turns`` through nginx, alternating the shipped
``hash $http_x_conversation_id consistent`` and plain round-robin (the hash lines removed, nginx reloaded),
and prints cached prompt tokens and TTFT by turn (medians over the conversations; each bench run tags its
conversations, so no run finds another's history in a cache). ``failover`` and ``wait`` use a primary, a
replica and three sentinels (down-after 1 s) and the Redis store directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from eoq.chat.redis_client import parse_sentinels
from eoq.chat.redis_store import RedisConversationStore
from eoq.chat.store import Role, StoredMessage, StoreUnavailable
from eoq.engine.types import FinishReason
from tests.conftest import running_redis

from .balancer import Nginx
from .live import EoqServer
from .sentinel import MASTER, SentinelCluster

API_KEY = "bench-key"


def affinity(work: Path, runs: int, conversations: int, turns: int) -> None:
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(work / "redis"))
        replicas = [EoqServer(work, f"r{i}", redis_url=redis.url, api_keys=f"{API_KEY}:bench",
                              extra_args=["--num-threads", "1"]) for i in range(3)]
        for r in replicas:
            stack.callback(r.stop)
            r.start()
        for r in replicas:
            r.wait_serving()
        nginx = Nginx(work / "nginx", [r.address for r in replicas])
        stack.callback(nginx.stop)
        nginx.start()
        results: dict[str, list[dict]] = {"hash": [], "round_robin": []}
        for run in range(runs):
            for balance in ("hash", "round_robin"):
                nginx.balance = balance
                nginx.reload()
                out = work / f"bench-{balance}-{run}"
                subprocess.run([sys.executable, "-m", "eoq.cli", "bench", "--address", nginx.address,
                                "--api-key", API_KEY, "--workloads", "turns", "--conversations", str(conversations),
                                "--turns", str(turns), "--out", str(out), "--no-progress"],
                               check=True, stdout=subprocess.DEVNULL, timeout=1800)
                (found,) = out.glob("*/results.json")  # <out>/<stamp>/results.json
                summary = json.loads(found.read_text())
                results[balance].append(_turns_summary(summary))
                print(f"run {run + 1} {balance}: done", flush=True)
        print(f"\nturns workload through nginx, 3 replicas, {conversations} conversations x {turns} turns, "
              f"{runs} run(s) each (medians; per run the median over conversations)")
        print(f"{'turn':>4} | {'cached hash':>11} {'cached rr':>9} | {'prompt':>6} | {'TTFT hash ms':>12} "
              f"{'TTFT rr ms':>10}")
        for t in range(turns):
            def med(balance: str, key: str) -> float:
                return statistics.median(r[t][key] for r in results[balance])
            print(f"{t + 1:>4} | {med('hash', 'cached'):>11.0f} {med('round_robin', 'cached'):>9.0f} | "
                  f"{med('hash', 'prompt'):>6.0f} | {1000 * med('hash', 'ttft'):>12.0f} "
                  f"{1000 * med('round_robin', 'ttft'):>10.0f}")
        print(json.dumps(results))


def _turns_summary(results: dict) -> list[dict]:
    """by_turn of the server target's turns workload in eoq bench's results.json."""
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "by_turn" in node:
                found.append(node["by_turn"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(results)
    (by_turn,) = found
    return [{"cached": t["cached_prompt_tokens_p50"], "prompt": t["prompt_tokens_p50"], "ttft": t["ttft_p50_s"]}
            for t in by_turn]


def _message(role: Role, text: str) -> StoredMessage:
    return StoredMessage(role=role, content=text, created_at=time.time(),
                         finish_reason=FinishReason.STOP if role is Role.ASSISTANT else None)


def _store(cluster: SentinelCluster, wait_replicas: int) -> RedisConversationStore:
    return RedisConversationStore("", ttl_seconds=3600, timeout_seconds=1.0,
                                  sentinels=parse_sentinels(cluster.sentinel_addresses), sentinel_master=MASTER,
                                  wait_replicas=wait_replicas)


def failover(work: Path, runs: int) -> None:
    rows = []
    for run in range(runs):
        cluster = SentinelCluster(work / f"failover-{run}")
        try:
            cluster.start()

            async def measure() -> tuple[float, float, int]:
                store = _store(cluster, 0)
                cid = (await store.create("bench", None)).id
                for _ in range(20):
                    await store.append_turn("bench", cid, _message(Role.USER, "q"), _message(Role.ASSISTANT, "a"))
                old = cluster.kill_primary()
                killed = time.monotonic()
                promoted = asyncio.create_task(asyncio.to_thread(cluster.wait_promoted, old))
                failures = 0
                while True:
                    try:
                        await store.append_turn("bench", cid, _message(Role.USER, "q"), _message(Role.ASSISTANT, "a"))
                        break
                    except StoreUnavailable:
                        failures += 1
                        await asyncio.sleep(0.01)
                resumed = time.monotonic() - killed
                await promoted
                # the sentinels' own view: when they switched (their +switch-master event is logged)
                await store.close()
                return resumed, failures, cluster.master_port()

            resumed, failures, _ = asyncio.run(measure())
            rows.append((resumed, failures))
            print(f"run {run + 1}: writes resumed {resumed:.2f} s after the primary was killed "
                  f"({failures} UNAVAILABLE meanwhile)", flush=True)
        finally:
            cluster.stop()
    print(f"median: {statistics.median(r[0] for r in rows):.2f} s (sentinel down-after-milliseconds 1000)")


def wait_cost(work: Path, turns: int) -> None:
    cluster = SentinelCluster(work / "wait")
    try:
        cluster.start()

        async def measure(wait_replicas: int) -> list[float]:
            store = _store(cluster, wait_replicas)
            cid = (await store.create("bench", None)).id
            times = []
            for i in range(turns):
                if i and i % 200 == 0:  # stay below the conversation's message limit
                    cid = (await store.create("bench", None)).id
                start = time.perf_counter()
                await store.append_turn("bench", cid, _message(Role.USER, "question " * 20),
                                        _message(Role.ASSISTANT, "answer " * 100))
                times.append(time.perf_counter() - start)
            await store.close()
            return times

        for wait_replicas in (0, 1, 0, 1):  # interleaved: the machine is shared
            times = sorted(asyncio.run(measure(wait_replicas)))
            p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
            print(f"append_turn, --redis-wait-replicas {wait_replicas}: p50 {p50 * 1000:.2f} ms, "
                  f"p99 {p99 * 1000:.2f} ms ({turns} turns)", flush=True)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["affinity", "failover", "wait"])
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eoq-scaleout-") as tmp:
        work = Path(tmp)
        if args.what == "affinity":
            affinity(work, args.runs or 2, args.conversations, args.turns or 6)
        elif args.what == "failover":
            failover(work, args.runs or 3)
        else:
            wait_cost(work, args.turns or 500)


if __name__ == "__main__":
    main()
