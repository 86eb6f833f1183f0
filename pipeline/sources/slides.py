"""Whole-slide images (and any other gigapixel files) in one folder, labelled by a CSV.

Layout: ``root/`` holds the slides (subfolders allowed) and ``labels.csv`` (or ``labels=URL``)
with a header row and columns ``slide`` (path relative to the root), ``label`` (class name) and
optionally ``split`` (default ``train``). Classes are the sorted label names, so indices do not
depend on row order. Every slide is streamed (never decoded whole): OpenSlide reads the formats
it knows (Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, Philips TIFF, generic tiled TIFF,
...) at its level 0; anything else (striped TIFF, JPEG, PNG) goes through libvips.

Nothing disappears silently: a CSV row naming a missing file is a reject "missing file", a slide
file no row names is a reject "unlabelled" (split ``train``), and a CSV row repeating a slide or
a key is a reject "duplicate key". A slide's transparent (unscanned) area becomes the slide's
background colour (OpenSlide's ``openslide.background-color``, white when absent), as viewers show it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.errors import DatasetError, SampleError
from pipeline.sources.base import LoadedSample, Reject, SourceRecord
from pipeline.sources.listing import KeyGuard, list_files, read_bytes, sanitize_key
from pipeline.streamed_sample import StreamedSample, local_file
from pipeline.streaming import VipsBands

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".tif", ".tiff",
                    ".jpg", ".jpeg", ".png")
DEFAULT_SLIDE_MAX_PIXELS = 1 << 36  # 68 G pixels: a 260k x 260k slide; memory is not the limit here
CHUNK_COLUMNS = 8192  # OpenSlide reads of one band, in column chunks (RGBA: 32 MB per 256-row chunk)


class OpenSlideBands:
    """Bands of an OpenSlide slide's level 0, composited onto its background colour."""

    def __init__(self, path: str, channels: int, where: str, max_pixels: int) -> None:
        import openslide

        try:
            self.slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as exc:
            raise SampleError(where, "unreadable image", f"OpenSlide: {exc}") from None
        self.width, self.height = (int(v) for v in self.slide.dimensions)
        if self.width * self.height > max_pixels:
            self.slide.close()
            raise SampleError(where, "decompression bomb", f"{self.width}x{self.height} > max_pixels={max_pixels}")
        self.channels, self.where = channels, where
        hexcolour = self.slide.properties.get("openslide.background-color", "FFFFFF")
        try:
            self.background = np.array([int(hexcolour[i:i + 2], 16) for i in (0, 2, 4)], np.uint32)
        except ValueError:
            self.background = np.array([255, 255, 255], np.uint32)

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        out = np.empty((y1 - y0, self.width, 3), np.uint8)
        for x0 in range(0, self.width, CHUNK_COLUMNS):
            w = min(CHUNK_COLUMNS, self.width - x0)
            try:
                rgba = np.asarray(self.slide.read_region((x0, y0), 0, (w, y1 - y0)))
            except Exception as exc:  # noqa: BLE001 - OpenSlide errors on corrupt tiles vary by format
                raise SampleError(self.where, "unreadable image", f"OpenSlide at ({x0}, {y0}): {exc}") from None
            a = rgba[:, :, 3:4].astype(np.uint32)
            out[:, x0:x0 + w] = ((rgba[:, :, :3] * a + self.background * (255 - a) + 127) // 255).astype(np.uint8)
        if self.channels == 1:
            rgb = out.astype(np.uint32)
            return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)
        return out

    def close(self) -> None:
        self.slide.close()


def open_bands(path: str, channels: int, where: str, max_pixels: int) -> Any:
    """OpenSlide bands when OpenSlide knows the format, else libvips bands.

    Raises:
        SampleError: neither can read the file, or it exceeds ``max_pixels``.
    """
    import openslide

    if openslide.OpenSlide.detect_format(path) is not None:
        return OpenSlideBands(path, channels, where, max_pixels)
    return VipsBands.open(path, channels, where, max_pixels)


class Slides:
    """Reader for a folder of slides with a labels CSV (module docstring)."""

    name = "slides"

    def __init__(self, root: str, *, labels: str = "", channels: int = 3, max_pixels: int = DEFAULT_SLIDE_MAX_PIXELS,
                 storage_options: dict[str, Any] | None = None) -> None:
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"slides.channels={channels!r}: must be 1 or 3")
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"slides.max_pixels={max_pixels!r}: must be a positive integer")
        self.root = root.rstrip("/")
        self.labels = labels or f"{self.root}/labels.csv"
        self.channels, self.max_pixels = channels, max_pixels
        self.storage_options = dict(storage_options or {})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_table", None)
        return state

    @cached_property
    def _table(self) -> list[dict[str, str]]:
        """The CSV rows (slide, label, split), validated once."""
        try:
            text = read_bytes(self.labels, self.storage_options, "missing labels").decode("utf-8-sig")
        except SampleError as exc:
            raise DatasetError(f"{self.labels}: labels CSV not readable ({exc.reason})") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.labels}: labels CSV is not UTF-8 ({exc})") from None
        reader = csv.DictReader(io.StringIO(text))
        missing = {"slide", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{self.labels}: labels CSV lacks column(s) {sorted(missing)} (has {reader.fieldnames})")
        rows = []
        for n, row in enumerate(reader, start=2):
            slide, label = (row.get("slide") or "").strip().strip("/"), (row.get("label") or "").strip()
            if not slide or not label:
                raise DatasetError(f"{self.labels}: line {n}: empty slide or label")
            rows.append({"slide": slide, "label": label, "split": (row.get("split") or "").strip() or "train"})
        return rows

    @property
    def classes(self) -> list[str]:
        return sorted({r["label"] for r in self._table})

    @property
    def splits(self) -> list[str]:
        return sorted({r["split"] for r in self._table})

    def records(self, splits: list[str]) -> Iterator[SourceRecord | Reject]:
        """Records of ``splits`` in CSV-path order; missing, unlabelled and repeated slides are rejects.

        Raises:
            DatasetError: the root or the CSV is missing or malformed.
        """
        listing = list_files(self.root, self.storage_options)
        index = {c: i for i, c in enumerate(self.classes)}
        wanted = set(splits)
        named = {r["slide"] for r in self._table}
        guard = KeyGuard()
        labels_rel = self.labels[len(self.root) + 1:] if self.labels.startswith(self.root + "/") else None
        for row in sorted(self._table, key=lambda r: (r["slide"], r["split"], r["label"])):
            if row["split"] not in wanted:
                continue
            url = listing.url(row["slide"])
            if row["slide"] not in listing.files:
                yield Reject(url, "missing file", row["split"], f"named in {self.labels}")
                continue
            yield guard.admit(SourceRecord(
                key=sanitize_key(f"slide-{row['slide']}"), split=row["split"], source=url,
                label=index[row["label"]], label_name=row["label"], meta={"path": row["slide"]},
                size_hint=listing.files[row["slide"]],
            ))
        if "train" in wanted:
            for rel in listing.files:
                if rel not in named and rel != labels_rel and rel.lower().endswith(SLIDE_EXTENSIONS) \
                        and not rel.startswith("."):
                    yield Reject(listing.url(rel), "unlabelled", "train", f"not named in {self.labels}")

    def load_stream(self, record: SourceRecord) -> StreamedSample:
        """The slide as bands (always streamed).

        Raises:
            SampleError: missing or unreadable slide, or more than ``max_pixels`` pixels.
        """
        path, sha, cleanup = local_file(record.source, self.storage_options)
        try:
            bands = open_bands(path, self.channels, record.source, self.max_pixels)
        except BaseException:
            cleanup()
            raise
        close = getattr(bands, "close", lambda: None)
        meta = {**record.meta, "label": record.label, "label_name": record.label_name,
                "width": bands.width, "height": bands.height, "streamed": True}
        return StreamedSample(bands, meta, sha, [cleanup, close])

    def load(self, record: SourceRecord) -> LoadedSample:
        """The whole slide in memory (small slides, previews); the sharder uses ``load_stream``.

        Raises:
            SampleError: as ``load_stream``.
        """
        sample = self.load_stream(record)
        try:
            b = sample.bands
            image = np.concatenate([b.read_band(y, min(y + 1024, b.height)) for y in range(0, b.height, 1024)])
        finally:
            sample.close()
        return LoadedSample(image, sample.meta, sample.sha256)

    def describe(self) -> dict[str, Any]:
        return {"root": self.root, "labels": self.labels, "channels": self.channels, "max_pixels": self.max_pixels}
