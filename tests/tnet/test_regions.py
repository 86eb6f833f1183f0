import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet.regions import TensorRegionSource, crop_resize


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
