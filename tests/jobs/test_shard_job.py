"""jobs/shard.py end to end on Ray: Megapixel MNIST locally and on S3 (moto), determinism, kill + resume."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.dataset_files import read_dataset_json
from pipeline.pyramid import PyramidReader
from pipeline.tarshard import read_member

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "shard.py"
# 24 train / 8 test canvases of 512 px, ~4 canvases per shard: the "small" MNIST
MNIST_ARGS = ["megapixel-mnist", "--option", "n_train=24", "--option", "n_test=8", "--option", "size=512",
              "--tile", "128", "--shard-bytes", "120k", "--no-progress"]  # fmt: skip


def load_job() -> Any:
    spec = importlib.util.spec_from_file_location("shard_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = load_job()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **(extra or {})}


# ----------------------------------------------------------------------------- parsing (fast)


def test_help_documents_every_option() -> None:
    text = job.build_parser().format_help()
    for flag in ("--src", "--dst", "--splits", "--tile", "--quality", "--max-side", "--max-pixels", "--shard-bytes",
                 "--seed", "--workers", "--storage-option", "--option", "--config", "--set", "--address",
                 "--overwrite", "512MB, 1GiB, 200k", "ray job submit"):  # fmt: skip
        assert flag in text


def test_config_layers_yaml_flags_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"tile": 512, "quality": 70, "seed": 3, "shard_bytes": "1GiB"}))
    args = job.build_parser().parse_args(
        ["folder", "--src", "raw", "--dst", "out", "--config", "c.yaml", "--quality", "85", "--set", "seed=9",
         "--shard-bytes", "200k", "--storage-option", "client_kwargs.endpoint_url=http://127.0.0.1:9",
         "--storage-option", "key=abc", "--option", "layout=flat", "--splits", "train"]  # fmt: skip
    )
    cfg = job.config_from_args(args)
    assert (cfg.tile, cfg.quality, cfg.seed, cfg.shard_bytes) == (512, 85, 9, 200_000)
    assert (cfg.src, cfg.dst) == (str(tmp_path / "raw"), str(tmp_path / "out"))
    assert cfg.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "key": "abc"}
    assert cfg.source_options == {"layout": "flat"} and cfg.splits == ("train",)


def test_bad_arguments_name_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["folder", "--dst", "x", "--tile", "100"], "tile=100"),
                          (["folder", "--dst", "x", "--set", "nope=1"], "nope: unknown key"),
                          (["folder", "--dst", "x", "--shard-bytes", "12 apples"], "invalid parse_size value")):  # fmt: skip
        with pytest.raises(SystemExit):
            job.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):  # before Ray starts
        job.main(["megapixel-mnist", "--dst", "x", "--option", "bogus=1"])


# ------------------------------------------------------------------------- on Ray (slow)


@pytest.fixture(scope="module")
def reference(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One uninterrupted in-process run of the small MNIST config: the bytes every other run must match."""
    dst = tmp_path_factory.mktemp("reference") / "ds"
    summary = job.main([*MNIST_ARGS, "--dst", str(dst)])
    return dst, summary


@pytest.mark.slow
def test_mnist_end_to_end(reference: tuple[Path, Any]) -> None:
    dst, summary = reference
    meta = read_dataset_json(str(dst))
    rows = pq.read_table(dst / "manifest.parquet").to_pylist()
    assert summary.samples == 32 and summary.rejects == {} and summary.shards_written == len(list(dst.rglob("*.tar")))
    assert meta["counts"] == {"train": 24, "test": 8} and len(meta["shards"]["train"]) >= 4
    assert [r["key"] for r in rows] == [r["key"] for r in sorted(rows, key=lambda r: (r["split"] == "train", r["shard"]))]
    for row in rows[:6]:
        reader = PyramidReader(read_member(str(dst / row["shard"]), row["offset"], row["size"]))
        assert (reader.width, reader.height) == (512, 512)
        assert reader.read_region((0, 0, 512, 512), 64).shape == (64, 64)
    assert not (dst / "_tmp").exists()


@pytest.mark.slow
def test_two_runs_are_byte_identical(reference: tuple[Path, Any], tmp_path: Path) -> None:
    dst, _ = reference
    job.main([*MNIST_ARGS, "--dst", str(tmp_path / "again"), "--verify", "size"])
    assert files_of(tmp_path / "again") == files_of(dst)


@pytest.mark.slow
def test_s3_write_and_read_back(reference: tuple[Path, Any], moto_s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = moto_s3.bucket("shards")
    endpoint = moto_s3.storage_options["client_kwargs"]["endpoint_url"]
    secret = "SECRETVALUE-xyz"
    job.main([*MNIST_ARGS, "--dst", f"{bucket}/mpmnist", "--storage-option", "key=AKIDEXAMPLE",
              "--storage-option", f"secret={secret}", "--storage-option", f"client_kwargs.endpoint_url={endpoint}"])  # fmt: skip
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    options = {"key": "AKIDEXAMPLE", "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}
    meta = read_dataset_json(f"{bucket}/mpmnist", options)
    assert secret not in json.dumps(meta) and meta["counts"] == {"train": 24, "test": 8}
    fs = moto_s3.filesystem()
    root = f"{bucket[5:]}/mpmnist"
    local = reference[0]
    assert fs.cat_file(f"{root}/manifest.parquet") == (local / "manifest.parquet").read_bytes()
    assert fs.find(f"{root}/_tmp") == []
    rows = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/manifest.parquet"))).to_pylist()
    row = rows[0]
    tif = read_member(f"{bucket}/mpmnist/{row['shard']}", row["offset"], row["size"], options)
    assert tif == (local / row["shard"]).read_bytes()[row["offset"] : row["offset"] + row["size"]]
    with fs.open(f"{root}/{row['shard']}", "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        assert next(iter(tar)).name == f"{row['key']}.tif"  # streams like WebDataset would


def run_job(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(JOB), *args], cwd=REPO, env=job_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)  # fmt: skip


def session_processes(sid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_dataset(reference: tuple[Path, Any], tmp_path: Path) -> None:
    dst = tmp_path / "ds"
    proc = run_job([*MNIST_ARGS, "--dst", str(dst), "--workers", "1"])
    deadline = time.monotonic() + 120
    while not list(dst.glob("*/shard-*.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"job ended or stalled before its first shard: {proc.communicate()[0][-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the job, its private Ray and every worker
    proc.wait()
    deadline = time.monotonic() + 15  # a worker orphaned mid-start notices its raylet is gone
    while (leftovers := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    info = [(p.pid, p.name(), os.getpgid(p.pid)) for p in leftovers]
    for p in leftovers:
        p.kill()
    assert leftovers == [], f"processes of the killed job's session survived: {info}"
    assert not (dst / "dataset.json").exists()
    committed = {p: p.stat().st_mtime_ns for p in dst.glob("*/shard-*.tar")}
    assert committed and len(committed) < len(list(reference[0].rglob("*.tar")))

    summary = job.main([*MNIST_ARGS, "--dst", str(dst)])  # the re-run, on the session's Ray
    assert summary.shards_skipped >= len(committed) and summary.samples == 32
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # skipped, not rewritten
    assert files_of(dst) == files_of(reference[0])  # no _tmp leftovers either
