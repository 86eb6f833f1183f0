"""The dataset-level files at a shard prefix: manifest.parquet, rejects.parquet and dataset.json.

``dataset.json`` is written last and removed first: its presence means every shard, the manifest
and the rejects table are complete (the mosaicml/streaming habit). It carries ``format_version``;
``read_dataset_json`` refuses versions it does not know rather than misreading them. Nothing here
holds a timestamp or a destination URL, so two runs of the same config give byte-identical files.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DatasetError, FormatError
from pipeline.plan import ShardTask
from pipeline.shard_config import FORMAT_VERSION, ShardConfig, output_config
from pipeline.storage import TMP_DIR, clean_tmp, exists, join, open_url, write_atomic

DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
SUPPORTED_VERSIONS = (FORMAT_VERSION,)
_SHARD_FILE = re.compile(r"^shard-\d{6}\.(tar|json)$")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("shard", pa.string()),  # tar path relative to the dataset prefix
        ("offset", pa.int64()),  # byte offset of the .tif member's data in the tar
        ("size", pa.int64()),  # bytes of the .tif member's data
        ("header_offset", pa.int64()),  # byte offset of the .tif member's tar header
        ("width", pa.int32()),  # stored level-0 width (after any max_side downscale)
        ("height", pa.int32()),
        ("source", pa.string()),  # source path/URL of the input
        ("sha256", pa.string()),  # sha256 of the source bytes (or generated pixels)
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),  # short stable phrase, the group key of summaries
        ("detail", pa.string()),
        ("key", pa.string()),  # empty for inputs rejected while listing
    ]
)


def tool_version() -> str:
    """The installed gigatnet version (recorded in dataset.json)."""
    try:
        return metadata.version("gigatnet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def table_bytes(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> bytes:
    """Parquet bytes of ``rows`` under ``schema`` (no pandas metadata, deterministic)."""
    columns = {name: [row.get(name, "") for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def dataset_record(
    cfg: ShardConfig,
    source_info: Mapping[str, Any],
    splits: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    rejects: Sequence[Mapping[str, Any]],
    shards: Sequence[tuple[str, str | None, int]],
) -> dict[str, Any]:
    """The content of dataset.json.

    ``source_info`` has ``classes``, ``channels`` and ``describe`` (the source's own parameters);
    ``shards`` is ``(split, tar path or None, bytes)`` per planned shard in order.
    """
    counts = Counter(row["split"] for row in rows)
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.dataset,
        "classes": list(source_info["classes"]),
        "channels": source_info["channels"],
        "counts": {split: counts.get(split, 0) for split in splits},
        "samples": len(rows),
        "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejected": len(rejects),
        "shards": {split: [p for s, p, _ in shards if s == split and p is not None] for split in splits},
        "bytes": sum(b for _, _, b in shards),
        "manifest": MANIFEST,
        "rejects_table": REJECTS,
        "seed": cfg.seed,
        "config": output_config(cfg),
        "source": source_info["describe"],
        "tool": {"name": "gigatnet", "version": tool_version()},
    }


def write_dataset_files(
    cfg: ShardConfig,
    record: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    rejects: Sequence[Mapping[str, Any]],
) -> None:
    """Commit manifest.parquet, rejects.parquet, then dataset.json (last), each atomically."""
    fs, root = open_url(cfg.dst, cfg.storage_options)
    write_atomic(fs, join(root, MANIFEST), table_bytes(rows, MANIFEST_SCHEMA), root)
    write_atomic(fs, join(root, REJECTS), table_bytes(rejects, REJECTS_SCHEMA), root)
    text = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    write_atomic(fs, join(root, DATASET_JSON), text.encode("utf-8"), root)
    clean_tmp(fs, root)


def read_dataset_json(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read ``dataset.json`` at a dataset prefix (or its own URL) and check its format version.

    Raises:
        DatasetError: no dataset.json there (the dataset is missing or still being written).
        FormatError: unparsable JSON, or a ``format_version`` this code does not know.
    """
    fs, path = open_url(url, storage_options)
    if not path.endswith(DATASET_JSON):
        path = join(path, DATASET_JSON)
    if not exists(fs, path):
        raise DatasetError(f"{url}: no {DATASET_JSON} (not a dataset, or not completely written yet)")
    try:
        data = json.loads(fs.cat_file(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{url}: {DATASET_JSON} is not valid JSON ({exc})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(
            f"{url}: {DATASET_JSON} has format_version={version!r}; this reader knows "
            f"{list(SUPPORTED_VERSIONS)} (upgrade gigatnet or re-shard)"
        )
    return data


def prepare_dst(cfg: ShardConfig, tasks: Iterable[ShardTask]) -> None:
    """Make ``cfg.dst`` ready for a run: check an existing dataset, mark it incomplete, tidy up.

    An existing complete dataset with the same output config is resumed (its shards verify and
    are skipped); one with a different config is refused unless ``cfg.overwrite``. Then
    dataset.json is removed (a running job means an incomplete dataset), the temporary area of
    interrupted writes is emptied, and shard files that the plan does not name are deleted
    (leftovers of a previous plan would otherwise sit beside the new shards).

    Raises:
        DatasetError: dst holds a dataset made with another config and ``overwrite`` is false.
    """
    fs, root = open_url(cfg.dst, cfg.storage_options)
    path = join(root, DATASET_JSON)
    if exists(fs, path):
        try:
            old = json.loads(fs.cat_file(path)).get("config")
        except (ValueError, AttributeError):
            old = None
        new = output_config(cfg)
        if old != new and not cfg.overwrite:
            differs = sorted(k for k in new if not isinstance(old, dict) or old.get(k) != new[k])
            raise DatasetError(
                f"{cfg.dst}: holds a dataset built with a different config (differs in: "
                f"{', '.join(differs) or 'format'}); pass --overwrite to replace it"
            )
        fs.rm(path)
    clean_tmp(fs, root)
    planned = {f"{t.name}.tar" for t in tasks} | {f"{t.name}.json" for t in tasks}
    for rel in _shard_files(fs, root):
        if rel not in planned:
            fs.rm(join(root, rel))


def _shard_files(fs: Any, root: str) -> list[str]:
    """``{split}/shard-NNNNNN.{tar,json}`` paths (relative) that exist under ``root``."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    out = []
    for path in fs.find(root, maxdepth=2):
        rel = path[len(root) :].strip("/")
        parts = rel.split("/")
        if len(parts) == 2 and parts[0] != TMP_DIR and _SHARD_FILE.match(parts[1]):
            out.append(rel)
    return sorted(out)
