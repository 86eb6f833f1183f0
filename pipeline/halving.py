"""Halving a level band by band with exactly the bytes Pillow's BOX resize gives on the whole level.

``pyramid.pyramid_levels`` makes each level with ``Image.resize((ceil(w / 2), ceil(h / 2)), BOX)``
on the whole previous level. A streaming build only ever holds a few rows, so it resizes groups
of output rows from the input rows they need. Pillow resizes in two passes, each rounded to uint8:
horizontal (every row alone, the same whatever rows are around it) then vertical, whose per-row
taps and int16 weights come from ``precompute_coeffs`` and ``normalize_coeffs_8bpc``
(Pillow-SIMD's ``Resample.c``): in double precision, ``center = in0 + (j + 0.5) * scale`` with
``scale = (in1 - in0) / out``, and one fixed-point precision for the whole table, chosen from its
largest weight. A group resized alone computes its centers from a shifted box and its precision
from its own rows, so when the scale is not a power of two (odd heights) a tie between two input
rows may fall the other way, or the precision may change: a grey level off here and there.

So ``box_coefficients`` replays that arithmetic (same IEEE doubles, same order of operations,
tested against Pillow) for the whole level once, and every group is checked against it: when the
group's own table (``box_coefficients`` with its box) equals its rows of the whole table, Pillow
resizes the group in one call (the usual case, and always when the height is even: scale 2.0 is
exact); otherwise Pillow does the horizontal pass alone and the vertical pass is the whole
table's rows applied in numpy with Pillow's integer arithmetic,
``clip((2 ** (p - 1) + sum(pixel * weight)) >> p, 0, 255)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's cap on the fixed-point precision of 8-bit resampling
MAX_COEFS_PRECISION = 16 - 1  # Pillow-SIMD's int16 weights


@dataclass(frozen=True)
class BoxTable:
    """Pillow's BOX resampling table along one axis: output ``j`` is
    ``clip((2 ** (precision - 1) + sum_t in[start[j] + t] * weights[j, t]) >> precision)``
    for ``t < count[j]``."""

    start: np.ndarray  # (out,) int64: first input index of each output index
    count: np.ndarray  # (out,) int64: number of taps
    weights: np.ndarray  # (out, ksize) int64: fixed-point weights, zero past count
    precision: int

    def rows(self, j0: int, j1: int, shift: int = 0) -> BoxTable:
        """Output indices ``[j0, j1)``, with input indices moved by ``-shift``."""
        return BoxTable(self.start[j0:j1] - shift, self.count[j0:j1], self.weights[j0:j1], self.precision)

    def same(self, other: BoxTable) -> bool:
        """Whether both tables make the same output: same taps, and weights equal once scaled to one
        precision (``(2 ** (p - 1) + sum) >> p`` does not change when every weight and ``p`` are
        doubled, so a table whose largest weight differs may still agree)."""
        if not np.array_equal(self.start, other.start) or not np.array_equal(self.count, other.count):
            return False
        k = max(self.weights.shape[1], other.weights.shape[1])
        top = max(self.precision, other.precision)
        a, b = (np.pad(t.weights, ((0, 0), (0, k - t.weights.shape[1]))) << (top - t.precision) for t in (self, other))
        return bool(np.array_equal(a, b))


def box_coefficients(in_size: int, in0: float, in1: float, out_size: int) -> BoxTable:
    """The table Pillow-SIMD builds for a BOX resize of input ``[in0, in1)`` (of ``in_size``
    samples) to ``out_size`` samples, replayed operation for operation: Pillow takes the box as C
    floats (float32, subtracted as such) and does the rest in doubles."""
    lo, hi = np.float32(in0), np.float32(in1)
    scale = float(hi - lo) / out_size
    in0 = float(lo)
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale  # the box filter's support is 0.5
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    start = np.zeros(out_size, np.int64)
    count = np.zeros(out_size, np.int64)
    pre = np.zeros((out_size, ksize))
    for j in range(out_size):
        center = in0 + (j + 0.5) * scale
        xmin = max(0, int(center - support + 0.5))
        xmax = min(in_size, int(center + support + 0.5)) - xmin
        w = [1.0 if -0.5 < (x + xmin - center + 0.5) * ss <= 0.5 else 0.0 for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        pre[j, :xmax] = [v / ww for v in w] if ww != 0.0 else w
        start[j], count[j] = xmin, xmax
    maxkk = float(pre.max()) if pre.size else 0.0
    precision = 0
    while precision < PRECISION_BITS and int(0.5 + maxkk * (1 << (precision + 1))) < (1 << MAX_COEFS_PRECISION):
        precision += 1
    weights = np.trunc(np.where(pre < 0, pre * (1 << precision) - 0.5, pre * (1 << precision) + 0.5)).astype(np.int64)
    return BoxTable(start, count, weights, precision)


def apply_vertical(rows: np.ndarray, table: BoxTable) -> np.ndarray:
    """Pillow's vertical pass: ``table`` (input indices relative to ``rows[0]``) applied to the
    uint8 rows ``(n, w[, c])``; returns ``(len(table.start), w[, c])`` uint8."""
    n = rows.shape[0]
    flat = rows.reshape(n, -1)
    acc = np.full((len(table.start), flat.shape[1]), 1 << (table.precision - 1) if table.precision else 0, np.int32)
    for t in range(table.weights.shape[1]):
        k = table.weights[:, t].astype(np.int32)
        if not k.any():
            continue
        acc += flat[np.minimum(table.start + t, n - 1)] * k[:, None]
    acc >>= table.precision
    return np.clip(acc, 0, 255).astype(np.uint8).reshape((len(table.start),) + rows.shape[1:])


class Halver:
    """Box-filters a level, pushed in row order as bands, to ``ceil(w / 2) x ceil(h / 2)``; writes
    the output rows, raw, to ``out`` as soon as their input rows are in (module docstring).

    Memory: output rows go out in groups of at most ``GROUP`` (about ``2 * GROUP + 3`` input rows
    resized per call), and the few input rows a later group still needs are copied out of their
    band, so no band outlives its turn: the band is the one full-width buffer held here.
    """

    GROUP = 32  # output rows per resize: 67 input rows of 32k RGB (Pillow holds RGBX) = 9 MB

    def __init__(self, size: tuple[int, int], out_size: tuple[int, int], out: BinaryIO) -> None:
        (self.w, self.h), (self.w2, self.h2) = size, out_size
        self.sy = self.h / self.h2
        self.table = box_coefficients(self.h, 0.0, float(self.h), self.h2)
        # input rows that output rows [0, j] need (exclusive end), and the first row rows [j, h2) need
        self.need = np.maximum.accumulate(self.table.start + self.table.count)
        self.first_needed = np.minimum.accumulate(self.table.start[::-1])[::-1]
        self.out = out
        self.rows: list[np.ndarray] = []  # pieces of consecutive input rows, from self.first on
        self.first = 0  # input row index of self.rows[0][0]
        self.avail = 0  # input rows pushed so far
        self.done = 0  # output rows written
        self.fallback_groups = 0  # groups whose vertical pass ran in numpy (for tests and curiosity)

    def _need(self, j: int) -> int:
        """Input rows needed (exclusive end) for output rows up to ``j`` (exclusive)."""
        return int(self.need[j - 1]) if j else 0

    def _first_kept(self, j: int) -> int:
        """First input row kept for output rows from ``j`` on: what the table needs and Pillow's box start."""
        return max(self.first, min(int(self.first_needed[j]), math.floor(j * self.sy)))

    def push(self, band: np.ndarray) -> None:
        self.rows.append(band)
        self.avail += band.shape[0]
        j1 = int(np.searchsorted(self.need, self.avail, side="right"))
        if j1 > self.done:
            self._emit(j1)

    def finish(self) -> None:
        if self.avail != self.h:
            raise ValueError(f"level of height {self.h} got {self.avail} rows")
        if self.done < self.h2:
            self._emit(self.h2)

    def _slice(self, r0: int, r1: int) -> np.ndarray:
        """Input rows ``[r0, r1)`` (all pushed, none dropped): a view when one piece holds them."""
        parts, y = [], self.first
        for piece in self.rows:
            a, b = max(r0, y), min(r1, y + piece.shape[0])
            if a < b:
                parts.append(piece[a - y:b - y])
            y += piece.shape[0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _group(self, j0: int, j1: int) -> bytes:
        # the rows the table needs, widened to hold Pillow's box [j0 * s, j1 * s) when pushed already
        r0 = self._first_kept(j0)
        r1 = min(self.avail, max(self._need(j1), math.ceil(j1 * self.sy)))
        crop = Image.fromarray(self._slice(r0, r1))
        in0, in1 = j0 * self.sy - r0, j1 * self.sy - r0
        whole = self.table.rows(j0, j1, r0)
        if in0 >= 0 and in1 <= r1 - r0 and box_coefficients(r1 - r0, in0, in1, j1 - j0).same(whole):
            return crop.resize((self.w2, j1 - j0), Image.BOX, box=(0.0, in0, float(self.w), in1)).tobytes()
        self.fallback_groups += 1
        across = np.asarray(crop.resize((self.w2, r1 - r0), Image.BOX, box=(0.0, 0.0, float(self.w), float(r1 - r0))))
        return apply_vertical(across, whole).tobytes()

    def _emit(self, j_end: int) -> None:
        for j0 in range(self.done, j_end, self.GROUP):
            self.out.write(self._group(j0, min(j0 + self.GROUP, j_end)))
        self.done = j_end
        keep = min(self._first_kept(j_end) if j_end < self.h2 else self.avail, self.avail)
        self.rows = [self._slice(keep, self.avail).copy()] if keep < self.avail else []
        self.first = keep
