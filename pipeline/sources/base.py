"""What every dataset source yields: records to shard, or rejects.

A source lists its inputs cheaply (no decoding) as ``SourceRecord``s in a deterministic order,
and decodes one record on demand with ``load``. Anything wrong with one input becomes a
``SampleError`` (raised by ``load``) or a ``Reject`` (yielded by ``records``), never a crash.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class SourceRecord:
    """One future sample. ``key`` is the sample's name from source file to batch (no dots)."""

    key: str
    split: str
    source: str  # path or URL of the input (or a generator URI such as megapixel-mnist://train/17)
    label: int
    label_name: str
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable dataset fields
    size_hint: int = 0  # bytes of the source, for planning shard sizes before decoding

    def __post_init__(self) -> None:
        if not KEY_PATTERN.match(self.key):
            raise ValueError(f"key={self.key!r}: keys are [A-Za-z0-9_-]+ (webdataset splits on dots)")


@dataclass(frozen=True)
class Reject:
    """An input that cannot become a sample, with a clear reason."""

    source: str
    reason: str
    split: str = ""
    detail: str = ""


@dataclass
class LoadedSample:
    """A decoded record: pixels plus metadata to store beside the pyramid."""

    image: np.ndarray  # (H, W) uint8 for single-channel datasets, (H, W, 3) uint8 otherwise
    meta: dict[str, Any]  # record.meta plus whatever decoding learnt (warnings, real size)
    sha256: str  # checksum of the source bytes (or of the generated pixels)


class Source(Protocol):
    """A dataset reader. ``classes`` is the class list in index order."""

    name: str
    classes: list[str]
    channels: int  # 1 or 3: what the pyramid stores and the model reads

    def records(self, splits: list[str]) -> Iterator[SourceRecord | Reject]: ...

    def load(self, record: SourceRecord) -> LoadedSample: ...

    def describe(self) -> dict[str, Any]:
        """Parameters to record in dataset.json (generator seed, options)."""
        ...
