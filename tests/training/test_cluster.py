"""Training on more than one Ray node, surviving a lost worker, and ``ray job submit`` end to end.

Both scenarios run Ray in subprocesses this test starts (a two-node ``ray.cluster_utils.Cluster``
in tests/fixtures/two_node_train.py; a ``ray start --head --block`` head for the job), so the
test process's own Ray (``ray_local``) is untouched, and they end by stopping exactly the
processes they started: never ``ray stop``, which stops every Ray on the machine.

``train.debug_dir`` makes every rank record its pid, node and the keys it trained on per epoch:
that is how the test sees which samples each rank read and which process to kill.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.loader import slot_plan, split_shards
from tests.fixtures.ray_runs import ray_env, records, registered_checkpoints, stop_tree, write_config
from tests.fixtures.tiny_mnist import tiny_job
from training.local_head import free_ports, start_head
from training.loop import CHECKPOINT_FILE, load_state

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TWO_NODES = REPO / "tests" / "fixtures" / "two_node_train.py"
RAY = str(Path(sys.executable).parent / "ray")


# ----------------------------------------------------------------------------- two nodes, a lost worker


@pytest.fixture(scope="module")
def two_nodes(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two nodes of 1 CPU, two workers of 1 CPU (so one per node), 3 epochs; once the checkpoint of
    epoch 0 is stored, rank 1's worker process is killed. FailureConfig(max_failures=1) must
    restart the group from that checkpoint and finish."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    debug = tmp / "debug"
    debug.mkdir()
    cfg = tiny_job(tiny_mnist, tmp, run_name="two-nodes", epochs=3, num_workers=2, cpus_per_worker=1.0,
                   batch_size=2, max_failures=1, debug_dir=str(debug))
    config = write_config(cfg, tmp / "job.yaml")
    log = (tmp / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, str(TWO_NODES), str(config), str(tmp / "out")], cwd=REPO,
                            env=ray_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    killed: dict[str, Any] = {}
    try:
        killed = kill_rank_after_first_checkpoint(proc, Path(cfg.train.storage_path) / cfg.train.run_name, debug, 1)
        out, _ = proc.communicate(timeout=540)
        log.close()
        if proc.returncode != 0:
            pytest.fail(f"two-node training failed ({proc.returncode}):\n{(tmp / 'driver.log').read_text()[-6000:]}")
        yield {"cfg": cfg, "outcome": json.loads(out.strip().splitlines()[-1]), "debug": debug, "killed": killed}
    finally:
        stop_tree(proc)


def kill_rank_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, debug: Path, rank: int) -> dict[str, Any]:
    """SIGKILL ``rank``'s Train worker once a checkpoint is registered; returns what was killed."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("training ended before a worker could be killed")
        stored = registered_checkpoints(run_dir)
        starts = records(debug, f"start-rank{rank}-")
        if stored and starts:
            pid = starts[0]["pid"]
            victim = psutil.Process(pid)
            # only a process of this test's cluster, and the Train worker itself
            assert pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            assert "RayTrainWorker" in " ".join(victim.cmdline())
            epochs_done = len(records(debug, "epoch"))
            victim.kill()
            return {"pid": pid, "checkpoints": len(stored), "epoch_records_before": epochs_done}
        time.sleep(0.05)
    raise AssertionError("no checkpoint within 400 s")


def test_two_node_run_completes_and_is_registered(two_nodes: dict[str, Any]) -> None:
    cfg, outcome = two_nodes["cfg"], two_nodes["outcome"]
    client = MlflowClient(outcome["tracking_uri"])
    run = client.get_run(outcome["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    steps = sorted(m.step for m in client.get_metric_history(outcome["run_id"], "train_total"))
    assert set(steps) == {0, 1, 2}
    assert "val_accuracy" in run.data.metrics and "final_accuracy" in run.data.metrics
    version = client.get_model_version_by_alias(cfg.tracking.model_name, "candidate")
    assert version.run_id == outcome["run_id"]


def test_each_rank_runs_on_its_own_node_and_reads_disjoint_shards(two_nodes: dict[str, Any], tiny_mnist: Path) -> None:
    cfg, debug, outcome = two_nodes["cfg"], two_nodes["debug"], two_nodes["outcome"]
    starts = records(debug, "start-")
    first = {r["rank"]: r for r in starts if r["start_epoch"] == 0}
    assert set(first) == {0, 1}
    assert first[0]["node_id"] != first[1]["node_id"]  # one worker per node
    assert {first[0]["node_id"], first[1]["node_id"]} == set(outcome["nodes"])

    rows = pq.read_table(tiny_mnist / "manifest.parquet", columns=["key", "split", "shard"]).to_pylist()
    shard_of = {r["key"]: r["shard"] for r in rows if r["split"] == "train"}
    shards = [s for s, _ in split_shards(str(tiny_mnist), "train")]
    by_epoch: dict[int, dict[int, list[str]]] = {}
    for rec in records(debug, "epoch"):
        by_epoch.setdefault(rec["epoch"], {})[rec["rank"]] = rec["keys"]
    assert set(by_epoch) == {0, 1, 2}
    for epoch, ranks in by_epoch.items():
        assert set(ranks) == {0, 1}
        keys0, keys1 = ranks[0], ranks[1]
        assert len(keys0) == len(keys1) == 12  # equal quotas: DDP never waits
        assert not set(keys0) & set(keys1)
        assert sorted(keys0 + keys1) == sorted(shard_of)  # the two ranks together: the epoch
        for rank, keys in ranks.items():
            read = {shard_of[k] for k in keys}
            planned, stride = slot_plan(shards, rank, 2, random.Random(f"{cfg.train.seed}-{epoch}"))
            assert stride is None and read == set(planned)  # loader_workers=0: one slot per rank


def test_lost_worker_resumes_from_the_last_checkpoint(two_nodes: dict[str, Any]) -> None:
    debug, killed, outcome = two_nodes["debug"], two_nodes["killed"], two_nodes["outcome"]
    assert killed["checkpoints"] >= 1
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    starts = records(debug, "start-")
    restarted = [r for r in starts if r["start_epoch"] > 0]
    assert {r["rank"] for r in restarted} == {0, 1}  # the whole group restarted ...
    assert all(r["pid"] != killed["pid"] for r in restarted)
    resumed_at = {r["start_epoch"] for r in restarted}
    assert len(resumed_at) == 1 and resumed_at.pop() >= 1  # ... from a checkpoint, not from scratch
    new_pids = {r["pid"] for r in restarted}
    assert not [r for r in records(debug, "epoch0-") if r["pid"] in new_pids]  # epoch 0 was not redone
    assert load_state(str(Path(outcome["checkpoint"], CHECKPOINT_FILE)))["epoch"] == 2


# ----------------------------------------------------------------------------- ray job submit


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, Any]]:
    """``ray start --head --block`` on free ports with the dashboard (the job server) on 127.0.0.1."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    log = Path(temp, "head.log")
    proc, address = start_head(RAY, temp, free_ports(), 2, log, ray_env())
    try:
        yield {"address": address, "log": log}
    finally:
        stop_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_and_registers(ray_head: dict[str, Any], tiny_mnist: Path, tmp_path: Path) -> None:
    cfg = tiny_job(tiny_mnist, tmp_path, run_name="submitted", epochs=1)
    cfg = replace(cfg, train=replace(cfg.train, storage_path=str(tmp_path / "ray_results")))
    config = write_config(cfg, tmp_path / "job.yaml")  # outside the working dir: absolute paths only
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO), "--",
           sys.executable, "jobs/train.py", "--config", str(config), "--out", str(tmp_path / "out"), "--json"]
    done = subprocess.run(cmd, env=ray_env(), cwd=REPO, capture_output=True, text=True, timeout=540)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "succeeded" in output, output[-6000:]
    client = MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version_by_alias(cfg.tracking.model_name, "candidate")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
    assert list((tmp_path / "out" / "submitted" / "attention").glob("*.png"))
