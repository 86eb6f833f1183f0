"""The MLflow server of infra/mlflow, started here with the manifests' own command line.

No containers here, so the test runs what the pod runs: the Deployment's command and args from
infra/mlflow/k8s/mlflow.yaml, ``$(VAR)`` filled from the same variables the pod gets (PostgreSQL
credentials, artifact destination, S3 endpoint), only --host and --port changed to a free port on
127.0.0.1. Behind it: a throwaway PostgreSQL from the machine's binaries and moto's S3 server.
A short real training run (training.driver.train on the tiny Megapixel MNIST) then logs to it and
registers a model, whose files must land in S3 and load back through the server.

Needs PostgreSQL's server binaries (Debian: apt-get install -y postgresql); skipped without them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.fixtures.tiny_mnist import shard_tiny_mnist, tiny_job
from tests.infra.mlflow_command import expand, k8s_command, k8s_container, with_option
from tests.infra.pg_server import DATABASE, INSTALL_HINT, USER, PgServer, find_bin_dir, free_port

pytestmark = pytest.mark.slow
MODEL = "tnet-infra"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PgServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found; install them: {INSTALL_HINT}")
    server = PgServer.start(bin_dir)
    try:
        yield server
    finally:
        server.stop()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def artifacts_root(moto_s3) -> str:
    return f"{moto_s3.bucket('mlflow')}/artifacts"


@pytest.fixture(scope="module")
def mlflow_server(postgres, moto_s3, artifacts_root, tmp_path_factory) -> Iterator[str]:
    """URL of `mlflow server` started from the Deployment's command line; stopped after the module."""
    env = {  # what the pod's env gives the command, pointed at this machine's servers
        "POSTGRES_USER": USER, "POSTGRES_PASSWORD": postgres.password, "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(postgres.port), "POSTGRES_DB": DATABASE, "MLFLOW_ARTIFACTS_DESTINATION": artifacts_root,
        "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    }
    assert set(env) == {e["name"] for e in k8s_container()["env"]}, "the pod gets other variables than this test"
    port = free_port()
    argv = with_option(with_option(expand(k8s_command(), env), "--host", "127.0.0.1"), "--port", str(port))
    assert argv[:2] == ["mlflow", "server"]
    argv[0] = str(Path(sys.executable).with_name("mlflow"))
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))} | env
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers: the session we started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def restore_tracking_uri() -> Iterator[None]:
    """mlflow.set_tracking_uri (called by the driver) also sets MLFLOW_TRACKING_URI: undo both."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.mark.parametrize(("host", "status"), [
    ("mlflow:5000", 200),  # MLFLOW_TRACKING_URI of the Ray pods (tnet-config)
    ("mlflow.tnet.svc.cluster.local:5000", 200),
    ("localhost:5000", 200),  # kubectl port-forward
    ("attacker.example.com", 403),  # DNS rebinding is still refused
])
def test_server_accepts_in_cluster_host_names_only(mlflow_server, host, status):
    response = requests.get(f"{mlflow_server}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            headers={"Host": host}, timeout=30)
    assert response.status_code == status, response.text[:300]


def test_server_keeps_its_tables_in_postgres(mlflow_server, postgres):
    tables = {row[0] for row in postgres.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"experiments", "runs", "metrics", "registered_models", "model_versions"} <= tables


def test_training_run_logs_to_the_server_and_registers_a_model(mlflow_server, postgres, moto_s3, artifacts_root,
                                                               ray_local, tmp_path, restore_tracking_uri):
    from training.driver import train

    data = shard_tiny_mnist(tmp_path / "megapixel-mnist")
    job = tiny_job(data, tmp_path, run_name="infra-e2e")
    job = replace(job, tracking=replace(job.tracking, tracking_uri=mlflow_server, experiment="infra", model_name=MODEL))
    outcome = train(job, tmp_path / "out")

    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.run_name"] == "infra-e2e" and "final_accuracy" in run.data.metrics
    assert outcome.model_uri == f"models:/{MODEL}@candidate"
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert version.run_id == outcome.run_id
    assert postgres.execute(f"SELECT count(*) FROM model_versions WHERE name = '{MODEL}'") == [(1,)]

    stored = moto_s3.filesystem().find(artifacts_root.removeprefix("s3://"))
    assert any(p.endswith("/MLmodel") for p in stored) and any(p.endswith("/weights.pt") for p in stored)
    assert any(p.endswith("/confusion_matrix.png") for p in stored)

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(outcome.model_uri)  # downloaded through the server from S3
    canvas = np.zeros((1, 512, 512), dtype=np.uint8)
    prediction = model.predict(canvas)
    assert len(prediction) == 1 and 0 <= int(prediction["prediction"][0]) < job.model.num_classes
