"""ImageNet (ILSVRC2012) classification: ``train/{wnid}/*.JPEG`` and the validation set.

Validation labels, first match wins:

1. ``val/{wnid}/*.JPEG`` folders (already sorted into classes);
2. Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of the
   prediction string is the wnid);
3. the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line i = ILSVRC2012_ID of
   ``ILSVRC2012_val_{i:08d}``) with ``meta.mat`` (ILSVRC2012_ID -> WNID).

Label files are found under the root (``LOC_*`` beside ``train/``; the devkit files either
beside it or in ``ILSVRC2012_devkit_t12/data/``) or given explicitly (``val_labels``,
``synset_mapping``, ``devkit_meta``), e.g. for Kaggle's tree whose images sit three levels
below the CSVs (root = ``ILSVRC/Data/CLS-LOC``).

Classes are wnids sorted alphabetically (the torchvision convention, also Kaggle's order; the
devkit's ILSVRC2012_IDs are NOT in this order). The wnid list comes from
``LOC_synset_mapping.txt``, else from the leaves of ``meta.mat``, else from the ``train/``
folders. ``label_name`` is the wnid (class words repeat in ImageNet, e.g. two "crane"s); the
words go to ``meta["words"]``. Known bad files (a PNG named .JPEG, CMYK JPEGs) are converted by
``decode_image``, not rejected; images of an unknown wnid are rejected.
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
from pipeline.sources.listing import (
    DEFAULT_MAX_PIXELS,
    KeyGuard,
    has_image_extension,
    list_files,
    load_image_file,
    open_root,
    read_bytes,
    sanitize_key,
)

SPLITS = ("train", "val")
EXTENSIONS = (".jpeg", ".jpg", ".png")
KAGGLE_VAL = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12/data/")


def parse_synset_mapping(text: str) -> dict[str, str]:
    """wnid -> words from ``LOC_synset_mapping.txt`` lines ``n01440764 tench, Tinca tinca``."""
    out = {}
    for line in text.splitlines():
        wnid, _, words = line.strip().partition(" ")
        if wnid:
            out[wnid] = words.strip()
    return out


def parse_kaggle_val(text: str, where: str) -> dict[str, str]:
    """image stem -> wnid from ``LOC_val_solution.csv``.

    Raises:
        DatasetError: the header lacks ImageId/PredictionString.
    """
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise DatasetError(f"{where}: expected columns ImageId,PredictionString")
    return {row["ImageId"]: (row["PredictionString"] or "").split(" ")[0] for row in reader}


def _scalar(value: Any) -> Any:
    """A MATLAB cell's content as a Python scalar (loadmat wraps them in 0-d/1-element arrays)."""
    arr = np.asarray(value)
    return arr.item() if arr.size == 1 else (None if arr.size == 0 else arr)


def parse_devkit_meta(data: bytes, where: str) -> dict[int, tuple[str, str, bool]]:
    """ILSVRC2012_ID -> (wnid, words, is_leaf) from the devkit's ``meta.mat`` ``synsets``.

    Raises:
        DatasetError: not a MAT file with a ``synsets`` struct array.
    """
    import scipy.io  # noqa: PLC0415  (heavy; only the devkit path needs it)

    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
        synsets = np.atleast_1d(mat["synsets"])
        out = {}
        for s in synsets:
            leaf = int(_scalar(s["num_children"]) or 0) == 0
            out[int(_scalar(s["ILSVRC2012_ID"]))] = (str(_scalar(s["WNID"])), str(_scalar(s["words"])), leaf)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise DatasetError(f"{where}: not a devkit meta.mat with a synsets struct ({err})") from err
    return out


class ImageNet:
    """ILSVRC2012 reader (layouts and label sources in the module docstring)."""

    name = "imagenet"
    channels = 3

    def __init__(
        self,
        root: str,
        *,
        val_labels: str | None = None,
        synset_mapping: str | None = None,
        devkit_meta: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"imagenet.max_pixels={max_pixels!r}: must be a positive integer")
        self.root = root.rstrip("/")
        self.val_labels = val_labels
        self.synset_mapping = synset_mapping
        self.devkit_meta = devkit_meta
        self.max_pixels = max_pixels
        self.storage_options = dict(storage_options or {})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_labels", None)  # re-read lazily in the worker: no cached I/O results travel
        return state

    # ------------------------------------------------------------------ label files

    def _find(self, explicit: str | None, names: list[str]) -> str | None:
        """``explicit`` if given, else the first of ``root/name`` that exists."""
        if explicit is not None:
            return explicit
        fs, root = open_root(self.root, self.storage_options)
        for name in names:
            if fs.isfile(f"{root}/{name}"):
                return f"{self.root}/{name}"
        return None

    def _read_text(self, url: str) -> str:
        try:
            return read_bytes(url, self.storage_options).decode("utf-8-sig")
        except SampleError as err:
            raise DatasetError(f"{url}: label file not found") from err

    @cached_property
    def _labels(self) -> dict[str, Any]:
        """wnid list, words and (if any) flat-val labels, read once per instance."""
        words: dict[str, str] = {}
        wnids: list[str] | None = None
        val: dict[str, str] | None = None
        mapping_url = self._find(self.synset_mapping, [KAGGLE_SYNSETS])
        if mapping_url:
            words = parse_synset_mapping(self._read_text(mapping_url))
            wnids = sorted(words)
        gt_url = self._find(self.val_labels, [KAGGLE_VAL] + [d + DEVKIT_GT for d in DEVKIT_DIRS])
        meta_url = self._find(self.devkit_meta, [d + DEVKIT_META for d in DEVKIT_DIRS])
        synsets = None
        if meta_url:
            try:
                data = read_bytes(meta_url, self.storage_options)
            except SampleError as err:
                raise DatasetError(f"{meta_url}: devkit meta.mat not found") from err
            synsets = parse_devkit_meta(data, meta_url)
            leaves = {wnid: w for wnid, w, leaf in synsets.values() if leaf}
            words = words or leaves
            wnids = wnids or sorted(leaves)
        if gt_url and gt_url.endswith(".csv"):
            val = parse_kaggle_val(self._read_text(gt_url), gt_url)
        elif gt_url:
            if synsets is None:
                raise DatasetError(f"{gt_url}: devkit ground truth needs meta.mat (pass devkit_meta=)")
            val = {}
            for i, line in enumerate(self._read_text(gt_url).split(), start=1):
                if not line.isdigit():
                    raise DatasetError(f"{gt_url}: line {i} is {line!r}, expected an ILSVRC2012_ID")
                val[f"ILSVRC2012_val_{i:08d}"] = synsets.get(int(line), ("",))[0]
        if wnids is None:  # no label files: the class folders of train (or of val) decide
            fs, root = open_root(self.root, self.storage_options)
            split = "train" if fs.isdir(f"{root}/train") else "val"
            listing = list_files(f"{self.root}/{split}", self.storage_options)
            wnids = sorted({rel.split("/")[0] for rel in listing.files if "/" in rel})
        return {"wnids": wnids, "words": words, "val": val}

    @property
    def classes(self) -> list[str]:
        """Sorted wnids (reads the label files on first use)."""
        return list(self._labels["wnids"])

    @property
    def splits(self) -> list[str]:
        """train/val, those whose folder exists under the root (the sharder's default)."""
        fs, root = open_root(self.root, self.storage_options)
        return [s for s in SPLITS if fs.isdir(f"{root}/{s}")]

    # ------------------------------------------------------------------ records / load

    def records(self, splits: list[str]) -> Iterator[SourceRecord | Reject]:
        """Records of ``splits`` in sorted path order.

        Raises:
            ValueError: a split other than train/val (ImageNet's test labels are not public).
            DatasetError: a missing split folder, unreadable label files, or flat val images
                with no label file.
        """
        for split in splits:
            if split not in SPLITS:
                raise ValueError(f"imagenet split={split!r}: must be one of {list(SPLITS)}")
        labels = self._labels
        index = {w: i for i, w in enumerate(labels["wnids"])}
        guard = KeyGuard()
        for split in splits:
            listing = list_files(f"{self.root}/{split}", self.storage_options)
            for rel, size in listing.files.items():
                url = listing.url(rel)
                parts = rel.split("/")
                name = parts[-1]
                if not has_image_extension(name, EXTENSIONS):
                    yield Reject(url, "unreadable image", split, "not an image file name")
                    continue
                stem = name.rsplit(".", 1)[0]
                if len(parts) == 2:
                    wnid = parts[0]
                elif len(parts) == 1 and split == "val":
                    if labels["val"] is None:
                        raise DatasetError(
                            f"{self.root}/val: flat validation images but no {KAGGLE_VAL} or {DEVKIT_GT} "
                            "(pass val_labels=)"
                        )
                    wnid = labels["val"].get(stem)
                    if wnid is None:
                        yield Reject(url, "no label", split, f"{stem} not in the validation labels")
                        continue
                else:
                    yield Reject(url, "unexpected location", split, "expected {split}/{wnid}/{image}")
                    continue
                if wnid not in index:
                    yield Reject(url, "unknown wnid", split, wnid)
                    continue
                yield guard.admit(SourceRecord(
                    key=sanitize_key(f"imagenet-{split}-{stem}"),
                    split=split,
                    source=url,
                    label=index[wnid],
                    label_name=wnid,
                    meta={"words": labels["words"].get(wnid, "")},
                    size_hint=size,
                ))

    def load(self, record: SourceRecord) -> LoadedSample:
        """Decode one image to RGB.

        Raises:
            SampleError: missing or undecodable file.
        """
        return load_image_file(record, 3, self.max_pixels, self.storage_options)

    def describe(self) -> dict[str, Any]:
        """Options for dataset.json."""
        return {
            "root": self.root,
            "val_labels": self.val_labels,
            "synset_mapping": self.synset_mapping,
            "devkit_meta": self.devkit_meta,
            "max_pixels": self.max_pixels,
            "class_order": "sorted wnids (torchvision)",
        }
