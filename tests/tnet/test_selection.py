"""Near-duplicate suppression of the chosen cells (tnet.selection, TNetConfig.suppress)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet.config import TNetConfig
from tnet.model import TNet
from tnet.selection import neighbourhood, suppressed_topk


def _apart(a: int, b: int, n: int, radius: int) -> bool:
    return max(abs(a // n - b // n), abs(a % n - b % n)) > radius


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 7),
    radius=st.integers(0, 3),
    data=st.data(),
)
def test_each_pick_is_the_best_free_cell_and_apart_from_earlier_ones_while_any_is(n, radius, data):
    cells = n * n
    k = data.draw(st.integers(1, cells))
    keep = data.draw(st.integers(0, k))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    first, rest = torch.randn(3, cells, generator=gen), torch.randn(3, cells, generator=gen)
    picks = suppressed_topk(first, rest, keep, k, neighbourhood(n, radius))
    assert picks.shape == (3, k)
    for r in range(3):
        row = picks[r].tolist()
        assert len(set(row)) == k and all(0 <= c < cells for c in row)
        for step, cell in enumerate(row):
            earlier = row[:step]
            free = [c for c in range(cells) if c not in earlier and all(_apart(c, e, n, radius) for e in earlier)]
            keys = (first if step < keep else rest)[r]
            pool = free or [c for c in range(cells) if c not in earlier]  # the fallback: best unchosen
            assert cell == max(pool, key=lambda c: float(keys[c]))


def test_radius_zero_is_plain_top_k_and_bad_arguments_are_named():
    keys = torch.randn(4, 25)
    picks = suppressed_topk(keys, keys, 6, 6, neighbourhood(5, 0))
    assert torch.equal(picks, keys.topk(6, dim=-1).indices)
    with pytest.raises(ValueError, match="keep=7"):
        suppressed_topk(keys, keys, 7, 6, neighbourhood(5, 0))
    with pytest.raises(ValueError, match="neighbours"):
        suppressed_topk(keys, keys, 1, 6, neighbourhood(4, 0))
    with pytest.raises(ValueError, match="radius=-1"):
        neighbourhood(5, -1)


CFG = TNetConfig(
    num_classes=4, backbone="tiny_s", in_chans=1, input_size=128, base_size=64, levels=2, grid=5,
    overlap=0.5, locations=(4,), pos_channels=24, dropout=0.0,
)


def test_tnet_with_suppress_attends_apart_in_evaluation_and_training_and_keeps_its_parameters():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 128, 128) * 2 - 1
    plain = TNet(CFG)
    model = TNet(dataclasses.replace(CFG, suppress=1, explore="gumbel", explore_scale=4.0, explore_keep=1))
    model.load_state_dict(plain.state_dict())  # same parameters: suppression adds none
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            out = model(images)
        for row in out.selections[0].cells.tolist():
            assert all(_apart(a, b, 5, 1) for i, a in enumerate(row) for b in row[i + 1 :])
    model.load_state_dict(plain.state_dict())  # training forwards moved the BatchNorm statistics
    model.eval()
    with torch.no_grad():
        unsuppressed = plain.eval()(images).selections[0]
        suppressed = model(images).selections[0]
    assert torch.equal(suppressed.cells[:, 0], unsuppressed.cells[:, 0])  # the best cell stays first
    assert torch.allclose(suppressed.probs, unsuppressed.probs)  # the distribution is untouched
    with pytest.raises(ValueError, match="suppress=5"):
        dataclasses.replace(CFG, suppress=5)
