"""Loading infra/ manifests and walking what is inside them: pod templates, containers, references.

Shared by the infra tests. Kubernetes manifests are every YAML file under infra/kuberay/ and
infra/mlflow/k8s/; infra/ray-cluster.yaml (Ray's cluster launcher) and
infra/mlflow/docker-compose.yaml are other formats with tests of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S_DIRS = (INFRA / "kuberay", INFRA / "mlflow" / "k8s")
RAY_KINDS = ("RayCluster", "RayJob")


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int  # position of the document in its file
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind"))

    @property
    def name(self) -> str:
        return str((self.doc.get("metadata") or {}).get("name"))

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}#{self.index} {self.kind}/{self.name}"


def yaml_files() -> list[Path]:
    """Every YAML file under infra/, sorted."""
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def k8s_files() -> list[Path]:
    return sorted(p for d in K8S_DIRS for p in d.glob("*.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML file.

    Raises:
        ValueError: a document that is not a mapping (what kubectl would reject too).
    """
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ValueError(f"{path}#{i}: a manifest must be a mapping, got {type(d).__name__}")
    return docs


def k8s_manifests() -> list[Manifest]:
    return [Manifest(p, i, d) for p in k8s_files() for i, d in enumerate(load_documents(p))]


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m.kind == kind]


def ray_cluster_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) of a RayCluster or of a RayJob's rayClusterSpec."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        yield "spec", spec
    elif doc.get("kind") == "RayJob" and "rayClusterSpec" in spec:
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]


def ray_groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, group) for the head group and every worker group of a Ray manifest."""
    for where, spec in ray_cluster_specs(doc):
        yield f"{where}.headGroupSpec", spec.get("headGroupSpec") or {}
        for i, group in enumerate(spec.get("workerGroupSpecs") or []):
            yield f"{where}.workerGroupSpecs[{i}]", group


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of every pod a manifest creates."""
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield "spec.template", (doc.get("spec") or {}).get("template") or {}
    for where, group in ray_groups(doc):
        yield f"{where}.template", group.get("template") or {}
    if kind == "RayJob" and "submitterPodTemplate" in (doc.get("spec") or {}):
        yield "spec.submitterPodTemplate", doc["spec"]["submitterPodTemplate"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for every container and init container of a manifest."""
    for where, template in pod_templates(doc):
        pod = template.get("spec") or {}
        for field in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(field) or []):
                yield f"{where}.spec.{field}[{i}]({c.get('name')})", c


@dataclass(frozen=True)
class Ref:
    """A reference from a container to a ConfigMap or a Secret (key None: the whole object)."""

    kind: str  # "ConfigMap" or "Secret"
    name: str
    key: str | None
    optional: bool
    where: str


def references(doc: dict[str, Any]) -> Iterator[Ref]:
    for where, c in containers(doc):
        for e in c.get("env") or []:
            source = e.get("valueFrom") or {}
            for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if field in source:
                    ref = source[field]
                    yield Ref(kind, ref["name"], ref["key"], bool(ref.get("optional")), f"{where}.env.{e['name']}")
        for e in c.get("envFrom") or []:
            for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if field in e:
                    yield Ref(kind, e[field]["name"], None, bool(e[field].get("optional")), f"{where}.envFrom")


_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("64Gi", "500m", "16000000000", 8) as a plain number.

    Raises:
        ValueError: not a Kubernetes quantity.
    """
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r}: not a Kubernetes quantity")
    return float(match.group(1)) * _FACTORS[match.group(2)]
