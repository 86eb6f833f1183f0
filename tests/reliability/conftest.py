"""Fixtures of the reliability tests: the fault proxy in front of moto, and storage options for it.

The proxy is module-scoped and reset by each test (fresh seed, rates and counters), so figures are
per test. ``FAST_RETRIES`` are the retry settings the fault tests run with: a read timeout shorter
than the proxy's stall, so a stall costs one second, not the production 30.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.fault_proxy import FaultProxy

STALL_S = 1.5  # longer than the read timeout below: a stall is a timeout, then a retry
FAST_RETRIES = {"attempts": 8, "timeout_s": 1.0}


def proxied_options(proxy: FaultProxy, secret: str = "testing", retries: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec storage options that reach moto through ``proxy`` with the test's retry settings."""
    return {"key": "testing", "secret": secret, "client_kwargs": {"endpoint_url": proxy.endpoint},
            "retries": dict(FAST_RETRIES if retries is None else retries)}


@pytest.fixture(scope="module")
def fault_proxy(moto_s3: Any) -> Iterator[FaultProxy]:
    """The fault proxy forwarding to the session's moto server (127.0.0.1 only), no faults yet."""
    with FaultProxy(moto_s3.endpoint, stall_s=STALL_S) as proxy:
        yield proxy


# A dataset small enough to shard in about a second, with several shards per split.
TINY_OPTIONS = {"n_train": 6, "n_test": 3, "size": 256}
TINY_SHARD_BYTES = 40_000  # ~2 canvases per shard


def tiny_config(dst: str, storage_options: dict[str, Any] | None = None, **changes: Any) -> Any:
    """The ShardConfig of the tiny Megapixel MNIST these tests shard (deterministic bytes)."""
    from pipeline.shard_config import ShardConfig

    fields = {"dataset": "megapixel-mnist", "dst": dst, "source_options": dict(TINY_OPTIONS), "tile": 128,
              "shard_bytes": TINY_SHARD_BYTES, "progress": False, "storage_options": dict(storage_options or {})}
    return ShardConfig(**{**fields, **changes})


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: what "byte-identical dataset" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One uninterrupted, fault-free local run: the bytes every faulted or killed run must match."""
    from pipeline.ray_shard import run_serial, run_sharding

    dst = tmp_path_factory.mktemp("reference") / "ds"
    run_sharding(tiny_config(str(dst)), runner=run_serial)
    return files_of(dst)
