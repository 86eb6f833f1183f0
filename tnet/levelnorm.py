"""Per-level BatchNorm running statistics for a backbone shared by every level.

TNet runs one backbone on the downscaled whole view (level 0) and on zoomed patches (levels >= 1).
In training each call normalises with its own batch statistics, but the running averages that
evaluation uses are shared, so they end up a mixture of both kinds of input. Where the levels look
alike (natural images, the paper) that is harmless; where they do not (Megapixel MNIST: a black
canvas with 5 px blobs at level 0, a digit filling the patch at level 1) evaluation normalises
every level wrongly and accuracy falls to chance while training accuracy climbs. This module keeps
one set of running statistics per level and swaps it into the backbone's norms around each call;
weights and biases stay shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class LevelNormStats(nn.Module):
    """Holds the running statistics of levels 1..levels-1 (level 0 keeps the backbone's own)."""

    def __init__(self, backbone: nn.Module, levels: int) -> None:
        super().__init__()
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._norms = [m for m in norms if m.track_running_stats]  # a plain list: not submodules
        self.levels = levels
        for level in range(1, levels):
            for i, norm in enumerate(self._norms):
                for stat in _STATS:
                    self.register_buffer(f"l{level}_{i}_{stat}", getattr(norm, stat).detach().clone())

    def _swap(self, level: int) -> None:
        for i, norm in enumerate(self._norms):
            for stat in _STATS:
                key = f"l{level}_{i}_{stat}"
                mine, theirs = self._buffers[key], norm._buffers[stat]
                self._buffers[key], norm._buffers[stat] = theirs, mine

    @contextmanager
    def use(self, level: int) -> Iterator[None]:
        """Within the block the backbone's norms read and update ``level``'s statistics."""
        if level == 0 or not self._norms:
            yield
            return
        self._swap(level)
        try:
            yield
        finally:
            self._swap(level)
