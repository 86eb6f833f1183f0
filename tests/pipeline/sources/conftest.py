"""Shared fixtures of the source tests: fake datasets written once per module from a fixed seed.

The repository root goes on ``sys.path`` so ``tests.fixtures`` imports under plain ``pytest``
as well as ``python -m pytest`` (no ``pythonpath`` setting in pyproject yet).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh ``memory://`` folder, removed afterwards (the memory filesystem is process-wide)."""
    root = f"memory://sources-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)
