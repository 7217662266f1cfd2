"""A real nginx in front of real replicas, for the scale-out tests and the affinity benchmark.

``render_nginx_conf`` takes deploy/nginx/nginx.conf, the file that is shipped, and changes only what cannot be
the same here: the replicas' addresses (free loopback ports instead of eoq-1..3), nginx's own listen ports,
its files (pid, logs, temp dirs under a work dir) and one worker. Every directive that decides behaviour (the
hash, the failure detection, the retry rules, the timeouts) is the shipped one; each change must match
exactly once, so a change of the shipped file that breaks the rendering fails loudly. ``balance="round_robin"``
drops the hash lines, for the benchmark's comparison only.

``Nginx`` runs it in the foreground in its own process group (``GroupProcess``); ``reload`` is nginx's
graceful reload (new workers take new calls, old ones finish their streams); ``access_log`` parses the
shipped log format, whose ``upstream=`` field says which replica answered each call.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _free_port

from .files import DEPLOY
from .live import GroupProcess, wait_until

NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
UPSTREAM_NAMES = ("eoq-1", "eoq-2", "eoq-3")


def nginx_executable() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        pytest.fail("nginx not found: install it (bash .ci/ensure-tools.sh, Debian package 'nginx'); these "
                    "tests need a real one")
    return path


def _replace_once(text: str, pattern: str, replacement: str, what: str) -> str:
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert n == 1, f"deploy/nginx/nginx.conf: expected one {what} ({pattern!r}), found {n}"
    return new


def _upstream_servers(text: str, upstream: str, port: int, backends: Sequence[str]) -> str:
    """The ``server eoq-N:PORT params;`` lines of ``upstream`` replaced by one line per backend, same params."""
    block = re.search(rf"\n    upstream {upstream} \{{\n(.*?)\n    \}}", text, flags=re.DOTALL)
    assert block, f"deploy/nginx/nginx.conf: no upstream {upstream}"
    body = block.group(1)
    pattern = rf"^( *)server (eoq-\d):{port}((?: [^;]*)?);\n?"
    found = list(re.finditer(pattern, body, flags=re.MULTILINE))
    assert tuple(m.group(2) for m in found) == UPSTREAM_NAMES, f"upstream {upstream}: {[m.group(0) for m in found]}"
    params = {m.group(3) for m in found}
    assert len(params) == 1, f"upstream {upstream}: servers differ in parameters: {params}"
    (param,) = params
    first = found[0]
    new = "".join(f"{first.group(1)}server {b}{param};\n" for b in backends)
    body = body[: first.start()] + new + re.sub(pattern, "", body[first.start():], flags=re.MULTILINE)
    return text[: block.start(1)] + body + text[block.end(1):]


def render_nginx_conf(
    work: Path,
    grpc_backends: Sequence[str],
    http_backends: Sequence[str] = (),
    *,
    grpc_port: int,
    http_port: int | None = None,
    balance: str = "hash",
    down: Sequence[str] = (),
) -> str:
    """The shipped config for backends on loopback; ``down``: backends marked ``down`` (taken out, as before a
    planned drain)."""
    text = NGINX_CONF.read_text()
    text = _replace_once(text, r"^worker_processes auto;$",
                         f"worker_processes 1;\ndaemon off;\npid {work}/nginx.pid;", "worker_processes")
    text = _replace_once(text, r"^(\s*)access_log /dev/stdout eoq;$", rf"\1access_log {work}/access.log eoq;",
                         "access_log")
    text = _replace_once(text, r"^(\s*)error_log /dev/stderr warn;$",
                         rf"\1error_log {work}/error.log warn;\n"
                         + "".join(rf"\1{kind}_temp_path {work}/{kind}_temp;\n"
                                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
                         "error_log")
    text = _replace_once(text, r"^(\s*)listen 50051 http2;$", rf"\1listen 127.0.0.1:{grpc_port} http2;",
                         "gRPC listen")
    text = _upstream_servers(text, "eoq_grpc", 50051, grpc_backends)
    if http_backends:
        assert http_port is not None
        text = _replace_once(text, r"^(\s*)listen 8000;$", rf"\1listen 127.0.0.1:{http_port};", "HTTP listen")
        text = _upstream_servers(text, "eoq_http", 8000, http_backends)
    else:  # no HTTP API on the replicas: drop its part (the end of the http block)
        start = text.index("    # The HTTP API's affinity key")
        text = text[:start].rstrip("\n") + "\n}\n"
        assert "eoq_http" not in text and text.count("{") == text.count("}")
    if balance == "round_robin":
        text, n = re.subn(r"^\s*hash \S+ consistent;\n", "", text, flags=re.MULTILINE)
        assert n >= 1
    elif balance != "hash":
        raise ValueError(f"balance: hash or round_robin, not {balance!r}")
    for backend in down:
        text, n = re.subn(rf"^(\s*server {re.escape(backend)}) [^;]*;$", r"\1 down;", text, flags=re.MULTILINE)
        assert n >= 1, f"no server {backend} to mark down"
    return text


@dataclass
class LogLine:
    request: str
    status: int
    upstreams: list[str]  # every replica tried, in order ("127.0.0.1:PORT")
    upstream_status: str
    grpc_status: str
    conversation: str

    @property
    def upstream(self) -> str:
        """The replica that answered (the last one tried)."""
        return self.upstreams[-1] if self.upstreams else ""


_LOG_RE = re.compile(
    r'^\S+ "(?P<request>[^"]*)" (?P<status>\d+) upstream=(?P<upstream>.*?) upstream_status=(?P<ustatus>.*?) '
    r"grpc_status=(?P<grpc>\S*) conversation=(?P<conversation>\S*) request_time="
)


class Nginx:
    """nginx with the rendered config, listening on free loopback ports (gRPC, and HTTP when asked)."""

    def __init__(self, work: Path, grpc_backends: Sequence[str], http_backends: Sequence[str] = (),
                 balance: str = "hash") -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(exist_ok=True)  # the error log before the config is read
        self.executable = nginx_executable()
        self.grpc_port = _free_port()
        self.http_port = _free_port() if http_backends else None
        self.grpc_backends = list(grpc_backends)
        self.http_backends = list(http_backends)
        self.balance = balance
        self.conf = work / "nginx.conf"
        self.write_conf()
        self.process = GroupProcess(
            [self.executable, "-p", str(work), "-e", str(work / "error.log"), "-c", str(self.conf)],
            work / "nginx.out",
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_conf(self, down: Sequence[str] = ()) -> None:
        self.conf.write_text(render_nginx_conf(
            self.work, self.grpc_backends, self.http_backends, grpc_port=self.grpc_port, http_port=self.http_port,
            balance=self.balance, down=down,
        ))

    def _run(self, *args: str) -> None:
        done = subprocess.run([self.executable, "-p", str(self.work), "-e", str(self.work / "error.log"),
                               "-c", str(self.conf), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"nginx {' '.join(args)}: {done.stderr}"

    def start(self, timeout: float = 20.0) -> None:
        self._run("-t", "-q")  # the rendered config is valid, or say why
        self.process.start()

        def listening() -> bool:
            if self.process.exited:
                raise RuntimeError(f"nginx exited:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.grpc_port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, timeout, "nginx listening")

    def reload(self, down: Sequence[str] = ()) -> None:
        """Rewrite the config (``down``: backends taken out) and reload gracefully; returns once the new worker
        answers on the gRPC port. Reloading also forgets the failures passive detection counted."""
        self.write_conf(down)
        pid_file = self.work / "nginx.pid"
        old_workers = set(_children(int(pid_file.read_text())))
        self._run("-s", "reload")
        # A new worker exists that was not there before.
        wait_until(lambda: bool(set(_children(int(pid_file.read_text()))) - old_workers), 20, "nginx reloaded")
        time.sleep(0.2)

    def stop(self) -> None:
        self.process.stop()

    def access_log(self) -> list[LogLine]:
        path = self.work / "access.log"
        if not path.exists():
            return []
        lines = []
        for raw in path.read_text().splitlines():
            m = _LOG_RE.match(raw)
            assert m, f"access log line in an unknown format: {raw}"
            # "a:1, b:2" lists the replicas tried in turn (" : " separates groups after an internal redirect)
            tried = [u.strip() for u in m["upstream"].replace(" : ", ", ").split(",")]
            lines.append(LogLine(
                m["request"], int(m["status"]), [u for u in tried if u and u != "-"],
                m["ustatus"], m["grpc"], m["conversation"],
            ))  # fmt: skip
        return lines

    def error_log(self) -> str:
        try:
            return (self.work / "error.log").read_text(errors="replace")[-4000:]
        except OSError:
            return "(no error log)"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
