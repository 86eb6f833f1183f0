"""Where TNet gets its pixels from.

TNet never sees a whole full-resolution image. It asks a ``RegionSource`` for boxes, and the
source decides how to produce them: ``TensorRegionSource`` crops tensors already in memory (tests,
the eager baseline), ``pipeline.lazy.PyramidRegionSource`` decodes only the pyramid tiles a box
touches. The model code is the same for both.

Coordinate convention (stated once, used everywhere): boxes are ``xyxy`` in **normalised view
coordinates**, where (0, 0) is the top-left and (1, 1) the bottom-right corner of the sample's
view (the whole image, or the augmentation crop of it). Boxes may extend past the view; the part
outside is zero-filled in model space (pixels are scaled to [-1, 1], so 0 is mid-grey), as the
paper's reference code zero-pads the grid.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class RegionSource(Protocol):
    """A batch of images that can be read region by region."""

    def __len__(self) -> int:
        """Number of samples in the batch."""
        ...

    def read_regions(self, boxes: Tensor, out_size: int) -> Tensor:
        """Read ``boxes`` (B, K, 4) normalised xyxy; return (B, K, C, out_size, out_size) in [-1, 1]."""
        ...

    def source_boxes(self, boxes: Tensor) -> Tensor:
        """Map normalised view boxes (B, K, 4) to source-image pixel xyxy (B, K, 4)."""
        ...

    def full_pixels(self) -> Tensor:
        """Pixels of each sample's view at full (stored) resolution, (B,) float64."""
        ...

    def decoded_pixels(self) -> int:
        """Pixels decoded so far by this source (0 when pixels were already in memory)."""
        ...


def crop_resize(image: Tensor, box: Tensor, out_size: int, antialias: bool = True) -> Tensor:
    """Crop ``box`` (x0, y0, x1, y1 in pixels of ``image``) with zero padding and resize.

    ``image`` is (C, H, W). Pixel edges are continuous coordinates: pixel i spans [i, i + 1).
    The box is snapped outward to whole pixels, so a box of integer corners (the grid's case) is
    exact. Returns (C, out_size, out_size).
    """
    return resize(snapped_crop(image, box)[0], out_size, antialias)


def snapped_crop(image: Tensor, box: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The pixels of ``box`` snapped outward to whole pixels, zero outside ``image`` (C, H, W),
    and the crop's top-left corner in ``image``."""
    c, h, w = image.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    ix0, iy0 = int(torch.floor(torch.tensor(x0))), int(torch.floor(torch.tensor(y0)))
    ix1, iy1 = int(torch.ceil(torch.tensor(x1))), int(torch.ceil(torch.tensor(y1)))
    if ix1 <= ix0 or iy1 <= iy0:
        raise ValueError(f"box={tuple(box.tolist())}: empty box")
    crop = image.new_zeros((c, iy1 - iy0, ix1 - ix0))
    sx0, sy0, sx1, sy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
    if sx1 > sx0 and sy1 > sy0:
        crop[:, sy0 - iy0 : sy1 - iy0, sx0 - ix0 : sx1 - ix0] = image[:, sy0:sy1, sx0:sx1]
    return crop, (ix0, iy0)


def sample_box(image: Tensor, box: Tensor, out_size: int) -> Tensor:
    """Bilinear samples at the centres of an ``out_size`` grid laid over ``box`` (fractional xyxy
    in pixels of ``image``, (C, H, W)), from the box's pixels snapped outward (zero outside the
    image) with the filter clamped to them: the pyramid reader's upsampling read
    (``pipeline.resample``), at the box's exact fractional position."""
    crop, (ix0, iy0) = snapped_crop(image, box)
    h, w = crop.shape[-2:]
    x0, y0, x1, y1 = (float(v) for v in box)
    steps = (torch.arange(out_size, dtype=torch.float64) + 0.5) / out_size
    gx = ((x0 - ix0) + steps * (x1 - x0)) * (2.0 / w) - 1.0  # grid_sample's [-1, 1] spans the pixel edges
    gy = ((y0 - iy0) + steps * (y1 - y0)) * (2.0 / h) - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()  # (1, out, out, (x, y))
    return F.grid_sample(crop[None].float(), grid.to(crop.device), mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def pyramid_level(image: Tensor, factor: int) -> Tensor:
    """``image`` (C, H, W) reduced by ``factor`` (a power of two) as our pyramids are built: means of
    ``factor`` x ``factor`` blocks, a partial block at the edge averaged over what it holds."""
    if factor == 1:
        return image
    return F.avg_pool2d(image[None].float(), factor, ceil_mode=True, count_include_pad=False)[0]


def pyramid_factor(box_w: float, box_h: float, out_size: int, max_upsample: float = 1.0) -> int:
    """The downsampling factor (a power of two) of the pyramid level that serves a box of
    ``box_w`` x ``box_h`` pixels at ``out_size``: the largest whose pixels still cover the output
    up to ``max_upsample`` (``pipeline.resample.choose_level`` on a pyramid of halvings)."""
    if not max_upsample >= 1.0:
        raise ValueError(f"max_upsample={max_upsample}: must be >= 1")
    factor, tol = 1, 1.0 - 1e-9
    while min(box_w, box_h) * max_upsample / (2 * factor) >= out_size * tol:
        factor *= 2
    return factor


def resize(image: Tensor, out_size: int, antialias: bool = True) -> Tensor:
    """Bilinear resize of (C, H, W) to (C, out_size, out_size); antialiased when downsampling."""
    if image.shape[-2:] == (out_size, out_size):
        return image
    return F.interpolate(
        image[None].float(), size=(out_size, out_size), mode="bilinear", align_corners=False,
        antialias=antialias,
    )[0]


class TensorRegionSource:
    """Regions cropped from images already in memory: the eager path and the test double.

    ``images`` is (B, C, H, W) float in [-1, 1] (or a list of (C, H_i, W_i) tensors of different
    sizes). Normalised view coordinates map to the whole image of each sample.
    """

    def __init__(self, images: Tensor | list[Tensor], antialias: bool = True, max_upsample: float = 1.0) -> None:
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images.shape={tuple(images.shape)}: expected (B, C, H, W)")
            images = list(images.unbind(0))
        if not images:
            raise ValueError("images: empty batch")
        self.images = images
        if not max_upsample >= 1.0:
            raise ValueError(f"max_upsample={max_upsample}: must be >= 1")
        self.antialias, self.max_upsample = antialias, max_upsample
        self._levels: dict[tuple[int, int], Tensor] = {}  # (sample, factor) -> that pyramid level

    def __len__(self) -> int:
        return len(self.images)

    def _sizes(self, device: torch.device) -> Tensor:
        # (B, 4): (W, H, W, H) per sample, to scale normalised xyxy into pixels.
        wh = [(img.shape[-1], img.shape[-2]) for img in self.images]
        return torch.tensor([[w, h, w, h] for w, h in wh], dtype=torch.float64, device=device)

    def source_boxes(self, boxes: Tensor) -> Tensor:
        return (boxes.double() * self._sizes(boxes.device)[:, None, :]).to(boxes.dtype)

    def read_regions(self, boxes: Tensor, out_size: int) -> Tensor:
        if boxes.dim() != 3 or boxes.shape[0] != len(self) or boxes.shape[-1] != 4:
            raise ValueError(f"boxes.shape={tuple(boxes.shape)}: expected ({len(self)}, K, 4)")
        pixel_boxes = self.source_boxes(boxes.detach().double())
        out = [torch.stack([self._read(i, img, b, out_size) for b in sample_boxes])
               for i, (img, sample_boxes) in enumerate(zip(self.images, pixel_boxes))]
        return torch.stack(out)  # (B, K, C, out, out)

    def _read(self, index: int, image: Tensor, box: Tensor, out_size: int) -> Tensor:
        """One region: with ``max_upsample`` > 1, from the pyramid level the lazy path would read
        (levels computed once per image), upsampled at the box's exact position when that level
        falls short of ``out_size``; otherwise the paper's crop and resize from full resolution."""
        x0, y0, x1, y1 = (float(v) for v in box)
        factor = 1 if self.max_upsample == 1.0 else pyramid_factor(x1 - x0, y1 - y0, out_size, self.max_upsample)
        if factor == 1:
            return crop_resize(image, box, out_size, self.antialias)
        key = (index, factor)
        if key not in self._levels:
            self._levels[key] = pyramid_level(image, factor)
        level, lbox = self._levels[key], box / factor
        if min(x1 - x0, y1 - y0) / factor >= out_size:  # still a reduction at this level
            return crop_resize(level, lbox, out_size, self.antialias)
        return sample_box(level, lbox, out_size)

    def full_pixels(self) -> Tensor:
        return torch.tensor([img.shape[-1] * img.shape[-2] for img in self.images], dtype=torch.float64)

    def decoded_pixels(self) -> int:
        return 0
