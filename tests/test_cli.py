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
