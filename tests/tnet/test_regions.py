import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tnet.regions import TensorRegionSource, crop_resize, pyramid_factor, pyramid_level, sample_box


def test_whole_box_is_a_plain_resize():
    img = torch.rand(3, 64, 48)
    out = crop_resize(img, torch.tensor([0.0, 0.0, 48.0, 64.0]), 32)
    ref = F.interpolate(img[None], size=(32, 32), mode="bilinear", antialias=True)[0]
    assert torch.allclose(out, ref)


def test_outside_is_zero_padded():
    img = torch.ones(1, 10, 10)
    out = crop_resize(img, torch.tensor([-10.0, 0.0, 10.0, 10.0]), 20)
    assert torch.allclose(out[:, :, :8], torch.zeros(1, 20, 8))
    assert torch.allclose(out[:, :, 12:], torch.ones(1, 20, 8))


@settings(max_examples=50, deadline=None)
@given(x0=st.integers(0, 30), y0=st.integers(0, 30), w=st.integers(1, 33), h=st.integers(1, 33))
def test_integer_crop_at_native_size_is_exact(x0, y0, w, h):
    img = torch.rand(2, 64, 64)
    side = max(w, h)
    box = torch.tensor([x0, y0, x0 + side, y0 + side], dtype=torch.float64)
    out = crop_resize(img, box, side)
    expected = torch.zeros(2, side, side)
    crop = img[:, y0 : y0 + side, x0 : x0 + side]
    expected[:, : crop.shape[1], : crop.shape[2]] = crop
    assert torch.equal(out, expected)


def test_source_reads_batch_in_normalised_coordinates():
    imgs = torch.rand(2, 3, 40, 80)
    src = TensorRegionSource(imgs)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0]], [[0.5, 0.0, 1.0, 1.0]]])
    out = src.read_regions(boxes, 40)
    assert out.shape == (2, 1, 3, 40, 40)
    assert torch.allclose(out[0, 0], imgs[0, :, :, :40])
    assert torch.allclose(out[1, 0], imgs[1, :, :, 40:])
    assert torch.equal(src.full_pixels(), torch.tensor([3200.0, 3200.0], dtype=torch.float64))


def test_pyramid_level_is_block_means_and_sample_box_reads_fractional_positions():
    img = torch.arange(36.0).reshape(1, 6, 6)
    level = pyramid_level(img, 2)
    assert level.shape == (1, 3, 3)
    assert torch.allclose(level[0, 0, 0], img[0, :2, :2].mean())
    odd = pyramid_level(torch.ones(1, 5, 5), 2)  # the partial edge block averages what it holds
    assert odd.shape == (1, 3, 3) and torch.allclose(odd, torch.ones_like(odd))
    ramp = torch.arange(8.0).repeat(8, 1)[None]  # value = column index, pixel centres at x + 0.5
    got = sample_box(ramp, torch.tensor([2.0, 0.0, 4.0, 8.0]), 4)  # centres 2.25, 2.75, 3.25, 3.75
    assert torch.allclose(got[0, 0], torch.tensor([2.0, 2.25, 2.75, 3.0]))  # clamped to the box's pixels
    half = sample_box(ramp, torch.tensor([2.5, 0.0, 4.5, 8.0]), 4)  # a fractional box: window 2..5
    assert torch.allclose(half[0, 0], torch.tensor([2.25, 2.75, 3.25, 3.75]))
    outside = sample_box(torch.ones(1, 4, 4), torch.tensor([-8.0, -8.0, -4.0, -4.0]), 3)
    assert outside.abs().max() == 0  # zero outside the image, as crop_resize pads


@settings(max_examples=30, deadline=None)
@given(cells=st.integers(2, 12), out=st.integers(8, 64), mu=st.floats(1.01, 3.0), x=st.integers(0, 8))
def test_read_upsample_reads_the_level_the_pyramid_would(cells, out, mu, x):
    """With max_upsample > 1 a region comes from the level ``pyramid_factor`` names, resized as the
    pyramid reader resizes it; a box on that level's pixel edges gives exactly torch's resize of
    the level's crop, and a different read from the full-resolution one."""
    torch.manual_seed(cells * 100 + out)
    img = torch.rand(1, 256, 256) * 2 - 1
    side = 8 * cells  # on the pixel edges of levels up to factor 8
    factor = pyramid_factor(side, side, out, mu)
    assert factor == 1 or side / factor * mu >= out * (1 - 1e-9) > side / (2 * factor) * mu * (1 - 1e-9)
    x0 = 8 * x
    source = TensorRegionSource(img[None], max_upsample=mu)
    got = source.read_regions(torch.tensor([[[x0, x0, x0 + side, x0 + side]]]) / 256.0, out)[0, 0]
    full = crop_resize(img, torch.tensor([x0, x0, x0 + side, x0 + side]), out)
    if factor == 1:
        assert torch.allclose(got, full)
        return
    assume(factor <= 8)
    level = pyramid_level(img, factor)
    a, n = x0 // factor, side // factor
    expected = F.interpolate(level[None, :, a:a + n, a:a + n], size=(out, out), mode="bilinear",
                             align_corners=False, antialias=n > out)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)
