"""Batched decoding of the selected pyramid tiles on the GPU (nvJPEG through torchvision).

DESIGN.md section 3 names two ways to decode the tiles under attended regions: a CPU thread pool
with pillow-simd (``pipeline.lazy.PyramidRegionSource``) or batched nvJPEG. This is the second:
``GpuPyramidRegionSource`` plans every requested box exactly as ``PyramidReader`` does (same level
choice, same sampling window, same tiles), fetches the tiles' bytes, decodes all the batch's new
tiles in **one** ``torchvision.io.decode_jpeg(list, device=...)`` call, and resamples on the device
with Pillow's antialiased bilinear filter written as two small matrices (``resample_matrix``), so
its pixels match the CPU path within JPEG decoder differences.

``device="cpu"`` runs the same code with torchvision's CPU decoder: the tests check it against the
CPU path on machines without a GPU, and the GPU run differs only in the decoder.

Tile bytes come from ``PyramidReader._fetch_tile``, the reader's one place that checks a tile's
size and splices shared JPEGTables; a public ``tile_bytes(key)`` on the reader would be cleaner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import FormatError
from pipeline.lazy import GREY, View, is_base_request, jitter_to_model, views_to_source
from pipeline.pyramid import PyramidReader
from pipeline.resample import (
    Box,
    Window,
    choose_level,
    level_box,
    parse_box,
    parse_out_size,
    sampling_window,
    tiles_of,
)

TileKey = tuple[int, int, int]  # (level, tx, ty), as in pipeline.pyramid


@dataclass(frozen=True)
class TilePlan:
    """How one box is served: level, level-pixel window, the box inside the window, tiles to decode."""

    level: int
    window: Window
    box: Box  # xyxy relative to the window's top-left, in level pixels
    tiles: tuple[TileKey, ...]


def plan_region(levels: list[tuple[int, int]], tile: int, box: Box, out_size: tuple[int, int] | int,
                max_upsample: float = 1.0) -> TilePlan:
    """The plan ``PyramidReader`` follows for ``box`` (level-0 xyxy) read at ``out_size``.

    Pure: the coarsest level covering the request (``resample.choose_level``), the box snapped
    outward to whole level pixels, and the tiles that window intersects inside the level.

    Raises:
        ValueError: a bad box or out_size.
    """
    box, size = parse_box(box), parse_out_size(out_size)
    level = choose_level(box, size, levels, max_upsample)
    lbox = level_box(box, levels[0], levels[level])
    window = sampling_window(lbox)
    inside = window.clip(*levels[level])
    tiles = () if inside is None else tuple((level, tx, ty) for tx, ty in tiles_of(inside, tile))
    rel = (lbox[0] - window.x0, lbox[1] - window.y0, lbox[2] - window.x0, lbox[3] - window.y0)
    return TilePlan(level, window, rel, tiles)


def resample_matrix(lo: float, hi: float, n_out: int, n_in: int, antialias: bool = True) -> np.ndarray:
    """(n_out, n_in) weights that resample ``[lo, hi)`` of an axis of ``n_in`` pixels to ``n_out``.

    ``antialias=True`` is Pillow's bilinear resize with a float box (``ImagingResample``'s
    coefficients: a triangle filter widened by the scale when downsampling, clipped to the input
    and renormalised); ``False`` is plain bilinear interpolation at output pixel centres clamped
    to the input, as ``pipeline.resample.bilinear``. Rows sum to 1.
    """
    scale = (hi - lo) / n_out
    out = np.arange(n_out, dtype=np.float64)
    x = np.arange(n_in, dtype=np.float64)
    if not antialias:
        src = np.clip(lo + (out + 0.5) * scale - 0.5, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = src - i0
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (out.astype(np.int64), i0), 1.0 - frac)
        np.add.at(weights, (out.astype(np.int64), i1), frac)
        return weights
    filterscale = max(scale, 1.0)
    support = filterscale  # the bilinear (triangle) filter has support 1
    centre = lo + (out + 0.5) * scale
    xmin = np.maximum(np.trunc(centre - support + 0.5), 0)  # C's (int) cast truncates
    xmax = np.minimum(np.trunc(centre + support + 0.5), n_in)
    weights = np.clip(1.0 - np.abs((x[None] - centre[:, None] + 0.5) / filterscale), 0.0, None)
    weights *= (x[None] >= xmin[:, None]) & (x[None] < xmax[:, None])
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def decode_tiles(data: list[bytes], channels: int, device: torch.device | str) -> list[Tensor]:
    """Decode JPEG streams in one batched call; (C, h, w) uint8 tensors on ``device``.

    Raises:
        FormatError: a stream torchvision cannot decode.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(decode_jpeg(tensors, mode=mode, device=device))
    except RuntimeError as exc:
        raise FormatError(f"decode_jpeg on {device}: {exc}") from exc


def decode_level(reader: PyramidReader, level: int, device: torch.device | str) -> Tensor:
    """The whole of one pyramid level decoded in one batch: (C, h, w) uint8 on ``device``.

    The GPU counterpart of ``PyramidReader.read_level`` (the eager path of the benchmarks).

    Raises:
        ValueError: no such level. FormatError: a corrupt tile.
    """
    if not 0 <= level < len(reader.levels):
        raise ValueError(f"{reader.where}: level={level}: pyramid has levels 0..{len(reader.levels) - 1}")
    w, h = reader.levels[level]
    t = reader.tile
    keys = [(level, tx, ty) for tx, ty in tiles_of(Window(0, 0, w, h), t)]
    tiles = decode_tiles([reader._fetch_tile(k) for k in keys], reader.channels, device)
    out = torch.empty((reader.channels, h, w), dtype=torch.uint8, device=device)
    for (_, tx, ty), tile in zip(keys, tiles):
        out[:, ty * t:(ty + 1) * t, tx * t:(tx + 1) * t] = tile[:, :min(t, h - ty * t), :min(t, w - tx * t)]
    return out


class GpuPyramidRegionSource:
    """A batch of pyramids as a ``tnet.regions.RegionSource`` whose tiles are decoded on ``device``.

    Same contract as ``pipeline.lazy.PyramidRegionSource`` (views, flips, colour jitter, the base
    views handed over by the loader, the decoded-pixel count) but every ``read_regions`` call
    decodes all the new tiles of the whole batch in one ``decode_jpeg`` call and returns tensors
    already on ``device``. Decoded tiles are kept for the life of the source (one batch), so a
    tile shared by two levels' regions is decoded once.
    """

    def __init__(self, readers: list[PyramidReader], views: list[View], channels: int,
                 base_views: Tensor | None = None, base_decoded: int = 0, device: torch.device | str = "cuda",
                 antialias: bool = True, max_upsample: float = 1.0) -> None:  # fmt: skip
        if len(readers) != len(views) or not readers:
            raise ValueError(f"readers={len(readers)}, views={len(views)}: need the same non-zero count")
        self.readers, self.views, self.channels = readers, views, channels
        self.base_views, self.base_decoded = base_views, base_decoded
        self.device, self.antialias, self.max_upsample = torch.device(device), antialias, max_upsample
        self._tiles: dict[tuple[int, TileKey], Tensor] = {}
        self._decoded = 0
        self.tiles_decoded = 0

    def __len__(self) -> int:
        return len(self.readers)

    def source_boxes(self, boxes: Tensor) -> Tensor:
        return views_to_source(self.views, boxes)

    def full_pixels(self) -> Tensor:
        return torch.tensor([(v.box[2] - v.box[0]) * (v.box[3] - v.box[1]) for v in self.views],
                            dtype=torch.float64)

    def decoded_pixels(self) -> int:
        return self.base_decoded + self._decoded

    def read_regions(self, boxes: Tensor, out_size: int) -> Tensor:
        if is_base_request(boxes, out_size, len(self), self.base_views):
            return self.base_views[:, None].to(self.device)
        src = self.source_boxes(boxes).numpy()
        plans = [[plan_region(r.levels, r.tile, tuple(b), out_size, self.max_upsample) for b in src[i]]
                 for i, r in enumerate(self.readers)]
        self._decode_missing(plans)
        out = [torch.stack([self._render(i, p, out_size) for p in row]) for i, row in enumerate(plans)]
        return torch.stack(out)  # (B, K, C, out, out)

    def _decode_missing(self, plans: list[list[TilePlan]]) -> None:
        """Fetch and decode, in one batch, every planned tile not decoded yet by this source."""
        missing = sorted({(i, k) for i, row in enumerate(plans) for p in row for k in p.tiles} - self._tiles.keys())
        for channels in sorted({self.readers[i].channels for i, _ in missing}):
            group = [(i, k) for i, k in missing if self.readers[i].channels == channels]
            data = [self.readers[i]._fetch_tile(k) for i, k in group]
            self._keep(group, decode_tiles(data, channels, self.device))

    def _keep(self, keys: list[tuple[int, TileKey]], tiles: list[Tensor]) -> None:
        for (i, key), tile in zip(keys, tiles):
            t = self.readers[i].tile
            if tuple(tile.shape[1:]) != (t, t):
                raise FormatError(f"{self.readers[i].where}: tile {key}: decoded {tuple(tile.shape)}, "
                                  f"expected {t}x{t}")
            self._tiles[(i, key)] = tile
            self._decoded += t * t
            self.tiles_decoded += 1

    def _render(self, i: int, plan: TilePlan, out_size: int) -> Tensor:
        """One region: window filled with grey, tiles pasted, resampled, then the view's flip and colour."""
        reader, view = self.readers[i], self.views[i]
        win, t = plan.window, reader.tile
        lw, lh = reader.levels[plan.level]
        arr = torch.full((reader.channels, *win.shape), float(GREY), device=self.device)
        for key in plan.tiles:
            _, tx, ty = key
            x0, y0 = max(tx * t, win.x0), max(ty * t, win.y0)
            x1, y1 = min((tx + 1) * t, lw, win.x1), min((ty + 1) * t, lh, win.y1)
            if x1 > x0 and y1 > y0:
                arr[:, y0 - win.y0:y1 - win.y0, x0 - win.x0:x1 - win.x0] = \
                    self._tiles[(i, key)][:, y0 - ty * t:y1 - ty * t, x0 - tx * t:x1 - tx * t]
        bx0, by0, bx1, by1 = plan.box
        wx = torch.from_numpy(resample_matrix(bx0, bx1, out_size, win.shape[1], self.antialias)).float()
        wy = torch.from_numpy(resample_matrix(by0, by1, out_size, win.shape[0], self.antialias)).float()
        pixels = (wy.to(self.device) @ arr @ wx.to(self.device).T).round_().clamp_(0, 255)  # (C, out, out)
        return self._to_model(pixels, view)

    def _to_model(self, pixels: Tensor, view: View) -> Tensor:
        """(C, h, w) float 0..255, owned here -> [-1, 1], flipped and jittered as the CPU path does."""
        if self.channels == 3 and pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1).contiguous()  # a real copy: the jitter works in place
        if view.flip:
            pixels = pixels.flip(-1)
        return jitter_to_model(pixels, view)
