"""The location module's reading of the coarse map (tnet.location.sample_cells, TNetConfig.loc_points)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet.config import TNetConfig
from tnet.geometry import candidate_grid
from tnet.location import sample_cells
from tnet.model import TNet

CFG = TNetConfig(
    num_classes=4, backbone="tiny_s", in_chans=1, input_size=256, base_size=64, levels=2, grid=4,
    overlap=0.4, locations=(2,), pos_channels=24, dropout=0.0,
)  # fmt: skip


def test_one_point_is_the_bilinear_sample_at_each_centre() -> None:
    fmap = torch.randn(2, 3, 8, 8)
    centres = torch.tensor([4.0, 24.0, 36.0, 60.0])  # pixels of a 64 px read; map pixel i: centre 8i + 4
    out = sample_cells(fmap, centres, 64)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[:, :, 0, 2], fmap[:, :, 0, 4], atol=1e-6)  # on pixel centres: the pixel
    # 24 px lies halfway between the centres of map rows 2 and 3 (20 and 28 px)
    assert torch.allclose(out[:, :, 1, 2], fmap[:, :, 2, 4] * 0.5 + fmap[:, :, 3, 4] * 0.5, atol=1e-6)


def test_a_blob_by_the_cells_edge_reaches_its_score_only_with_points() -> None:
    """A 64 px read, 4 cells a side of 26 px; one hot map pixel near the second cell's left edge,
    away from its centre: the centre sample misses it, the 3 x 3 lattice's max finds it."""
    grid = candidate_grid(64, 4, 0.4)
    centres = torch.tensor(grid.centres())
    fmap = torch.zeros(1, 1, 16, 16)  # stride 4: map pixel i spans [4i, 4i+4)
    x0 = grid.starts[1] + 3  # inside cell 1, 3 px from its left edge
    y0 = int(centres[1])
    fmap[0, 0, y0 // 4, x0 // 4] = 1.0
    point = sample_cells(fmap, centres, 64)[0, 0]
    pooled = sample_cells(fmap, centres, 64, span=grid.patch, points=3)[0, 0]
    assert point[1, 1] < 0.05 and pooled[1, 1] > 0.3
    assert pooled[3, 3] == 0.0  # a cell far from the blob stays empty


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 6), points=st.sampled_from([3, 5]), span=st.floats(1.0, 30.0), seed=st.integers(0, 2**16))
def test_an_odd_lattice_holds_the_centre_so_its_max_is_never_below_the_centre_sample(n, points, span, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(2, 3, 10, 10, generator=g)
    centres = torch.sort(torch.rand(n, generator=g) * 64).values
    point = sample_cells(fmap, centres, 64)
    pooled = sample_cells(fmap, centres, 64, span=span, points=points)
    assert pooled.shape == point.shape == (2, 3, n, n)
    assert bool((pooled >= point - 1e-5).all())


def test_tnet_with_points_runs_keeps_its_parameters_and_validates() -> None:
    torch.manual_seed(0)
    plain = TNet(CFG)
    pooled = TNet(dataclasses.replace(CFG, loc_points=3))
    pooled.load_state_dict(plain.state_dict())  # the same parameters: checkpoints move between them
    x = torch.rand(2, 1, 256, 256) * 2 - 1
    plain.eval(), pooled.eval()
    with torch.no_grad():
        a, b = plain(x), pooled(x)
    assert b.logits.shape == a.logits.shape and not torch.equal(a.selections[0].logits, b.selections[0].logits)
    with pytest.raises(ValueError, match="loc_points"):
        dataclasses.replace(CFG, loc_points=0)
