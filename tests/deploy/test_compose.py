"""deploy/compose.yaml: valid against the Compose Specification's schema, and wired the way the README says
(images, ports, Redis persistence, volumes, mounts that exist). No Docker runs here: `docker compose up` is not."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import pytest

from .files import DEPLOY, REPO, compose_volume

SCHEMA = json.loads((REPO / "tests/deploy/schemas/compose-spec.json").read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(document)]


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []


def test_schema_check_can_fail(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["volumes"] = "redis-data:/data"  # a string, not a list
    broken["services"]["eoq"]["stop_grace_seconds"] = 45  # no such key
    assert len(schema_errors(broken)) == 2


def test_services_and_pinned_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"eoq", "redis", "prometheus", "grafana"}
    images = {name: s["image"] for name, s in services.items()}
    assert images["redis"].startswith("redis:7")
    assert images["prometheus"].startswith("prom/prometheus:v")
    assert images["grafana"].startswith("grafana/grafana:")
    for name, image in images.items():
        assert not image.endswith(":latest") and ":" in image, f"{name}: pin a tag"


def published(service: dict[str, Any]) -> set[int]:
    return {int(p.split(":")[-2]) for p in service.get("ports", [])}


def test_ports_a_user_opens(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert published(services["eoq"]) == {50051, 8000, 9400}  # gRPC, HTTP (OpenAI API and page), metrics
    assert published(services["prometheus"]) == {9090}
    assert published(services["grafana"]) == {3000}
    assert published(services["redis"]) == set(), "Redis needs no port on the host"


def test_eoq_is_built_from_the_repo_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["eoq"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).is_file()
    assert re.fullmatch(r"\$\{EOQ_DEVICE:-cpu\}", build["args"]["DEVICE"])


def test_eoq_talks_to_the_redis_service_and_waits_for_it(compose: dict[str, Any]) -> None:
    eoq = compose["services"]["eoq"]
    assert eoq["environment"]["EOQ_REDIS_URL"].startswith("redis://redis:6379/")
    assert eoq["depends_on"]["redis"]["condition"] == "service_healthy"


def test_eoq_stop_grace_exceeds_the_drain_grace(compose: dict[str, Any]) -> None:
    eoq = compose["services"]["eoq"]
    grace = float(eoq["environment"]["EOQ_GRACE_PERIOD_SECONDS"])
    stop = re.fullmatch(r"(\d+)s", eoq["stop_grace_period"])
    assert stop and int(stop.group(1)) > grace


def test_redis_persists_with_aof_everysec_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    (volume,) = redis["volumes"]
    source, target, _ = compose_volume(volume)
    assert target == "/data" and source in compose["volumes"]


def test_redis_memory_is_capped_below_its_limit_and_evicts_lru_with_ttl(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    maxmemory = re.fullmatch(r"(\d+)mb", command[command.index("--maxmemory") + 1])
    limit = re.fullmatch(r"(\d+)g", redis["mem_limit"])
    assert maxmemory and limit and int(maxmemory.group(1)) < int(limit.group(1)) * 1024
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"


@pytest.mark.parametrize("service", ["redis", "prometheus", "grafana"])
def test_named_volumes_declared_and_bind_mounts_exist(compose: dict[str, Any], service: str) -> None:
    for spec in compose["services"][service].get("volumes", []):
        source, _, _ = compose_volume(spec)
        if source.startswith("."):
            assert (DEPLOY / source).exists(), f"{service} mounts missing {source}"
        else:
            assert source in compose["volumes"], f"{service} uses undeclared volume {source}"


def test_prometheus_loads_the_config_and_rules_from_its_mount(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = {target: source for source, target, _ in map(compose_volume, prometheus["volumes"])}
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    host_dir = DEPLOY / mounts["/etc/prometheus"]
    assert config_path.startswith("/etc/prometheus/")
    assert (host_dir / config_path.removeprefix("/etc/prometheus/")).is_file()
    assert (host_dir / "rules.yml").is_file()
