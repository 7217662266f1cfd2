"""A real Redis Sentinel set-up on loopback: a primary, a replica and three sentinels (Debian's redis-sentinel).

``SentinelCluster`` starts a primary, a replica of it and three sentinels monitoring it as ``MASTER`` (quorum
2), each on a free port with its files under a work dir, and waits until every sentinel sees the replica and
the two other sentinels (so a failover can happen at once). ``kill_primary`` SIGKILLs the current primary, as
a crash; ``wait_promoted`` waits until the sentinels name another one. The sentinels' timings are short
(``down_after_ms``: 1 s instead of the 30 s default) so that a failover takes seconds in a test; the deploy
README says what to use in production.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisProcess

from .live import wait_until

MASTER = "eoq"


def _executable(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.fail(f"{name} not found: install it (bash .ci/ensure-tools.sh, Debian packages redis-server and "
                    "redis-sentinel); these tests need real ones")
    return path


class RedisNode(RedisProcess):
    """``redis-server`` (or, with ``sentinel=True``, a sentinel) from a config file under ``data_dir``."""

    def __init__(self, data_dir: Path, config: Sequence[str], *, sentinel: bool = False) -> None:
        super().__init__(data_dir)
        self.sentinel = sentinel
        self.config = list(config)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / ("sentinel.conf" if self.sentinel else "redis.conf")
        lines = [f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {self.data_dir}",
                 f"logfile {self.log_file}", *self.config]
        if not conf.exists():  # a sentinel rewrites its file: on a restart it keeps what it learnt
            conf.write_text("\n".join(lines) + "\n")
        argv = [_executable("redis-sentinel"), str(conf)] if self.sentinel else [_executable("redis-server"), str(conf)]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = self.client()
        try:
            def up() -> bool:
                if self._process.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited at start (port {self.port}):\n{self.log_tail(30)}")
                try:
                    return bool(client.ping())
                except redis.exceptions.RedisError:
                    return False

            wait_until(up, timeout, f"{argv[0]} on port {self.port} answering PING", interval=0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)


class SentinelCluster:
    """Primary + replica + three sentinels; ``stop()`` kills them all (fixtures call it, also on failure)."""

    def __init__(self, work: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 10_000) -> None:
        self.work = work
        replication = ["appendonly yes", "appendfsync everysec", 'save ""', "repl-diskless-sync yes",
                       "repl-diskless-sync-delay 0", "repl-ping-replica-period 1"]
        self.primary = RedisNode(work / "primary", replication)
        self.replica = RedisNode(work / "replica", replication)
        self.replica.config.append(f"replicaof 127.0.0.1 {self.primary.port}")
        self.sentinels = [
            RedisNode(work / f"sentinel-{i}", [
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2",
                f"sentinel down-after-milliseconds {MASTER} {down_after_ms}",
                f"sentinel failover-timeout {MASTER} {failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER} 1",
            ], sentinel=True)
            for i in range(3)
        ]
        self.nodes = {self.primary.port: self.primary, self.replica.port: self.replica}

    @property
    def sentinel_addresses(self) -> str:
        """The ``--redis-sentinels`` value."""
        return ",".join(s.address for s in self.sentinels)

    def start(self, timeout: float = 60.0) -> None:
        self.primary.start()
        self.replica.start()
        with self.replica.client() as r:
            wait_until(lambda: r.info("replication").get("master_link_status") == "up", timeout,
                       "the replica in sync with the primary")
        for s in self.sentinels:
            s.start()

        def ready() -> bool:
            for s in self.sentinels:
                with s.client() as c:
                    state = c.sentinel_master(MASTER)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
            return True

        wait_until(ready, timeout, "every sentinel sees the replica and the two other sentinels", interval=0.2)

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for s in self.sentinels:
            if not s.running:
                continue
            try:
                with s.client() as c:
                    host, port = c.sentinel_get_master_addr_by_name(MASTER)
                return int(port)
            except (redis.exceptions.RedisError, TypeError):
                continue
        return None

    def current_primary(self) -> RedisNode:
        return self.nodes[self.master_port()]

    def kill_primary(self) -> RedisNode:
        """SIGKILL the primary the sentinels name now; returns it (``start()`` brings it back, as a replica)."""
        primary = self.current_primary()
        primary.kill()
        return primary

    def wait_promoted(self, old: RedisNode, timeout: float = 30.0) -> RedisNode:
        """Wait until the sentinels name a primary other than ``old`` and it answers as a master."""

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old.port:
                return False
            with self.nodes[port].client() as c:
                try:
                    return c.info("replication")["role"] == "master"
                except redis.exceptions.RedisError:
                    return False

        wait_until(promoted, timeout, "the sentinels promoting the replica", interval=0.05)
        return self.current_primary()

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n.data_dir.name}\n{n.log_tail(15)}" for n in [*self.sentinels, *self.nodes.values()])


def wait_for(predicate, timeout: float, what: str) -> float:
    """``wait_until`` that returns how long it took."""
    start = time.monotonic()
    wait_until(predicate, timeout, what, interval=0.05)
    return time.monotonic() - start
