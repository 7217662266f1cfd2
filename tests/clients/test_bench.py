"""``eoq bench``: the figures' arithmetic on made-up records (exact), then short real runs against the
in-process server, the engine in this process, and the peers, checking the JSON, the tables and the plots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from eoq.cli import main
from eoq_clients.bench.cli import plan_from_args
from eoq_clients.bench.workloads import (
    BenchPlan,
    RequestRecord,
    median_of_runs,
    percentile,
    prefill_prompt,
    summarize_batch,
    summarize_prefill,
    summarize_single,
    summarize_turns,
)
from tests.clients.conftest import ServerThread, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the arithmetic, exactly --------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_inter_token_latency_is_normalised_by_the_tokens_in_each_event() -> None:
    r = RequestRecord(sent=10.0, events=[(10.5, 1), (10.6, 1), (10.9, 3), (11.0, 1)])
    assert r.ttft == pytest.approx(0.5)
    assert r.num_tokens == 6
    assert r.inter_token_latencies() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    # 5 tokens after the first event, over 0.5 s
    assert r.decode_tokens_per_second() == pytest.approx(10.0)
    r.add(11.1, 0)  # an event without tokens is not a token event
    assert len(r.events) == 4


def test_reported_completion_tokens_win_over_counted_ones() -> None:
    r = RequestRecord(sent=0.0, events=[(1.0, 2)], completion_tokens=3)
    assert r.num_tokens == 3
    assert r.decode_tokens_per_second() is None  # one event: no decode interval


def test_batch_summary() -> None:
    records = [
        RequestRecord(sent=0.0, events=[(0.2, 1), (0.3, 1), (0.4, 1)]),
        RequestRecord(sent=0.0, events=[(0.4, 1), (0.6, 2)]),
    ]
    s = summarize_batch(records, started=0.0, concurrency=2)
    assert s["num_requests"] == 2
    assert s["completion_tokens"] == 6
    assert s["wall_s"] == pytest.approx(0.6)
    assert s["tokens_per_s"] == pytest.approx(10.0)
    assert s["ttft_p50_s"] == pytest.approx(0.3)
    assert s["ttft_p99_s"] == pytest.approx(0.2 + 0.2 * 0.99)
    # ITLs: 0.1, 0.1 (first request), 0.1, 0.1 (second: 0.2 s for 2 tokens)
    assert s["itl_p50_s"] == pytest.approx(0.1)
    assert s["itl_p99_s"] == pytest.approx(0.1)
    assert s["server_ttft_p50_s"] is None  # these records carry no server-side TTFT


def test_single_and_turns_summaries() -> None:
    single = summarize_single(RequestRecord(sent=0.0, events=[(0.1, 1), (0.2, 1), (0.3, 1)], prompt_tokens=9), 0.3)
    assert single == {"ttft_s": pytest.approx(0.1), "decode_tokens_per_s": pytest.approx(10.0),
                      "completion_tokens": 3, "prompt_tokens": 9, "server_ttft_s": None, "wall_s": 0.3}
    turn1 = [RequestRecord(0.0, [(0.1, 2)], 40, 16), RequestRecord(0.0, [(0.3, 2)], 40, 32)]
    turn2 = [RequestRecord(1.0, [(1.2, 1)], 80, 48), RequestRecord(1.0, [(1.4, 1)], 90, 64)]
    s = summarize_turns([turn1, turn2], 2.0)
    assert s["num_conversations"] == 2 and s["num_turns"] == 2
    assert [b["ttft_p50_s"] for b in s["by_turn"]] == pytest.approx([0.2, 0.3])
    assert [b["cached_prompt_tokens_p50"] for b in s["by_turn"]] == [24, 56]
    assert [b["prompt_tokens_p50"] for b in s["by_turn"]] == [40, 85]
    assert [b["completion_tokens"] for b in s["by_turn"]] == [4, 2]


def test_prefill_summary_counts_the_tokens_not_cached_over_each_ttft() -> None:
    records = [RequestRecord(0.0, [(0.5, 1)], 1000, 32), RequestRecord(1.0, [(1.25, 1)], 1010, 0),
               RequestRecord(2.0, [(3.0, 1)], 990, None)]  # a target that does not report cached tokens
    s = summarize_prefill(records)
    # (1000 - 32) / 0.5, 1010 / 0.25, 990 / 1.0: the median of the three rates, not a rate of medians
    assert s["prefill_tokens_per_s"] == pytest.approx(1936.0)
    assert (s["num_requests"], s["prompt_tokens_p50"], s["cached_prompt_tokens_p50"]) == (3, 1000, 0)
    assert s["ttft_p50_s"] == pytest.approx(0.5) and s["server_ttft_p50_s"] is None
    assert summarize_prefill([RequestRecord(0.0)])["prefill_tokens_per_s"] is None  # no token came


def test_prefill_prompts_are_new_for_every_seed() -> None:
    a, b = prefill_prompt("x-0", 110), prefill_prompt("x-1", 110)
    assert a == prefill_prompt("x-0", 110) and a != b
    assert len(a.split()) == 110 and all(w[0] == "w" and w[1:].isdigit() and len(w) == 10 for w in a.split())


def test_median_of_runs() -> None:
    runs = [{"tokens_per_s": 10.0, "concurrency": 4, "warning": "a"}, {"tokens_per_s": 30.0, "concurrency": 4},
            {"tokens_per_s": 20.0, "concurrency": 4}]
    assert median_of_runs(runs) == {"tokens_per_s": 20.0, "concurrency": 4, "warning": "a"}
    turns = [{"by_turn": [{"turn": 1, "ttft_p50_s": v}]} for v in (0.3, 0.1, 0.2)]
    assert median_of_runs(turns) == {"by_turn": [{"turn": 1, "ttft_p50_s": 0.2}]}


def test_plan_from_flags(capsys) -> None:
    from eoq.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--concurrency", "2,8", "--max-tokens", "5"])
    plan = plan_from_args(args)
    assert plan.concurrency == (2, 8) and plan.max_tokens == 5  # flags win over --quick
    assert plan.num_turns == BenchPlan.quick().num_turns
    assert plan.workload_names() == ["single", "conc-2", "conc-8", "turns", "prefill"]
    assert (plan.prefill_words, plan.prefill_requests) == (24, 2)
    default = plan_from_args(build_parser().parse_args(["bench"]))
    levels = (1, 4, 8, 16, 32, 64)
    assert default.workload_names() == ["single", *(f"conc-{n}" for n in levels), "turns", "prefill"]
    assert (default.max_tokens, default.turn_max_tokens, default.num_conversations, default.num_turns) == (128, 64, 8, 6)
    assert (default.prefill_words, default.prefill_requests) == (110, 3)
    words = plan_from_args(build_parser().parse_args(["bench", "--workloads", "prefill", "--prefill-words", "50",
                                                      "--prefill-requests", "5"]))
    assert words.workload_names() == ["prefill"] and (words.prefill_words, words.prefill_requests) == (50, 5)


@pytest.mark.parametrize("argv", [["--workloads", "single,nope"], ["--concurrency", "4,x"], ["--concurrency", "0"],
                                  ["--compare", "server,nope"], ["--compare", "server,server"],
                                  ["--max-tokens", "0"], ["--compare", "server", "--baseline", "transformers"],
                                  ["--prefill-words", "0"]])
def test_bad_flags_exit_2_before_measuring(argv: list[str], tmp_path: Path, capsys) -> None:
    assert main(["bench", "--address", f"127.0.0.1:{free_port()}", "--out", str(tmp_path), *argv]) == 2
    assert "eoq bench:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- real runs ----------------------------------------------------------------------------------------------


def _results(out: Path) -> tuple[dict, Path]:
    files = sorted(out.glob("*/results.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0].parent


def _conversation_ids(server: ServerThread) -> set[str]:
    from eoq._proto.chat.v1 import chat_pb2 as pb
    from eoq_clients.common import sync_stub

    channel, stub = sync_stub(server.address)
    ids: set[str] = set()
    token = ""
    with channel:
        while True:
            page = stub.ListConversations(pb.ListConversationsRequest(page_size=100, page_token=token), timeout=10)
            ids.update(c.id for c in page.conversations)
            token = page.next_page_token
            if not token:
                return ids


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 5_000  # axes, lines and labels, not an empty canvas


def _assert_prefill(s: dict, words: int) -> None:
    """``prefill``'s figures: every request answered; its prompt is the random words (~10 tokens each) in the chat
    template, new each time, so the prefix cache holds at most the template's opening."""
    assert s["num_requests"] == 2  # --quick
    assert 8 * words < s["prompt_tokens_p50"] < 16 * words + 100
    assert s["cached_prompt_tokens_p50"] < s["prompt_tokens_p50"] / 4
    assert s["ttft_p50_s"] > 0 and s["prefill_tokens_per_s"] > 0


def _assert_conc(s: dict, n: int, tokens: int) -> None:
    assert s["concurrency"] == n and s["num_requests"] == n
    assert s["completion_tokens"] == n * tokens  # forced: every request ran to max_tokens
    assert s["tokens_per_s"] > 0 and s["wall_s"] > 0
    assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
    assert 0 < s["itl_p50_s"] <= s["itl_p99_s"]
    assert "warning" not in s


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_quick_run_against_the_server(eoq_server: ServerThread, tmp_path: Path, capsys) -> None:
    conversations_before = _conversation_ids(eoq_server)
    rc = main(["bench", "--address", eoq_server.address, "--quick", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results, folder = _results(tmp_path)

    assert results["schema"] == "eoq-bench/1"
    assert results["plan"]["workload_names"] == ["single", "conc-1", "conc-4", "turns", "prefill"]
    server = results["targets"]["server"]
    info = server["info"]
    assert info["model"] == "SmolLM2-135M-Instruct"
    assert info["kv_cache_tokens"] > 0
    # 30 layers x 3 KV heads x 64 dims x K and V, at 2 (bf16) or 4 (fp32) bytes
    assert info["kv_cache_dtype"] == "bfloat16"  # auto: bfloat16 models, or float32 with int8 activations
    assert info["kv_bytes_per_token"] == {"bfloat16": 23_040, "float32": 46_080}[info["kv_cache_dtype"]]
    assert info["kv_cache_bytes"] == info["kv_cache_tokens"] * info["kv_bytes_per_token"]

    w = server["workloads"]
    assert w["single"]["completion_tokens"] == 16
    assert w["single"]["ttft_s"] > 0 and w["single"]["decode_tokens_per_s"] > 0
    assert w["single"]["prompt_tokens"] > 0
    # the server's own TTFT (engine arrival to first token) is part of what the client waited for
    assert 0 < w["single"]["server_ttft_s"] <= w["single"]["ttft_s"]
    assert 0 < w["conc-4"]["server_ttft_p50_s"] <= w["conc-4"]["ttft_p99_s"]
    _assert_conc(w["conc-1"], 1, 16)
    _assert_conc(w["conc-4"], 4, 16)

    turns = w["turns"]
    assert (turns["num_conversations"], turns["num_turns"]) == (2, 3)
    by_turn = turns["by_turn"]
    assert [b["turn"] for b in by_turn] == [1, 2, 3]
    assert all(b["ttft_p50_s"] > 0 and b["completion_tokens"] > 0 for b in by_turn)
    prompt = [b["prompt_tokens_p50"] for b in by_turn]
    assert prompt[0] < prompt[1] < prompt[2], "the server keeps the history: prompts grow turn by turn"
    cached = [b["cached_prompt_tokens_p50"] for b in by_turn]
    assert cached[2] > cached[0], f"later turns reuse the history's KV from the prefix cache: {cached}"

    _assert_prefill(w["prefill"], 24)

    assert results["ratios"]["baseline"] == "server"
    assert results["ratios"]["by_workload"]["prefill"]["server"] == 1.0
    for name in ("throughput.png", "itl.png", "ttft_by_turn.png"):
        _assert_png(folder / name)
    assert set(results["files"]) == {"throughput", "itl", "ttft_by_turn"}
    for title in ("Targets", "single: one stream", "conc-N: N concurrent", "turns: median TTFT by turn",
                  "prefill: a long prompt"):
        assert title in printed
    # the run's conversations (1 + 1 + 4 + 2, and the warm-up's) were deleted at the end
    assert _conversation_ids(eoq_server) == conversations_before


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_server_rss_is_read_with_server_pid(eoq_server: ServerThread, tmp_path: Path, capsys) -> None:
    import os

    rc = main(["bench", "--address", eoq_server.address, "--workloads", "conc", "--concurrency", "2",
               "--max-tokens", "4", "--warmup-tokens", "0", "--server-pid", str(os.getpid()), "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    results, folder = _results(tmp_path)
    assert results["plan"]["workload_names"] == ["conc-2"]
    server = results["targets"]["server"]
    assert list(server["workloads"]) == ["conc-2"]
    _assert_conc(server["workloads"]["conc-2"], 2, 4)
    mem = server["memory"]
    assert 50 * 2**20 < mem["rss_bytes"] <= mem["peak_rss_bytes"]  # the model alone is ~270 MB in bf16/fp32
    _assert_png(folder / "throughput.png")
    assert not (folder / "ttft_by_turn.png").exists()  # no turns were run


def test_unreachable_server_fails_with_a_result_file(tmp_path: Path, capsys) -> None:
    rc = main(["bench", "--address", f"127.0.0.1:{free_port()}", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    results, _ = _results(tmp_path)
    assert "UNAVAILABLE" in results["targets"]["server"]["error"]
    assert "did not start" in capsys.readouterr().out


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_compare_inprocess_engine_with_the_peers(tmp_path: Path, capsys) -> None:
    """The engine in this process, transformers and (where installed) llama.cpp, in one short run."""
    try:
        import llama_cpp  # noqa: F401

        has_llamacpp = True
    except ImportError:
        has_llamacpp = False
    rc = main(["bench", "--compare", "inprocess,transformers,llamacpp", "--quick", "--concurrency", "2",
               "--max-tokens", "6", "--conversations", "2", "--turns", "2", "--turn-max-tokens", "6",
               "--kv-cache-memory-gb", "0.5", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results, folder = _results(tmp_path)
    targets = results["targets"]

    inprocess = targets["inprocess"]
    assert inprocess["info"]["kv_bytes_per_token"] == {"bfloat16": 23_040, "float32": 46_080}[
        inprocess["info"]["kv_cache_dtype"]]
    assert inprocess["info"]["kv_cache_bytes"] <= 0.5 * 2**30  # --kv-cache-memory-gb reached the engine
    assert inprocess["memory"]["peak_rss_bytes"] > 0
    assert inprocess["workloads"]["single"]["completion_tokens"] == 6
    _assert_conc(inprocess["workloads"]["conc-2"], 2, 6)
    by_turn = inprocess["workloads"]["turns"]["by_turn"]
    assert by_turn[1]["prompt_tokens_p50"] > by_turn[0]["prompt_tokens_p50"]  # the whole history is resent
    assert by_turn[1]["cached_prompt_tokens_p50"] > 0

    hf = targets["transformers"]
    assert hf["info"]["dtype"] == "float32"
    # a process of its own: its RSS is its own (the model in float32 is ~540 MB)
    assert 200 * 2**20 < hf["memory"]["rss_bytes"] <= hf["memory"]["peak_rss_bytes"]
    assert hf["workloads"]["single"]["completion_tokens"] == 6
    _assert_conc(hf["workloads"]["conc-2"], 2, 6)
    assert "skipped" in hf["workloads"]["turns"]
    _assert_prefill(inprocess["workloads"]["prefill"], 24)
    _assert_prefill(hf["workloads"]["prefill"], 24)

    ratios = results["ratios"]
    assert ratios["baseline"] == "transformers"
    assert ratios["by_workload"]["conc-2"]["transformers"] == 1.0
    assert ratios["by_workload"]["conc-2"]["inprocess"] > 0

    llama = targets["llamacpp"]
    if has_llamacpp:
        assert llama["workloads"]["single"]["completion_tokens"] == 6
        _assert_conc(llama["workloads"]["conc-2"], 2, 6)
        assert "skipped" in llama["workloads"]["turns"]
    else:
        assert llama["unavailable"] is True and "llama-cpp-python" in llama["error"]
    _assert_png(folder / "throughput.png")
    _assert_png(folder / "ttft_by_turn.png")


def test_llamacpp_without_its_package_is_reported_unavailable(monkeypatch) -> None:
    import asyncio

    from eoq_clients.bench import peers

    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    target = peers.PeerProcessTarget("llamacpp", "default", Path("/nonexistent"))
    with pytest.raises(peers.PeerUnavailable, match="pip install llama-cpp-python"):
        asyncio.run(target.start())
    assert target._proc is None  # found out before spawning anything


def test_a_peer_killed_by_a_signal_is_named_with_a_hint(tmp_path: Path) -> None:
    import multiprocessing as mp
    import signal

    from eoq_clients.bench import peers

    target = peers.PeerProcessTarget("llamacpp", "default", tmp_path)
    target._proc = mp.get_context("spawn").Process(target=signal.raise_signal, args=(signal.SIGSEGV,))
    target._proc.start()
    message = target._exit_message()
    assert "killed by SIGSEGV" in message and "-DGGML_NATIVE=OFF" in message
    target.kind = "transformers"
    assert "killed by SIGSEGV" in target._exit_message() and "GGML" not in target._exit_message()


def test_process_memory_counts_child_processes() -> None:
    """eoq's engine runs in a child process of the server: ``--server-pid`` must count it."""
    import os
    import subprocess
    import sys

    from eoq_clients.bench.targets import read_proc_memory

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); "
                              "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        alone = read_proc_memory(child.pid)["rss_bytes"]
        assert alone > 200 * 2**20
        status = Path(f"/proc/{os.getpid()}/status").read_text()
        own = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
        total = read_proc_memory(os.getpid())
        assert total["rss_bytes"] >= own + alone * 0.9
        assert total["peak_rss_bytes"] >= total["rss_bytes"]
    finally:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def http_server_thread() -> Iterator[ServerThread]:
    server = ServerThread(http_port=free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_grpc_and_http_targets_on_one_server(http_server_thread: ServerThread, tmp_path: Path, capsys) -> None:
    """The http target speaks OpenAI's API: the same workloads through eoq's HTTP port and its gRPC port."""
    port = http_server_thread.settings["http_port"]
    rc = main(["bench", "--address", http_server_thread.address, "--base-url", f"http://127.0.0.1:{port}/v1",
               "--compare", "server,http", "--quick", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results, _ = _results(tmp_path)
    http = results["targets"]["http"]
    assert http["info"]["model"] == "SmolLM2-135M-Instruct"
    w = http["workloads"]
    _assert_conc(w["conc-4"], 4, 16)
    assert w["single"]["completion_tokens"] == 16
    by_turn = w["turns"]["by_turn"]
    prompt = [b["prompt_tokens_p50"] for b in by_turn]
    assert prompt[0] < prompt[1] < prompt[2], "the client resends the growing conversation"
    cached = [b["cached_prompt_tokens_p50"] for b in by_turn]
    assert cached[2] > cached[0], f"the stateless requests hit the prefix cache: {cached}"
    # the second target on the same server: prompts of their own, not the gRPC target's again from the cache
    _assert_prefill(w["prefill"], 24)
    _assert_prefill(results["targets"]["server"]["workloads"]["prefill"], 24)
