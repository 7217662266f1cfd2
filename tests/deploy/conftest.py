"""Fixtures of the deploy tests: they read deploy/ and run promtool and hadolint; no server, no Docker."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import yaml

from .files import DEPLOY


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed (Debian package 'prometheus'; `make install-test` installs it)"
        )
    return path


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())
