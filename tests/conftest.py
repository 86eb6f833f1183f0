"""Shared fixtures: a local S3 server (moto) and a local Ray, both on 127.0.0.1 only.

Both are session-scoped because they take seconds to start; tests isolate themselves by using
their own bucket (``moto_s3.bucket(name)``) or their own output folder.

The repository root goes first on ``sys.path``: pytest puts ``tests/`` there to import this file,
and without the root ahead of it ``import pipeline`` would find ``tests/pipeline/`` as a namespace
package instead of the real one.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Every Ray these tests start (in this process or in subprocesses) stays on 127.0.0.1: without this
# switch Ray replaces 127.0.0.1 with the host's network address so that other nodes could join.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT in sys.path:
    sys.path.remove(ROOT)
sys.path.insert(0, ROOT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server: endpoint, fsspec storage options, and env for subprocesses."""

    endpoint: str
    storage_options: dict[str, Any]
    env: dict[str, str]  # AWS_* variables that point boto/s3fs in a subprocess at this server

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(use_listings_cache=False, **self.storage_options)

    def bucket(self, prefix: str = "test") -> str:
        """Create a fresh bucket and return its ``s3://`` URL (names need >= 3 characters)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.filesystem().mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on 127.0.0.1 (any key/secret accepted), stopped after the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    try:
        yield MotoS3(endpoint=endpoint, storage_options=options, env=env)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A local Ray with 2 CPUs and no dashboard, shared by the session and shut down after it.

    If Ray is already initialised (another fixture or test started it), that instance is used and
    left running.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
