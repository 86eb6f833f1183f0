"""pipeline.gpu_decode: the batched (nvJPEG) region source, checked on CPU against the CPU path.

``device="cpu"`` runs the very same code with torchvision's CPU decoder, so these tests pin the
planning, tile pasting, resampling and view handling on any machine; the CUDA test only adds the
device and is skipped without one.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.gpu_decode import GpuPyramidRegionSource, decode_level, plan_region, resample_matrix
from pipeline.lazy import Jitter, PyramidRegionSource, View, random_view
from pipeline.pyramid import PyramidReader, build_pyramid
from pipeline.resample import resample


def _image(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """Smooth structure plus noise: compresses like a photo, so JPEG error stays small."""
    base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, channels)).astype(np.float32)
    up = np.kron(base, np.ones((16, 16, 1), np.float32))[:h, :w]
    out = (up + rng.normal(0, 3, up.shape)).clip(0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


@pytest.fixture(scope="module")
def pyramid() -> bytes:
    return build_pyramid(_image(np.random.default_rng(0), 600, 520), tile=128)


@given(lo=st.floats(0, 200), span=st.floats(1, 300), n_out=st.integers(1, 64), antialias=st.booleans())
@settings(max_examples=60, deadline=None)
def test_resample_matrix_matches_pillow_and_bilinear(lo: float, span: float, n_out: int, antialias: bool) -> None:
    rng = np.random.default_rng(1)
    n_in = int(np.ceil(lo + span)) + 1
    row = rng.integers(0, 256, (3, n_in, 3), dtype=np.uint8)
    box = (lo, 0.0, lo + span, 3.0)
    ref = resample(row, box, (n_out, 3), antialias).astype(np.float64)
    weights = resample_matrix(lo, lo + span, n_out, n_in, antialias)
    assert np.allclose(weights.sum(axis=1), 1.0)
    got = np.einsum("ow,hwc->hoc", weights, row.astype(np.float64))
    assert np.abs(ref[1] - got[1]).max() <= 1.01  # Pillow works in 8-bit fixed point


def test_plan_matches_the_readers_decode(pyramid: bytes) -> None:
    reader = PyramidReader(pyramid)
    for box in [(0, 0, 520, 600), (10.5, 20.2, 200.7, 300.1), (400, 500, 700, 800)]:
        fresh = PyramidReader(pyramid)
        fresh.read_region(box, 64)
        plan = plan_region(reader.levels, reader.tile, box, 64)
        assert len(plan.tiles) == fresh.tiles_decoded, box


def test_region_source_matches_the_cpu_path(pyramid: bytes) -> None:
    rng = random.Random(3)
    views = [View((0.0, 0.0, 520.0, 600.0)), random_view(520, 600, rng),
             View((40.0, 30.0, 500.0, 580.0), flip=True, jitter=Jitter("contrast", 1.4), mean=(0.5, 0.4, 0.6)),
             View((0.0, 0.0, 520.0, 600.0), jitter=Jitter("hue", 0.1))]
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.3, 0.2, 0.9, 0.7], [0.8, 0.8, 1.3, 1.3]]] * len(views))
    cpu = PyramidRegionSource([PyramidReader(pyramid) for _ in views], views, 3)
    gpu = GpuPyramidRegionSource([PyramidReader(pyramid) for _ in views], views, 3, device="cpu")
    a, b = cpu.read_regions(boxes, 48), gpu.read_regions(boxes, 48)
    assert b.shape == a.shape == (4, 3, 3, 48, 48) and b.dtype == torch.float32
    diff = (a - b).abs() * 127.5  # in 8-bit levels
    assert diff.mean() < 0.5 and diff.max() <= 4.0  # 1 level of rounding, scaled by contrast/hue
    assert gpu.decoded_pixels() == cpu.decoded_pixels()
    assert torch.equal(gpu.source_boxes(boxes), cpu.source_boxes(boxes))
    before = gpu.tiles_decoded
    gpu.read_regions(boxes, 48)  # the same tiles again: served from the batch's decoded tiles
    assert gpu.tiles_decoded == before


def test_grey_pyramid_and_base_view_handover() -> None:
    tif = build_pyramid(_image(np.random.default_rng(2), 300, 300, channels=1), tile=64)
    views = [View((0.0, 0.0, 300.0, 300.0))] * 2
    base = torch.zeros(2, 1, 32, 32)
    src = GpuPyramidRegionSource([PyramidReader(tif), PyramidReader(tif)], views, 1, base, 7, device="cpu")
    whole = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]] * 2)
    assert torch.equal(src.read_regions(whole, 32), base[:, None])
    assert src.decoded_pixels() == 7  # the handed-over base view decoded nothing here
    ref = PyramidRegionSource([PyramidReader(tif)] * 2, views, 1).read_regions(whole, 40)
    got = src.read_regions(whole, 40)
    assert got.shape == (2, 1, 1, 40, 40) and ((ref - got).abs() * 127.5).max() <= 3.0


def test_decode_level_equals_read_level(pyramid: bytes) -> None:
    reader = PyramidReader(pyramid)
    full = decode_level(reader, 0, "cpu")
    assert full.shape == (3, 600, 520) and full.dtype == torch.uint8
    ref = PyramidReader(pyramid).read_level(0)
    assert np.abs(full.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="level=9"):
        decode_level(reader, 9, "cpu")


def test_bad_batch_is_refused(pyramid: bytes) -> None:
    with pytest.raises(ValueError, match="readers=1, views=0"):
        GpuPyramidRegionSource([PyramidReader(pyramid)], [], 3, device="cpu")
    src = GpuPyramidRegionSource([PyramidReader(pyramid)], [View((0.0, 0.0, 520.0, 600.0))], 3, device="cpu")
    with pytest.raises(ValueError, match="expected \\(1, K, 4\\)"):
        src.read_regions(torch.zeros(2, 1, 4), 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_decode_matches_the_cpu_path(pyramid: bytes) -> None:
    views = [View((0.0, 0.0, 520.0, 600.0)), View((10.0, 10.0, 510.0, 590.0), flip=True)]
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]] * 2)
    cpu = PyramidRegionSource([PyramidReader(pyramid) for _ in views], views, 3).read_regions(boxes, 64)
    gpu = GpuPyramidRegionSource([PyramidReader(pyramid) for _ in views], views, 3, device="cuda")
    out = gpu.read_regions(boxes, 64)
    assert out.device.type == "cuda"
    diff = (out.cpu() - cpu).abs() * 127.5  # nvJPEG's IDCT differs a little from libjpeg-turbo's
    assert diff.mean() < 1.5 and diff.max() <= 12
