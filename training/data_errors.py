"""Corrupt data met during training: read around it, count it, and gather it from every rank.

The loader skips samples whose base view cannot be decoded; a tile found corrupt only when the model
reads it is handled here, so one bad tile never fails a step (every retry would meet it again).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.errors import FormatError
from pipeline.lazy import PyramidRegionSource


class TolerantRegionSource:
    """A batch's ``PyramidRegionSource`` that survives a tile found corrupt when the model reads it.

    Raising would fail the step on this rank alone, and every retry of the run would meet the same
    sample at the same step. So the batch is re-read box by box and a box that cannot be read
    becomes 0 in model space (mid-grey, like the padding outside a view); ``damaged`` maps the
    sample's key to the reason. No extra forward pass, so DDP's collectives stay in step.
    """

    def __init__(self, inner: PyramidRegionSource, keys: list[str]) -> None:
        self.inner, self.keys = inner, keys
        self.damaged: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def source_boxes(self, boxes: Tensor) -> Tensor:
        return self.inner.source_boxes(boxes)

    def full_pixels(self) -> Tensor:
        return self.inner.full_pixels()

    def decoded_pixels(self) -> int:
        return self.inner.decoded_pixels()

    def read_regions(self, boxes: Tensor, out_size: int) -> Tensor:
        try:
            return self.inner.read_regions(boxes, out_size)
        except FormatError:
            pass
        inner, rows = self.inner, []
        for i, (reader, view) in enumerate(zip(inner.readers, inner.views)):
            one = PyramidRegionSource([reader], [view], inner.channels, antialias=inner.antialias)
            regions = []
            for k in range(boxes.shape[1]):
                try:
                    regions.append(one.read_regions(boxes[i : i + 1, k : k + 1], out_size)[0, 0])
                except FormatError as exc:
                    self.damaged.setdefault(self.keys[i], str(exc))
                    regions.append(torch.zeros(inner.channels, out_size, out_size))
            rows.append(torch.stack(regions))
        return torch.stack(rows)  # (B, K, C, out, out)


def error_entries(errors: list[str]) -> list[dict[str, str]]:
    """``"<key or shard URL>: <reason>"`` (how pipeline errors read) as {where, reason} records."""
    return [dict(zip(("where", "reason"), e.split(": ", 1))) for e in errors]


def every_rank_has(flag: bool, world: int, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (a collective: all ranks call it, once per step)."""
    if world == 1 or not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_json(obj: Any, world: int, device: torch.device) -> list[Any]:
    """Every rank's JSON-able ``obj``, on every rank (a collective: all ranks call it). Plain
    bytes, not ``all_gather_object``, which would unpickle what other processes send."""
    if world == 1 or not dist.is_initialized():
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    longest = int(max(int(s) for s in sizes))
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([data, data.new_zeros(longest - data.numel())]))
    return [json.loads(bytes(p[: int(s)].tolist())) for p, s in zip(parts, sizes)]
