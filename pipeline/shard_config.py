"""The sharding job's one frozen config, its validation, and what of it defines the output bytes.

Why split "output" from "run" fields: dataset.json records the config that produced the data, two
runs with the same output config must give byte-identical datasets, and a re-run may resume a
dataset with a different number of workers or a different Ray address. So only ``OUTPUT_FIELDS``
go into dataset.json and into each shard's fingerprint; ``dst``, credentials and run settings do not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import redact
from tnet.configtools import to_dict

FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 512 << 20
OUTPUT_FIELDS = (
    "dataset",
    "src",
    "splits",
    "source_options",
    "tile",
    "quality",
    "max_side",
    "max_pixels",
    "shard_bytes",
    "calibrate",
    "seed",
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """``"512MB"`` -> 512_000_000, ``"1GiB"`` -> 2**30, ``"200k"`` -> 200_000, ``4096`` -> 4096.

    SI prefixes (k, M, G, T, optional B) are powers of 1000; binary ones (KiB, MiB, GiB, TiB) of 1024.

    Raises:
        ValueError: on anything else, naming the text.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"size={text!r}: expected a byte count like 512MB, 1GiB, 200k or 4096")
    number, prefix, binary = match.groups()
    if binary and not prefix:
        raise ValueError(f"size={text!r}: 'i' needs a prefix (KiB, MiB, GiB)")
    base = 1024 if binary else 1000
    return int(float(number) * base ** _UNITS[prefix.lower()])


@dataclass(frozen=True)
class ShardConfig:
    """Everything ``jobs/shard.py`` needs. Ray tasks receive ``to_dict(cfg)`` and rebuild it."""

    dataset: str = "megapixel-mnist"  # source name in pipeline.sources' registry
    src: str = ""  # raw dataset root (local path or URL); generated datasets need none
    dst: str = ""  # output prefix (local path, file:// or s3://)
    splits: tuple[str, ...] = ()  # empty: every split the source has
    source_options: dict[str, Any] = field(default_factory=dict)  # passed to the source (n_train=20)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # fsspec options for dst (secret!)
    tile: int = 256  # pyramid tile side; 128-512, a multiple of 16 (JPEG MCU, TIFF tiles)
    quality: int = 90  # JPEG quality of every tile
    max_side: int = 0  # downscale (antialiased) so the longer side is at most this; 0 keeps size
    max_pixels: int = 400_000_000  # decompression-bomb limit on source pixels (W*H), checked before decode
    shard_bytes: int = DEFAULT_SHARD_BYTES  # target shard size, estimated from source sizes
    calibrate: int = 8  # records built on the driver to scale source sizes to shard bytes; 0 = off
    seed: int = 0  # shuffles samples across shards; recorded in dataset.json
    workers: int = 0  # local Ray CPUs; 0 = all cores. Ignored when joining a cluster
    task_cpus: float = 1.0  # CPUs Ray reserves per shard task
    max_retries: int = 2  # Ray retries of a failed shard task (crash or storage error)
    verify: str = "sha256"  # on resume, how a committed shard is trusted: "size", or "sha256" (re-reads it)
    address: str = ""  # Ray cluster address; "" = RAY_ADDRESS or a new local Ray
    overwrite: bool = False  # replace a dataset at dst built with a different config
    progress: bool = True  # tqdm progress bar on the driver

    def __post_init__(self) -> None:
        checks = [
            ("dataset", bool(self.dataset), "must name a source"),
            ("dst", bool(self.dst), "must be a path or URL"),
            ("tile", 16 <= self.tile <= 4096 and self.tile % 16 == 0, "must be a multiple of 16 in [16, 4096]"),
            ("quality", 1 <= self.quality <= 100, "must be in [1, 100]"),
            ("max_side", self.max_side == 0 or self.max_side >= 16, "must be 0 (keep) or >= 16"),
            ("max_pixels", self.max_pixels > 0, "must be positive"),
            ("shard_bytes", self.shard_bytes > 0, "must be positive"),
            ("calibrate", self.calibrate >= 0, "must be >= 0 (0 = off)"),
            ("workers", self.workers >= 0, "must be >= 0 (0 = all cores)"),
            ("task_cpus", self.task_cpus > 0, "must be positive"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("verify", self.verify in ("size", "sha256"), "must be 'size' or 'sha256'"),
        ]
        for name, ok, reason in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {reason}")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits={list(self.splits)!r}: repeated split")
        for split in self.splits:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", split):
                raise ValueError(f"splits={split!r}: split names are [A-Za-z0-9_-]+ (they become folders)")


def output_config(cfg: ShardConfig) -> dict[str, Any]:
    """The fields that define the dataset's bytes, as plain data (what dataset.json records).

    Credential-like values (in ``source_options`` or a URL's ``user:password@``) are redacted, so
    rotating a key neither leaks it nor makes committed shards look stale.
    """
    data = to_dict(cfg)
    return redact({name: data[name] for name in OUTPUT_FIELDS})


def fingerprint(cfg: ShardConfig) -> str:
    """sha256 of the output config and format version: a shard written under another is stale."""
    text = json.dumps({"format_version": FORMAT_VERSION, **output_config(cfg)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
