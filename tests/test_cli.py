"""The ``eoq`` command line: every subcommand's help renders, ``serve`` offers a flag per setting, and serving
imports none of the clients (the benchmark, matplotlib, the peers)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eoq.cli import build_parser
from eoq.config import Settings


@pytest.mark.parametrize("command", ["serve", "chat", "bench", "soak", "prepare", "health"])
def test_help_renders(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"eoq {command}" in capsys.readouterr().out


def test_serve_has_a_flag_and_env_var_per_setting(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert f"EOQ_{name.upper()}" in text.replace("- ", "-")
    assert "85% of the GPU memory" in text  # a '%' in a description is text, not a format


def test_bad_settings_are_refused_naming_flag_and_variable(monkeypatch) -> None:
    from eoq.config import load_settings
    from eoq.errors import ConfigError

    with pytest.raises(ConfigError, match="--quantized-max-tokens / EOQ_QUANTIZED_MAX_TOKENS: .*must be >= 0"):
        load_settings(quantized_max_tokens=-1)
    monkeypatch.setenv("EOQ_QUANTIZED_WEIGHTS", "sometimes")
    with pytest.raises(ConfigError, match="--quantized-weights / EOQ_QUANTIZED_WEIGHTS"):
        load_settings()
    monkeypatch.setenv("EOQ_QUANTIZED_WEIGHTS", "never")
    assert load_settings(quantized_max_tokens=0).quantized_weights == "never"


def test_top_level_help_lists_every_subcommand(capsys) -> None:
    from eoq_clients import COMMANDS

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ["serve", "prepare", "health", *COMMANDS]:
        assert f"\n    {command} " in text  # listed with its help line


# In a fresh interpreter: the modules imported by parsing `serve` (and its help), then by `eoq bench --help`.
_IMPORTS_SCRIPT = """
import contextlib, io, json, sys
from eoq.cli import build_parser

def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("eoq_clients", "matplotlib"))

args = build_parser().parse_args(["serve", "--port", "0"])
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    build_parser().parse_args(["serve", "--help"])
serve = loaded()
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    build_parser().parse_args(["bench", "--help"])
print(json.dumps({"func": args.func.__name__, "serve": serve, "bench": loaded(), "bench_help": out.getvalue()}))
"""


def test_serve_does_not_import_the_clients() -> None:
    result = subprocess.run([sys.executable, "-c", _IMPORTS_SCRIPT], capture_output=True, text=True, timeout=120,
                            check=True)
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["func"] == "cmd_serve"
    # Perhaps the package's table of commands and the TLS flags of `eoq health`: no client, no benchmark, no plots.
    clients = ("eoq_clients.bench", "eoq_clients.chat", "eoq_clients.soak", "matplotlib")
    assert [m for m in seen["serve"] if m.startswith(clients)] == []
    # `eoq bench --help` imports the benchmark's command module, still neither the peers nor matplotlib.
    assert "eoq bench" in seen["bench_help"] and "--compare" in seen["bench_help"]
    assert "eoq_clients.bench.cli" in seen["bench"]
    assert "eoq_clients.bench.peers" not in seen["bench"]
    assert not [m for m in seen["bench"] if m.startswith("matplotlib")]
