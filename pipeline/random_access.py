"""``access: random``: samples addressed through the manifest and read by ranged requests.

Streaming mode reads every byte of every shard; a 2 GB slide of which the model looks at a few
tiles makes that absurd. In random mode a loader slot gets manifest rows instead of shards: its
share of the split (rows ``slot, slot + S, ...`` of an order shuffled per epoch with the run's
seed, as streaming mode shuffles shards), and for each it opens the ``.tif`` member where it lies
(``ranged.MemberRef``). The base view then costs the pyramid header plus the coarse tiles it
covers; the model's regions cost their tiles (``PyramidReader(defer_index=True)`` leaves the
tile index of unused fine levels unread).

The ``.json`` member (object boxes for the training crop) follows the ``.tif`` member in the tar
(``docs/format.md``): its header is read with one small ranged request, only when boxes matter.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline.dataset_files import MANIFEST, read_dataset_json
from pipeline.errors import FormatError, PipelineError
from pipeline.ranged import ByteCounter, MemberRef, RangedFile
from pipeline.storage import join, open_url
from pipeline.tarshard import BLOCK, parse_member_header

JSON_PEEK = 4096  # bytes of the .json member fetched with its header; most are smaller


@dataclass(frozen=True)
class Row:
    """One manifest row as the random-access loader needs it."""

    key: str
    label: int
    ref: MemberRef


def manifest_rows(url: str, split: str, storage_options: dict[str, Any] | None = None) -> list[Row]:
    """The split's samples from ``manifest.parquet``, sorted by key; refuses unknown formats.

    Raises:
        PipelineError: no dataset.json, an unknown format version, or an empty split.
    """
    read_dataset_json(url, storage_options)
    fs, root = open_url(url, storage_options)
    with fs.open(join(root, MANIFEST), "rb") as f:
        table = pq.read_table(f, columns=["key", "split", "label", "shard", "offset", "size"])
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    options = dict(storage_options or {})
    rows = [Row(k, int(lab), MemberRef(url, shard, int(off), int(size), options))
            for k, s, lab, shard, off, size in zip(cols["key"], cols["split"], cols["label"], cols["shard"],
                                                   cols["offset"], cols["size"]) if s == split]
    if not rows:
        raise PipelineError(f"{url}: split {split!r} has no samples")
    return sorted(rows, key=lambda r: r.key)


def slot_rows(rows: list[Row], slot: int, slots: int, rng: random.Random, shuffle: bool) -> list[Row]:
    """The rows one (rank, loader worker) slot reads this epoch: a shuffled (or not) stride."""
    order = list(rows)
    if shuffle:
        rng.shuffle(order)
    return order[slot::slots]


def cycle(rows: list[Row], quota: int) -> Iterator[Row]:
    """``quota`` rows, wrapping around the slot's list (every rank makes the same number of steps)."""
    if not rows:
        return
    for i in range(quota):
        yield rows[i % len(rows)]


def read_json_member(ref: MemberRef, key: str, counter: ByteCounter) -> dict[str, Any]:
    """The sample's ``.json`` member, located right after its ``.tif`` member in the tar.

    Raises:
        FormatError: the next member is not ``{key}.json`` or is not JSON.
    """
    start = ref.offset + ref.size + (-ref.size % BLOCK)
    f = RangedFile(*_fs_path(ref), start, BLOCK + JSON_PEEK, counter=counter)
    head = f.read(BLOCK + JSON_PEEK)
    name, size = parse_member_header(head[:BLOCK], f"{ref.url}/{ref.shard}")
    if name != f"{key}.json":
        raise FormatError(f"{ref.url}/{ref.shard}: member after {key}.tif is {name!r}, not {key}.json")
    body = head[BLOCK:BLOCK + size]
    if len(body) < size:
        rest = RangedFile(*_fs_path(ref), start + BLOCK + len(body), size - len(body), counter=counter)
        body += rest.read()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{ref.url}/{ref.shard}: {key}.json is not JSON ({exc})") from None


def _fs_path(ref: MemberRef) -> tuple[Any, str]:
    fs, root = open_url(ref.url, ref.storage_options)
    return fs, join(root, ref.shard)
