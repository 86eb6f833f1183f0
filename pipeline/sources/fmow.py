"""fMoW-rgb: Functional Map of the World satellite views with JSON sidecars.

Layout (as released):

- ``{split}/{category}/{category}_{id}/{category}_{id}_{view}_rgb.jpg`` plus ``..._rgb.json``
  for ``train`` and ``val``; ``_msrgb`` files are the pan-sharpened variants of the same views and
  are only read when ``include_msrgb=True`` (off by default: the paper and its baselines use the
  ``_rgb`` images, and counting both would show every view twice).
- ``test/{id}/{id}_{view}_rgb.jpg`` (anonymised, sidecar without ``category``); labels come from
  ``test_mapping``, a file in one of three formats:

  * fMoW's own ``test_gt_mapping.json``: ``[{"input": "test_gt/airport/airport_3",
    "output": "test/0000000"}, ...]`` (category = second part of ``input``, id = second part
    of ``output``);
  * a JSON object ``{"0000000": "airport", ...}``;
  * a CSV with a header row containing ``id`` and ``category`` columns.

  Without a mapping every anonymised view is a reject "no label mapping". A test split laid out
  like train (``test/{category}/...``, e.g. rebuilt from ``test_gt``) is read like train.

Every temporal view is one sample: by default the WHOLE image labelled by its category, with the
valid boxes in the metadata (TNet's input, DESIGN.md section 2). A box is valid unless its ``ID``
is -1 (the placeholder first box of ground-truth files) or it names another category. Boxes are
converted from ``[x, y, w, h]`` to ``[x0, y0, x1, y1]`` (pixels of the stored image, end
exclusive, floats), clipped to the real pixel size with a warning, and dropped with a warning when
their area is zero; a view with no valid box left is rejected ("no valid box"). When the JSON's
``img_width``/``img_height`` disagree with the decoded pixels, the pixels win and a warning is
recorded. Warnings go to ``meta["warnings"]``.

``per_box=True`` gives the paper's "cropped" baseline instead: one sample per valid box, the
stored image being the box grown by ``context`` times its width/height on each side (clipped to
the image). This mode reads every sidecar while listing (concurrently, on S3).

``max_short_side`` caps the shorter side of the stored image (the paper uses 1000) with an
antialiased resize; boxes are scaled with it and ``meta["scale"]`` records the factors.

Class indices follow ``fmow_classes.txt`` (the paper code's order, not alphabetical);
``false_detection`` is skipped unless ``include_false_detection=True`` (then it is index 62).
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import DatasetError, SampleError
from pipeline.images import decode_image
from pipeline.sources import fmow_boxes
from pipeline.sources.base import LoadedSample, Reject, SourceRecord
from pipeline.sources.listing import (
    DEFAULT_MAX_PIXELS,
    KeyGuard,
    check_bools,
    list_files,
    open_root,
    read_bytes,
    read_many,
    sanitize_key,
    sha256_hex,
)

FALSE_DETECTION = "false_detection"
SPLITS = ("train", "val", "test")


def fmow_classes(include_false_detection: bool = False) -> list[str]:
    """The 62 fMoW categories in the paper code's index order (+ false_detection as 62)."""
    text = importlib.resources.files("pipeline.sources").joinpath("fmow_classes.txt").read_text()
    classes = [line.strip() for line in text.splitlines() if line.strip()]
    return classes + [FALSE_DETECTION] if include_false_detection else classes


def parse_mapping(data: bytes, where: str) -> dict[str, str]:
    """Anonymised id -> category from a mapping file (formats in the module docstring).

    Raises:
        DatasetError: the file is none of the accepted formats.
    """
    text = data.decode("utf-8-sig", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: bad mapping json ({err})") from err
        if isinstance(obj, dict) and all(isinstance(v, str) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, list):
            out = {}
            for item in obj:
                try:
                    category = str(item["input"]).strip("/").split("/")[1]
                    anon = str(item["output"]).strip("/").split("/")[1]
                except (KeyError, IndexError, TypeError) as err:
                    raise DatasetError(f"{where}: mapping entry {item!r} lacks input/output paths") from err
                out[anon] = category
            return out
        raise DatasetError(f"{where}: mapping json must be an id->category object or fMoW's list")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"id", "category"} <= set(rows[0]):
        raise DatasetError(f"{where}: mapping csv needs a header with 'id' and 'category' columns")
    return {r["id"].strip(): r["category"].strip() for r in rows}


class FMoW:
    """fMoW-rgb reader (options in the module docstring)."""

    name = "fmow"
    channels = 3

    def __init__(
        self,
        root: str,
        *,
        include_msrgb: bool = False,
        include_false_detection: bool = False,
        test_mapping: str | None = None,
        per_box: bool = False,
        context: float = 0.0,
        max_short_side: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        check_bools(
            "fmow",
            include_msrgb=include_msrgb,
            include_false_detection=include_false_detection,
            per_box=per_box,
        )
        if isinstance(context, bool) or not isinstance(context, int | float) or not context >= 0:
            raise ValueError(f"fmow.context={context!r}: must be a number >= 0 (fraction of box size)")
        if max_short_side is not None and (
            isinstance(max_short_side, bool) or not isinstance(max_short_side, int) or max_short_side < 1
        ):
            raise ValueError(f"fmow.max_short_side={max_short_side!r}: must be a positive integer or null")
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"fmow.max_pixels={max_pixels!r}: must be a positive integer")
        self.root = root.rstrip("/")
        self.include_msrgb = include_msrgb
        self.include_false_detection = include_false_detection
        self.test_mapping = test_mapping
        self.per_box = per_box
        self.context = float(context)
        self.max_short_side = max_short_side
        self.max_pixels = max_pixels
        self.storage_options = dict(storage_options or {})
        self.classes = fmow_classes(include_false_detection)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def splits(self) -> list[str]:
        """The fMoW splits whose folder exists under the root (what the sharder shards by default)."""
        fs, root = open_root(self.root, self.storage_options)
        return [s for s in SPLITS if fs.isdir(f"{root}/{s}")]

    # ------------------------------------------------------------------ listing

    def _mapping(self) -> dict[str, str] | None:
        if self.test_mapping is None:
            return None
        try:
            data = read_bytes(self.test_mapping, self.storage_options)
        except SampleError as err:
            raise DatasetError(f"{self.test_mapping}: test mapping file not found") from err
        return parse_mapping(data, self.test_mapping)

    def _view_records(self, split: str) -> Iterator[SourceRecord | Reject]:
        """One whole-image record per view of ``split`` (rejects for what cannot be labelled)."""
        listing = list_files(f"{self.root}/{split}", self.storage_options)
        mapping = self._mapping() if split == "test" else None
        suffixes = ("_rgb.jpg", "_msrgb.jpg") if self.include_msrgb else ("_rgb.jpg",)
        for rel, size in listing.files.items():
            parts = rel.split("/")
            name = parts[-1]
            if not name.endswith(".jpg"):
                continue  # sidecars and stray files (listings, checksums)
            url = listing.url(rel)
            if not name.endswith(("_rgb.jpg", "_msrgb.jpg")):
                yield Reject(url, "unexpected file name", split, "expected *_rgb.jpg or *_msrgb.jpg")
                continue
            if not name.endswith(suffixes):
                continue  # _msrgb without include_msrgb: excluded by option
            if len(parts) == 3:
                category = parts[0]
            elif len(parts) == 2:  # anonymised test layout
                if mapping is None:
                    yield Reject(url, "no label mapping", split, "anonymised view; pass test_mapping=")
                    continue
                if parts[0] not in mapping:
                    yield Reject(url, "not in label mapping", split, f"id {parts[0]}")
                    continue
                category = mapping[parts[0]]
            else:
                yield Reject(url, "unexpected location", split, "expected {category}/{category}_{id}/{file}")
                continue
            if category == FALSE_DETECTION and not self.include_false_detection:
                continue  # excluded by option, not a bad input
            if category not in self._index:
                yield Reject(url, "unknown category", split, category)
                continue
            stem = name[: -len(".jpg")]
            sidecar = "/".join(parts[:-1] + [stem + ".json"])
            if sidecar not in listing.files:
                yield Reject(url, "missing metadata", split, f"no {stem}.json beside the image")
                continue
            key_stem = stem.removesuffix("_rgb")  # "_msrgb" keeps its suffix: both variants coexist
            yield SourceRecord(
                key=sanitize_key(f"fmow-{split}-{key_stem}"),
                split=split,
                source=url,
                label=self._index[category],
                label_name=category,
                meta={"metadata_source": listing.url(sidecar), "view": stem},
                size_hint=size,
            )

    def _box_records(self, views: list[SourceRecord]) -> Iterator[SourceRecord | Reject]:
        """Expand whole-view records into one record per valid box (reads every sidecar)."""
        urls = [v.meta["metadata_source"] for v in views]
        for view, (url, data) in zip(views, read_many(urls, self.storage_options)):
            if isinstance(data, Exception):
                yield Reject(view.source, "missing metadata", view.split, str(data))
                continue
            try:
                meta = fmow_boxes.parse_sidecar(data, url)
            except SampleError as err:
                yield Reject(view.source, err.reason, view.split, err.detail)
                continue
            picked = fmow_boxes.select_boxes(meta["bounding_boxes"], view.label_name)
            if not picked:
                yield Reject(view.source, "no valid box", view.split, "no box of this category")
                continue
            for position, box in picked:
                yield SourceRecord(
                    key=f"{view.key}-box{position}",
                    split=view.split,
                    source=view.source,
                    label=view.label,
                    label_name=view.label_name,
                    meta={**view.meta, "box_index": position, "box_id": box.get("ID")},
                    size_hint=view.size_hint,
                )

    def records(self, splits: list[str]) -> Iterator[SourceRecord | Reject]:
        """Records of ``splits`` in sorted path order; the same input gives the same keys.

        Raises:
            ValueError: a split that fMoW does not have.
            DatasetError: a split folder or the mapping file is missing or unreadable.
        """
        for split in splits:
            if split not in SPLITS:
                raise ValueError(f"fmow split={split!r}: must be one of {list(SPLITS)}")
        guard = KeyGuard()
        for split in splits:
            views: Iterator[SourceRecord | Reject] = self._view_records(split)
            if self.per_box:
                listed = list(views)
                rejects = [r for r in listed if isinstance(r, Reject)]
                good = [r for r in listed if isinstance(r, SourceRecord)]
                views = iter(rejects + list(self._box_records(good)))
            for item in views:
                yield guard.admit(item) if isinstance(item, SourceRecord) else item

    # ------------------------------------------------------------------ loading

    def load(self, record: SourceRecord) -> LoadedSample:
        """Decode one view (or one box crop) with its boxes and warnings.

        Raises:
            SampleError: missing/bad sidecar, undecodable image, or no valid box.
        """
        meta_url = record.meta["metadata_source"]
        sidecar = fmow_boxes.parse_sidecar(
            read_bytes(meta_url, self.storage_options, reason="missing metadata"), meta_url
        )
        data = read_bytes(record.source, self.storage_options)
        image = decode_image(data, record.source, 3, self.max_pixels)
        height, width = image.shape[:2]
        warnings: list[str] = []
        claimed = (sidecar.get("img_width"), sidecar.get("img_height"))
        if claimed != (width, height) and claimed != (None, None):
            warnings.append(
                f"json size {claimed[0]}x{claimed[1]} differs from pixels {width}x{height}; using pixels"
            )
        picked = fmow_boxes.select_boxes(sidecar["bounding_boxes"], record.label_name)
        boxes = fmow_boxes.clip_boxes(picked, width, height, warnings)
        if self.per_box:
            wanted = record.meta.get("box_index")
            boxes = [b for b in boxes if b["index"] == wanted]
        if not boxes:
            raise SampleError(record.source, "no valid box", "; ".join(warnings))
        crop = None
        if self.per_box:
            crop = fmow_boxes.context_crop(boxes[0]["box"], self.context, width, height)
            image = np.ascontiguousarray(image[crop[1] : crop[3], crop[0] : crop[2]])
            boxes = fmow_boxes.shift_boxes(boxes, crop[0], crop[1])
        scale = None
        if self.max_short_side is not None and min(image.shape[:2]) > self.max_short_side:
            image, scale = fmow_boxes.cap_short_side(image, self.max_short_side)
            boxes = fmow_boxes.scale_boxes(boxes, scale)
        meta = {
            **record.meta,
            "label": record.label,
            "label_name": record.label_name,
            "boxes": boxes,
            "warnings": warnings,
            "source_size": [width, height],
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "fmow": {k: v for k, v in sidecar.items() if isinstance(v, str | int | float | bool)},
        }
        if crop is not None:
            meta["crop"] = list(crop)
        if scale is not None:
            meta["scale"] = list(scale)
        return LoadedSample(image=image, meta=meta, sha256=sha256_hex(data))

    def describe(self) -> dict[str, Any]:
        """Options for dataset.json (the class order itself is the dataset's class list)."""
        return {
            "root": self.root,
            "include_msrgb": self.include_msrgb,
            "include_false_detection": self.include_false_detection,
            "test_mapping": self.test_mapping,
            "per_box": self.per_box,
            "context": self.context,
            "max_short_side": self.max_short_side,
            "max_pixels": self.max_pixels,
            "class_order": "pipeline/sources/fmow_classes.txt (TNet paper code order)",
        }
