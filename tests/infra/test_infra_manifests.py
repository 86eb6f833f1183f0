"""infra/ manifests: every YAML parses, every Kubernetes manifest matches its schema and our rules.

The checker is shown to bite: deliberately broken copies of the real manifests must fail it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import pytest
import ray

from tests.infra.k8s_manifests import (
    INFRA,
    REPO,
    by_kind,
    containers,
    k8s_manifests,
    load_documents,
    parse_quantity,
    ray_groups,
    references,
    yaml_files,
)
from tests.infra.kuberay_schema import schema_errors
from tests.infra.manifest_policy import ray_problems, secret_problems

MANIFESTS = k8s_manifests()
RAY = [m for m in MANIFESTS if m.kind in ("RayCluster", "RayJob")]


def problems(doc: dict[str, Any]) -> list[str]:
    return schema_errors(doc) + ray_problems(doc) + secret_problems(doc)


def the(kind: str, name: str) -> dict[str, Any]:
    found = [m.doc for m in by_kind(MANIFESTS, kind) if m.name == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return copy.deepcopy(found[0])


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    assert load_documents(path), f"{path}: no YAML document"


def test_the_expected_manifests_exist():
    kinds = {(m.kind, m.name) for m in MANIFESTS}
    assert {("RayCluster", "tnet"), ("RayJob", "tnet-shard-fmow"), ("RayJob", "tnet-train-fmow"),
            ("ConfigMap", "tnet-config"), ("ConfigMap", "mlflow-config"), ("Deployment", "mlflow"),
            ("Service", "mlflow"), ("StatefulSet", "mlflow-postgres"), ("Service", "mlflow-postgres"),
            ("StatefulSet", "minio"), ("Service", "minio"), ("Job", "minio-buckets")} <= kinds


@pytest.mark.parametrize("manifest", MANIFESTS, ids=str)
def test_manifest_matches_its_schema(manifest):
    assert schema_errors(manifest.doc) == [], str(manifest)


@pytest.mark.parametrize("manifest", RAY, ids=str)
def test_ray_manifest_sizes_object_store_shm_and_autoscaling(manifest):
    assert ray_problems(manifest.doc) == [], str(manifest)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=str)
def test_settings_and_credentials_come_from_configmaps_and_secrets(manifest):
    assert secret_problems(manifest.doc) == [], str(manifest)


def test_configmap_references_resolve_to_committed_configmaps():
    maps = {m.name: set(m.doc.get("data") or {}) for m in by_kind(MANIFESTS, "ConfigMap")}
    for m in MANIFESTS:
        for ref in references(m.doc):
            if ref.kind != "ConfigMap":
                continue
            assert ref.name in maps, f"{m}: {ref.where} names ConfigMap {ref.name}, not in infra/"
            if ref.key is not None and not ref.optional:
                assert ref.key in maps[ref.name], f"{m}: {ref.where} needs key {ref.key} of ConfigMap {ref.name}"


def test_ray_pods_share_one_image_one_ray_version_and_the_same_settings():
    images = {c.get("image") for m in RAY for _, c in containers(m.doc)}
    assert len(images) == 1, f"Ray pods use several images: {images}"
    versions = {spec.get("rayVersion") for m in RAY
                for spec in [m.doc["spec"].get("rayClusterSpec", m.doc["spec"])]}
    assert versions == {ray.__version__}, f"rayVersion {versions} != installed Ray {ray.__version__}"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in dockerfile
    settings = {}  # Ray container -> the ConfigMaps/Secrets (and keys) it reads
    for m in RAY:
        refs = list(references(m.doc))
        for where, _ in containers(m.doc):
            settings[f"{m}: {where}"] = frozenset((r.kind, r.name, r.key) for r in refs if r.where.startswith(where))
    assert len(set(settings.values())) == 1, f"Ray pods read different settings: {settings}"


def test_train_job_fits_the_gpus_of_its_cluster():
    from tests.infra.manifest_policy import gpu_capacity

    job = the("RayJob", "tnet-train-fmow")
    workers = int(re.search(r"train\.num_workers=(\d+)", job["spec"]["entrypoint"]).group(1))
    assert 1 <= workers <= gpu_capacity(job)
    assert workers <= gpu_capacity(the("RayCluster", "tnet"))


def _buckets_created() -> set[str]:
    job = the("Job", "minio-buckets")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    return set(re.findall(r"local/([a-z0-9][a-z0-9.-]+)", script))


def test_every_bucket_used_is_created():
    used = set()
    for m in MANIFESTS:
        text = str(m.doc.get("data", "")) + str((m.doc.get("spec") or {}).get("entrypoint", ""))
        used |= set(re.findall(r"s3://([a-z0-9][a-z0-9.-]+)", text))
    assert used and used <= _buckets_created(), f"buckets used {used}, created {_buckets_created()}"


def test_service_urls_in_configmaps_point_at_our_services():
    ports = {m.name: {p["port"] for p in m.doc["spec"]["ports"]} for m in by_kind(MANIFESTS, "Service")}
    urls = [*the("ConfigMap", "tnet-config")["data"].values(), *the("ConfigMap", "mlflow-config")["data"].values()]
    for url in (u for u in urls if u.startswith("http://")):
        parsed = urlparse(url)
        assert parsed.hostname in ports and parsed.port in ports[parsed.hostname], f"{url}: no such Service port"
    pg = the("ConfigMap", "mlflow-config")["data"]
    assert int(pg["POSTGRES_PORT"]) in ports[pg["POSTGRES_HOST"]]


def _first_worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["workerGroupSpecs"][0]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def _typo_in_spec(d):
    d["spec"]["workerGroupSpec"] = d["spec"].pop("workerGroupSpecs")


def _typo_in_container(d):
    _ray_container(d["spec"]["headGroupSpec"])["imagePullPolicey"] = "IfNotPresent"


def _no_ray_start_params(d):
    del d["spec"]["headGroupSpec"]["rayStartParams"]


def _no_max_replicas(d):
    del _first_worker(d)["maxReplicas"]


def _max_below_min(d):
    _first_worker(d).update(minReplicas=3, replicas=3, maxReplicas=2)


def _small_shm(d):
    _first_worker(d)["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = "1Gi"


def _disk_shm(d):
    del _first_worker(d)["template"]["spec"]["volumes"][0]["emptyDir"]["medium"]


def _fractional_gpu(d):
    resources = _ray_container(_first_worker(d))["resources"]
    resources["limits"]["nvidia.com/gpu"] = resources["requests"]["nvidia.com/gpu"] = "0.5"


def _no_auth(d):
    del d["spec"]["authOptions"]


def _inline_secret(d):
    _ray_container(d["spec"]["headGroupSpec"])["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})


BROKEN_RAY_CLUSTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "typo in a KubeRay field": _typo_in_spec,
    "typo in a container field": _typo_in_container,
    "missing rayStartParams": _no_ray_start_params,
    "worker group without maxReplicas": _no_max_replicas,
    "maxReplicas below minReplicas": _max_below_min,
    "/dev/shm smaller than the object store": _small_shm,
    "/dev/shm on disk": _disk_shm,
    "half a GPU": _fractional_gpu,
    "no token authentication": _no_auth,
    "literal S3 secret": _inline_secret,
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_RAY_CLUSTERS))
def test_a_broken_ray_cluster_is_rejected(breakage):
    doc = the("RayCluster", "tnet")
    assert problems(doc) == []
    BROKEN_RAY_CLUSTERS[breakage](doc)
    assert problems(doc), f"{breakage}: not detected"


def test_broken_core_manifests_are_rejected():
    deployment = the("Deployment", "mlflow")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    assert any("replica" in p for p in schema_errors(deployment))
    service = the("Service", "mlflow")
    service["spec"]["ports"][0]["port"] = "five thousand"
    assert schema_errors(service)
    statefulset = the("StatefulSet", "mlflow-postgres")
    del statefulset["spec"]["selector"]
    assert any("selector" in p for p in schema_errors(statefulset))
    assert schema_errors({"apiVersion": "apps/v1", "kind": "Deploymnt", "metadata": {"name": "x"}})
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tnet-s3"},
              "stringData": {"AWS_SECRET_ACCESS_KEY": "hunter2"}}
    assert schema_errors(secret) == [] and secret_problems(secret)
    job = the("RayJob", "tnet-shard-fmow")
    job["spec"]["entrypoint"] += " --storage-option secret=hunter2"
    assert secret_problems(job)


def test_every_ray_group_is_checked():
    groups = [where for m in RAY for where, _ in ray_groups(m.doc)]
    assert len(groups) == 3 + 2 + 2  # RayCluster: head, gpu, cpu; each RayJob: head + one group


@pytest.mark.parametrize(("text", "value"), [("64Gi", 64 * 2**30), ("500m", 0.5), ("16000000000", 16e9), (8, 8),
                                             ("1.5G", 1.5e9), ("2e3", 2000), ("512Ki", 512 * 1024)])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "64GB", "Gi", "1.2.3", "-"])
def test_parse_quantity_rejects_non_quantities(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_repo_root_is_found():
    assert (REPO / "pyproject.toml").is_file()
