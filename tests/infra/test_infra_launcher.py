"""infra/ray-cluster.yaml: valid for Ray's own cluster-launcher schema, and installs the project as the image does."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import mlflow
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.infra.dockerfiles import IMAGE, args
from tests.infra.k8s_manifests import INFRA, REPO

LAUNCHER = INFRA / "ray-cluster.yaml"


def config() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def check(cfg: dict[str, Any]) -> None:
    """What `ray up` does first: fill in the provider's defaults, then validate against ray-schema.json."""
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_config_is_valid_for_ray_up():
    check(config())


@pytest.mark.parametrize("breakage", ["misspelt node field", "misspelt top-level field", "node type without node_config"])
def test_ray_schema_catches_a_broken_config(breakage):
    cfg = config()
    if breakage == "misspelt node field":
        cfg["available_node_types"]["ray.worker.gpu"]["min_worker"] = 1
    elif breakage == "misspelt top-level field":
        cfg["setup_command"] = cfg.pop("setup_commands")
    else:
        del cfg["available_node_types"]["ray.worker.gpu"]["node_config"]
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        check(cfg)


def test_node_types_schedule_drivers_on_the_head_and_training_on_gpus():
    cfg = config()
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [n for n in nodes.values() if re.match(r"^(g\d|p\d)", n["node_config"]["InstanceType"])]
    assert gpu, "no GPU instance type among the worker node types"
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert all(0 <= n["min_workers"] <= n["max_workers"] for n in workers)
    assert sum(n["max_workers"] for n in workers) <= cfg["max_workers"]
    assert all(n["node_config"].get("ImageId") for n in nodes.values()), "Ray's default AMI has CUDA 11"


def test_setup_installs_the_project_like_the_image():
    cfg = config()
    setup = "\n".join(cfg["setup_commands"])
    pinned = args(IMAGE)
    order = [setup.index(step) for step in (
        f"torch=={pinned['TORCH_VERSION']} torchvision=={pinned['TORCHVISION_VERSION']}",
        f'pip install --quiet ~/tnet "ray[default,train]=={ray.__version__}" mlflow=={mlflow.__version__}',
        "pip uninstall --quiet -y pillow",
        f'CC="cc -mavx2" pip install --quiet --no-deps --no-cache-dir --force-reinstall '
        f"pillow-simd=={pinned['PILLOW_SIMD_VERSION']}",
        "'post' in PIL.__version__")]
    assert order == sorted(order)
    assert f"uv python install {pinned['PYTHON_VERSION']}" in setup
    assert cfg["file_mounts"]["~/tnet"] == "." and ".gitignore" in cfg["rsync_filter"]


def test_every_node_uses_token_authentication_and_the_project_venv():
    cfg = config()
    first = cfg["setup_commands"][0]  # later commands and `ray start` read ~/.bashrc
    assert "export RAY_AUTH_MODE=token" in first and "tnet-venv/bin" in first
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("ray start --head" in c and "--autoscaling-config" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    assert any(re.search(r"boto3==\d", c) for c in cfg["head_setup_commands"]), "the AWS autoscaler needs boto3"


def test_launcher_is_documented():
    assert "ray up infra/ray-cluster.yaml" in (REPO / "docs" / "deploy.md").read_text()
