"""Credentials given by environment, config or ``--storage-option`` never reach logs, MLflow params,
dataset.json or exception messages, including the errors of a store that is down."""

from __future__ import annotations

import dataclasses
import logging
import traceback
import uuid
from typing import Any

import pytest

from pipeline.ray_shard import run_serial, run_sharding
from pipeline.shard_config import ShardConfig
from pipeline.storage import StorageError, redact, storage_errors
from tests.reliability.conftest import proxied_options, tiny_config
from tests.reliability.fault_proxy import FaultProxy
from training.config import DataConfig, JobConfig
from training.tracking import config_params

pytestmark = pytest.mark.slow


def secret() -> str:
    return f"SeCrEt{uuid.uuid4().hex}"


def everything_in(moto_s3: Any, url: str) -> bytes:
    fs = moto_s3.filesystem()
    root = url.removeprefix("s3://")
    return b"".join(fs.cat_file(p) for p in sorted(fs.find(root)))


@pytest.mark.parametrize("via", ["config", "environment"])
def test_sharding_to_s3_never_writes_or_logs_the_secret(
    via: str, moto_s3: Any, fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    word = secret()
    url = f"{moto_s3.bucket('secrets')}/ds"
    if via == "config":  # what --storage-option secret=... and a YAML config both produce
        options = proxied_options(fault_proxy, secret=word)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", word)
        options = {"client_kwargs": {"endpoint_url": fault_proxy.endpoint}, "retries": {"attempts": 8, "timeout_s": 1}}
    fault_proxy.reset({"error": 0.05, "drop": 0.05}, seed=11)  # retries log too
    caplog.set_level(logging.DEBUG, logger="pipeline")
    caplog.set_level(logging.INFO)
    summary = run_sharding(tiny_config(url, options), runner=run_serial)
    out = capsys.readouterr()
    assert word not in out.out + out.err + caplog.text + summary.format()
    assert word.encode() not in everything_in(moto_s3, url)  # dataset.json, indexes, manifest, shards


def test_errors_of_a_dead_store_do_not_carry_the_secret(moto_s3: Any, fault_proxy: FaultProxy) -> None:
    word = secret()
    url = f"{moto_s3.bucket('secrets-down')}/ds"
    fault_proxy.reset(seed=12)
    fault_proxy.down = True
    cfg = tiny_config(url, proxied_options(fault_proxy, secret=word, retries={"attempts": 1, "timeout_s": 1}))
    with pytest.raises(StorageError) as caught:
        run_sharding(cfg, runner=run_serial)
    text = "".join(traceback.format_exception(caught.value))  # the chained botocore error too
    assert word not in text


def test_storage_errors_redact_urls_and_messages() -> None:
    with pytest.raises(StorageError) as caught, storage_errors("s3://AKID:hunter2@bucket/x"):
        raise ConnectionError("could not reach https://AKID:hunter2@host/x")
    assert "hunter2" not in str(caught.value) and "s3://***@bucket/x" in str(caught.value)


def test_mlflow_params_hold_no_credential() -> None:
    word = secret()
    options = {"key": "AKIDEXAMPLE", "secret": word, "token": word, "client_kwargs": {
        "endpoint_url": f"http://minio:{word}@127.0.0.1:9000", "aws_secret_access_key": word}}
    params = config_params(JobConfig(data=DataConfig(url=f"s3://u:{word}@bucket/ds", storage_options=options)))
    assert params and not [k for k, v in params.items() if word in v]
    assert redact({"retries": {"attempts": 3}}) == {"retries": {"attempts": 3}}  # settings stay readable



def test_config_reprs_hold_no_credential() -> None:
    """A config printed in a log line or a traceback must not show the storage options."""
    secret = "wJalrXUtnFEMI-REPR-SECRET"
    assert secret not in repr(DataConfig(url="s3://bucket/data", storage_options={"secret": secret}))
    shard_field = next(f for f in dataclasses.fields(ShardConfig) if f.name == "storage_options")
    assert shard_field.repr is False
