"""Write one output shard: decode each record, build its pyramid, commit the tar and its index.

No Ray here (``pipeline/ray_shard.py`` is the glue), so a test runs ``write_shard`` in-process.

Per record: ``source.load`` -> decompression-bomb check -> optional antialiased downscale to
``max_side`` -> ``build_pyramid`` -> members ``{key}.tif``, ``{key}.json``, ``{key}.cls``. A
``SampleError`` becomes a reject row with its reason; any other exception raised while turning one
record into a sample becomes a reject whose reason names the exception type. Either way the shard
goes on: every input ends as exactly one manifest row or one reject row. A source that streams
(``load_stream``, gigapixel inputs) hands over bands instead: the pyramid is built into a
temporary file by ``streaming.build_pyramid_file`` and copied into the tar in chunks.

Commit protocol (resumability): the tar is written to a temporary key, its sha256 computed from
the bytes on their way out and its stored size checked, then committed atomically. It is not read
back: on a local disk that would re-read the page cache, and on S3 botocore by default sends a CRC
of every part, which the store checks; the read would cost one more pass over every byte. Only then
the shard's index ``{split}/shard-{i:06d}.json`` (fingerprint of the output config, input keys,
the tar's size and sha256, its manifest rows and rejects) is committed the same way. A re-run
skips a shard whose index matches the task and whose tar verifies (its size, and with
``verify="sha256"``, the default, the sha256 of the stored bytes read back), and rebuilds the
manifest from the indexes. A shard whose inputs were all rejected gets no tar (an empty tar must
not pose as data); its index says ``"shard": null`` and lists the rejects.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import SampleError
from pipeline.plan import ShardTask, estimate_bytes
from pipeline.pyramid import PyramidReader, build_pyramid
from pipeline.shard_config import FORMAT_VERSION, ShardConfig, fingerprint
from pipeline.sources.base import LoadedSample, Source, SourceRecord
from pipeline.storage import atomic_writer, exists, file_sha256, join, open_url, write_atomic
from pipeline.streamed_sample import FileMember, StreamedSample
from pipeline.streaming import build_pyramid_file
from pipeline.tarshard import TarShardWriter

MANIFEST_COLUMNS = (
    "key", "split", "label", "label_name", "shard", "offset", "size", "header_offset",
    "width", "height", "source", "sha256",
)  # fmt: skip
REJECT_COLUMNS = ("key", "source", "split", "reason", "detail")


@dataclass
class ShardResult:
    """What one shard task produced (or found already committed)."""

    split: str
    index: int
    shard: str | None  # tar path relative to the dataset prefix; None when every input was rejected
    sha256: str
    bytes: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # manifest rows, in tar order
    rejects: list[dict[str, Any]] = field(default_factory=list)
    source_pixels: int = 0  # pixels decoded from the source (before any downscale)
    skipped: bool = False  # True: found committed and verified, nothing rewritten
    seconds: float = 0.0  # wall time of this task (not persisted: output stays time-free)
    cpu_seconds: float = 0.0  # CPU time of this task's process during the task (not persisted)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, NaN refused, numpy converted.

    Raises:
        TypeError, ValueError: a value JSON cannot represent.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default).encode("utf-8")  # fmt: skip


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def reject_row(record: SourceRecord, reason: str, detail: str = "") -> dict[str, Any]:
    return {"key": record.key, "source": record.source, "split": record.split, "reason": reason,
            "detail": detail[:2000]}  # fmt: skip


def downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """Resize so the longer side is ``max_side`` (aspect kept), antialiased; unchanged if smaller."""
    h, w = image.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return image
    from PIL import Image  # local import: only the downscale path needs Pillow here

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _check_pixels(record: SourceRecord, image: np.ndarray, max_pixels: int) -> None:
    if image.ndim not in (2, 3) or image.dtype != np.uint8 or (image.ndim == 3 and image.shape[2] != 3):
        raise SampleError(record.source, "unsupported mode", f"array {image.dtype} {image.shape}")
    pixels = int(image.shape[0]) * int(image.shape[1])
    if pixels > max_pixels:
        raise SampleError(record.source, "decompression bomb", f"{pixels} pixels > max_pixels={max_pixels}")


def _declared_pixels(record: SourceRecord) -> int:
    """Pixels a record declares before decoding (width/height in its meta), else 0."""
    w, h = record.meta.get("width"), record.meta.get("height")
    return w * h if isinstance(w, int) and isinstance(h, int) else 0


def build_members(
    record: SourceRecord, sample: LoadedSample, cfg: ShardConfig
) -> tuple[list[tuple[str, bytes]], dict[str, Any], int]:
    """The three members of one sample, its manifest fields and its source pixel count.

    Raises:
        SampleError: too many pixels, an unsupported array, or metadata JSON cannot hold.
    """
    image = sample.image
    _check_pixels(record, image, cfg.max_pixels)
    src_h, src_w = image.shape[:2]
    image = downscale(image, cfg.max_side)
    height, width = image.shape[:2]
    tif = build_pyramid(image, tile=cfg.tile, quality=cfg.quality)
    levels = PyramidReader(tif).levels
    info: dict[str, Any] = {
        "key": record.key,
        "source": record.source,
        "sha256": sample.sha256,
        "split": record.split,
        "label": record.label,
        "label_name": record.label_name,
        "width": width,
        "height": height,
        "channels": 1 if image.ndim == 2 else image.shape[2],
        "source_width": src_w,
        "source_height": src_h,
        "scale": width / src_w,
        "pyramid": {"levels": levels if isinstance(levels, int) else len(levels), "tile": cfg.tile,
                    "quality": cfg.quality, "format": "tiff-jpeg-tiled"},  # fmt: skip
        "meta": {**record.meta, **sample.meta},
        "format_version": FORMAT_VERSION,
    }
    try:
        meta_bytes = canonical_json(info)
    except (TypeError, ValueError) as exc:
        raise SampleError(record.source, "bad metadata", str(exc)) from None
    members = [("tif", tif), ("json", meta_bytes), ("cls", str(record.label).encode("ascii"))]
    fields = {"label": record.label, "label_name": record.label_name, "width": width, "height": height,
              "source": record.source, "sha256": sample.sha256}  # fmt: skip
    return members, fields, src_w * src_h


def build_streamed_members(
    record: SourceRecord, sample: StreamedSample, cfg: ShardConfig
) -> tuple[list[tuple[str, Any]], dict[str, Any], int]:
    """``build_members`` for an image given as bands: the pyramid is built streaming into a
    temporary file and becomes a ``FileMember`` (close it after writing). Same metadata fields.

    Raises:
        SampleError: too many pixels, a ``max_side`` the band source cannot apply, bad metadata,
            or the source's own decode errors.
    """
    try:
        bands = sample.bands
        src_w, src_h = bands.width, bands.height
        if src_w * src_h > cfg.max_pixels:
            raise SampleError(record.source, "decompression bomb", f"{src_w * src_h} pixels > max_pixels={cfg.max_pixels}")
        if cfg.max_side and max(src_w, src_h) > cfg.max_side:
            shrunk = getattr(bands, "shrunk", None)
            if shrunk is None:
                raise SampleError(record.source, "unsupported option", "max_side on a streamed source without resizing")
            bands = shrunk(cfg.max_side)
        f, built = build_pyramid_file(bands, cfg.tile, cfg.quality)
    finally:
        sample.close()
    width, height = built.levels[0]
    info: dict[str, Any] = {
        "key": record.key, "source": record.source, "sha256": sample.sha256, "split": record.split,
        "label": record.label, "label_name": record.label_name, "width": width, "height": height,
        "channels": bands.channels, "source_width": src_w, "source_height": src_h, "scale": width / src_w,
        "pyramid": {"levels": len(built.levels), "tile": cfg.tile, "quality": cfg.quality, "format": "tiff-jpeg-tiled"},
        "meta": {**record.meta, **sample.meta},
        "format_version": FORMAT_VERSION,
    }  # fmt: skip
    try:
        meta_bytes = canonical_json(info)
    except (TypeError, ValueError) as exc:
        f.close()
        raise SampleError(record.source, "bad metadata", str(exc)) from None
    members = [("tif", FileMember(f, built.size)), ("json", meta_bytes), ("cls", str(record.label).encode("ascii"))]
    fields = {"label": record.label, "label_name": record.label_name, "width": width, "height": height,
              "source": record.source, "sha256": sample.sha256}  # fmt: skip
    return members, fields, src_w * src_h


def close_members(members: list[tuple[str, Any]]) -> None:
    """Close file-backed members (their temporary files vanish); bytes need nothing."""
    for _, data in members:
        close = getattr(data, "close", None)
        if close is not None:
            close()


def _sample_or_reject(
    record: SourceRecord, source: Source, cfg: ShardConfig
) -> tuple[list[tuple[str, Any]], dict[str, Any], int] | dict[str, Any]:
    """Members and fields of one record, or its reject row; never raises for a bad input.

    A source with ``load_stream`` (streamed_sample.py) may hand over bands instead of pixels.
    """
    try:
        declared = _declared_pixels(record)
        if declared > cfg.max_pixels:
            raise SampleError(record.source, "decompression bomb", f"declared {declared} pixels > max_pixels={cfg.max_pixels}")
        load_stream = getattr(source, "load_stream", None)
        streamed = load_stream(record) if load_stream is not None else None
        if streamed is not None:
            return build_streamed_members(record, streamed, cfg)
        return build_members(record, source.load(record), cfg)
    except SampleError as exc:
        return reject_row(record, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - a bad input must never kill its shard
        return reject_row(record, f"unexpected {type(exc).__name__}", str(exc))


def calibrate_scale(records: list[SourceRecord], source: Source, cfg: ShardConfig) -> float:
    """Measured shard bytes per estimated byte (``plan.estimate_bytes``) over a few records.

    Builds the samples of up to ``cfg.calibrate`` records (at most one per 100 records, so the
    driver redoes at most 1% of the work) spread evenly over the (split, key)-sorted list, in this
    process, and compares their member bytes (plus tar headers) with their estimates.
    Deterministic (the pyramid bytes are), so a re-run gets the same plan. 1.0 when calibration
    is off or every sampled record is rejected.
    """
    n = min(cfg.calibrate, math.ceil(len(records) / 100))
    if n <= 0:
        return 1.0
    ordered = sorted(records, key=lambda r: (r.split, r.key))
    picks = sorted({i * len(ordered) // n for i in range(n)})
    made_bytes = estimated = 0
    for i in picks:
        made = _sample_or_reject(ordered[i], source, cfg)
        if isinstance(made, dict):
            continue
        made_bytes += sum(512 + len(data) + (-len(data) % 512) for _, data in made[0])
        close_members(made[0])
        estimated += estimate_bytes(ordered[i])
    return made_bytes / estimated if estimated and made_bytes else 1.0


def index_path(root: str, task: ShardTask) -> str:
    return join(root, f"{task.name}.json")


def shard_rel(task: ShardTask) -> str:
    return f"{task.name}.tar"


def load_committed(fs: Any, root: str, task: ShardTask, cfg: ShardConfig) -> ShardResult | None:
    """The result of an already committed, verified shard of ``task``, else None (rewrite it).

    A shard counts as committed when its index exists, parses, carries this config's fingerprint
    and exactly the task's keys, and its tar exists with the recorded size (and sha256 when
    ``cfg.verify == "sha256"``).
    """
    path = index_path(root, task)
    if not exists(fs, path):
        return None
    try:
        index = json.loads(fs.cat_file(path))
        ok = index["fingerprint"] == fingerprint(cfg) and index["keys"] == task.keys
        shard = index["shard"]
        if ok and shard is not None:
            tar = join(root, shard)
            ok = exists(fs, tar) and fs.info(tar)["size"] == index["bytes"]
            ok = ok and (cfg.verify != "sha256" or file_sha256(fs, tar) == index["sha256"])
        if not ok:
            return None
        return ShardResult(task.split, task.index, shard, index["sha256"], index["bytes"], index["samples"],
                           index["rejects"], index["source_pixels"], skipped=True)  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None  # unreadable or foreign index: rewrite the shard


def write_shard(task: ShardTask, source: Source, cfg: ShardConfig) -> ShardResult:
    """Write (or find committed) the shard of ``task`` under ``cfg.dst``; returns its rows and rejects.

    Raises:
        StorageError, OSError: writing to ``cfg.dst`` failed (the Ray glue retries the task).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    fs, root = open_url(cfg.dst, cfg.storage_options)
    done = load_committed(fs, root, task, cfg)
    if done is not None:
        done.seconds, done.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return done
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    pixels = 0
    tar_rel = shard_rel(task)
    with ExitStack() as stack:
        tar: TarShardWriter | None = None
        commit = None
        for record in task.records:
            made = _sample_or_reject(record, source, cfg)
            if isinstance(made, dict):
                rejects.append(made)
                continue
            members, fields, src_pixels = made
            if tar is None:  # open lazily: a shard of rejects only gets no tar at all
                # sha256 hashed as the bytes are written, size checked after the upload; no
                # re-read here: ``cfg.verify == "sha256"`` re-reads committed tars on resume
                writer, commit = stack.enter_context(atomic_writer(fs, join(root, tar_rel), root))
                tar = TarShardWriter(writer)
            try:
                spans = tar.add_sample(record.key, members)
            finally:
                close_members(members)
            tif = spans["tif"]
            rows.append({"key": record.key, "split": task.split, "shard": tar_rel, "offset": tif.offset,
                         "size": tif.size, "header_offset": tif.header_offset, **fields})  # fmt: skip
            pixels += src_pixels
        if tar is not None:
            tar.close()
    committed = commit.result if commit is not None else None
    result = ShardResult(
        split=task.split,
        index=task.index,
        shard=tar_rel if committed else None,
        sha256=committed.sha256 if committed else "",
        bytes=committed.size if committed else 0,
        rows=rows,
        rejects=rejects,
        source_pixels=pixels,
    )
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(cfg),
        "split": task.split,
        "index": task.index,
        "keys": task.keys,
        "shard": result.shard,
        "sha256": result.sha256,
        "bytes": result.bytes,
        "samples": rows,
        "rejects": rejects,
        "source_pixels": pixels,
    }
    write_atomic(fs, index_path(root, task), canonical_json(index), root)
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return result
