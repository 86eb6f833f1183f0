import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet.geometry import candidate_grid, child_box, features_per_image, grid_boxes, level_grids


def test_fmow_448():
    g = candidate_grid(448, 3, 0.5)
    assert (g.patch, g.stride, g.starts) == (224, 112, (0, 112, 224))


def test_fmow_896_two_levels():
    g1, g2 = level_grids(896, 3, 3, 0.5)
    assert (g1.patch, g1.stride, g1.starts) == (448, 224, (0, 224, 448))
    assert (g2.side, g2.patch, g2.stride, g2.starts) == (448, 224, 112, (0, 112, 224))


def test_imagenet_padding_goes_top_left():
    g = candidate_grid(224, 5, 0.34375)
    assert (g.patch, g.stride) == (77, 37)
    assert g.starts == (-1, 36, 73, 110, 147)


def test_features_per_image():
    assert features_per_image([2]) == 3
    assert features_per_image([2, 1]) == 5
    assert features_per_image([2, 2]) == 7
    assert features_per_image([]) == 1
    with pytest.raises(ValueError, match="locations"):
        features_per_image([0])


def test_child_box_nests_in_parent_coordinates():
    g1, g2 = level_grids(896, 3, 3, 0.5)
    level1 = child_box((0, 0, 896, 896), g1, 5)  # row 1, col 2
    assert level1 == (448, 224, 896, 672)
    assert child_box(level1, g2, 8) == (448 + 224, 224 + 224, 896, 672)


@pytest.mark.parametrize("args", [(0, 3, 0.5), (100, 1, 0.5), (100, 3, 0.0), (100, 3, 1.5)])
def test_bad_geometry_is_refused(args):
    with pytest.raises(ValueError):
        candidate_grid(*args)


@settings(max_examples=300, deadline=None)
@given(side=st.integers(16, 5000), n=st.integers(2, 12), overlap=st.floats(0.05, 1.0))
def test_grid_properties(side, n, overlap):
    g = candidate_grid(side, n, overlap)
    assert g.patch == math.floor(side * overlap + 0.5)
    span = g.starts[-1] + g.patch - g.starts[0]
    excess = span - side
    assert excess >= 0  # the grid covers the whole region, nothing is clipped
    assert excess < n  # and pads less than one pixel per cell step
    assert -g.starts[0] == math.ceil(excess / 2)  # the odd pixel goes top/left
    assert all(b - a == g.stride for a, b in zip(g.starts, g.starts[1:]))
    for x0, y0, x1, y1 in grid_boxes((0, 0, side, side), g):
        assert x1 - x0 == g.patch == y1 - y0
        # every box lies inside the padded region
        assert x0 >= g.starts[0] and x1 <= g.starts[0] + span


@settings(max_examples=100, deadline=None)
@given(size=st.integers(64, 4096), levels=st.integers(1, 4), n=st.integers(2, 5), overlap=st.floats(0.3, 0.9))
def test_level_sides_shrink(size, levels, n, overlap):
    try:
        grids = level_grids(size, levels, n, overlap)
    except ValueError:
        return  # a patch shrank to nothing: refused, never silently wrong
    side = size
    for g in grids:
        assert g.side == side and g.patch <= side
        side = g.patch
