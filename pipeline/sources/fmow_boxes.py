"""Pure helpers for fMoW sidecars and boxes: parse, select, clip, crop with context, rescale.

Convention: a stored box is ``{"index", "id", "category", "box": [x0, y0, x1, y1]}`` with the
corners in pixels of the image it is stored with (x along columns, end exclusive, floats);
``index`` is the box's position in the sidecar's ``bounding_boxes`` list and ``id`` its ``ID``.
fMoW sidecars give ``box`` as ``[x, y, width, height]``.
"""

from __future__ import annotations

import json
import math
from numbers import Real
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import SampleError

PLACEHOLDER_ID = -1  # first box of ground-truth files, not an object


def parse_sidecar(data: bytes, where: str) -> dict[str, Any]:
    """The sidecar as a dict, its ``bounding_boxes`` checked to be boxes of four numbers.

    Raises:
        SampleError: "bad metadata json" for unparsable JSON or a wrong structure.
    """
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(where, "bad metadata json", str(err)) from err
    if not isinstance(obj, dict) or not isinstance(obj.get("bounding_boxes"), list):
        raise SampleError(where, "bad metadata json", "no bounding_boxes list")
    for i, box in enumerate(obj["bounding_boxes"]):
        coords = box.get("box") if isinstance(box, dict) else None
        if (
            not isinstance(coords, list)
            or len(coords) != 4
            or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in coords)
        ):
            raise SampleError(
                where, "bad metadata json", f"bounding_boxes[{i}] is not {{'box': [x, y, w, h]}}"
            )
    return obj


def select_boxes(boxes: list[dict[str, Any]], category: str) -> list[tuple[int, dict[str, Any]]]:
    """``(position, box)`` of the boxes that describe ``category``.

    Skipped: the ID -1 placeholder and boxes naming another category. A box without a
    ``category`` (anonymised test sidecars) counts as the view's category.
    """
    return [
        (i, b)
        for i, b in enumerate(boxes)
        if b.get("ID") != PLACEHOLDER_ID and b.get("category", category) == category
    ]


def clip_boxes(
    picked: list[tuple[int, dict[str, Any]]], width: int, height: int, warnings: list[str]
) -> list[dict[str, Any]]:
    """xyxy boxes clipped to ``width x height``; zero-area ones dropped. Appends to ``warnings``."""
    out = []
    for index, raw in picked:
        x, y, w, h = (float(v) for v in raw["box"])
        ident = raw.get("ID", index)
        box = [x, y, x + w, y + h]
        limits = [float(width), float(height)] * 2
        clipped = [min(max(v, 0.0), lim) for v, lim in zip(box, limits)]
        if clipped != box:
            warnings.append(f"box {ident} {_fmt(box)} clipped to image {width}x{height}: {_fmt(clipped)}")
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            warnings.append(f"box {ident} {_fmt(box)} has zero area, dropped")
            continue
        out.append({"index": index, "id": raw.get("ID"), "category": raw.get("category"), "box": clipped})
    return out


def context_crop(box: list[float], context: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer xyxy crop: ``box`` grown by ``context`` x its width/height on each side, clipped.

    Outward rounding (floor/ceil) so the crop always contains the whole box.
    """
    x0, y0, x1, y1 = box
    mx, my = context * (x1 - x0), context * (y1 - y0)
    cx0, cy0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
    cx1, cy1 = min(width, math.ceil(x1 + mx)), min(height, math.ceil(y1 + my))
    return cx0, cy0, cx1, cy1


def shift_boxes(boxes: list[dict[str, Any]], dx: float, dy: float) -> list[dict[str, Any]]:
    """Boxes moved into a crop whose top-left corner is ``(dx, dy)``."""
    return [
        {**b, "box": [b["box"][0] - dx, b["box"][1] - dy, b["box"][2] - dx, b["box"][3] - dy]} for b in boxes
    ]


def scale_boxes(boxes: list[dict[str, Any]], scale: tuple[float, float]) -> list[dict[str, Any]]:
    """Boxes multiplied by ``(sx, sy)`` (rounded to 1/1000 px to keep JSON short)."""
    sx, sy = scale
    return [
        {
            **b,
            "box": [
                round(b["box"][0] * sx, 3),
                round(b["box"][1] * sy, 3),
                round(b["box"][2] * sx, 3),
                round(b["box"][3] * sy, 3),
            ],
        }
        for b in boxes
    ]


def capped_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """``(w, h)`` with the shorter side at most ``max_short_side``, aspect kept (rounded)."""
    short = min(width, height)
    if short <= max_short_side:
        return width, height
    factor = max_short_side / short
    if width <= height:
        return max_short_side, max(1, round(height * factor))
    return max(1, round(width * factor)), max_short_side


def cap_short_side(image: np.ndarray, max_short_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` resized (antialiased bilinear) so its shorter side is ``max_short_side``.

    Returns the image and the ``(sx, sy)`` factors that map old pixel coordinates to new ones.
    """
    height, width = image.shape[:2]
    new_w, new_h = capped_size(width, height, max_short_side)
    if (new_w, new_h) == (width, height):
        return image, (1.0, 1.0)
    # Pillow's resize widens the filter support when downscaling, i.e. it antialiases.
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized), (new_w / width, new_h / height)


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
