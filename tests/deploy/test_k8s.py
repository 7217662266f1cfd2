"""deploy/k8s: every built-in object validates strictly against the Kubernetes OpenAPI schemas
(kubernetes-validate, offline); CRD objects (ServiceMonitor, PrometheusRule, ScaledObject, DestinationRule),
which those schemas lack, are checked structurally below; and the objects agree with one another and with
the server (ports, probes, drain timing, Secret, Services' selectors, autoscaling, Redis persistence)."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from eoq.config import Settings

from . import contract
from .files import DEPLOY, K8S, find_object, is_k8s_manifest, k8s_objects, load_yaml_docs

# Kinds from CRDs: not in kubernetes-validate's schemas; each has its own structural test here.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "DestinationRule"}
# The oldest Kubernetes the manifests are meant for (gRPC probes are GA since 1.27) and the newest known.
K8S_VERSIONS = ["1.28.0", kv_utils.latest_version()]
NAMESPACE = "eoq"
# The slowest decode the connection-age grace must outlast (CPU, big batch): tokens per second per stream.
MIN_DECODE_TOKENS_PER_SECOND = 5

OBJECTS = k8s_objects()
VARIANTS = ["cpu", "gpu"]


def object_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, obj = item
    return f"{path.relative_to(K8S)}:{obj['kind']}/{obj['metadata']['name']}"


def deployment(variant: str) -> dict[str, Any]:
    return find_object("Deployment", "eoq", K8S / variant)


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


CONFIG = find_object("ConfigMap", "eoq-config")["data"]


# --- schema validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", OBJECTS, ids=object_id)
def test_validates_strictly(item: tuple[Path, dict[str, Any]], version: str) -> None:
    _, obj = item
    if obj["kind"] in CRD_KINDS:
        pytest.skip(
            f"{obj['kind']} is a CRD kind, not in kubernetes-validate's schemas: checked structurally"
        )
    kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    broken = copy.deepcopy(deployment("cpu"))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_only_known_crd_kinds_lack_a_schema() -> None:
    for _, obj in OBJECTS:
        if obj["kind"] in CRD_KINDS:
            with pytest.raises(kv_utils.SchemaNotFoundError):
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("item", OBJECTS, ids=object_id)
def test_everything_lives_in_the_eoq_namespace(item: tuple[Path, dict[str, Any]]) -> None:
    _, obj = item
    if obj["kind"] == "Namespace":
        assert obj["metadata"]["name"] == NAMESPACE
    else:
        assert obj["metadata"]["namespace"] == NAMESPACE


# --- kustomizations --------------------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def resources_of(kustomization: Path) -> Iterator[Path]:
    for entry in yaml.safe_load(kustomization.read_text())["resources"]:
        yield (kustomization.parent / entry).resolve()


@pytest.mark.parametrize("kustomization", kustomizations(), ids=lambda p: str(p.parent.relative_to(K8S)))
def test_kustomization_resources_exist(kustomization: Path) -> None:
    data = yaml.safe_load(kustomization.read_text())
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and data["kind"] == "Kustomization"
    assert data["namespace"] == NAMESPACE
    # Plain resource lists (plus `images`, which `kustomize edit set image` adds): nothing a test can't see.
    assert set(data) <= {"apiVersion", "kind", "namespace", "resources", "images"}
    for resource in resources_of(kustomization):
        if resource.is_dir():
            assert (resource / "kustomization.yaml").is_file(), resource
        else:
            assert resource.is_file() and resource.is_relative_to(kustomization.parent), resource


def test_every_manifest_belongs_to_a_kustomization() -> None:
    listed = {r for k in kustomizations() for r in resources_of(k) if r.is_file()}
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if is_k8s_manifest(p)}
    assert manifests - listed == set()


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_deployment_plus_base(variant: str) -> None:
    kinds = set()
    for resource in resources_of(K8S / variant / "kustomization.yaml"):
        files = sorted(resource.glob("*.yaml")) if resource.is_dir() else [resource]
        for f in files:
            if is_k8s_manifest(f):
                kinds |= {(d["kind"], d["metadata"]["name"]) for d in load_yaml_docs(f)}
    assert {
        ("Deployment", "eoq"), ("Service", "eoq-headless"), ("Service", "eoq"), ("Service", "eoq-metrics"),
        ("ConfigMap", "eoq-config"), ("Secret", "eoq-api-keys"), ("PodDisruptionBudget", "eoq"),
        ("StatefulSet", "redis"), ("Service", "redis"), ("Namespace", "eoq"),
    } <= kinds  # fmt: skip


# --- the eoq Deployments -------------------------------------------------------------------------


def differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield f"{path}.{key}"
            else:
                yield from differences(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{path}.{i}")
    elif a != b:
        yield path


def test_cpu_and_gpu_deployments_differ_only_where_allowed() -> None:
    def normalized(variant: str) -> dict[str, Any]:
        obj = copy.deepcopy(deployment(variant))
        c = container(obj)
        c["env"] = {e["name"]: e for e in c["env"]}
        return obj

    c = ".spec.template.spec.containers.0"
    allowed = {
        ".spec.template.spec.tolerations", f"{c}.image", f"{c}.resources", f"{c}.startupProbe.failureThreshold",
        f"{c}.env.EOQ_DEVICE.value", f"{c}.env.EOQ_NUM_THREADS.value", f"{c}.env.EOQ_KV_CACHE_MEMORY_GB.value",
    }  # fmt: skip
    found = set(differences(normalized("cpu"), normalized("gpu")))
    assert found, "the variants must differ somewhere"
    unexpected = {d for d in found if not any(d == a or d.startswith(a + ".") for a in allowed)}
    assert not unexpected


def test_gpu_variant_asks_for_a_gpu_and_cpu_does_not() -> None:
    gpu, cpu = container(deployment("gpu")), container(deployment("cpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert env_of(gpu)["EOQ_DEVICE"] == "cuda" and env_of(cpu)["EOQ_DEVICE"] == "cpu"
    assert "cuda" in gpu["image"] and "cpu" in cpu["image"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_resources_requested_and_limited(variant: str) -> None:
    resources = container(deployment(variant))["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    # torch's threads no more than the CPU limit (more would be throttled).
    assert int(env_of(container(deployment(variant)))["EOQ_NUM_THREADS"]) <= int(resources["limits"]["cpu"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_match_the_settings(variant: str) -> None:
    ports = {p["name"]: p["containerPort"] for p in container(deployment(variant))["ports"]}
    assert ports == {"grpc": int(CONFIG["EOQ_PORT"]), "http": int(CONFIG["EOQ_HTTP_PORT"]),
                     "metrics": int(CONFIG["EOQ_METRICS_PORT"])}


@pytest.mark.parametrize("variant", VARIANTS)
def test_grpc_probes(variant: str) -> None:
    c = container(deployment(variant))
    port = int(CONFIG["EOQ_PORT"])
    startup, readiness, liveness = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    for probe in (startup, readiness, liveness):
        assert probe["grpc"]["port"] == port
    # Readiness follows the chat service, which turns NOT_SERVING while draining.
    assert readiness["grpc"]["service"] == "chat.v1.ChatService"
    # Liveness asks for the server as a whole; its health never depends on Redis (see the manifest).
    assert liveness["grpc"].get("service", "") == ""
    # Long enough for a model load (the contract: ~20 s conversion on a first start, less later).
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 120


@pytest.mark.parametrize("variant", VARIANTS)
def test_drain_fits_in_the_termination_grace(variant: str) -> None:
    obj = deployment(variant)
    c = container(obj)
    grace = float(CONFIG["EOQ_GRACE_PERIOD_SECONDS"])
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = float(pre_stop[1])
    assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause + grace
    # A draining pod (health NOT_SERVING) is never restarted by liveness before it exits.
    liveness = c["livenessProbe"]
    assert liveness["failureThreshold"] * liveness["periodSeconds"] > pause + grace
    strategy = obj["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0 and strategy["maxSurge"] >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_the_images_non_root_user(variant: str) -> None:
    spec = deployment(variant)["spec"]["template"]["spec"]
    dockerfile_user = next(
        line.split()[1]
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    )
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert (
        f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" == dockerfile_user
    )
    c = container(deployment(variant))
    if c["securityContext"].get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/home/eoq"} <= mounts


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_keys_come_from_the_secret(variant: str) -> None:
    ref = env_of(container(deployment(variant)))["EOQ_API_KEYS"]["secretKeyRef"]
    secret = find_object("Secret", ref["name"])
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    sources = container(deployment(variant))["envFrom"]
    assert [s["configMapRef"]["name"] for s in sources] == ["eoq-config"]


def eoq_variable_names() -> set[str]:
    names = {k for k in CONFIG}
    for variant in VARIANTS:
        names |= set(env_of(container(deployment(variant))))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    names |= set(compose["services"]["eoq"]["environment"])
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        names |= {w.split("=")[0] for w in line.split() if w.startswith("EOQ_") and "=" in w}
    return {n for n in names if n.startswith("EOQ_")}


def test_every_eoq_variable_is_a_setting() -> None:
    known = set(Settings.model_fields)  # eoq ignores unknown EOQ_* variables: a typo would pass silently
    unknown = {n for n in eoq_variable_names() if n.removeprefix("EOQ_").lower() not in known}
    assert not unknown, f"not eoq settings (typo?): {sorted(unknown)}"


def test_connection_age_and_keepalive() -> None:
    age = float(CONFIG["EOQ_MAX_CONNECTION_AGE_SECONDS"])
    age_grace = float(CONFIG["EOQ_MAX_CONNECTION_AGE_GRACE_SECONDS"])
    longest_answer = int(CONFIG["EOQ_MAX_TOKENS_LIMIT"]) / MIN_DECODE_TOKENS_PER_SECOND
    assert 60 <= age <= 1800, "short enough that clients re-resolve after a scale-out"
    assert age_grace > longest_answer, "a stream open when the connection ages out must be able to finish"
    assert 10 <= float(CONFIG["EOQ_KEEPALIVE_TIME_SECONDS"]) <= 300


# --- Services, PDB, autoscaling --------------------------------------------------------------------


def pod_labels() -> dict[str, str]:
    labels = deployment("cpu")["spec"]["template"]["metadata"]["labels"]
    assert labels == deployment("gpu")["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", ["eoq-headless", "eoq", "eoq-metrics"])
def test_services_select_eoq_pods_by_named_ports(name: str) -> None:
    service = find_object("Service", name)
    assert selects(service["spec"]["selector"], pod_labels())
    port_names = {p["name"] for p in container(deployment("cpu"))["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_headless_service_for_client_side_balancing() -> None:
    headless = find_object("Service", "eoq-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), "draining pods must leave DNS"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


def test_pdb_covers_the_pods_and_leaves_one_up() -> None:
    pdb = find_object("PodDisruptionBudget", "eoq")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels())
    hpa = find_object("HorizontalPodAutoscaler", "eoq")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_hpa_scales_on_waiting_requests_and_scales_down_slowly() -> None:
    hpa = find_object("HorizontalPodAutoscaler", "eoq")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "eoq")
    metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert metrics[0] == "eoq_requests_waiting"
    assert set(metrics) <= set(contract.GAUGES)
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 900
    assert hpa["spec"]["minReplicas"] >= 2


def test_prometheus_adapter_serves_the_hpa_metrics() -> None:
    values = yaml.safe_load(
        (K8S / "autoscaling/prometheus-adapter/prometheus-adapter-values.yaml").read_text()
    )
    served = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    hpa = find_object("HorizontalPodAutoscaler", "eoq")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= served
    for rule in values["rules"]["custom"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_keda_scaled_object() -> None:
    scaled = find_object("ScaledObject", "eoq")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "eoq"
    assert 2 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 900
    (first, *_) = scaled["spec"]["triggers"]
    assert first["type"] == "prometheus" and "eoq_requests_waiting" in first["metadata"]["query"]
    assert float(first["metadata"]["threshold"]) > 0


# --- monitoring CRDs -----------------------------------------------------------------------------


def test_service_monitor_scrapes_only_the_metrics_service_as_job_eoq() -> None:
    monitor = find_object("ServiceMonitor", "eoq")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [obj for _, obj in OBJECTS if obj["kind"] == "Service"]
    chosen = [s for s in services if selects(selector, s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in chosen] == ["eoq-metrics"], "each pod scraped exactly once"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in chosen[0]["spec"]["ports"]}
    assert chosen[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "eoq"  # job="eoq", as rules select


def test_prometheus_rule_matches_rules_yml() -> None:
    rule = find_object("PrometheusRule", "eoq")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules_yml = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    assert rule["spec"]["groups"] == rules_yml["groups"], "copy rules.yml's groups into prometheusrule.yaml"


# --- L7 options ----------------------------------------------------------------------------------


def test_istio_destination_rule_hashes_the_conversation_header() -> None:
    rule = find_object("DestinationRule", "eoq")
    assert rule["apiVersion"].startswith("networking.istio.io/")
    service = find_object("Service", rule["spec"]["host"].split(".")[0])
    assert rule["spec"]["host"] == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert (
        rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"]
        == "x-conversation-id"
    )


def envoy_config() -> dict[str, Any]:
    return yaml.safe_load(find_object("ConfigMap", "eoq-envoy")["data"]["envoy.yaml"])


def test_envoy_hashes_the_conversation_header_onto_a_ring() -> None:
    config = envoy_config()["static_resources"]
    (cluster,) = config["clusters"]
    assert cluster["lb_policy"] in {"RING_HASH", "MAGLEV"}
    (listener,) = config["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    for route in routes:
        assert route["route"]["cluster"] == cluster["name"]
        assert {"header": {"header_name": "x-conversation-id"}} in route["route"]["hash_policy"]
        assert route["route"]["timeout"] == "0s", "streams must not be cut by a route timeout"


def test_envoy_speaks_http2_to_ready_eoq_pods() -> None:
    (cluster,) = envoy_config()["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] == f"eoq-headless.{NAMESPACE}.svc.cluster.local"
    assert address["port_value"] == int(CONFIG["EOQ_PORT"])
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == "chat.v1.ChatService"


def test_envoy_deployment_mounts_its_config_and_drains() -> None:
    envoy = find_object("Deployment", "eoq-envoy")
    c = container(envoy)
    args = c["args"]
    config_path = args[args.index("--config-path") + 1]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in envoy["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "eoq-envoy"
    assert config_path.rsplit("/", 1)[1] in find_object("ConfigMap", "eoq-envoy")["data"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["bash", "-c"] and "drain_listeners" in command[2]
    assert subprocess.run(["bash", "-n", "-c", command[2]], check=False, capture_output=True).returncode == 0
    assert envoy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(command[2].split()[-1])


# --- Redis -----------------------------------------------------------------------------------------


def redis_conf() -> dict[str, str]:
    text = find_object("ConfigMap", "redis-config")["data"]["redis.conf"]
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {k: v.strip() for k, v in pairs}


def test_redis_uses_aof_everysec_on_a_persistent_volume() -> None:
    conf = redis_conf()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    redis = find_object("StatefulSet", "redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    c = container(redis)
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == conf["dir"]
    assert c["command"][-1].startswith("/etc/redis/")


def test_redis_memory_cap_below_its_limit() -> None:
    limit = container(find_object("StatefulSet", "redis"))["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert redis_conf()["maxmemory"].endswith("mb")
    assert int(redis_conf()["maxmemory"][:-2]) < int(limit[:-2]) * 1024
    # Every eoq key has a TTL, so volatile-lru evicts the least recently used conversations (eoq tolerates a
    # conversation's keys going: tests/chat/test_store.py::test_redis_list_skips_evicted_conversations).
    assert redis_conf()["maxmemory-policy"] == "volatile-lru"


def test_eoq_reaches_the_redis_service() -> None:
    redis = find_object("StatefulSet", "redis")
    service = find_object("Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    host_port = CONFIG["EOQ_REDIS_URL"].removeprefix("redis://").split("/")[0]
    assert (
        host_port
        == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    )
