"""Pure shard planning: which record goes into which shard, decided before any pixel is decoded.

Why plan up front: one Ray task per output shard needs its full record list, a re-run must give
the same plan to recognise committed shards, and every shard must mix classes (sources list their
records grouped by class). So the plan is a pure function of the records and three numbers:

1. records are sorted by (split, key), so the source's listing order does not matter;
2. each split is shuffled with its own ``random.Random(f"{seed}/{split}")`` (never the global
   RNG; string seeds are hashed with SHA-512 by ``random``, so they are stable across processes
   and Python runs, and adding a split does not reshuffle another);
3. the shuffled list is cut into ``n = ceil(total / shard_bytes)`` contiguous groups of nearly equal
   estimated bytes. Record i goes to shard ``floor(mid_i * n / total)`` where ``mid_i`` is the
   cumulative estimate at the record's midpoint, so shard sizes differ by at most about one
   record, instead of a greedy cut's tiny last shard. A record's estimate is its ``size_hint``
   (bytes of the source; records without one count as ``default_bytes``) times ``scale``, the
   measured ratio of shard bytes to source bytes (``sharding.calibrate_scale``): a pyramid of
   JPEG tiles is close to its JPEG source, but a generated canvas's raw-pixel hint is 10x too big.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.sources.base import SourceRecord

DEFAULT_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardTask:
    """One output shard: its split, index within the split, and records in write order."""

    split: str
    index: int
    records: tuple[SourceRecord, ...]

    @property
    def name(self) -> str:
        """``{split}/shard-{index:06d}``: the shard's path stem relative to the dataset prefix."""
        return shard_stem(self.split, self.index)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]


def shard_stem(split: str, index: int) -> str:
    """Path of a shard relative to the dataset prefix, without extension."""
    return f"{split}/shard-{index:06d}"


def estimate_bytes(record: SourceRecord, default_bytes: int = DEFAULT_RECORD_BYTES) -> int:
    """Planning estimate of one record's shard bytes (its source size, or a default)."""
    return record.size_hint if record.size_hint > 0 else default_bytes


def plan_shards(
    records: Iterable[SourceRecord],
    shard_bytes: int,
    seed: int,
    default_bytes: int = DEFAULT_RECORD_BYTES,
    scale: float = 1.0,
) -> list[ShardTask]:
    """Shuffle records per split and group them into shards of about ``shard_bytes`` each.

    Returns tasks ordered by (split name, index); indices are 0..n-1 per split with no gaps.

    Raises:
        ValueError: on a non-positive ``shard_bytes`` or a key repeated within a split.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes={shard_bytes}: must be positive")
    if not scale > 0:
        raise ValueError(f"scale={scale}: must be positive")
    by_split: dict[str, list[SourceRecord]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    tasks: list[ShardTask] = []
    for split in sorted(by_split):
        items = sorted(by_split[split], key=lambda r: r.key)
        for a, b in zip(items, items[1:]):
            if a.key == b.key:
                raise ValueError(f"{a.key}: key appears twice in split {split!r} ({a.source}, {b.source})")
        random.Random(f"{seed}/{split}").shuffle(items)
        tasks.extend(_group(split, items, shard_bytes, default_bytes, scale))
    return tasks


def _group(
    split: str, items: list[SourceRecord], shard_bytes: int, default_bytes: int, scale: float
) -> list[ShardTask]:
    sizes = [estimate_bytes(r, default_bytes) * scale for r in items]
    total = sum(sizes)
    n = max(1, math.ceil(total / shard_bytes))
    groups: list[list[SourceRecord]] = [[] for _ in range(n)]
    cumulative = 0
    for record, size in zip(items, sizes):
        mid = cumulative + size / 2
        groups[min(n - 1, int(mid * n // total))].append(record)
        cumulative += size
    non_empty = [g for g in groups if g]  # a record bigger than a shard can leave a gap
    return [ShardTask(split, i, tuple(g)) for i, g in enumerate(non_empty)]
