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
    return resize(crop, out_size, antialias)


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

    def __init__(self, images: Tensor | list[Tensor], antialias: bool = True) -> None:
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images.shape={tuple(images.shape)}: expected (B, C, H, W)")
            images = list(images.unbind(0))
        if not images:
            raise ValueError("images: empty batch")
        self.images = images
        self.antialias = antialias

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
        out = [
            torch.stack([crop_resize(img, b, out_size, self.antialias) for b in sample_boxes])
            for img, sample_boxes in zip(self.images, pixel_boxes)
        ]
        return torch.stack(out)  # (B, K, C, out, out)

    def full_pixels(self) -> Tensor:
        return torch.tensor([img.shape[-1] * img.shape[-2] for img in self.images], dtype=torch.float64)

    def decoded_pixels(self) -> int:
        return 0
