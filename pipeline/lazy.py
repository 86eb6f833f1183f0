"""Lazy regions: TNet's ``RegionSource`` over tiled pyramids.

A sample's *view* is the box of the source image the model sees (the whole image at evaluation, a
random 85-100% crop in training), optionally flipped and colour-jittered. Augmentation is just a
different view: every region TNet asks for is mapped through the view to source pixels and read
from the pyramid, so only the tiles under attended regions are ever decoded. The base view
(level 0 of TNet) is decoded by the loader's workers and handed over, so it is never read twice.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.pyramid import PyramidReader

GREY = 128  # uint8 fill outside the image: ~0 in model space, as the tensor path's zero padding


@dataclass(frozen=True)
class Jitter:
    """One of the paper's five colour options, with its drawn strength."""

    kind: str  # "none", "brightness", "saturation", "contrast", "hue"
    amount: float = 0.0

    @staticmethod
    def draw(rng: random.Random) -> Jitter:
        kind = rng.choice(["none", "brightness", "saturation", "contrast", "hue"])
        ranges = {"none": (0.0, 0.0), "brightness": (-32 / 255, 32 / 255), "saturation": (0.5, 1.5),
                  "contrast": (0.5, 1.5), "hue": (-0.2, 0.2)}
        lo, hi = ranges[kind]
        return Jitter(kind, rng.uniform(lo, hi))


@dataclass(frozen=True)
class View:
    """The part of a source image the model sees, in source pixels (xyxy), and how it is altered."""

    box: tuple[float, float, float, float]
    flip: bool = False
    jitter: Jitter = Jitter("none")
    mean: tuple[float, ...] = ()  # per-channel mean of the base view in [0, 1], for contrast

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Normalised view xyxy (..., 4) -> source-pixel xyxy; flips mirror x inside the view."""
        x0, y0, x1, y1 = self.box
        nx0, ny0, nx1, ny1 = (boxes[..., i] for i in range(4))
        if self.flip:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        w, h = x1 - x0, y1 - y0
        return np.stack([x0 + nx0 * w, y0 + ny0 * h, x0 + nx1 * w, y0 + ny1 * h], axis=-1)

    def from_source(self, boxes: np.ndarray) -> np.ndarray:
        """Source-pixel xyxy (..., 4) -> normalised view xyxy; the inverse of ``to_source``."""
        x0, y0, x1, y1 = self.box
        w, h = x1 - x0, y1 - y0
        b = np.asarray(boxes, np.float64)
        nx0, nx1 = (b[..., 0] - x0) / w, (b[..., 2] - x0) / w
        if self.flip:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        return np.stack([nx0, (b[..., 1] - y0) / h, nx1, (b[..., 3] - y0) / h], axis=-1)


def random_view(width: int, height: int, rng: random.Random, flip: bool = True, jitter: bool = True,
                area: tuple[float, float] = (0.85, 1.0), aspect: tuple[float, float] = (0.5, 2.0),
                objects: list[list[float]] | None = None, min_object_cover: float = 0.1,
                keep_objects: bool = False) -> View:
    """The paper's training view: a crop of 85-100% of the area, aspect 0.5-2, covering at least
    ``min_object_cover`` of the first object box when boxes are known; then flip and colour.

    ``keep_objects``: every box of ``objects`` lies whole inside the crop instead. Where the label
    counts objects (Megapixel MNIST's majority of target digits), a crop that cuts one off changes
    the answer: label noise. The crop's corner is drawn among the positions that hold the boxes'
    union, so the constraint costs a retry only when the drawn size cannot hold it.

    Falls back to the whole image after 10 tries (as Inception-style croppers do).
    """
    box = (0.0, 0.0, float(width), float(height))
    need = _union(objects, width, height) if keep_objects and objects else None
    for _ in range(10):
        a = rng.uniform(*area) * width * height
        r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        w, h = np.sqrt(a * r), np.sqrt(a / r)
        if w > width or h > height:
            continue
        (xlo, xhi), (ylo, yhi) = (0.0, width - w), (0.0, height - h)
        if need is not None:
            xlo, xhi = max(xlo, need[2] - w), min(xhi, need[0])
            ylo, yhi = max(ylo, need[3] - h), min(yhi, need[1])
            if xlo > xhi or ylo > yhi:
                continue
        x0, y0 = rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)
        cand = (x0, y0, x0 + w, y0 + h)
        if objects and need is None and _cover(cand, objects[0]) < min_object_cover:
            continue
        box = cand
        break
    return View(box, flip=flip and rng.random() < 0.5, jitter=Jitter.draw(rng) if jitter else Jitter("none"))


def _union(objects: list[list[float]], width: int, height: int) -> tuple[float, float, float, float]:
    """The boxes' union (xyxy), clipped to the image: a box partly outside can only be kept in part."""
    x0, y0 = max(min(o[0] for o in objects), 0.0), max(min(o[1] for o in objects), 0.0)
    x1, y1 = min(max(o[2] for o in objects), float(width)), min(max(o[3] for o in objects), float(height))
    return x0, y0, max(x1, x0), max(y1, y0)


def _cover(box: tuple[float, ...], obj: list[float]) -> float:
    ix = max(0.0, min(box[2], obj[2]) - max(box[0], obj[0]))
    iy = max(0.0, min(box[3], obj[3]) - max(box[1], obj[1]))
    area = max((obj[2] - obj[0]) * (obj[3] - obj[1]), 1e-9)
    return ix * iy / area


def pixel_mean(pixels: np.ndarray) -> tuple[float, ...]:
    """Per-channel mean of uint8 (h, w[, c]) pixels in [0, 1] (a view's ``mean``, for contrast).

    Summed in float64 by torch (exact: integer sums far below 2**53): numpy's ``mean(0)`` over
    the (h * w, c) pixels gives the same numbers 10x slower (1 ms per 224 px view).
    """
    flat = torch.from_numpy(pixels.copy()).reshape(pixels.shape[0] * pixels.shape[1], -1)  # a writable copy
    sums = flat.double().sum(0) / flat.shape[0] / 255.0
    return tuple(float(m) for m in sums)


def to_model(pixels: np.ndarray, view: View, channels: int) -> Tensor:
    """uint8 (h, w[, 3]) -> float (C, h, w) in [-1, 1], flipped and jittered as the view says."""
    return regions_to_model([pixels], view, channels)[0]


def regions_to_model(regions: Sequence[np.ndarray], view: View, channels: int, out: Tensor | None = None) -> Tensor:
    """A sample's uint8 regions, each (h, w[, 3]), -> float (K, C, h, w) in [-1, 1], flipped and
    jittered as the view says, written into ``out`` when given.

    Why one call per sample: converting, flipping and colour-jittering the K regions as one
    stack costs one set of tensor operations instead of K (the per-call overhead dominated at
    224 px), and writing into the batch's ``out`` saves the two stacking copies.

    Raises:
        ValueError: no regions, regions of different shapes, or ``out`` of the wrong shape.
    """
    if not regions:
        raise ValueError("regions: need at least one region")
    try:
        stack = np.stack(regions)  # (K, h, w[, 3]) uint8, writable (decoded arrays are read-only)
    except ValueError as exc:
        raise ValueError(f"regions: shapes {sorted({r.shape for r in regions})} differ") from exc
    u8 = torch.from_numpy(stack)
    u8 = u8[:, None] if u8.dim() == 3 else u8.permute(0, 3, 1, 2)  # (K, c, h, w), a strided view
    if channels == 3 and u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    if view.flip:
        u8 = u8.flip(-1)
    if out is None:
        out = torch.empty(u8.shape, dtype=torch.float32)
    elif tuple(out.shape) != tuple(u8.shape):
        raise ValueError(f"out.shape={tuple(out.shape)}: expected {tuple(u8.shape)}")
    out.copy_(u8)  # the transposing copy, uint8 to float in one pass (torch's uint8 .contiguous() is 3x slower)
    return jitter_to_model(out, view)


def jitter_to_model(x: Tensor, view: View) -> Tensor:
    """In place: float (..., C, h, w) holding 0..255 -> [-1, 1], colour-jittered as the view says.

    The colour changes in [0, 1] (brightness: clamp(x + a); contrast: clamp(m + (x - m) a) around
    the view's mean; saturation: clamp(g + (x - g) a) around the grey; hue: ``shift_hue``) with
    the scalings to [0, 1] and then to [-1, 1] folded into their constants: two or three passes
    over the stack instead of five or six (the conversion is a tenth of the loader's time). The
    one implementation, for the CPU and the GPU paths alike. ``x`` must be contiguous and not
    shared (not an expanded view).
    """
    kind, amount, channels = view.jitter.kind, view.jitter.amount, x.shape[-3]
    if kind == "brightness":  # clamp(x / 255 + a, 0, 1) * 2 - 1
        return x.mul_(2.0 / 255.0).add_(2.0 * amount - 1.0).clamp_(-1.0, 1.0)
    if kind == "contrast":  # clamp(m + (x / 255 - m) * a, 0, 1) * 2 - 1
        m = float(np.mean(view.mean)) if view.mean else 0.5
        return x.mul_(2.0 * amount / 255.0).add_(2.0 * m * (1.0 - amount) - 1.0).clamp_(-1.0, 1.0)
    if kind == "saturation" and channels == 3:  # clamp(g + (x / 255 - g) * a, 0, 1) * 2 - 1, g the grey
        r, g, b = x.unbind(-3)
        w = 2.0 * (1.0 - amount) / 255.0
        grey = (r * (0.299 * w)).add_(g, alpha=0.587 * w).add_(b, alpha=0.114 * w).sub_(1.0)
        return x.mul_(2.0 * amount / 255.0).add_(grey.unsqueeze(-3)).clamp_(-1.0, 1.0)
    if kind == "hue" and channels == 3:
        return shift_hue(x.div_(255.0), amount, out=x).mul_(2.0).sub_(1.0)
    return x.mul_(2.0 / 255.0).sub_(1.0)  # "none", or a colour change of a grey image


def shift_hue(t: Tensor, amount: float, out: Tensor | None = None) -> Tensor:
    """Rotate the HSV hue of a (..., 3, h, w) tensor in [0, 1] by ``amount`` turns.

    The semantics of torchvision's ``adjust_hue`` (to HSV, add ``amount`` to the hue modulo 1,
    back to RGB) in closed form with ~30 tensor operations instead of its one-hot masks and
    einsums (12 ms per 224 px region here; this: under 1 ms, equal within 2e-6): a hue shift keeps
    V = max(r, g, b) and V - C = min(r, g, b), and with H = 6 * hue in [0, 6) the channels are
    ``min + C * clamp(|H - 3| - 1, 0, 1)`` (red), ``min + C * clamp(2 - |H - 2|, 0, 1)`` (green)
    and ``min + C * clamp(2 - |H - 4|, 0, 1)`` (blue). Grey pixels (C = 0) keep their value
    whatever their (undefined) hue. ``out`` may be ``t`` itself.
    """
    r, g, b = t.unbind(-3)
    lo = torch.minimum(torch.minimum(r, g), b)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - lo
    # 6 * hue = (g - b) / C where red is the maximum, 2 + (b - r) / C for green, 4 + (r - g) / C for blue
    h = torch.where(v == r, g - b, torch.where(v == g, (b - r).add_(c, alpha=2.0), (r - g).add_(c, alpha=4.0)))
    h.div_(c).nan_to_num_(0.0, 0.0, 0.0).add_(6.0 * (amount % 1.0)).remainder_(6.0)
    out = torch.empty_like(t) if out is None else out  # r, g, b are not read again: out may be t
    for i, (centre, sign) in enumerate(((3.0, 1.0), (2.0, -1.0), (4.0, -1.0))):
        f = (h - centre).abs_()
        f = f.sub_(1.0) if sign > 0 else f.neg_().add_(2.0)
        torch.addcmul(lo, c, f.clamp_(0.0, 1.0), out=out.select(-3, i))
    return out


def views_to_source(views: list[View], boxes: Tensor) -> Tensor:
    """(B, R, 4) normalised view boxes -> the same boxes in source-image pixels, per sample."""
    arr = boxes.detach().double().cpu().numpy()
    out = np.stack([v.to_source(arr[i]) for i, v in enumerate(views)])
    return torch.from_numpy(out).to(boxes.dtype)


def is_base_request(boxes: Tensor, out_size: int, batch: int, base_views: Tensor | None) -> bool:
    """Whether TNet asks for the whole view at the base size, which the loader already decoded.

    Raises ValueError on boxes that are not (batch, K, 4).
    """
    if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
        raise ValueError(f"boxes.shape={tuple(boxes.shape)}: expected ({batch}, K, 4)")
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0])
    return (base_views is not None and boxes.shape[1] == 1 and out_size == base_views.shape[-1]
            and torch.allclose(boxes.detach().cpu().float(), whole.expand_as(boxes)))

class PyramidRegionSource:
    """A batch of pyramids as a ``tnet.regions.RegionSource``.

    ``base_views`` (B, C, b, b) are the whole views already decoded by the loader at ``base_size``;
    a request for exactly that is served from them. Everything else is read from the pyramids,
    only the tiles under the requested boxes, in ``executor`` threads when given, from the coarsest
    level that covers each box up to ``max_upsample`` (``resample.choose_level``).
    """

    def __init__(self, readers: list[PyramidReader], views: list[View], channels: int,
                 base_views: Tensor | None = None, base_decoded: int = 0, executor: Executor | None = None,
                 antialias: bool = True, max_upsample: float = 1.0) -> None:
        if len(readers) != len(views) or not readers:
            raise ValueError(f"readers={len(readers)}, views={len(views)}: need the same non-zero count")
        self.readers, self.views, self.channels = readers, views, channels
        self.base_views, self.base_decoded = base_views, base_decoded
        self.executor, self.antialias, self.max_upsample = executor, antialias, max_upsample
        self._start = [r.decoded_pixels for r in readers]

    def __len__(self) -> int:
        return len(self.readers)

    def source_boxes(self, boxes: Tensor) -> Tensor:
        return views_to_source(self.views, boxes)

    def read_regions(self, boxes: Tensor, out_size: int) -> Tensor:
        if is_base_request(boxes, out_size, len(self), self.base_views):
            return self.base_views[:, None]
        src = self.source_boxes(boxes).numpy()  # (B, K, 4)
        channels = 3 if self.channels == 3 or any(r.channels == 3 for r in self.readers) else 1
        out = torch.empty(len(self), src.shape[1], channels, out_size, out_size)  # (B, K, C, out, out)

        def read(i: int) -> None:
            reader, view = self.readers[i], self.views[i]
            tiles = reader.read_regions([tuple(b) for b in src[i]], out_size, executor=None,
                                        antialias=self.antialias, fill=GREY, max_upsample=self.max_upsample)
            regions_to_model(tiles, view, self.channels, out=out[i])

        indices = range(len(self))
        if self.executor is not None and len(self) > 1:
            list(self.executor.map(read, indices))  # list(): re-raise a worker's exception here
        else:
            for i in indices:
                read(i)
        return out

    def full_pixels(self) -> Tensor:
        return torch.tensor([(v.box[2] - v.box[0]) * (v.box[3] - v.box[1]) for v in self.views],
                            dtype=torch.float64)

    def decoded_pixels(self) -> int:
        return self.base_decoded + sum(r.decoded_pixels - s for r, s in zip(self.readers, self._start))
