"""Fixtures of the training tests: the tiny Megapixel MNIST, sharded once per session.

Builders of tiny configs live in tests/fixtures/tiny_mnist.py (the pipeline tests use them too).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_mnist import shard_tiny_mnist


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset's prefix (a local folder), shared read-only by every training test."""
    return shard_tiny_mnist(tmp_path_factory.mktemp("data") / "megapixel-mnist")
