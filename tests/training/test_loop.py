"""``training.driver.train`` end to end on a local Ray with one CPU worker: MLflow, registry, resume.

Every run uses ``train.lr_decay_at=1.0`` (no decay step inside the run): the paper's schedule
decays at 80% of ``train.epochs``, so a 1-epoch run would decay in epoch 0 where a 2-epoch run does
not, and "1 epoch, then resume to 2" would differ from "2 epochs" for a reason that is not resuming.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.loader import split_shards
from pipeline.pyramid import PyramidReader
from tests.conftest import free_port
from tests.fixtures import pool_norms_rank
from tests.fixtures.ray_runs import train_in_process
from tests.fixtures.tiny_mnist import tiny_job
from tnet.model import TNet
from training.config import JobConfig
from training.driver import TrainOutcome
from training.loop import CHECKPOINT_FILE, epoch_quota, epoch_spec, load_state, recalibrate

pytestmark = pytest.mark.slow


POOL_RANK = Path(pool_norms_rank.__file__)
WARMUP = 40  # images: steps of 8 images ramp the rate over 5 steps, past the first epoch's 3


def final_state(outcome: TrainOutcome) -> dict[str, Any]:
    return load_state(os.path.join(outcome.checkpoint, CHECKPOINT_FILE))


@pytest.fixture(scope="module")
def straight(ray_local: Any, tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[JobConfig, TrainOutcome]]:
    """Two epochs without interruption; the learning-rate warm-up runs into the second epoch."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny_job(tiny_mnist, tmp, run_name="straight", epochs=2, lr_decay_at=1.0, warmup_images=WARMUP)
    yield cfg, train_in_process(cfg, tmp / "out")


def test_run_is_tracked_and_registered(straight: tuple[JobConfig, TrainOutcome], tiny_mnist: Path) -> None:
    cfg, outcome = straight
    client = MlflowClient(outcome.tracking_uri)
    mlrun = client.get_run(outcome.run_id)
    assert mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["model.input_size"] == "512" and params["model.backbone"] == "tiny_s"
    assert params["train.epochs"] == "2" and params["data.url"] == str(tiny_mnist)
    for name in ("train_total", "val_accuracy", "train_decoded_pixel_fraction", "train_images_per_s",
                 "train_acc_level1", "val_decoded_pixel_fraction"):
        history = client.get_metric_history(outcome.run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name  # one value per epoch
    fraction = mlrun.data.metrics["train_decoded_pixel_fraction"]
    assert 0.0 < fraction <= 5 / 16  # lazy: top level + tiles under 2 attended patches (test_lazy.py)
    assert client.get_metric_history(outcome.run_id, "step/total")  # step-level metrics too
    lrs = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "step/lr"), key=lambda m: m.step)]
    ramp = [min(1.0, 8 * (i + 1) / WARMUP) * cfg.train.lr for i in range(len(lrs))]
    assert len(lrs) == 6 and lrs == pytest.approx(ramp)  # 8/40 .. 40/40 of lr, then lr
    assert "final_accuracy" in mlrun.data.metrics
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"attention", "confusion_matrix.png", "config.yaml", "last_epoch_metrics.json"} <= artifacts
    pictures = [a.path for a in client.list_artifacts(outcome.run_id, "attention")]
    assert len(pictures) == cfg.tracking.overlays and all(p.endswith(".png") for p in pictures)
    # artifacts live beside the SQLite store, not in the current directory
    assert mlrun.info.artifact_uri.startswith(Path(outcome.tracking_uri.removeprefix("sqlite:///")).parent.as_uri())

    version = client.get_model_version_by_alias(cfg.tracking.model_name, "candidate")
    assert version.run_id == outcome.run_id
    assert outcome.model_uri == f"models:/{cfg.tracking.model_name}@candidate"
    mlflow.set_tracking_uri(outcome.tracking_uri)
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    images = canvases(tiny_mnist, 2)
    predictions = model.predict(images)
    assert len(predictions) == 2
    for probs, boxes in zip(predictions["probabilities"], predictions["boxes"]):
        assert len(probs) == 10 and abs(sum(probs) - 1.0) < 1e-4
        assert np.asarray(boxes).shape == (2, 4)


def test_checkpoint_holds_the_last_epoch(straight: tuple[JobConfig, TrainOutcome], tiny_mnist: Path) -> None:
    cfg, outcome = straight
    state = final_state(outcome)
    assert state["epoch"] == 1 and set(state) == {"model", "optimizer", "loss", "epoch", "metrics"}
    assert outcome.metrics["epoch"] == 1
    shards = [(f"s{i}", 3) for i in range(8)]
    assert epoch_quota(cfg, shards, 1) == 24 and epoch_quota(cfg, shards, 2) == 12
    assert epoch_quota(replace(cfg, train=replace(cfg.train, max_steps_per_epoch=1)), shards, 1) == 8


def test_resume_gives_the_same_model_as_an_uninterrupted_run(
        straight: tuple[JobConfig, TrainOutcome], tiny_mnist: Path, tmp_path: Path) -> None:
    _, uninterrupted = straight
    first = tiny_job(tiny_mnist, tmp_path, run_name="resumed", epochs=1, lr_decay_at=1.0, warmup_images=WARMUP)
    first = replace(first, tracking=replace(first.tracking, register=False, overlays=0))  # saves ~5 s a run
    one = train_in_process(first, tmp_path / "out1")
    assert final_state(one)["epoch"] == 0
    resumed = train_in_process(replace(first, train=replace(first.train, epochs=2)), tmp_path / "out2")
    client = MlflowClient(resumed.tracking_uri)
    # the re-run started at epoch 1: it logged no epoch 0
    assert [m.step for m in client.get_metric_history(resumed.run_id, "train_total")] == [1]
    expected, got = final_state(uninterrupted), final_state(resumed)
    assert got["epoch"] == expected["epoch"] == 1
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert torch.equal(got["loss"]["baseline"], expected["loss"]["baseline"])
    for pid, moments in expected["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(got["optimizer"]["state"][pid][key]), torch.as_tensor(value)), (pid, key)
    assert got["metrics"]["train_total"] == expected["metrics"]["train_total"]


def test_the_checkpoint_holds_norm_statistics_recomputed_after_the_epoch(
        ray_local: Any, tiny_mnist: Path, tmp_path: Path) -> None:
    cfg = tiny_job(tiny_mnist, tmp_path, run_name="recalibrated", recalibrate_norms=16, lr_decay_at=1.0)
    cfg = replace(cfg, tracking=replace(cfg.tracking, register=False, overlays=0))
    state = final_state(train_in_process(cfg, tmp_path / "out"))
    model = TNet(cfg.model)
    model.load_state_dict(state["model"])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    # Recomputed here from the first 16 samples of epoch 0: recalibration ignores what the norms
    # held before, so equal statistics mean the loop recalibrated these weights on these samples.
    shards = split_shards(cfg.data.url, cfg.data.train_split)
    spec = epoch_spec(cfg, shards, epoch_quota(cfg, shards, 1), 0, 1, 0)
    for name, value in model.state_dict().items():
        if "running_mean" in name:
            value.fill_(7.0)  # whatever the norms hold before is forgotten
    with ThreadPoolExecutor(1) as pool:
        recalibrate(model, cfg, spec, pool)
    assert stats and all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in stats.items())


def test_recomputed_norm_statistics_are_pooled_over_the_ranks(tmp_path: Path) -> None:
    """Two gloo ranks on 127.0.0.1 recalibrate on their own batches (two and one); after pooling
    both hold what one process computes from all three, per level, with the batch count."""
    port, world = free_port(), 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(POOL_RANK), str(r), str(world), str(port), str(outs[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()[-3000:]
    expected = pool_norms_rank.recalibrated((0, 1, 2)).state_dict()
    own = pool_norms_rank.recalibrated(pool_norms_rank.BATCHES[0]).state_dict()
    stats = [k for k in expected if "running_" in k]
    assert any(k.startswith("level_norms.l2_") for k in stats)  # the per-level statistics too
    assert not all(torch.allclose(own[k], expected[k], atol=1e-5) for k in stats)  # pooling matters
    for path in outs:
        got = torch.load(path, weights_only=True)
        for k in stats:
            assert torch.allclose(got[k], expected[k], atol=1e-5), k
        counts = [k for k in expected if k.endswith("num_batches_tracked")]
        assert counts and all(int(got[k]) == int(expected[k]) for k in counts)  # 3 batches, not 2
        assert int(got["backbone.s1.1.num_batches_tracked"]) == 3


def canvases(url: Path, n: int) -> np.ndarray:
    """``n`` test canvases as uint8 (n, 512, 512), fully decoded from the shards (small images)."""
    images = []
    for shard in sorted((url / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".tif") and len(images) < n:
                    data = tar.extractfile(member)
                    assert data is not None
                    images.append(PyramidReader(data.read()).read_level(0))
    return np.stack(images)
