"""MLflow: one run per training job, created by the driver, written to by rank 0 only.

The driver creates the run and passes its id to the workers, so a worker retry or a resumed job
keeps writing to the same run (Ray's ``setup_mlflow`` would start a new one on every retry). Every
URI handed to workers is absolute: Ray workers run in another working directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.storage import redact
from tnet.configtools import flatten, to_dict
from training.config import JobConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the project folder."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"  # absolute for workers
    return uri


@contextmanager
def tracking_uri_scope(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then restore what was there.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment, which
    would leak into everything the process does afterwards (other jobs, tests).
    """
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def config_params(cfg: JobConfig) -> dict[str, str]:
    """The full resolved config as MLflow params, credentials redacted, values within MLflow's limit."""
    data = redact(to_dict(cfg))  # credential-like keys anywhere, and user:password@ in any URL
    return {k: str(v)[:6000] for k, v in flatten(data).items()}


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a new experiment in a SQLite store go beside the database (``<folder>/mlruns``).

    MLflow's default is ``./mlruns`` of the *current directory*: under ``ray job submit`` that is
    the job's temporary copy of the working dir (deleted with it), in tests the project folder.
    Other stores (a tracking server) keep their own default (None).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def find_or_create_run(client: MlflowClient, experiment: str, run_name: str) -> str:
    """The run of this job name (a re-run resumes into it), or a new one."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_location(client.tracking_uri))
    found = client.search_runs([exp_id], filter_string=f"tags.`tnet.run_name` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={"tnet.run_name": run_name})
    return run.info.run_id


class RankZeroTracker:
    """Logs metrics to an existing run; a no-op without a run id (e.g. unit tests of the loop)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.client = MlflowClient(tracking_uri) if tracking_uri and run_id else None
        self.run_id = run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step))
                 for k, v in metrics.items() if isinstance(v, int | float)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """``data`` as a JSON artifact of the run (e.g. the samples an epoch skipped, and why)."""
        if self.client is not None:
            self.client.log_dict(self.run_id, data, artifact_file)
