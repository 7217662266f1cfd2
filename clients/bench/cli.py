"""``eoq bench``: the benchmark workloads (``clients/bench/WORKLOADS.md``) against one target or several.

Targets: ``server`` (an eoq server over gRPC, the default), ``inprocess`` (eoq's engine in this process, no
gRPC), ``transformers`` (the baseline: ``generate`` in float32) and ``llamacpp`` (llama-cpp-python, if
installed; both peers run in child processes, see ``peers.py``), ``http`` and ``http-peer`` (any OpenAI-compatible
API — eoq's own HTTP port, llama.cpp's ``llama-server``, vLLM — see ``openai_target.py``) and ``llama-server``
(llama.cpp's server started from ``--llama-server PATH`` with continuous batching and ``--parallel`` = the highest
concurrency: the llama.cpp peer as it serves, not one stream at a time). ``--compare server,transformers`` runs
several in one run, interleaved workload by workload, so their ratios are measured under the same load. Workloads:
``single``, ``conc-N``, ``turns`` and ``prefill`` (see ``workloads.py`` for how each figure is computed). Results:
tables on the terminal, ``<out>/<stamp>/results.json`` and PNG plots.

    eoq bench --address localhost:50051
    eoq bench --compare server,inprocess,transformers,llamacpp --server-pid $(pgrep -f 'eoq serve')
    eoq bench --quick --target inprocess
    eoq bench --compare server,http,llama-server --llama-server ~/llama.cpp/build/bin/llama-server --llamacpp-threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from eoq_clients.bench.report import compute_ratios, print_report, run_dir, write_json, write_plots
from eoq_clients.bench.targets import LocalModel, Target, TargetInfo
from eoq_clients.bench.workloads import (
    WORKLOAD_KINDS,
    BenchPlan,
    RequestRecord,
    median_of_runs,
    prefill_prompt,
    question,
    summarize_batch,
    summarize_prefill,
    summarize_single,
    summarize_turns,
)
from eoq_clients.common import TransportSecurity, add_connection_flags

TARGETS = ("server", "inprocess", "transformers", "llamacpp", "http", "http-peer", "llama-server")
WARMUP_QUESTION = "Say hello."  # not in the measured list, so it leaves no measured prompt in a prefix cache
SCHEMA = "eoq-bench/1"
EXAMPLES = """examples:
  eoq bench --address localhost:50051                     # all workloads against a server
  eoq bench --quick --target inprocess                    # smoke run of the engine alone
  eoq bench --compare server,inprocess,transformers,llamacpp --server-pid PID
  eoq bench --workloads conc --concurrency 1,4,32 --repeat 3
  eoq bench --compare server,http --workloads single,conc --concurrency 32    # gRPC vs HTTP, one server
  eoq bench --compare http,http-peer --peer-base-url http://localhost:8080/v1  # eoq vs llama-server
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark workloads (single, conc-N, turns, prefill) against targets",
                       description="Run the benchmark workloads (single, conc-N, turns, prefill) against an eoq "
                                   "server, eoq's engine in this process, transformers or llama.cpp; print tables, "
                                   "write results.json and PNG plots.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_flags(p)
    p.add_argument("--target", choices=TARGETS, default="server", help="what to measure (default: server)")
    p.add_argument("--compare", metavar="T1,T2,...",
                   help=f"run several targets in one run, interleaved per workload (from {', '.join(TARGETS)})")
    p.add_argument("--baseline", help="the target ratios are taken against (default: transformers if it runs, "
                                      "else the first target)")
    p.add_argument("--workloads", default=",".join(WORKLOAD_KINDS),
                   help=f"comma-separated, from {', '.join(WORKLOAD_KINDS)} (default: all)")
    p.add_argument("--concurrency", metavar="N1,N2,...", help="conc-N levels (default 1,4,8,16,32,64)")
    p.add_argument("--max-tokens", type=int, help="forced tokens per request in single and conc-N (default 128)")
    p.add_argument("--turn-max-tokens", type=int, help="most tokens per answer in turns (default 64)")
    p.add_argument("--conversations", type=int, help="parallel conversations in turns (default 8)")
    p.add_argument("--turns", type=int, help="turns per conversation (default 6)")
    p.add_argument("--prefill-words", type=int,
                   help="prefill: random words of its prompt (default 110, ~1,130 tokens with the chat template)")
    p.add_argument("--prefill-requests", type=int,
                   help="prefill: prompts sent one after another, each new; figures are medians (default 3)")
    p.add_argument("--repeat", type=int, help="runs of each workload; the figures are their medians (default 1)")
    p.add_argument("--warmup-tokens", type=int, help="one short request per target first (0 = none; default 8)")
    p.add_argument("--settle-seconds", type=float, default=5.0,
                   help="pause after starting the targets, before measuring: a peer that just warmed up may "
                        "still hold a CPU (llama.cpp's threads spin for a while), which skews the first runs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: conc 1,4, 16 tokens, 2 conversations x 3 turns, 2 prefill prompts of 24 words "
                        "(flags given still win)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder (default bench-results/)")
    p.add_argument("--server-pid", type=int, help="the server's process id, to read its RSS from /proc")
    p.add_argument("--model", default="default",
                   help="model of the inprocess/transformers targets, and whose config gives the server's KV "
                        "bytes/token ('default', a checkpoint folder or a .gguf file)")
    p.add_argument("--cache-dir", type=Path, help="converted checkpoints (default: eoq's cache, ~/.cache/eoq)")
    p.add_argument("--device", default="auto", help="inprocess target: device (auto, cpu, cuda)")
    p.add_argument("--dtype", default="auto", help="inprocess target: dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--kv-cache-memory-gb", type=float, help="inprocess target: KV cache budget in GiB (default 1)")
    p.add_argument("--num-threads", type=int, help="inprocess and transformers: torch threads (default: all cores)")
    p.add_argument("--llamacpp-threads", type=int, default=2, help="llamacpp target: threads (default 2)")
    p.add_argument("--base-url", default="http://localhost:8000/v1",
                   help="http target: an OpenAI-compatible API (default: eoq's own HTTP port on localhost)")
    p.add_argument("--peer-base-url", help="http-peer target: another OpenAI-compatible API (llama-server, vLLM)")
    p.add_argument("--llama-server", metavar="PATH", help="llama-server target: the llama-server binary to start "
                   "(on the default model's GGUF, --parallel = the highest --concurrency, --cont-batching)")
    p.add_argument("--openai-model", help="http targets: the model to ask for (default: the first /v1/models lists)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """The run's plan: the defaults (or --quick's), then every flag that was given. Raises ValueError."""
    workloads = tuple(_csv(args.workloads))
    plan = BenchPlan.quick(workloads) if args.quick else BenchPlan(workloads=workloads)
    given: dict = {}
    if args.concurrency:
        try:
            given["concurrency"] = tuple(int(n) for n in _csv(args.concurrency))
        except ValueError:
            raise ValueError(f"--concurrency takes comma-separated numbers, got {args.concurrency!r}") from None
    for flag, name in (("max_tokens", "max_tokens"), ("turn_max_tokens", "turn_max_tokens"),
                       ("conversations", "num_conversations"), ("turns", "num_turns"), ("repeat", "repeat"),
                       ("warmup_tokens", "warmup_tokens"), ("prefill_words", "prefill_words"),
                       ("prefill_requests", "prefill_requests")):
        if getattr(args, flag) is not None:
            given[name] = getattr(args, flag)
    return replace(plan, **given)


def targets_from_args(args: argparse.Namespace) -> list[str]:
    names = _csv(args.compare) if args.compare else [args.target]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}: choose from {', '.join(TARGETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a target is named twice in --compare {args.compare}")
    return names


def make_target(name: str, args: argparse.Namespace, local: Callable[[], LocalModel]) -> Target:
    from eoq_clients.bench import peers, targets

    if name == "server":
        return targets.ServerTarget(args.address, args.api_key, args.server_pid,
                                    security=TransportSecurity.from_args(args))
    if name == "inprocess":
        return targets.InProcessTarget(local, args.device, args.dtype, args.num_threads, args.kv_cache_memory_gb)
    if name == "transformers":
        return peers.PeerProcessTarget("transformers", args.model, _cache_dir(args), {"num_threads": args.num_threads})
    if name == "llamacpp":
        return peers.PeerProcessTarget("llamacpp", args.model, _cache_dir(args),
                                       {"gguf": _gguf_file(args.model), "num_threads": args.llamacpp_threads})
    if name in ("http", "http-peer"):
        from eoq_clients.bench.openai_target import OpenAITarget

        url = args.base_url if name == "http" else args.peer_base_url
        if not url:
            raise ValueError("the http-peer target needs --peer-base-url")
        return OpenAITarget(url, args.api_key, args.openai_model, label=name)
    if name == "llama-server":
        from eoq_clients.bench.openai_target import LlamaServerTarget

        if not args.llama_server:
            raise ValueError("the llama-server target needs --llama-server PATH (a built llama-server binary)")
        levels = [int(c) for c in _csv(args.concurrency)] if args.concurrency else [32]
        return LlamaServerTarget(args.llama_server, str(_gguf_file(args.model)), args.llamacpp_threads,
                                 max(levels + [1]))
    raise ValueError(name)


def _gguf_file(model: str) -> Path:
    if model == "default":
        from eoq.engine.model.checkpoint import default_gguf_path

        return default_gguf_path()
    if model.endswith(".gguf"):
        return Path(model).expanduser()
    raise ValueError(f"the llamacpp target needs a GGUF file; --model {model} is not one")


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir is not None:
        return args.cache_dir
    from eoq.config import default_cache_dir

    return default_cache_dir()


# --- running ------------------------------------------------------------------------------------------------


class Runner:
    """Runs the plan's workloads on started targets; one progress-bar line per workload run."""

    def __init__(self, plan: BenchPlan, progress: Progress) -> None:
        self.plan = plan
        self.progress = progress
        self._totals: dict[int, int] = {}

    def _task(self, label: str, total: int) -> tuple[int, Callable[[int], None]]:
        task = self.progress.add_task(label, total=total)
        self._totals[task] = total
        return task, lambda n: self.progress.advance(task, n)

    def _done(self, task: int) -> None:
        # Answers in `turns` may end early: the bar's total is an upper bound.
        self.progress.update(task, completed=self._totals[task])

    async def run(self, target: Target, workload: str, label: str) -> dict:
        plan = self.plan
        if workload == "turns":
            if target.turns_skipped:
                return {"skipped": target.turns_skipped}
            task, on_tokens = self._task(label, plan.num_conversations * plan.num_turns * plan.turn_max_tokens)
            summary = await self._turns(target, on_tokens)
        elif workload == "prefill":
            task, on_tokens = self._task(label, plan.prefill_requests)
            summary = await self._prefill(target, on_tokens)
        else:
            n = 1 if workload == "single" else int(workload.split("-", 1)[1])
            task, on_tokens = self._task(label, n * plan.max_tokens)
            records = await target.generate([question(i) for i in range(n)], plan.max_tokens, on_tokens)
            started = min(r.sent for r in records)
            if workload == "single":
                end = records[0].last_token_time
                summary = summarize_single(records[0], (end - started) if end is not None else 0.0)
            else:
                summary = summarize_batch(records, started, n)
            short = [r.num_tokens for r in records if r.num_tokens != plan.max_tokens]
            if short:
                summary["warning"] = f"{len(short)} request(s) did not generate {plan.max_tokens} tokens: {short[:8]}"
        self._done(task)
        return summary

    async def _prefill(self, target: Target, on_tokens: Callable[[int], None]) -> dict:
        plan = self.plan
        tag = secrets.token_hex(3)  # a prompt of its own for every request of every run and target
        records = []
        for i in range(plan.prefill_requests):  # one after another: each request's TTFT is its prompt's prefill
            records += await target.generate([prefill_prompt(f"{tag}-{i}", plan.prefill_words)], 1, on_tokens)
        return summarize_prefill(records)

    async def _turns(self, target: Target, on_tokens: Callable[[int], None]) -> dict:
        plan = self.plan
        # A fresh tag at the start of each conversation: greedy answers repeat, and without it a second run
        # against the same server would find whole histories of the first in the prefix cache.
        tag = secrets.token_hex(3)
        conversations = [await target.new_conversation() for _ in range(plan.num_conversations)]
        by_turn: list[list[RequestRecord | None]] = [[None] * plan.num_conversations for _ in range(plan.num_turns)]

        async def converse(c: int) -> None:
            for t in range(plan.num_turns):
                q = question(c * plan.num_turns + t)
                by_turn[t][c] = await target.turn(conversations[c], f"({tag}) {q}" if t == 0 else q,
                                                  plan.turn_max_tokens, on_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(converse(c) for c in range(plan.num_conversations)))
        return summarize_turns(by_turn, time.perf_counter() - t0)  # type: ignore[arg-type]


def _info_dict(info: TargetInfo) -> dict:
    d = {f.name: getattr(info, f.name) for f in fields(info)}
    d["kv_cache_bytes"] = info.kv_cache_bytes
    return d


def _error(e: BaseException) -> str:
    details = getattr(e, "details", None)
    code = getattr(e, "code", None)
    if callable(details) and callable(code):  # grpc.RpcError
        return f"{code().name}: {details()}"
    return f"{type(e).__name__}: {e}"


async def run_bench(plan: BenchPlan, names: list[str], make: Callable[[str], Target], console: Console,
                    show_progress: bool = True, settle_seconds: float = 0.0) -> tuple[dict, bool]:
    """Start the targets, run every workload on each (interleaved), return (results, every part ran)."""
    from eoq_clients.bench.peers import PeerUnavailable

    results: dict = {"targets": {}}
    ok = True
    started: list[Target] = []
    measured: list[Target] = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                        TimeElapsedColumn(), console=console, disable=not show_progress, refresh_per_second=4)
    try:
        for name in names:
            console.print(f"[dim]starting {name}...[/dim]")
            try:
                target = make(name)
                info = await target.start()
                started.append(target)
                if plan.warmup_tokens:
                    await target.generate([WARMUP_QUESTION], plan.warmup_tokens, lambda n: None)
            except PeerUnavailable as e:  # an optional peer: reported, not a failure of the run
                results["targets"][name] = {"error": str(e), "unavailable": True}
                console.print(f"[yellow]{name}: {e}[/yellow]")
                continue
            except Exception as e:  # noqa: BLE001 - any failure to start is reported and the other targets run
                results["targets"][name] = {"error": _error(e)}
                console.print(f"[red]{name} did not start: {_error(e)}[/red]")
                ok = False
                continue
            entry = {"info": _info_dict(info), "workloads": {}, "runs": {}}
            entry["memory_after_start"] = target.memory()
            results["targets"][name] = entry
        measured = [t for t in started if "info" in results["targets"][t.name]]
        if len(started) > 1 and settle_seconds > 0:
            await asyncio.sleep(settle_seconds)
        runner = Runner(plan, progress)

        with progress:
            for workload in plan.workload_names():
                for target in measured:
                    entry = results["targets"][target.name]
                    runs = []
                    for rep in range(plan.repeat):
                        label = f"{target.name:<12} {workload:<8}" + (f" run {rep + 1}" if plan.repeat > 1 else "")
                        try:
                            summary = await runner.run(target, workload, label)
                        except Exception as e:  # noqa: BLE001 - recorded in the results; the run goes on
                            summary = {"error": _error(e)}
                            ok = False
                        runs.append(summary)
                        if "skipped" in summary or "error" in summary:
                            break
                    good = [r for r in runs if "skipped" not in r and "error" not in r]
                    entry["workloads"][workload] = median_of_runs(good) if good else runs[-1]
                    if plan.repeat > 1:
                        entry["runs"][workload] = runs
        for target in measured:
            results["targets"][target.name]["memory"] = target.memory()
    finally:
        for target in started:
            try:
                await target.close()
            except Exception as e:  # noqa: BLE001 - closing one must not keep the others open
                console.print(f"[yellow]closing {target.name}: {_error(e)}[/yellow]")
    if not measured:
        ok = False
    return results, ok


def _machine() -> dict:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": cpus,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run(args: argparse.Namespace) -> int:
    console = Console()
    err = Console(stderr=True)
    try:
        plan = plan_from_args(args)
        names = targets_from_args(args)
    except ValueError as e:
        err.print(f"eoq bench: {e}", markup=False)
        return 2
    baseline = args.baseline or ("transformers" if "transformers" in names else names[0])
    if baseline not in names:
        err.print(f"eoq bench: --baseline {baseline} is not one of the targets {names}", markup=False)
        return 2

    local = functools.cache(lambda: LocalModel(args.model, _cache_dir(args)))
    results: dict = {
        "schema": SCHEMA,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["eoq", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "args": {k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                 for k, v in vars(args).items() if k not in ("func", "api_key")},
        "machine": _machine(),
        "plan": {**asdict(plan), "workload_names": plan.workload_names()},
    }
    t0 = time.perf_counter()
    measured, ok = asyncio.run(run_bench(plan, names, lambda n: make_target(n, args, local), console,
                                         show_progress=not args.no_progress, settle_seconds=args.settle_seconds))
    results.update(measured)
    results["wall_s"] = time.perf_counter() - t0
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["ratios"] = compute_ratios(results, baseline)

    folder = run_dir(args.out, dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    plots = write_plots(results, folder)
    results["files"] = {k: str(v) for k, v in plots.items()}
    path = write_json(results, folder / "results.json")
    print_report(console, results)
    console.print(f"results: {path}" + (f"; plots: {', '.join(str(p.name) for p in plots.values())}" if plots else ""),
                  markup=False, highlight=False)
    load = results["machine"]["load_average_at_start"]
    cpus = results["machine"]["cpus"] or 1
    if load and load[0] > 0.5 * cpus:
        console.print(f"[yellow]note: the load average was {load[0]:.1f} on {cpus} CPUs when the run started: "
                      "other work was running, the numbers are noisy[/yellow]")
    return 0 if ok else 1
