"""Rules our manifests follow beyond their schemas; each returns problems as "where: what".

- Ray pods: the object store lives in /dev/shm, so every Ray group sets object-store-memory,
  mounts a memory-backed /dev/shm at least that large, and has a memory limit covering the object
  store plus room for the processes; worker groups have autoscaling bounds; GPU groups ask for
  whole GPUs. Clusters autoscale and use token authentication (Ray 2.60 clients expect it).
- Settings and credentials (S3, MLflow, passwords, tokens) come from ConfigMaps and Secrets,
  never from a literal value in a manifest, and no Secret with data is committed.
"""

from __future__ import annotations

import re
from typing import Any

from tests.infra.k8s_manifests import containers, parse_quantity, ray_cluster_specs, ray_groups

HEAP_HEADROOM = 2 * 2**30  # memory beyond the object store for raylet, workers and Python heaps
GPU = "nvidia.com/gpu"
# Names whose value must come from a ConfigMap or a Secret, never a literal `value:`.
EXTERNAL_SETTINGS = re.compile(
    r"^(AWS_[A-Z_]+|MLFLOW_TRACKING_[A-Z_]+|MLFLOW_S3_ENDPOINT_URL|MINIO_ROOT_[A-Z_]+|RAY_AUTH_TOKEN"
    r"|.*PASSWORD.*|.*SECRET.*|.*TOKEN.*)$"
)
# A literal credential on a command line: an fsspec option or an AWS_* assignment (a "$VAR" reference is fine).
CREDENTIAL_FLAGS = re.compile(r"(--storage-option[\s=]+\S*(key|secret|token|password)\S*=|\bAWS_[A-Z_]*(KEY|SECRET|TOKEN)[A-Z_]*=)",
                              re.IGNORECASE)


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    pod = (group.get("template") or {}).get("spec") or {}
    return (pod.get("containers") or [{}])[0]


def _shm_size(group: dict[str, Any]) -> float | None:
    """sizeLimit of the memory-backed emptyDir mounted at /dev/shm in the Ray container, or None."""
    pod = (group.get("template") or {}).get("spec") or {}
    mounts = {m.get("name") for m in _ray_container(group).get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"}
    for volume in pod.get("volumes") or []:
        empty_dir = volume.get("emptyDir")
        if volume.get("name") in mounts and empty_dir is not None and empty_dir.get("medium") == "Memory":
            return parse_quantity(empty_dir["sizeLimit"]) if "sizeLimit" in empty_dir else None
    return None


def ray_group_problems(where: str, group: dict[str, Any], is_worker: bool) -> list[str]:
    problems = []
    container = _ray_container(group)
    if not container.get("image"):
        problems.append(f"{where}: the Ray container has no image")
    params = group.get("rayStartParams") or {}
    if "object-store-memory" not in params:
        problems.append(f"{where}.rayStartParams: object-store-memory is not set")
        return problems
    store = parse_quantity(params["object-store-memory"])
    shm = _shm_size(group)
    if shm is None:
        problems.append(f"{where}: no memory-backed emptyDir with a sizeLimit mounted at /dev/shm")
    elif shm < store:
        problems.append(f"{where}: /dev/shm sizeLimit {shm:.0f} B < object-store-memory {store:.0f} B")
    limits = (container.get("resources") or {}).get("limits") or {}
    if "memory" not in limits:
        problems.append(f"{where}: the Ray container has no memory limit")
    elif parse_quantity(limits["memory"]) < store + HEAP_HEADROOM:
        problems.append(f"{where}: memory limit {limits['memory']} leaves < 2 GiB beside the object store")
    if is_worker:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        replicas = group.get("replicas", low)
        if not (0 <= low <= replicas <= high and high >= 1):
            problems.append(f"{where}: need 0 <= minReplicas ({low}) <= replicas ({replicas}) <= maxReplicas ({high}), "
                            "maxReplicas >= 1")
    requests = (container.get("resources") or {}).get("requests") or {}
    if GPU in limits or GPU in requests:
        gpus = parse_quantity(limits.get(GPU, 0))
        if gpus < 1 or gpus != int(gpus) or parse_quantity(requests.get(GPU, gpus)) != gpus:
            problems.append(f"{where}: {GPU} must be a whole number >= 1, the same in requests and limits")
    return problems


def ray_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for where, spec in ray_cluster_specs(doc):
        if spec.get("enableInTreeAutoscaling") is not True:
            problems.append(f"{where}.enableInTreeAutoscaling: must be true (worker groups are autoscaled)")
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{where}.authOptions.mode: must be 'token'")
        if not spec.get("rayVersion"):
            problems.append(f"{where}.rayVersion: not set")
    for where, group in ray_groups(doc):
        problems += ray_group_problems(where, group, is_worker="workerGroupSpecs" in where)
    return problems


def gpu_capacity(doc: dict[str, Any]) -> int:
    """GPUs of a Ray manifest at its worker groups' maxReplicas."""
    total = 0
    for where, group in ray_groups(doc):
        if "workerGroupSpecs" in where:
            limits = (_ray_container(group).get("resources") or {}).get("limits") or {}
            total += int(parse_quantity(limits.get(GPU, 0))) * int(group.get("maxReplicas", 0))
    return total


def secret_problems(doc: dict[str, Any]) -> list[str]:
    """Literal values of settings or credentials, committed Secrets, credentials on command lines."""
    problems = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append("Secret with data committed: create it with kubectl (docs/deploy.md)")
    for where, c in containers(doc):
        for e in c.get("env") or []:
            if "value" in e and EXTERNAL_SETTINGS.match(str(e.get("name"))):
                problems.append(f"{where}.env.{e['name']}: literal value; use a ConfigMap or Secret reference")
        for text in [*(c.get("command") or []), *(c.get("args") or [])]:
            if CREDENTIAL_FLAGS.search(str(text)):
                problems.append(f"{where}: credentials on the command line")
    entrypoint = str((doc.get("spec") or {}).get("entrypoint", "")) if doc.get("kind") == "RayJob" else ""
    if CREDENTIAL_FLAGS.search(entrypoint) or "tracking_uri" in entrypoint:
        problems.append("spec.entrypoint: credentials or the tracking URI inline; they come from tnet-config/tnet-s3")
    return problems
