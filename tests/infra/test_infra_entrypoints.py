"""RayJob entrypoints run real jobs with real configs, as the image lays them out (/app/jobs, /app/configs)."""

from __future__ import annotations

import pytest

from tests.infra.job_commands import APP, command_problems, load_job, parse_command
from tests.infra.k8s_manifests import INFRA, by_kind, k8s_manifests

RAY_JOBS = by_kind(k8s_manifests(), "RayJob")


def entrypoint_command(manifest):
    cmd = parse_command(manifest.doc["spec"]["entrypoint"])
    assert cmd is not None, f"{manifest}: the entrypoint runs no python jobs/<job>.py"
    return cmd


@pytest.mark.parametrize("manifest", RAY_JOBS, ids=str)
def test_ray_job_entrypoint_is_accepted_by_its_job(manifest):
    cmd = entrypoint_command(manifest)
    assert cmd.script.startswith(f"{APP}/jobs/"), "RayJobs run the image's copy of the job (no working_dir upload)"
    assert command_problems(cmd) == []


def test_the_image_puts_jobs_and_configs_where_entrypoints_look():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"COPY jobs {APP}/jobs" in dockerfile
    assert f"COPY configs {APP}/configs" in dockerfile


def test_shard_job_shards_fmow_from_s3_to_s3():
    (manifest,) = [m for m in RAY_JOBS if m.name == "tnet-shard-fmow"]
    job = load_job("shard.py")
    cfg = job.config_from_args(job.build_parser().parse_args(list(entrypoint_command(manifest).argv)))
    assert cfg.dataset == "fmow"
    assert cfg.src.startswith("s3://") and cfg.dst.startswith("s3://")
    assert cfg.progress is False  # a progress bar in pod logs is noise


def test_train_job_writes_outside_the_read_only_app_folder():
    (manifest,) = [m for m in RAY_JOBS if m.name == "tnet-train-fmow"]
    argv = entrypoint_command(manifest).argv
    out = argv[argv.index("--out") + 1]
    assert not out.startswith(APP), "the image's /app belongs to root; the job runs as uid 1000"


@pytest.mark.parametrize("text", [
    "python /app/jobs/train.py --config /app/configs/fmow_448.yaml --set train.epoch=3",  # misspelt key
    "python /app/jobs/train.py --config /app/configs/fmow_1000.yaml",  # no such config
    "python /app/jobs/train.py --config /app/configs/fmow_448.yaml --resume",  # no such flag
    "python /app/jobs/trian.py --config /app/configs/fmow_448.yaml",  # no such job
    "python /app/jobs/shard.py fmow --src s3://a/raw --dst s3://a/shards --shard-bytes lots",
    "python /app/jobs/shard.py fmow --src s3://a/raw --dst s3://a/shards --quality 101",
    "python /app/jobs/evaluate.py --model tnet-fmow-448 --data s3://a/shards",
])
def test_a_broken_entrypoint_is_rejected(text):
    cmd = parse_command(text)
    assert cmd is not None and command_problems(cmd)


def test_parse_command_finds_the_job_inside_a_shell_line():
    cmd = parse_command("RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py --config c.yaml; echo")
    assert cmd.script == "jobs/train.py" and cmd.argv == ("--config", "c.yaml")
    assert parse_command("kubectl apply -f infra/kuberay/raycluster.yaml") is None
