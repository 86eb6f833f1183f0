"""Lazy regions: TNet's ``RegionSource`` over tiled pyramids.

A sample's *view* is the box of the source image the model sees (the whole image at evaluation, a
random 85-100% crop in training), optionally flipped and colour-jittered. Augmentation is just a
different view: every region TNet asks for is mapped through the view to source pixels and read
from the pyramid, so only the tiles under attended regions are ever decoded. The base view
(level 0 of TNet) is decoded by the loader's workers and handed over, so it is never read twice.
"""

from __future__ import annotations

import random
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


def random_view(width: int, height: int, rng: random.Random, flip: bool = True, jitter: bool = True,
                area: tuple[float, float] = (0.85, 1.0), aspect: tuple[float, float] = (0.5, 2.0),
                objects: list[list[float]] | None = None, min_object_cover: float = 0.1) -> View:
    """The paper's training view: a crop of 85-100% of the area, aspect 0.5-2, covering at least
    ``min_object_cover`` of the first object box when boxes are known; then flip and colour.

    Falls back to the whole image after 10 tries (as Inception-style croppers do).
    """
    box = (0.0, 0.0, float(width), float(height))
    for _ in range(10):
        a = rng.uniform(*area) * width * height
        r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        w, h = np.sqrt(a * r), np.sqrt(a / r)
        if w > width or h > height:
            continue
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        cand = (x0, y0, x0 + w, y0 + h)
        if objects and _cover(cand, objects[0]) < min_object_cover:
            continue
        box = cand
        break
    return View(box, flip=flip and rng.random() < 0.5, jitter=Jitter.draw(rng) if jitter else Jitter("none"))


def _cover(box: tuple[float, ...], obj: list[float]) -> float:
    ix = max(0.0, min(box[2], obj[2]) - max(box[0], obj[0]))
    iy = max(0.0, min(box[3], obj[3]) - max(box[1], obj[1]))
    area = max((obj[2] - obj[0]) * (obj[3] - obj[1]), 1e-9)
    return ix * iy / area


def to_model(pixels: np.ndarray, view: View, channels: int) -> Tensor:
    """uint8 (h, w[, 3]) -> float (C, h, w) in [-1, 1], flipped and jittered as the view says."""
    t = torch.tensor(pixels, dtype=torch.float32).div_(255.0)  # a copy: decoded arrays are read-only
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if view.flip:
        t = t.flip(-1)
    t = apply_jitter(t, view)
    return t.mul_(2.0).sub_(1.0) if t.is_contiguous() else t.mul(2.0).sub(1.0)


def apply_jitter(t: Tensor, view: View) -> Tensor:
    """Colour change of a (C, h, w) tensor in [0, 1], identical for every region of a sample."""
    kind, amount = view.jitter.kind, view.jitter.amount
    if kind == "none":
        return t
    if kind == "brightness":
        return (t + amount).clamp_(0, 1)
    if kind == "contrast":
        mean = torch.tensor(view.mean or [0.5] * t.shape[0]).mean()
        return (mean + (t - mean) * amount).clamp_(0, 1)
    if t.shape[0] != 3:
        return t
    if kind == "saturation":
        grey = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
        return (grey + (t - grey) * amount).clamp_(0, 1)
    from torchvision.transforms.functional import adjust_hue

    return adjust_hue(t, amount)



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
    only the tiles under the requested boxes, in ``executor`` threads when given.
    """

    def __init__(self, readers: list[PyramidReader], views: list[View], channels: int,
                 base_views: Tensor | None = None, base_decoded: int = 0, executor: Executor | None = None,
                 antialias: bool = True) -> None:
        if len(readers) != len(views) or not readers:
            raise ValueError(f"readers={len(readers)}, views={len(views)}: need the same non-zero count")
        self.readers, self.views, self.channels = readers, views, channels
        self.base_views, self.base_decoded = base_views, base_decoded
        self.executor, self.antialias = executor, antialias
        self._start = [r.decoded_pixels for r in readers]

    def __len__(self) -> int:
        return len(self.readers)

    def source_boxes(self, boxes: Tensor) -> Tensor:
        return views_to_source(self.views, boxes)

    def read_regions(self, boxes: Tensor, out_size: int) -> Tensor:
        if is_base_request(boxes, out_size, len(self), self.base_views):
            return self.base_views[:, None]
        src = self.source_boxes(boxes).numpy()

        def read(i: int) -> Tensor:
            reader, view = self.readers[i], self.views[i]
            tiles = reader.read_regions([tuple(b) for b in src[i]], out_size, executor=None,
                                        antialias=self.antialias, fill=GREY)
            return torch.stack([to_model(t, view, self.channels) for t in tiles])

        indices = range(len(self))
        parts = list(self.executor.map(read, indices)) if self.executor else [read(i) for i in indices]
        return torch.stack(parts)  # (B, K, C, out, out)

    def full_pixels(self) -> Tensor:
        return torch.tensor([(v.box[2] - v.box[0]) * (v.box[3] - v.box[1]) for v in self.views],
                            dtype=torch.float64)

    def decoded_pixels(self) -> int:
        return self.base_decoded + sum(r.decoded_pixels - s for r, s in zip(self.readers, self._start))
