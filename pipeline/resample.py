"""Pure geometry of pyramid reads: which level serves a box, which pixels it needs, and resampling.

Convention (stated once): boxes are ``xyxy`` in continuous pixel coordinates of the image they
refer to; pixel ``i`` spans ``[i, i + 1)``. A pyramid level of size ``(w_i, h_i)`` covers the whole
level-0 extent ``[0, W) x [0, H)``, so a level-0 point ``x`` is ``x * w_i / W`` at level ``i``
(our builder makes every level by box-filtering the previous one to ``ceil(w / 2)``, which keeps
that mapping exact).

A region is what you get by cutting the box out of the level, padded with a constant ``fill``
outside the image, snapped outward to whole level pixels, and resizing that crop with the box's
exact (fractional) position inside it. The filter never reads past the crop (it renormalises at
the crop's edges), which is what ``torch.nn.functional.interpolate`` does to a crop: so the
paper's reference (crop from a zero-padded image, bilinear resize) and ``tnet.regions``'
in-memory source agree with the pyramid, and only the tiles the box intersects are decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
MAX_WINDOW_PIXELS = 1 << 26  # a sampling window larger than this means an absurd box for out_size


def parse_out_size(out_size: tuple[int, int] | int) -> tuple[int, int]:
    """``(w, h)`` from ``(w, h)`` or an int for a square.

    Raises:
        ValueError: sizes that are not positive integers.
    """
    w, h = (out_size, out_size) if isinstance(out_size, int | np.integer) else tuple(out_size)
    if int(w) != w or int(h) != h or w < 1 or h < 1:
        raise ValueError(f"out_size={out_size!r}: expected a positive int or (w, h) of positive ints")
    return int(w), int(h)


def parse_box(box: Box) -> Box:
    """Validate a box: four finite numbers with x1 > x0 and y1 > y0.

    Raises:
        ValueError: anything else.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"box={box!r}: expected four numbers x0, y0, x1, y1") from exc
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box={box!r}: expected finite numbers with x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def choose_level(box: Box, out_size: tuple[int, int], level_sizes: list[tuple[int, int]],
                 max_upsample: float = 1.0) -> int:
    """The coarsest level whose resolution still covers the request, else level 0.

    Level ``i`` downsamples by ``d = (W / w_i, H / h_i)``; it covers the request when
    ``box_w / d_x >= out_w`` and ``box_h / d_y >= out_h``, i.e. the box spans at least as many
    level pixels as output pixels, so we only ever downsample from it (antialiased) by less than
    the next level's factor. Example: 1500 px with tile 256 has levels 1500, 750, 375, 188; the
    whole image at 188 px uses level 3, a 300 px box at 224 px uses level 0.

    ``max_upsample > 1`` lets a level cover a request it falls short of by up to that factor (it
    is then upsampled): a 165 px cell read at 96 px comes from the half-resolution level (82.5
    px) with ``max_upsample >= 1.17``, a quarter of the full-resolution tiles for a slightly
    softer read.
    """
    if not max_upsample >= 1.0:
        raise ValueError(f"max_upsample={max_upsample}: must be >= 1")
    (w0, h0), (ow, oh) = level_sizes[0], out_size
    bw, bh = box[2] - box[0], box[3] - box[1]
    ow, oh = ow / max_upsample, oh / max_upsample
    tol = 1.0 - 1e-9  # float noise must not push an exact fit to the finer level
    for i in range(len(level_sizes) - 1, 0, -1):
        w, h = level_sizes[i]
        if bw * w / w0 >= ow * tol and bh * h / h0 >= oh * tol:
            return i
    return 0


def level_box(box: Box, level0: tuple[int, int], level: tuple[int, int]) -> Box:
    """Map a level-0 box into the coordinates of a level of size ``level``."""
    sx, sy = level[0] / level0[0], level[1] / level0[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


@dataclass(frozen=True)
class Window:
    """Integer pixel rectangle ``[x0, x1) x [y0, y1)`` of a level; may extend past the image."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def clip(self, width: int, height: int) -> Window | None:
        """The part inside ``[0, width) x [0, height)``, or None if empty."""
        x0, y0 = max(self.x0, 0), max(self.y0, 0)
        x1, y1 = min(self.x1, width), min(self.y1, height)
        return Window(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def sampling_window(box: Box) -> Window:
    """The level pixels a box (level coordinates) covers: the box snapped outward to whole pixels.

    Raises:
        ValueError: the window exceeds MAX_WINDOW_PIXELS (a box absurdly large for the request
            even at the coarsest level).
    """
    win = Window(math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    if win.shape[0] * win.shape[1] > MAX_WINDOW_PIXELS:
        raise ValueError(f"box={box!r}: needs a {win.shape[1]}x{win.shape[0]} window even at the "
                         f"coarsest level (limit {MAX_WINDOW_PIXELS} pixels)")
    return win


def tiles_of(win: Window, tile: int) -> list[tuple[int, int]]:
    """(tx, ty) of the tiles a clipped window intersects, row-major."""
    return [(tx, ty) for ty in range(win.y0 // tile, (win.y1 - 1) // tile + 1)
            for tx in range(win.x0 // tile, (win.x1 - 1) // tile + 1)]


def resample(arr: np.ndarray, box: Box, out_size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resample ``box`` (coordinates of the crop ``arr``, inside it) to ``out_size`` = (w, h).

    ``antialias=True``: Pillow's bilinear resize with a float box (a triangle filter widened by
    the scale factor when downsampling). ``antialias=False``: plain bilinear interpolation at the
    output pixel centres (``align_corners=False``, clamped to the crop), what
    ``torch.nn.functional.interpolate(mode="bilinear", antialias=False)`` computes for a crop.
    """
    if antialias:
        img = Image.fromarray(arr)
        return np.asarray(img.resize(out_size, Image.BILINEAR, box=box))
    return bilinear(arr, box, out_size)


def _axis(lo: float, hi: float, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = lo + (np.arange(n_out, dtype=np.float64) + 0.5) * ((hi - lo) / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def bilinear(arr: np.ndarray, box: Box, out_size: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation without antialiasing of ``box`` of ``arr`` (H, W[, C]) to ``out_size``."""
    (ow, oh), (h, w) = out_size, arr.shape[:2]
    x0, x1, fx = _axis(box[0], box[2], ow, w)
    y0, y1, fy = _axis(box[1], box[3], oh, h)
    a = arr.astype(np.float32)
    if a.ndim == 3:
        fx, fy = fx[:, None], fy[:, None]
    top, bottom = a[y0], a[y1]
    rows = top + (bottom - top) * fy[:, None]  # (oh, W[, C])
    out = rows[:, x0] + (rows[:, x1] - rows[:, x0]) * fx[None]
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)
