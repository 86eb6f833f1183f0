"""docs/deploy.md: its commands apply files that exist, run jobs that accept them, in a working order."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from tests.infra.job_commands import command_problems, parse_command, repo_path
from tests.infra.k8s_manifests import INFRA, REPO, containers, k8s_files, k8s_manifests, references

DOC = REPO / "docs" / "deploy.md"
PLACEHOLDER_REGISTRY = "registry.example.com"


def commands() -> list[str]:
    """Shell commands of the doc's bash blocks, continuation lines joined, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    joined = [re.sub(r"\\\n\s*", " ", block) for block in blocks]
    return [line.strip() for block in joined for line in block.splitlines() if line.strip()]


COMMANDS = commands()
JOB_COMMANDS = [c for c in COMMANDS if parse_command(c) is not None]


def first(pattern: str) -> int:
    """Index of the first command matching ``pattern``."""
    for i, command in enumerate(COMMANDS):
        if re.search(pattern, command):
            return i
    raise AssertionError(f"docs/deploy.md: no command matches {pattern!r}")


def applied_files() -> list[str]:
    return [m for c in COMMANDS for m in re.findall(r"kubectl (?:apply|delete) -f (\S+)", c)]


def test_every_applied_file_exists_and_every_manifest_is_applied():
    applied = applied_files()
    for path in applied:
        assert (REPO / path).is_file(), f"docs/deploy.md applies {path}, which does not exist"
    assert {str(p.relative_to(REPO)) for p in k8s_files()} <= set(applied)


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_job_command_is_accepted_by_its_job(command):
    assert command_problems(parse_command(command)) == []


def test_the_flow_goes_from_image_to_promoted_model():
    steps = [first(r"^docker build -f infra/docker/Dockerfile"), first(r"^docker push"),
             first(r"^helm install kuberay-operator"), first(r"^kubectl create secret generic tnet-s3"),
             first(r"kubectl apply -f infra/mlflow/k8s/mlflow.yaml"),
             first(r"kubectl apply -f infra/kuberay/rayjob-shard-fmow.yaml"),
             first(r"ray job submit .* python jobs/train.py"), first(r"port-forward svc/mlflow"),
             first(r"python jobs/evaluate.py .*--promote")]
    assert steps == sorted(steps), "docs/deploy.md: steps out of order"
    assert first(r"export RAY_AUTH_MODE=token") < first(r"ray job submit")


def test_every_secret_the_manifests_read_is_created():
    created: dict[str, set[str]] = {}
    for command in COMMANDS:
        tokens = shlex.split(command)
        if tokens[:4] == ["kubectl", "create", "secret", "generic"]:
            keys = {t.split("=", 1)[1].split("=", 1)[0] for t in tokens if t.startswith("--from-literal=")}
            created[tokens[4]] = keys
    for manifest in k8s_manifests():
        for ref in references(manifest.doc):
            if ref.kind == "Secret":
                assert ref.name in created, f"{manifest}: Secret {ref.name} is never created in docs/deploy.md"
                assert ref.key is None or ref.key in created[ref.name], f"{manifest}: {ref.name} lacks {ref.key}"


def test_pushed_images_are_the_ones_the_manifests_pull():
    # the doc's sed turns the manifests' registry.example.com into $REGISTRY
    pushed = {c.split()[-1].replace("$REGISTRY", PLACEHOLDER_REGISTRY) for c in COMMANDS if c.startswith("docker push")}
    pulled = {c.get("image") for m in k8s_manifests() for _, c in containers(m.doc)}
    assert pushed and pushed == {image for image in pulled if image.startswith(PLACEHOLDER_REGISTRY)}
    assert {c.split()[-1] for c in COMMANDS if c.startswith("docker build")} == {".", "infra/mlflow"}


def test_promoted_model_is_the_one_training_registers():
    train = parse_command(next(c for c in JOB_COMMANDS if parse_command(c).job == "train.py"))
    config = yaml.safe_load(repo_path(train.argv[train.argv.index("--config") + 1]).read_text())
    evaluate = parse_command(next(c for c in JOB_COMMANDS if parse_command(c).job == "evaluate.py"))
    model = evaluate.argv[evaluate.argv.index("--model") + 1]
    assert model == f"models:/{config['tracking']['model_name']}@candidate"


def test_compose_and_launcher_sections_use_the_real_files():
    assert (INFRA / "mlflow" / "env.example").is_file()
    assert first(r"docker compose -f infra/mlflow/docker-compose.yaml up")
    assert first(r"^ray up infra/ray-cluster.yaml") < first(r"^ray down infra/ray-cluster.yaml")


def test_commands_are_found():
    assert len(COMMANDS) > 30 and len(JOB_COMMANDS) >= 4
