"""Choosing k cells of an N x N grid without near-duplicates (TNetConfig.suppress).

The paper's top-k can spend all k locations on neighbouring, overlapping cells around one spot:
on Megapixel MNIST the attention pictures showed blocks of 2-6 adjacent cells where five digits
lay apart. Greedy suppression (as non-maximum suppression does for detections) takes the best
cell, then excludes the cells within ``radius`` rows and columns of it, and repeats, so the k
reads cover k different places. Pure functions on index tensors; the scores and their
log-probabilities are untouched, so REINFORCE and every loss see the same distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


def neighbourhood(n: int, radius: int) -> Tensor:
    """(N*N, N*N) bool: True where two cells of an n x n grid lie within ``radius`` rows and columns."""
    if n < 1 or radius < 0:
        raise ValueError(f"n={n}, radius={radius}: need n >= 1 and radius >= 0")
    idx = torch.arange(n * n)
    rows, cols = idx // n, idx % n
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)


def suppressed_topk(first: Tensor, rest: Tensor, keep: int, k: int, neighbours: Tensor) -> Tensor:
    """(R, N*N) keys -> (R, k) distinct cells, chosen greedily with neighbours suppressed.

    The first ``keep`` picks maximise ``first`` (the module's own ranking), the others ``rest``
    (e.g. the Gumbel-perturbed keys), each among the cells no earlier pick suppresses. When every
    unchosen cell is suppressed (a radius too wide for k), the pick falls back to the best
    unchosen cell, so there are always k distinct cells.
    """
    if first.shape != rest.shape or first.dim() != 2:
        raise ValueError(f"keys: shapes {tuple(first.shape)} and {tuple(rest.shape)}, expected the same (R, N*N)")
    cells = first.shape[1]
    if not 0 <= keep <= k <= cells or neighbours.shape != (cells, cells):
        raise ValueError(f"keep={keep}, k={k}, neighbours {tuple(neighbours.shape)}: need 0 <= keep <= k <= {cells}")
    if not bool(neighbours.diagonal().all()):
        raise ValueError("neighbours: every cell must be its own neighbour (as neighbourhood() builds it)")
    neighbours = neighbours.to(first.device)
    chosen = torch.zeros_like(first, dtype=torch.bool)
    blocked = torch.zeros_like(chosen)  # every cell is its own neighbour: chosen ones are blocked too
    picks = []
    for step in range(k):
        keys = first if step < keep else rest
        free = keys.masked_fill(blocked, float("-inf"))
        fallback = keys.masked_fill(chosen, float("-inf"))
        has_free = (~blocked).any(dim=1)
        pick = torch.where(has_free, free.argmax(dim=1), fallback.argmax(dim=1))  # (R,)
        picks.append(pick)
        chosen[torch.arange(len(pick), device=pick.device), pick] = True
        blocked |= neighbours[pick]
    return torch.stack(picks, dim=1) if picks else first.new_zeros(first.shape[0], 0, dtype=torch.long)
