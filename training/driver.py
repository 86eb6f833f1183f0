"""The driver side of a training job: Ray Train set-up, then evaluation, pictures and registry.

Three levels kept apart (as in Ray Train's examples): data and model code (pipeline/, tnet/), the
worker function (training/loop.py), and this driver that builds ``ScalingConfig`` and
``TorchTrainer``, creates the MLflow run and registers the model when training is done.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from tnet.configtools import to_dict
from tnet.model import TNet
from training.config import JobConfig
from training.evaluation import evaluate_loader
from training.loop import CHECKPOINT_FILE, load_state, train_loop_per_worker
from training.pictures import confusion_png, write_overlays
from training.pyfunc import log_pyfunc
from training.tracking import config_params, find_or_create_run, resolve_tracking_uri, tracking_uri_scope

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    model_uri: str | None
    checkpoint: str
    metrics: dict[str, Any]
    test_accuracy: float
    decoded_pixel_fraction: float
    pictures: list[str]


def absolute(url: str) -> str:
    """Workers run elsewhere: make local paths absolute, leave URLs alone."""
    return url if "://" in url else str(Path(url).resolve())


def resolved(cfg: JobConfig) -> JobConfig:
    debug = absolute(cfg.train.debug_dir) if cfg.train.debug_dir else None
    return replace(cfg, data=replace(cfg.data, url=absolute(cfg.data.url)),
                   train=replace(cfg.train, storage_path=absolute(cfg.train.storage_path), debug_dir=debug))


def class_names(cfg: JobConfig) -> list[str]:
    from pipeline.dataset_files import read_dataset_json

    meta = read_dataset_json(cfg.data.url, cfg.data.storage_options)
    names = list(meta.get("classes") or [])
    return names if len(names) == cfg.model.num_classes else [str(i) for i in range(cfg.model.num_classes)]


def fit(cfg: JobConfig, tracking_uri: str, run_id: str) -> Any:
    """Run Ray Train; a re-run with the same run_name and storage_path resumes from its checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                            resources_per_worker={"CPU": cfg.train.cpus_per_worker})
    run = RunConfig(name=cfg.train.run_name, storage_path=cfg.train.storage_path,
                    failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=scaling, run_config=run,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )
    return trainer.fit()


def finalize(cfg: JobConfig, checkpoint_dir: str, tracking_uri: str, run_id: str, out_dir: Path) -> TrainOutcome:
    """Evaluate the final model on the validation split, draw attention, log and register it."""
    state = load_state(os.path.join(checkpoint_dir, CHECKPOINT_FILE))
    model = TNet(cfg.model)
    model.load_state_dict(state["model"])
    names = class_names(cfg)
    with ThreadPoolExecutor(cfg.data.decode_threads) as pool:
        result = evaluate_loader(model, cfg, cfg.data.val_split, pool, limit=cfg.data.val_samples,
                                 keep_examples=cfg.tracking.overlays)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = write_overlays(result.examples, names, out_dir / "attention")
    confusion = confusion_png(result.confusion, names, out_dir / "confusion_matrix.png")
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    summary = result.summary()
    (out_dir / "evaluation.json").write_text(json.dumps(summary, indent=2))

    client = MlflowClient(tracking_uri)
    model_uri = None
    with tracking_uri_scope(tracking_uri), mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"final_{k}": v for k, v in summary.items()})
        mlflow.log_artifacts(str(out_dir / "attention"), "attention")
        mlflow.log_artifact(str(confusion))
        mlflow.log_artifact(str(out_dir / "config.yaml"))
        mlflow.log_dict(state["metrics"], "last_epoch_metrics.json")
        if cfg.tracking.register:
            example = np.stack([ex.base_view for ex in result.examples[:2]]) if result.examples else None
            with tempfile.TemporaryDirectory() as tmp:
                info = log_pyfunc(model, Path(tmp), registered_name=cfg.tracking.model_name, example=example)
            version = info.registered_model_version
            client.set_registered_model_alias(cfg.tracking.model_name, "candidate", str(version))
            client.set_model_version_tag(cfg.tracking.model_name, str(version), "val_accuracy",
                                         f"{summary['accuracy']:.6f}")
            model_uri = f"models:/{cfg.tracking.model_name}@candidate"
    client.set_terminated(run_id)
    return TrainOutcome(run_id, tracking_uri, model_uri, checkpoint_dir, state["metrics"], summary["accuracy"],
                        summary["decoded_pixel_fraction"], [str(p) for p in pictures])


def train(cfg: JobConfig, out_dir: Path) -> TrainOutcome:
    cfg = resolved(cfg)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id = find_or_create_run(client, cfg.tracking.experiment, cfg.train.run_name)
    client.update_run(run_id, status="RUNNING")  # a resumed run that had failed runs again
    logged = client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in config_params(cfg).items() if k not in logged]
    for i in range(0, len(fresh), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=fresh[i : i + 100])
    try:  # Ray Train raises from fit() when the workers fail for good; either way MLflow must say so
        result = fit(cfg, tracking_uri, run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    if result.error:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run {cfg.train.run_name} failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.train.run_name}: no checkpoint was reported")
    with result.checkpoint.as_directory() as ckpt:
        return finalize(cfg, ckpt, tracking_uri, run_id, out_dir)
