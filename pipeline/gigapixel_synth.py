"""Synthetic gigapixel images, written streaming, for tests and benchmarks (nothing committed).

A scene is a textured background ("tissue": smooth colour waves plus fine noise) with a few
class-bearing objects: the label decides their shape (0 discs, 1 squares, 2 rings, 3 crosses).
Every pixel is a pure function of its coordinates, the seed and the label, so any tile can be
rendered alone: the file is written tile by tile (or strip by strip) and a 64k x 64k image never
sits in memory. The objects are few and small against the image (about side / 24), which is what
makes hard attention worth it: the label is only visible at full resolution in a few places.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tifffile

SHAPES = ("disc", "square", "ring", "cross")


@dataclass(frozen=True)
class SceneObject:
    """One class-bearing object: its box (xyxy, level-0 pixels) and shape."""

    box: tuple[int, int, int, int]
    shape: str


@dataclass(frozen=True)
class Scene:
    """Everything that determines the pixels of a synthetic image."""

    width: int
    height: int
    label: int
    seed: int
    objects: tuple[SceneObject, ...]
    channels: int = 3

    def boxes(self) -> list[dict[str, object]]:
        """Object boxes in the metadata form sources use (``{"box": [x0, y0, x1, y1], ...}``)."""
        return [{"box": list(o.box), "shape": o.shape} for o in self.objects]


def make_scene(width: int, height: int, label: int, seed: int, n_objects: int = 3, channels: int = 3) -> Scene:
    """Place ``n_objects`` non-overlapping objects of the label's shape with ``random.Random(seed)``.

    Raises:
        ValueError: a label outside 0..3, channels not 1 or 3, or an image under 64 px.
    """
    if not 0 <= label < len(SHAPES):
        raise ValueError(f"label={label}: must be in 0..{len(SHAPES) - 1}")
    if channels not in (1, 3) or min(width, height) < 64:
        raise ValueError(f"{width}x{height}x{channels}: need >= 64 px and 1 or 3 channels")
    rng = random.Random(f"gigapixel-synth/{seed}/{label}/{width}x{height}")
    side = max(16, min(width, height) // 24)
    objects: list[SceneObject] = []
    for _ in range(200 * n_objects):
        if len(objects) == n_objects:
            break
        x0, y0 = rng.randrange(0, width - side), rng.randrange(0, height - side)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] <= o.box[0] or o.box[2] <= box[0] or box[3] <= o.box[1] or o.box[3] <= box[1]
               for o in objects):
            objects.append(SceneObject(box, SHAPES[label]))
    return Scene(width, height, label, seed, tuple(objects), channels)


def _noise_block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-12, 13, (509, 509), dtype=np.int16)  # prime side: no seams


def render(scene: Scene, x0: int, y0: int, x1: int, y1: int, noise: np.ndarray | None = None) -> np.ndarray:
    """Pixels ``[y0, y1) x [x0, x1)`` of the scene: uint8 (h, w, 3) or (h, w)."""
    noise = _noise_block(scene.seed) if noise is None else noise
    xs = np.arange(x0, x1, dtype=np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)
    period = max(scene.width, scene.height) / 7.0
    wave = (np.sin(xs / period * 6.283)[None, :] + np.cos(ys / (period * 1.3) * 6.283)[:, None]) * 18.0
    n = noise[np.ix_(np.arange(y0, y1) % noise.shape[0], np.arange(x0, x1) % noise.shape[1])]
    base = wave + n  # (h, w)
    colour = np.array([224.0, 176.0, 200.0], np.float32)  # pale pink, stained-tissue-like
    img = np.clip(colour[None, None, :] + base[:, :, None], 0, 255)
    for obj in scene.objects:
        bx0, by0, bx1, by1 = obj.box
        ix0, iy0, ix1, iy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        cx, cy, r = (bx0 + bx1) / 2, (by0 + by1) / 2, (bx1 - bx0) / 2
        gx = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5 - cx
        gy = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5 - cy
        d = np.sqrt(gx * gx + gy * gy)
        if obj.shape == "disc":
            mask = d <= r
        elif obj.shape == "square":
            mask = (np.abs(gx) <= r * 0.8) & (np.abs(gy) <= r * 0.8)
        elif obj.shape == "ring":
            mask = (d <= r) & (d >= r * 0.6)
        else:
            mask = (np.abs(gx) <= r * 0.25) | (np.abs(gy) <= r * 0.25)
        region = img[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        region[mask] = (70.0, 40.0, 120.0)  # dark purple, nucleus-like
    out = img.astype(np.uint8)
    if scene.channels == 1:
        return out[:, :, 1]
    return out


def iter_tiles(scene: Scene, tile: int) -> Iterator[np.ndarray]:
    """Row-major ``tile`` x ``tile`` tiles of the scene (edge tiles padded with the edge's pixels)."""
    noise = _noise_block(scene.seed)
    for y in range(0, scene.height, tile):
        for x in range(0, scene.width, tile):
            t = render(scene, x, y, min(x + tile, scene.width), min(y + tile, scene.height), noise)
            if t.shape[:2] != (tile, tile):
                pad = ((0, tile - t.shape[0]), (0, tile - t.shape[1])) + ((0, 0),) * (t.ndim - 2)
                t = np.pad(t, pad, mode="edge")
            yield t


def iter_strips(scene: Scene, rows: int) -> Iterator[np.ndarray]:
    """Full-width strips of ``rows`` rows, top to bottom (the last one shorter)."""
    noise = _noise_block(scene.seed)
    for y in range(0, scene.height, rows):
        yield render(scene, 0, y, scene.width, min(y + rows, scene.height), noise)


def write_tiff(path: str, scene: Scene, *, tile: int = 512,
               compression: str | None = "jpeg", quality: int = 90, bigtiff: bool = True) -> int:
    """Write the scene as a tiled TIFF/BigTIFF at ``path``, streaming; returns its bytes.

    ``compression`` is a tifffile codec name ("jpeg", "deflate", "zstd") or None. Tiles are
    rendered one at a time, so memory stays at one tile whatever the size. (tifffile wants whole
    pages for strips: make a striped file with ``write_with_vips(..., tile=False)``.)
    """
    shape = (scene.height, scene.width, 3) if scene.channels == 3 else (scene.height, scene.width)
    kwargs: dict[str, object] = {"compression": compression, "photometric": "rgb" if scene.channels == 3 else "minisblack",
                                 "metadata": None, "software": False}  # fmt: skip
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": quality}
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        tw.write(iter_tiles(scene, tile), shape=shape, dtype=np.uint8, tile=(tile, tile), **kwargs)
    return os.path.getsize(path)


def write_with_vips(src_tiff: str, dst: str, **options: object) -> int:
    """Re-encode a TIFF to ``dst`` with libvips, sequentially: a huge JPEG/PNG, or a striped TIFF
    (``dst="x.tif", tile=False, compression="jpeg", bigtiff=True``)."""
    import pyvips

    pyvips.Image.new_from_file(src_tiff, access="sequential").write_to_file(dst, **options)
    return os.path.getsize(dst)
