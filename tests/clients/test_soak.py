"""``eoq soak`` against a real server: a short run mixing new conversations, follow-ups, cancels and sampling
reports its calls by code, no lost turn, the server's RSS and a KV cache empty afterwards, and exits 0."""

from __future__ import annotations

import os
import re

import pytest

from tests.clients.conftest import ServerThread, free_port, run_eoq

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_a_short_soak_loses_no_turn_and_frees_the_cache(eoq_server: ServerThread) -> None:
    port = free_port()
    eoq_server.running.metrics.serve(port, "127.0.0.1")
    done = run_eoq("soak", "--address", eoq_server.address, "--streams", "6", "--minutes", "0.25",
                   "--max-tokens", "24", "--server-pid", str(os.getpid()),
                   "--metrics-url", f"http://127.0.0.1:{port}/metrics", timeout=120)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    calls = int(re.search(r"streams for [\d.]+ min: (\d+) calls", out).group(1))
    assert calls >= 6
    ok = int(re.search(r"^  OK: (\d+)$", out, re.M).group(1))
    cancelled = re.search(r"^  CANCELLED \(by the soak\): (\d+)$", out, re.M)
    assert ok + (int(cancelled.group(1)) if cancelled else 0) == calls  # no error of any kind
    assert re.search(r"^turns lost: 0 of (\d+)$", out, re.M)
    assert re.search(r"server RSS \(with the engine\): start \d+ MiB, peak \d+ MiB, end \d+ MiB", out)
    assert "KV cache usage 0.0, running requests 0.0 (ok)" in out
