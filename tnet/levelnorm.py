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

    def reset(self) -> None:
        """Running statistics of every level back to their initial values (mean 0, variance 1)."""
        for level in range(1, self.levels):
            with self.use(level):
                for norm in self._norms:
                    norm.reset_running_stats()


@contextmanager
def recalibrating_norms(model: nn.Module) -> Iterator[None]:
    """Forward passes inside the block recompute every BatchNorm's running statistics from scratch.

    Why: evaluation normalises with running averages (momentum 0.1) of batch statistics gathered
    while the weights moved. Early in training the weights move fast, so the averages describe
    weights of many steps ago, and evaluation is worse than the weights ("precise BN"; measured
    on Megapixel MNIST's patch classifier in docs/benchmarks.md, recipe round 3). Inside the block
    the model is in eval mode (TNet selects its deterministic top-k, dropout is off) except the
    norms, which average the batch statistics of every pass equally (``momentum=None``); TNet's
    per-level statistics are recomputed per level. Run it under ``torch.no_grad()`` on a few
    hundred training samples; weights are untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for stats in (m for m in model.modules() if isinstance(m, LevelNormStats)):
        stats.reset()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
