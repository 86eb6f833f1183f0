"""Pure geometry of TNet's candidate grids.

Convention: boxes are ``(x0, y0, x1, y1)`` in **input pixels**, the coordinates of the image
squash-resized to ``input_size`` x ``input_size`` (the paper's "448 px" or "896 px" image). The
model divides by ``input_size`` to get the normalised view coordinates of ``tnet.regions``, and a
region source maps those to source-image pixels.

Derivation of the grid (paper, reference code): a region of side S is covered by an N x N grid of
patches of side ``p = round(S * o)`` at stride ``s = ceil((S - p) / (N - 1))``. When ``s`` does not
divide evenly, the grid spans ``(N - 1) * s + p >= S`` pixels: the excess is zero padding, the odd
pixel going top/left, so the first start is ``-ceil(excess / 2)``. Nothing is clipped.
ImageNet (S=224, N=5, o=0.34375): p=77, s=37, excess 1, starts -1, 36, 73, 110, 147.
fMoW-448 (S=448, N=3, o=0.5): p=224, s=112, starts 0, 112, 224.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    """The candidate grid of one region side."""

    side: int  # S, region side in input pixels
    n: int  # N, cells per row/column
    patch: int  # p, candidate side in input pixels
    stride: int  # s
    starts: tuple[int, ...]  # offsets of each row/column from the region's top/left

    @property
    def cells(self) -> int:
        return self.n * self.n

    def cell_offset(self, cell: int) -> tuple[int, int]:
        """(dx, dy) of a flattened cell index (row-major) from the region origin."""
        row, col = divmod(cell, self.n)
        return self.starts[col], self.starts[row]

    def centres(self) -> tuple[float, ...]:
        """Centre of each row/column in region pixels, for sampling the location map."""
        return tuple(s + self.patch / 2 for s in self.starts)


def round_half_up(x: float) -> int:
    """Rounding as in the paper's arithmetic (Python's round() would give 0.5 -> 0)."""
    return int(math.floor(x + 0.5))


def candidate_grid(side: int, n: int, overlap: float) -> Grid:
    """N x N candidate grid over a region of ``side`` pixels (see module docstring).

    Raises:
        ValueError: side < 1, n < 2, overlap outside (0, 1], or a patch of zero pixels.
    """
    if side < 1:
        raise ValueError(f"side={side}: must be >= 1")
    if n < 2:
        raise ValueError(f"grid={n}: must be >= 2")
    if not 0.0 < overlap <= 1.0:
        raise ValueError(f"overlap={overlap}: must be in (0, 1]")
    patch = round_half_up(side * overlap)
    if patch < 1:
        raise ValueError(f"side={side}, overlap={overlap}: patch of zero pixels")
    stride = math.ceil((side - patch) / (n - 1))
    excess = (n - 1) * stride + patch - side
    first = -math.ceil(excess / 2)
    return Grid(side, n, patch, stride, tuple(first + i * stride for i in range(n)))


def level_grids(input_size: int, levels: int, n: int, overlap: float) -> list[Grid]:
    """Grids of levels 1..levels-1: level l's patches are the regions that level l+1 divides."""
    if levels < 1:
        raise ValueError(f"levels={levels}: must be >= 1")
    grids, side = [], input_size
    for _ in range(levels - 1):
        grid = candidate_grid(side, n, overlap)
        grids.append(grid)
        side = grid.patch
    return grids


def features_per_image(locations: Sequence[int]) -> int:
    """1 + k1 + k1*k2 + ...: fMoW-448 (k=2) gives 3, fMoW-896 (k=2 then 1) gives 5."""
    total, width = 1, 1
    for k in locations:
        if k < 1:
            raise ValueError(f"locations={list(locations)}: every k must be >= 1")
        width *= k
        total += width
    return total


def child_box(parent: tuple[float, float, float, float], grid: Grid, cell: int) -> tuple[float, ...]:
    """Box of ``cell`` of ``grid`` inside ``parent`` (both in input pixels)."""
    dx, dy = grid.cell_offset(cell)
    x0, y0 = parent[0] + dx, parent[1] + dy
    return (x0, y0, x0 + grid.patch, y0 + grid.patch)


def grid_boxes(parent: tuple[float, float, float, float], grid: Grid) -> list[tuple[float, ...]]:
    """All N*N candidate boxes of a region, row-major."""
    return [child_box(parent, grid, c) for c in range(grid.cells)]
