"""The ``eoq`` command line: every subcommand's help renders and ``serve`` offers a flag per setting."""

from __future__ import annotations

import pytest

from eoq.cli import build_parser
from eoq.config import Settings


@pytest.mark.parametrize("command", ["serve", "chat", "bench", "prepare", "health"])
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
