"""Paths and loaders for the files under deploy/."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def is_k8s_manifest(path: Path) -> bool:
    """Kubernetes objects, as opposed to kustomizations and Helm values files."""
    return path.name != "kustomization.yaml" and not path.name.endswith("-values.yaml")


@functools.cache
def k8s_objects() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """(file, object) for every Kubernetes object under deploy/k8s. Shared: deep-copy before changing one."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        if is_k8s_manifest(path):
            found.extend((path, doc) for doc in load_yaml_docs(path))
    return tuple(found)


def find_object(kind: str, name: str, under: Path = K8S) -> dict[str, Any]:
    """The one object of that kind and name in the files under ``under``."""
    matches = [
        obj
        for path, obj in k8s_objects()
        if obj["kind"] == kind and obj["metadata"]["name"] == name and path.is_relative_to(under)
    ]
    assert len(matches) == 1, f"expected one {kind}/{name} under {under}, found {len(matches)}"
    return matches[0]


def compose_volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a compose short-syntax volume "SOURCE:TARGET[:MODE]"."""
    parts = spec.split(":")
    if len(parts) == 2:
        return parts[0], parts[1], "rw"
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"not a SOURCE:TARGET[:MODE] volume: {spec!r}")
