"""The scale-out files, statically: deploy/nginx/nginx.conf (valid for a real nginx, and the rules the README
states), deploy/compose.scale.yaml (Compose Specification, wired to that config and to the sentinels), and
deploy/k8s/redis-sentinel (wired to what eoq-config's commented sentinel lines name). The live behaviour is in
test_nginx.py and test_sentinel.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from eoq.chat.redis_client import parse_sentinels
from eoq.config import Settings

from .balancer import NGINX_CONF, nginx_executable, render_nginx_conf
from .files import DEPLOY, K8S, REPO, find_object

CONF = NGINX_CONF.read_text()
SCALE = yaml.safe_load((DEPLOY / "compose.scale.yaml").read_text())
SCHEMA = json.loads((REPO / "tests/deploy/schemas/compose-spec.json").read_text())


def location(pattern: str) -> str:
    """The body of the location block whose header matches ``pattern``."""
    m = re.search(rf"location {pattern} \{{(.*?)\n        \}}", CONF, flags=re.DOTALL)
    assert m, pattern
    return m.group(1)


def test_the_shipped_nginx_config_is_valid_for_nginx(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    (tmp_path / "logs").mkdir()
    conf.write_text(render_nginx_conf(tmp_path, ["127.0.0.1:1"] * 3, ["127.0.0.1:2"] * 3, grpc_port=1, http_port=2))
    done = subprocess.run([nginx_executable(), "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                           "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_both_upstreams_hash_the_conversation_consistently_with_passive_checks() -> None:
    for upstream, key in (("eoq_grpc", "$http_x_conversation_id"), ("eoq_http", "$eoq_http_affinity")):
        body = re.search(rf"upstream {upstream} \{{(.*?)\n    \}}", CONF, flags=re.DOTALL).group(1)
        assert f"hash {key} consistent;" in body
        servers = re.findall(r"^\s*server (\S+) (.*);$", body, flags=re.MULTILINE)
        assert [s for s, _ in servers] == [f"eoq-{i}:{50051 if upstream == 'eoq_grpc' else 8000}" for i in (1, 2, 3)]
        assert {p for _, p in servers} == {"max_fails=1 fail_timeout=10s"}


def test_a_started_grpc_call_is_never_sent_to_a_second_replica() -> None:
    grpc = location("/")
    assert "grpc_pass grpc://eoq_grpc;" in grpc
    assert re.search(r"grpc_next_upstream error timeout;", grpc)
    directives = "\n".join(line for line in grpc.splitlines() if not line.strip().startswith("#"))
    assert "non_idempotent" not in directives  # POSTs are retried only when no replica received them
    # No upstream keepalive for gRPC: a dead replica is found at connect time, where a retry is safe.
    grpc_upstream = re.search(r"upstream eoq_grpc \{(.*?)\n    \}", CONF, flags=re.DOTALL).group(1)
    assert not re.search(r"^\s*keepalive ", grpc_upstream, flags=re.MULTILINE)
    # Streams as long as answers: the read timeout bounds the silence before a token, not the call.
    assert int(re.search(r"grpc_read_timeout (\d+)s;", grpc).group(1)) >= 600


def test_http_retries_only_stateless_routes_after_a_replica_got_them() -> None:
    stateless = location(r"~ \^/v1/\(chat/\)\?completions\$")
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in stateless
    stateful = re.search(r"location / \{(.*?)\n        \}", CONF.split("listen 8000;")[1], flags=re.DOTALL).group(1)
    assert "proxy_next_upstream error timeout;" in stateful
    assert "proxy_buffering off;" in CONF.split("listen 8000;")[1]  # server-sent events stream
    # $request_body (previous_response_id) can be hashed only when the whole body is in memory.
    http = CONF.split("listen 8000;")[1]
    size = re.search(r"client_max_body_size (\d+)m;", http).group(1)
    assert f"client_body_buffer_size {size}m;" in http


@pytest.mark.parametrize(("body", "expected"), [
    ('{"model":"m","previous_response_id":"resp_' + "a" * 32 + '-0123456789abcdef","input":"x"}', "a" * 32),
    ('{"conversation": "conv_' + "b" * 32 + '", "input": "x"}', "b" * 32),
    ('{"conversation": {"id": "conv_' + "c" * 32 + '"}, "input": "x"}', "c" * 32),
    ('{"input": "a new conversation"}', None),
])
def test_the_body_map_finds_the_conversation(body: str, expected: str | None) -> None:
    """The map's regular expression (PCRE in nginx; these constructs mean the same in Python's re)."""
    (pattern,) = re.findall(r'map \$request_body \$eoq_body_conversation \{\n\s*"~(.*)" \$c;', CONF)
    m = re.search(pattern.replace("\\\"", '"').replace("(?<c>", "(?P<c>"), body)
    assert (m.group("c") if m else None) == expected


def test_compose_scale_is_valid_and_three_identical_replicas_sit_behind_nginx() -> None:
    assert [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(SCALE)] == []
    services = SCALE["services"]
    replicas = [services[f"eoq-{i}"] for i in (1, 2, 3)]
    assert replicas[0] == replicas[1] == replicas[2]
    nginx = services["nginx"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert (DEPLOY / "nginx" / "nginx.conf").is_file()
    assert {int(p.split(":")[-1]) for p in nginx["ports"]} == {50051, 8000}
    assert set(nginx["depends_on"]) == {"eoq-1", "eoq-2", "eoq-3"}
    assert all("ports" not in r for r in replicas), "only nginx is published"
    env = replicas[0]["environment"]
    assert set(env) <= set(Settings.model_fields) | {f"EOQ_{n.upper()}" for n in Settings.model_fields}
    assert float(replicas[0]["stop_grace_period"].rstrip("s")) > float(env["EOQ_GRACE_PERIOD_SECONDS"])


def test_compose_scale_sentinels_watch_the_primary_that_eoq_asks_them_for() -> None:
    services = SCALE["services"]
    env = services["eoq-1"]["environment"]
    sentinels = parse_sentinels(env["EOQ_REDIS_SENTINELS"])
    assert {h for h, _ in sentinels} == {"sentinel-1", "sentinel-2", "sentinel-3"}
    for host, port in sentinels:
        script = services[host]["command"][-1]
        assert f"port {port}" in script
        assert f"sentinel monitor {env['EOQ_REDIS_SENTINEL_MASTER']} redis-primary 6379 2" in script
        assert "[ -f /data/sentinel.conf ] ||" in script  # what a sentinel learnt survives its restart
        assert services[host]["volumes"][0].endswith(":/data")
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:] == ["redis-primary", "6379"]
    for name in ("redis-primary", "redis-replica"):
        command = services[name]["command"]
        assert command[command.index("--appendfsync") + 1] == "everysec"
        assert command[command.index("--replica-announce-ip") + 1] == name


def _config_comment_settings() -> dict[str, str]:
    """The commented-out sentinel settings of base/configmap.yaml, as they would be uncommented."""
    text = (K8S / "base" / "configmap.yaml").read_text()
    return dict(re.findall(r"^  # (EOQ_REDIS_\w+): (.+)$", text, flags=re.MULTILINE))


def test_k8s_sentinels_are_the_ones_eoq_config_names() -> None:
    settings = _config_comment_settings()
    sentinels = parse_sentinels(settings["EOQ_REDIS_SENTINELS"])
    statefulset = find_object("StatefulSet", "redis-sentinel", K8S / "redis-sentinel")
    service = find_object("Service", "redis-sentinel", K8S / "redis-sentinel")
    expected = [(f"redis-sentinel-{i}.redis-sentinel.eoq.svc.cluster.local", 26379)
                for i in range(statefulset["spec"]["replicas"])]
    assert list(sentinels) == expected
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    script = find_object("ConfigMap", "redis-sentinel", K8S / "redis-sentinel")["data"]["start.sh"]
    master = settings["EOQ_REDIS_SENTINEL_MASTER"]
    quorum = int(re.search(rf"sentinel monitor {master} redis-ha-0\.redis-ha\.eoq\.svc\.cluster\.local 6379 (\d)",
                           script).group(1))
    assert quorum == statefulset["spec"]["replicas"] // 2 + 1
    Settings(redis_sentinels=settings["EOQ_REDIS_SENTINELS"], redis_sentinel_master=master,
             redis_wait_replicas=int(settings["EOQ_REDIS_WAIT_REPLICAS"].strip('"')))


def test_k8s_redis_pods_join_whoever_the_sentinels_name() -> None:
    ha = find_object("StatefulSet", "redis-ha", K8S / "redis-sentinel")
    data: dict[str, Any] = find_object("ConfigMap", "redis-ha", K8S / "redis-sentinel")["data"]
    assert ha["spec"]["replicas"] == 2
    assert "sentinel get-master-addr-by-name eoq" in data["start.sh"]
    assert "--replicaof" in data["start.sh"] and "--replica-announce-ip" in data["start.sh"]
    assert "appendfsync everysec" in data["redis.conf"]
    assert re.search(r"^maxmemory-policy volatile-lru$", data["redis.conf"], flags=re.MULTILINE)
