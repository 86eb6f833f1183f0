"""Training faults: a lost node and a corrupted shard, each ending in a completed run.

- A killed node: on a two-node local cluster (tests/fixtures/two_node_train.py with
  ``--kill-node-after-checkpoint``), the non-head node hosting rank 1 is removed ungracefully (its
  raylet and workers SIGKILLed) once the first checkpoint is registered, and a replacement node
  joins. ``FailureConfig(max_failures=1)`` must resume from that checkpoint and finish.
- A corrupted shard: random bytes flipped (seeded) inside the pyramids of one training shard. The
  run completes; the samples the loader cannot decode are skipped, counted (``train_skipped``) and
  listed with their reasons in MLflow (``data_errors/epoch-000.json``); the tiles found corrupt
  only when the model reads them are read as grey and counted (``train_damaged``); every clean
  sample is trained on. Above ``data.max_bad_fraction`` the run stops with a clear error.

Both start Ray in ways that leave the caller's Ray alone: the node test in a subprocess, the
corruption tests on the session's local Ray (tests/conftest.py's ``ray_local``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
from mlflow.tracking import MlflowClient
from ray.train import TrainingFailedError

from pipeline.errors import FormatError, PipelineError
from pipeline.lazy import PyramidRegionSource, View
from pipeline.loader import ShardStream, StreamSpec, split_shards
from pipeline.pyramid import PyramidReader
from tests.fixtures.ray_runs import ray_env, records, stop_tree, train_in_process, write_config
from tests.fixtures.tiny_mnist import shard_tiny_mnist, tiny_job
from training.data_errors import TolerantRegionSource
from training.loop import CHECKPOINT_FILE, SET_ASIDE, load_state

REPO = Path(__file__).resolve().parents[2]
TWO_NODES = REPO / "tests" / "fixtures" / "two_node_train.py"
CORRUPTION_SEED = 0  # picks the shard and the bytes: 1 sample undecodable, 2 with corrupt deep tiles
FLIPS_PER_PYRAMID = 12


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Megapixel MNIST (tests/training/conftest.py has the same one for its directory)."""
    return shard_tiny_mnist(tmp_path_factory.mktemp("data") / "megapixel-mnist")


def train_keys(root: Path) -> list[str]:
    rows = pq.read_table(root / "manifest.parquet", columns=["key", "split"]).to_pylist()
    return sorted(r["key"] for r in rows if r["split"] == "train")


# ----------------------------------------------------------------------------- killed node


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped (a container's pid 1 may not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def lost_node(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two nodes of 1 CPU, two workers of 1 CPU (one per node), 3 epochs; once the checkpoint of
    epoch 0 is registered the non-head node dies whole and a fresh node joins. Epochs of 72 samples
    (3 passes over the 24) last seconds, so the kill lands while training still has work left."""
    tmp = tmp_path_factory.mktemp("lost_node")
    debug = tmp / "debug"
    debug.mkdir()
    cfg = tiny_job(tiny_mnist, tmp, run_name="lost-node", epochs=3, num_workers=2, cpus_per_worker=1.0,
                   batch_size=2, max_failures=1, debug_dir=str(debug), data={"samples_per_epoch": 72})
    config = write_config(cfg, tmp / "job.yaml")
    log = (tmp / "driver.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(TWO_NODES), str(config), str(tmp / "out"),
                             "--kill-node-after-checkpoint"], cwd=REPO, env=ray_env(), stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        out, _ = proc.communicate(timeout=560)
        log.close()
        if proc.returncode != 0:
            pytest.fail(f"two-node training failed ({proc.returncode}):\n{(tmp / 'driver.log').read_text()[-6000:]}")
        outcome = json.loads(out.strip().splitlines()[-1])
        yield {"cfg": cfg, "outcome": outcome, "debug": debug, "seconds": time.monotonic() - t0}
    finally:
        stop_tree(proc)


@pytest.mark.slow
def test_lost_node_is_replaced_and_the_run_resumes_from_its_checkpoint(lost_node: dict[str, Any]) -> None:
    cfg, outcome, debug = lost_node["cfg"], lost_node["outcome"], lost_node["debug"]
    killed = outcome["killed"]
    assert "error" not in killed and killed["checkpoints"]  # killed after a registered checkpoint
    assert killed["node_id"] in outcome["nodes"] and killed["replacement"] not in outcome["nodes"]
    assert sorted(outcome["nodes_after"]) == sorted((set(outcome["nodes"]) - {killed["node_id"]}) | {killed["replacement"]})
    assert killed["pids"] and all(dead(p) for p in [killed["raylet_pid"], *killed["pids"]])

    starts = records(debug, "start-")
    first = {r["rank"]: r for r in starts if r["start_epoch"] == 0}
    assert set(first) == {0, 1} and first[0]["node_id"] != first[1]["node_id"]
    assert killed["ranks"] == [r for r, rec in sorted(first.items()) if rec["node_id"] == killed["node_id"]]
    assert len(killed["ranks"]) == 1  # the dead node held one of the two ranks
    restarted = [r for r in starts if r["start_epoch"] > 0]
    assert {r["rank"] for r in restarted} == {0, 1}  # the whole group restarted ...
    [resumed_at] = {r["start_epoch"] for r in restarted}  # ... once, from a checkpoint, not from scratch
    assert len(killed["checkpoints"]) <= resumed_at < cfg.train.epochs  # the latest one, with work left
    assert {r["node_id"] for r in restarted} == (set(outcome["nodes"]) - {killed["node_id"]}) | {killed["replacement"]}
    redone = [r for r in records(debug, "epoch") if r["pid"] in {x["pid"] for x in restarted}]
    assert sorted(r["epoch"] for r in redone) == sorted(list(range(resumed_at, cfg.train.epochs)) * 2)

    assert load_state(str(Path(outcome["checkpoint"], CHECKPOINT_FILE)))["epoch"] == cfg.train.epochs - 1
    client = MlflowClient(outcome["tracking_uri"])
    assert client.get_run(outcome["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(outcome["run_id"], "train_total")]
    assert set(steps) == set(range(cfg.train.epochs))  # one MLflow run across the failure
    relogged = len(steps) - cfg.train.epochs  # an epoch cut short after rank 0 logged it is logged again
    assert relogged <= 1
    version = client.get_model_version_by_alias(cfg.tracking.model_name, "candidate")
    assert version.run_id == outcome["run_id"]
    print(f"\nFIGURES lost-node: {json.dumps({'seconds': round(lost_node['seconds'], 1), 'resumed_at_epoch': resumed_at, 'killed_ranks': killed['ranks'], 'killed_pids': len(killed['pids']) + 1, 'replaced_in_s': killed['replaced_in_s'], 'epochs_relogged': relogged})}")


# ----------------------------------------------------------------------------- corrupted shard


def flip_pyramid_bytes(shard: bytes, rng: random.Random, per_pyramid: int) -> bytes:
    """XOR ``per_pyramid`` random bytes into the payload of every ``.tif`` member of a tar shard
    (tar headers and the json/cls members stay intact: the damage is in the images)."""
    blob = bytearray(shard)
    with tarfile.open(fileobj=io.BytesIO(shard), mode="r:") as tar:
        spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".tif")]
    for offset, size in spans:
        for _ in range(per_pyramid):
            blob[offset + rng.randrange(size)] ^= rng.randint(1, 255)
    return bytes(blob)


@pytest.fixture(scope="module")
def corrupted(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the tiny dataset with one training shard's pyramids damaged, and the loader's
    verdict on it (the spec training/loop.py builds for one rank, epoch 0)."""
    root = tmp_path_factory.mktemp("corrupted") / "ds"
    shutil.copytree(tiny_mnist, root)
    shards = [s for s, _ in split_shards(str(root), "train")]
    rng = random.Random(CORRUPTION_SEED)
    victim = rng.choice(shards)
    (root / victim).write_bytes(flip_pyramid_bytes((root / victim).read_bytes(), rng, FLIPS_PER_PYRAMID))
    cfg = tiny_job(root, root.parent)
    spec = StreamSpec(url=str(root), split="train", shards=tuple(shards), base_size=cfg.model.base_size,
                      channels=cfg.model.in_chans, quota=len(train_keys(root)), seed=cfg.train.seed,
                      augment=cfg.data.augment, flip=cfg.data.flip, colour_jitter=cfg.data.colour_jitter,
                      shuffle_buffer=cfg.data.shuffle_buffer)
    errors = sorted(str(i) for i in ShardStream(spec) if isinstance(i, PipelineError))
    with tarfile.open(root / victim) as tar:
        victim_keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return {"root": root, "victim": victim, "victim_keys": victim_keys, "loader_errors": errors}


def corrupt_first_tile(tif: bytes) -> bytes:
    """The pyramid with the JPEG body of level 0's first tile zeroed (SOI and EOI kept)."""
    with tifffile.TiffFile(io.BytesIO(tif)) as t:
        offset, count = t.pages[0].dataoffsets[0], t.pages[0].databytecounts[0]
    blob = bytearray(tif)
    blob[offset + 2 : offset + count - 2] = bytes(count - 4)
    return bytes(blob)


def test_tolerant_source_reads_a_corrupt_deep_tile_as_grey(tiny_mnist: Path) -> None:
    with tarfile.open(tiny_mnist / "train" / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".tif"))
        clean = tar.extractfile(member).read()
    key = member.name.split(".", 1)[0]
    bad = corrupt_first_tile(clean)
    reader = PyramidReader(bad, where=key)
    view = View((0.0, 0.0, float(reader.width), float(reader.height)))
    base = reader.read_region(view.box, 64)  # the loader's base view still decodes: coarse levels only
    assert base.shape == (64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]]])  # level-0 tiles (0, 0), (2, 2)
    with pytest.raises(FormatError, match=rf"^{key}: tile \(0, 0, 0\)"):
        PyramidRegionSource([PyramidReader(bad, where=key)], [view], 1).read_regions(boxes, 128)
    source = TolerantRegionSource(PyramidRegionSource([reader], [view], 1), [key])
    out = source.read_regions(boxes, 128)
    assert out.shape == (1, 2, 1, 128, 128)
    assert torch.equal(out[0, 0], torch.zeros(1, 128, 128))  # unreadable: mid-grey in model space
    expected = PyramidRegionSource([PyramidReader(clean, where=key)], [view], 1).read_regions(boxes[:, 1:], 128)
    assert torch.equal(out[0, 1], expected[0, 0])  # the sample's readable boxes are untouched
    assert list(source.damaged) == [key] and "tile (0, 0, 0)" in source.damaged[key]
    assert source.decoded_pixels() > 0 and len(source) == 1


@pytest.mark.slow
def test_corrupted_shard_run_completes_and_logs_what_it_skipped(
        ray_local: Any, corrupted: dict[str, Any], tmp_path: Path) -> None:
    root, loader_errors = corrupted["root"], corrupted["loader_errors"]
    assert loader_errors  # the corruption reaches the loader (else this test checks nothing)
    debug = tmp_path / "debug"
    debug.mkdir()
    cfg = tiny_job(root, tmp_path, run_name="corrupted", epochs=1, debug_dir=str(debug))
    cfg = replace(cfg, tracking=replace(cfg.tracking, register=False, overlays=0))
    t0 = time.monotonic()
    outcome = train_in_process(cfg, tmp_path / "out")
    elapsed = time.monotonic() - t0

    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    [skipped_metric] = client.get_metric_history(outcome.run_id, "train_skipped")
    [damaged_metric] = client.get_metric_history(outcome.run_id, "train_damaged")
    listing = json.loads(Path(client.download_artifacts(outcome.run_id, "data_errors/epoch-000.json",
                                                         str(tmp_path))).read_text())
    assert listing["epoch"] == 0
    skipped = [f"{e['where']}: {e['reason']}" for e in listing["skipped"]]
    assert sorted(skipped) == loader_errors  # the same samples, for the same reasons
    assert skipped_metric.value == len(skipped) > 0
    assert damaged_metric.value == len(listing["damaged"])

    skipped_keys = [e["where"] for e in listing["skipped"]]
    [epoch] = records(debug, "epoch0-")
    seen = epoch["keys"]
    assert sorted(seen + skipped_keys) == train_keys(root)  # every clean sample trained on, once
    assert set(skipped_keys) <= corrupted["victim_keys"]
    damaged_keys = {e["where"] for e in listing["damaged"]}
    assert damaged_keys <= corrupted["victim_keys"] and damaged_keys <= set(seen)
    assert load_state(str(Path(outcome.checkpoint, CHECKPOINT_FILE)))["epoch"] == 0
    print(f"\nFIGURES corrupted-shard-training: {json.dumps({'victim': corrupted['victim'], 'seen': len(seen), 'skipped': len(skipped), 'damaged': len(damaged_keys), 'seconds': round(elapsed, 1)})}")


@pytest.mark.slow
@pytest.mark.timeout(900)  # out-of-step ranks would wait in gloo's all-reduce for 30 minutes
def test_a_rank_with_an_empty_batch_makes_every_rank_skip_that_step(
        ray_local: Any, corrupted: dict[str, Any], tmp_path: Path) -> None:
    """Two DDP ranks at batch 1: the rank that draws the undecodable sample has nothing to step on.
    Both skip that step (DDP all-reduces every step); the other rank's sample is set aside, counted
    and listed; every other sample is trained on once."""
    debug = tmp_path / "debug"
    debug.mkdir()
    cfg = tiny_job(corrupted["root"], tmp_path, run_name="empty-batch", epochs=1, num_workers=2, batch_size=1,
                   debug_dir=str(debug))
    cfg = replace(cfg, tracking=replace(cfg.tracking, register=False, overlays=0))
    outcome = train_in_process(cfg, tmp_path / "out")
    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    listing = json.loads(Path(client.download_artifacts(outcome.run_id, "data_errors/epoch-000.json",
                                                         str(tmp_path))).read_text())
    skipped = sorted(f"{e['where']}: {e['reason']}" for e in listing["skipped"])
    aside = [e["where"] for e in listing["set_aside"]]
    assert skipped == corrupted["loader_errors"] and len(skipped) == 1
    assert len(aside) == 1 and [e["reason"] for e in listing["set_aside"]] == [SET_ASIDE]
    [aside_metric] = client.get_metric_history(outcome.run_id, "train_set_aside")
    assert aside_metric.value == 1
    seen = [k for r in records(debug, "epoch0-") for k in r["keys"]]
    assert len(records(debug, "epoch0-")) == 2 and not set(aside) & set(seen)
    assert sorted(seen + aside + [e["where"] for e in listing["skipped"]]) == train_keys(root=corrupted["root"])


@pytest.mark.slow
def test_too_many_undecodable_samples_stop_the_run_clearly(
        ray_local: Any, corrupted: dict[str, Any], tmp_path: Path) -> None:
    cfg = tiny_job(corrupted["root"], tmp_path, run_name="too-many", epochs=1, max_failures=0,
                   data={"max_bad_fraction": 0.0})
    # Ray Train raises the worker's error in the driver, its message inside
    with pytest.raises(TrainingFailedError, match=rf"RuntimeError: {corrupted['root']}: 1 undecodable samples "
                                                  r"this epoch, over data\.max_bad_fraction=0\.0"):
        train_in_process(cfg, tmp_path / "out")
    assert not list((tmp_path / "ray_results" / "too-many").glob("checkpoint_*"))  # stopped in epoch 0
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.`tnet.run_name` = 'too-many'")
    assert [r.info.status for r in runs] == ["FAILED"]  # MLflow says so, not RUNNING forever
