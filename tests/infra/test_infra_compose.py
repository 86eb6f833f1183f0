"""infra/mlflow/docker-compose.yaml: complete, pinned, and the same MLflow server as the Kubernetes manifests."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.infra.k8s_manifests import INFRA, by_kind, k8s_manifests
from tests.infra.mlflow_command import COMPOSE_FILE, compose_as_k8s, k8s_command, k8s_container

SERVICES = ("postgres", "minio", "create-buckets", "mlflow")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> dict[str, str]:
    lines = (INFRA / "mlflow" / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_services_exist_and_start_in_order(compose):
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    assert services["create-buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["minio"]
    named_volumes = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert named_volumes <= set(compose.get("volumes") or {})


def test_mlflow_service_runs_the_kubernetes_command_line(compose):
    assert compose_as_k8s(compose["services"]["mlflow"]["command"]) == k8s_command()
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the driver is named so that stays true
    assert any(t.startswith("postgresql+psycopg://") for t in k8s_command())


def test_mlflow_service_gets_the_same_s3_settings_as_the_deployment(compose):
    s3_names = {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert s3_names <= set(compose["services"]["mlflow"]["environment"])
    assert s3_names <= {e["name"] for e in k8s_container()["env"]}


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [str(value)]


def test_every_required_variable_is_in_env_example(compose):
    text = "\n".join(strings(compose))
    # ${X} or ${X:?message} has no default, so .env must set it; $${X} is the container's own variable
    required = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)(?::\?[^}]*)?\}", text))
    assert required <= set(env_example()), f"missing from env.example: {required - set(env_example())}"
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()


def test_images_are_pinned_and_match_the_kubernetes_manifests(compose):
    k8s_images = {c["image"] for m in k8s_manifests() if m.kind in ("StatefulSet", "Job")
                  for c in m.doc["spec"]["template"]["spec"]["containers"]}
    for name in ("postgres", "minio", "create-buckets"):
        image = compose["services"][name]["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
        assert image in k8s_images, f"{name}: {image} differs from the Kubernetes manifests"


def test_the_same_buckets_are_created(compose):
    created = set(re.findall(r"local/([a-z0-9.-]+)", " ".join(compose["services"]["create-buckets"]["command"])))
    (job,) = [m for m in by_kind(k8s_manifests(), "Job") if m.name == "minio-buckets"]
    k8s_created = set(re.findall(r"local/([a-z0-9.-]+)", " ".join(job.doc["spec"]["template"]["spec"]["containers"][0]["args"])))
    assert created == k8s_created == {"mlflow", "tnet-data"}


def test_a_changed_command_would_be_noticed(compose):
    changed = list(compose["services"]["mlflow"]["command"])
    changed[changed.index("--workers") + 1] = "8"
    assert compose_as_k8s(changed) != k8s_command()
    assert compose_as_k8s(["${A}", "${B:-x}", "${C:?set it}", "$(D)"]) == ["$(A)", "$(B)", "$(C)", "$(D)"]
