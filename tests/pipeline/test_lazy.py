"""Lazy regions (pipeline/lazy.py): the lazy path sees what the eager path sees, decoding far less.

The eager reference is ``TensorRegionSource`` over each sample's fully decoded level 0
(``PyramidReader.read_level(0)`` scaled to [-1, 1]); the lazy path is the loader's batch as a
``PyramidRegionSource``. They differ by design in two ways only: JPEG noise of the pyramid's
coarser levels (each level is compressed on its own) and the pyramid's box-filtered levels
standing in for torch's antialiased resize of level 0. Tolerances, measured on this data (seed 0):
regions differ by 0.004 on average in [-1, 1] units (0.5 grey level) and by at most 0.34 at a few
digit edges; the logits of a TNet with calibrated batch norm by at most 0.04 (asserted: < 0.1),
its probabilities by 0.004 (asserted: < 0.02), and its attended cells not at all (asserted).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.lazy import (
    GREY,
    Jitter,
    PyramidRegionSource,
    View,
    pixel_mean,
    random_view,
    regions_to_model,
    shift_hue,
    to_model,
)
from pipeline.loader import Batch, StreamSpec, make_loader, split_shards
from pipeline.pyramid import PyramidReader, build_pyramid
from pipeline.resample import choose_level, level_box, sampling_window, tiles_of
from tests.fixtures.tiny_mnist import TILE, shard_tiny_mnist, tiny_model
from tnet.model import TNet
from tnet.regions import TensorRegionSource

BASE = 64  # tiny_model's base_size


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """The 8 test canvases of the tiny Megapixel MNIST as one evaluation batch (whole views)."""
    url = str(shard_tiny_mnist(tmp_path_factory.mktemp("lazy") / "mnist"))
    shards = split_shards(url, "test")
    spec = StreamSpec(url=url, split="test", shards=tuple(s for s, _ in shards), base_size=BASE, channels=1,
                      quota=8, train=False)
    return next(iter(make_loader(spec, batch_size=8)))


@pytest.fixture(scope="module")
def eager(batch: Batch) -> torch.Tensor:
    """(8, 1, 512, 512): level 0 fully decoded, in [-1, 1]."""
    levels = [PyramidReader(t).read_level(0).astype(np.float32) for t in batch.pyramids]
    return torch.stack([torch.from_numpy(a)[None] for a in levels]) / 255.0 * 2.0 - 1.0


def calibrated_tnet(images: torch.Tensor) -> TNet:
    """A seeded TNet whose batch norm statistics come from the images, then in eval mode.

    With initial statistics (mean 0, variance 1) an untrained tiny CNN maps every canvas to the
    same logits (3e-6 apart): comparing two input paths through it would prove nothing.
    """
    torch.manual_seed(0)
    model = TNet(tiny_model(dropout=0.0))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(TensorRegionSource(images))
    return model.eval()


def expected_tiles(reader: PyramidReader, boxes: list[tuple[float, ...]], out_size: int) -> set[tuple[int, int, int]]:
    """The (level, tx, ty) tiles a read of ``boxes`` must touch, from the pure geometry functions."""
    tiles = set()
    for box in boxes:
        level = choose_level(box, (out_size, out_size), reader.levels)
        window = sampling_window(level_box(box, reader.levels[0], reader.levels[level])).clip(*reader.levels[level])
        if window is not None:
            tiles |= {(level, tx, ty) for tx, ty in tiles_of(window, reader.tile)}
    return tiles


def test_lazy_logits_equal_eager_logits_within_jpeg_tolerance(batch: Batch, eager: torch.Tensor) -> None:
    model = calibrated_tnet(eager)
    lazy_source = batch.region_source(1)
    with torch.no_grad():
        lazy, full = model(lazy_source), model(TensorRegionSource(eager))
    # the two paths attend to the same cells, so the rest compares like with like
    assert torch.equal(lazy.selections[0].cells, full.selections[0].cells)
    diff = (lazy.logits - full.logits).abs().max(-1).values  # (B,)
    assert diff.max() < 0.1
    assert (lazy.logits.softmax(-1) - full.logits.softmax(-1)).abs().max() < 0.02
    # the prediction agrees wherever the eager top-2 margin is beyond what that difference can flip
    # (an untrained model is near-uniform: margins of 0.01-0.08, so only some samples are decisive)
    top2 = full.logits.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert decisive.sum() >= 2
    assert torch.equal(lazy.logits.argmax(-1)[decisive], full.logits.argmax(-1)[decisive])
    # ... and the regions it read are the eager crops within JPEG tolerance
    boxes = full.selections[0].boxes
    lazy_px, eager_px = lazy_source.read_regions(boxes, BASE), TensorRegionSource(eager).read_regions(boxes, BASE)
    px = (lazy_px - eager_px).abs()
    assert px.mean() < 0.01 and px.max() < 0.5
    other = TensorRegionSource(eager.roll(1, 0)).read_regions(boxes, BASE)  # negative control: another canvas
    assert (lazy_px - other).abs().mean() > 5 * px.mean()


def test_lazy_path_decodes_only_the_tiles_under_the_attended_boxes(batch: Batch, eager: torch.Tensor) -> None:
    model = calibrated_tnet(eager)
    source = batch.region_source(1)
    with torch.no_grad():
        out = model(source)
    readers = source.readers
    expected = 0
    for i, reader in enumerate(readers):
        whole = [(0.0, 0.0, float(reader.width), float(reader.height))]
        attended = [tuple(b) for b in out.selections[0].source_boxes[i].tolist()]
        expected += len(expected_tiles(reader, whole, BASE)) * TILE**2  # the base view (loader's decode)
        expected += len(expected_tiles(reader, attended, BASE)) * TILE**2
    assert source.decoded_pixels() == expected
    # bound: the base view is the one-tile top level (128 px); a 154 px patch read at 64 px uses the
    # 256 px level, where it spans at most 2 x 2 of its 4 tiles: (1 + 4) of the 16 level-0 tiles' area
    full = float(source.full_pixels().sum())
    fraction = source.decoded_pixels() / full
    assert fraction <= 5 / 16
    assert fraction < 0.35
    eager_reader = PyramidReader(batch.pyramids[0])
    eager_reader.read_level(0)
    assert eager_reader.decoded_pixels == eager_reader.full_pixels()  # the eager path: everything


def test_read_upsample_reads_coarser_levels_and_eager_path_follows(batch: Batch, eager: torch.Tensor) -> None:
    """``model.read_upsample``: a 154 px cell read at 64 px comes from the 128 px level (38.5 px,
    upsampled 1.66x) instead of the 256 px one; the in-memory source passes through the same
    resolution, so lazy and eager regions still agree, decoding fewer tiles."""
    model = calibrated_tnet(eager)
    with torch.no_grad():
        boxes = model(TensorRegionSource(eager)).selections[0].boxes  # (8, 2, 4) attended cells
    exact, soft = batch.region_source(1), batch.region_source(1, max_upsample=1.7)
    exact_px, soft_px = exact.read_regions(boxes, BASE), soft.read_regions(boxes, BASE)
    soft_cells, exact_cells = soft.decoded_pixels() - batch.base_decoded, exact.decoded_pixels() - batch.base_decoded
    assert soft_cells == len(batch) * TILE**2  # the 128 px level is one tile per sample
    assert exact_cells >= 2 * soft_cells
    eager_soft = TensorRegionSource(eager, max_upsample=1.7).read_regions(boxes, BASE)
    eager_exact = TensorRegionSource(eager).read_regions(boxes, BASE)
    matched = (soft_px - eager_soft).abs()  # measured: mean 0.004, max 0.09 (JPEG, uint8 levels)
    assert matched.mean() < 0.01 and matched.max() < 0.2
    assert (soft_px - eager_exact).abs().mean() > 3 * matched.mean()  # 0.014: the softer read is another read
    assert (exact_px - eager_exact).abs().mean() < 0.01  # 1 (the default) leaves the exact path as it was
    with pytest.raises(ValueError, match="max_upsample"):
        TensorRegionSource(eager, max_upsample=0.5)


def test_base_view_shortcut_serves_the_loaders_decode(batch: Batch) -> None:
    source = batch.region_source(1)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(len(batch), 1, 4)
    before = source.decoded_pixels()
    base = source.read_regions(whole, BASE)
    assert base.shape == (8, 1, 1, BASE, BASE)
    assert torch.equal(base[:, 0], batch.base_views)
    assert source.decoded_pixels() == before == batch.base_decoded  # nothing decoded again
    # the short-cut returns exactly what reading the pyramid would have
    plain = PyramidRegionSource(source.readers, batch.views, 1)
    assert torch.equal(plain.read_regions(whole, BASE), base)
    assert plain.decoded_pixels() > 0
    # any other request goes to the pyramid
    half = torch.tensor([0.0, 0.0, 0.5, 0.5]).expand(len(batch), 1, 4)
    source.read_regions(half, BASE)
    assert source.decoded_pixels() > before
    bigger = batch.region_source(1)
    bigger.read_regions(whole, BASE * 2)
    assert bigger.decoded_pixels() > batch.base_decoded


# ----------------------------------------------------------------------------- View.to_source


def test_to_source_maps_normalised_boxes_into_the_view_hand_computed() -> None:
    box = np.array([0.0, 0.0, 0.25, 0.5])
    view = View((100.0, 50.0, 300.0, 250.0))
    np.testing.assert_allclose(view.to_source(box), [100, 50, 150, 150])
    flipped = View((100.0, 50.0, 300.0, 250.0), flip=True)
    np.testing.assert_allclose(flipped.to_source(box), [250, 50, 300, 150])  # mirrored inside the view
    np.testing.assert_allclose(flipped.to_source(np.array([0.0, 0.0, 1.0, 1.0])), [100, 50, 300, 250])


coord = st.floats(0.0, 1.0, allow_nan=False)


@given(x0=coord, y0=coord, w=st.floats(0.01, 1.0), h=st.floats(0.01, 1.0),
       vx=st.floats(0, 1000), vy=st.floats(0, 1000), vw=st.floats(1, 1000), vh=st.floats(1, 1000))
def test_flip_mirrors_the_unflipped_box_about_the_view_centre(x0: float, y0: float, w: float, h: float, vx: float,
                                                              vy: float, vw: float, vh: float) -> None:
    box = np.array([x0, y0, x0 + w, y0 + h])
    plain = View((vx, vy, vx + vw, vy + vh)).to_source(box)
    flipped = View((vx, vy, vx + vw, vy + vh), flip=True).to_source(box)
    centre2 = 2 * vx + vw  # x0 + x1 of the view
    np.testing.assert_allclose(flipped, [centre2 - plain[2], plain[1], centre2 - plain[0], plain[3]],
                               rtol=1e-9, atol=1e-6)
    assert flipped[2] - flipped[0] == pytest.approx(plain[2] - plain[0])


def test_flipped_view_reads_the_mirror_image_of_the_mirrored_box(batch: Batch) -> None:
    reader = PyramidReader(batch.pyramids[0])
    box = torch.tensor([[[0.1, 0.2, 0.45, 0.5]]])
    mirrored = torch.tensor([[[0.55, 0.2, 0.9, 0.5]]])
    view = (0.0, 0.0, 512.0, 512.0)
    flipped = PyramidRegionSource([reader], [View(view, flip=True)], 1).read_regions(box, BASE)
    plain = PyramidRegionSource([reader], [View(view)], 1).read_regions(mirrored, BASE)
    torch.testing.assert_close(flipped, plain.flip(-1))
    assert (flipped - plain).abs().mean() > 0.01  # the region is not symmetric: the test has teeth


# ----------------------------------------------------------------------------- colour jitter


@pytest.fixture(scope="module")
def colour_reader() -> PyramidReader:
    """A 256 px RGB pyramid of smooth gradients (colour jitter of grey images is a no-op)."""
    y, x = np.mgrid[0:256, 0:256]
    image = np.stack([x, y, 255 - (x + y) // 2], axis=-1).astype(np.uint8)
    return PyramidReader(build_pyramid(image, tile=128, quality=95))


@pytest.mark.parametrize("jitter", [Jitter("brightness", 0.1), Jitter("contrast", 1.4), Jitter("saturation", 0.6),
                                    Jitter("hue", 0.15)])
def test_colour_jitter_is_one_function_applied_to_every_region(colour_reader: PyramidReader, jitter: Jitter) -> None:
    box = (0.0, 0.0, 256.0, 256.0)
    mean = (0.45, 0.5, 0.55)  # the sample's base-view mean (the loader computes it once)
    jittered = PyramidRegionSource([colour_reader], [View(box, jitter=jitter, mean=mean)], 3)
    plain = PyramidRegionSource([colour_reader], [View(box, mean=mean)], 3)
    boxes = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.6, 0.6, 1.0, 1.0], [0.2, 0.5, 0.5, 0.8]]])
    got, ref = jittered.read_regions(boxes, 32)[0], plain.read_regions(boxes, 32)[0]
    assert not torch.allclose(got, ref, atol=1e-3)
    # every region (different content, different means) gets the same pixel-wise function:
    # reproduce it from the plain pixels with one View, the sample's
    view = View(box, jitter=jitter, mean=mean)
    for region, expected in zip(got, ref):
        pixels = ((expected + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        torch.testing.assert_close(region, to_model(pixels, view, 3), atol=1e-5, rtol=0)
    if jitter.kind == "contrast":  # around the sample's mean, not each region's own
        m = torch.tensor(mean).mean()
        p = (ref + 1) / 2
        torch.testing.assert_close((got + 1) / 2, (m + (p - m) * 1.4).clamp(0, 1), atol=1e-5, rtol=0)


def test_random_view_draws_one_jitter_and_one_flip_per_sample() -> None:
    rng = random.Random(3)
    views = [random_view(512, 384, rng) for _ in range(200)]
    assert {v.jitter.kind for v in views} == {"none", "brightness", "saturation", "contrast", "hue"}
    assert 60 < sum(v.flip for v in views) < 140
    for v in views:
        x0, y0, x1, y1 = v.box
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 384
        assert 0.85 * 512 * 384 * 0.999 <= (x1 - x0) * (y1 - y0) <= 512 * 384 * 1.001
    assert random_view(512, 384, random.Random(3)) == views[0]  # seeded: a resumed epoch draws the same views


def test_outside_the_image_reads_mid_grey(batch: Batch) -> None:
    source = batch.region_source(1)
    out = source.read_regions(torch.tensor([[[1.2, 1.2, 1.5, 1.5]]] * len(batch)), 16)
    torch.testing.assert_close(out, torch.full_like(out, GREY / 255 * 2 - 1))
    assert abs(GREY / 255 * 2 - 1) < 0.01  # ~0 in model space, as the eager path's zero padding


def test_mismatched_readers_and_views_are_refused(batch: Batch) -> None:
    with pytest.raises(ValueError, match="readers=1, views=2"):
        PyramidRegionSource([PyramidReader(batch.pyramids[0])], batch.views[:2], 1)
    with pytest.raises(ValueError, match="boxes.shape"):
        batch.region_source(1).read_regions(torch.zeros(2, 1, 4), 16)


# ----------------------------------------------------------------------------- conversion and hue


def reference_to_model(pixels: np.ndarray, view: View) -> torch.Tensor:
    """The per-region conversion before issue 7, kept as the reference: float (C, h, w) in [-1, 1]."""
    from torchvision.transforms.functional import adjust_hue

    t = torch.tensor(pixels, dtype=torch.float32).div_(255.0)
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if view.flip:
        t = t.flip(-1)
    kind, amount = view.jitter.kind, view.jitter.amount
    if kind == "brightness":
        t = (t + amount).clamp(0, 1)
    elif kind == "contrast":
        mean = torch.tensor(view.mean or [0.5] * t.shape[0]).mean()
        t = (mean + (t - mean) * amount).clamp(0, 1)
    elif kind == "saturation" and t.shape[0] == 3:
        grey = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
        t = (grey + (t - grey) * amount).clamp(0, 1)
    elif kind == "hue" and t.shape[0] == 3:
        t = adjust_hue(t, amount)
    return t * 2.0 - 1.0


def photo_regions(k: int = 3, size: int = 40) -> list[np.ndarray]:
    """Colourful uint8 regions: a smooth gradient, noise, and flat grey and saturated patches."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:size, 0:size]
    gradient = np.stack([x * 6, y * 6, 255 - (x + y) * 3], axis=-1).clip(0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    flat = np.zeros((size, size, 3), np.uint8)
    flat[: size // 2] = 77  # grey: hue undefined, must stay put
    flat[size // 2:] = (250, 10, 60)
    return [gradient, noise, flat][:k]


@pytest.mark.parametrize("jitter", [Jitter("none"), Jitter("brightness", -0.1), Jitter("brightness", 0.12),
                                    Jitter("contrast", 0.6), Jitter("contrast", 1.4), Jitter("saturation", 0.5),
                                    Jitter("saturation", 1.5), Jitter("hue", -0.2), Jitter("hue", 0.13)])
@pytest.mark.parametrize("flip", [False, True])
def test_one_conversion_per_sample_equals_the_per_region_reference(jitter: Jitter, flip: bool) -> None:
    regions = photo_regions()
    view = View((0.0, 0.0, 40.0, 40.0), flip=flip, jitter=jitter, mean=(0.3, 0.5, 0.6))
    got = regions_to_model(regions, view, 3)
    assert got.shape == (3, 3, 40, 40) and got.dtype == torch.float32 and got.is_contiguous()
    ref = torch.stack([reference_to_model(r, view) for r in regions])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)  # float rounding only (1/400 of a grey level)
    for region, one in zip(got, regions):
        torch.testing.assert_close(to_model(one, view, 3), region, atol=1e-6, rtol=0)


def test_shift_hue_is_torchvisions_adjust_hue() -> None:
    from torchvision.transforms.functional import adjust_hue

    images = torch.stack([torch.from_numpy(r).permute(2, 0, 1) for r in photo_regions()]).float() / 255
    for amount in (-0.5, -0.2, -0.01, 0.0, 0.07, 0.2, 0.5):
        ref = adjust_hue(images, amount)
        got = shift_hue(images.clone(), amount)
        diff = (got - ref).abs()
        assert diff.mean() < 1e-6 and diff.max() < 1e-4, (amount, diff.mean(), diff.max())
    shifted = shift_hue(images, 0.2)
    assert (shifted - images).abs().mean() > 0.05  # it does change colours ...
    torch.testing.assert_close(shifted[2, :, :20], images[2, :, :20])  # ... but not grey pixels
    torch.testing.assert_close(shift_hue(images, 1.0), images, atol=1e-5, rtol=0)  # a full turn
    same = images.clone()
    assert shift_hue(same, 0.2, out=same) is same  # in place allowed: what the loader does
    torch.testing.assert_close(same, shifted)


def test_hue_and_flip_of_a_seeded_view_are_deterministic() -> None:
    regions = photo_regions()
    for seed in range(40):
        view = random_view(40, 40, random.Random(seed))
        if view.jitter.kind == "hue":
            break
    again = random_view(40, 40, random.Random(seed))
    assert view == again and view.jitter.kind == "hue"
    assert torch.equal(regions_to_model(regions, view, 3), regions_to_model(regions, again, 3))


def test_regions_to_model_writes_into_out_and_checks_its_input() -> None:
    regions = photo_regions(2)
    out = torch.full((3, 2, 3, 40, 40), 9.0)
    view = View((0.0, 0.0, 1.0, 1.0), jitter=Jitter("brightness", 0.1))
    assert regions_to_model(regions, view, 3, out=out[1]).data_ptr() == out[1].data_ptr()
    torch.testing.assert_close(out[1], regions_to_model(regions, view, 3))
    assert (out[0] == 9).all() and (out[2] == 9).all()  # the neighbours are untouched
    with pytest.raises(ValueError, match=r"out.shape=\(2, 3, 40, 41\)"):
        regions_to_model(regions, view, 3, out=torch.empty(2, 3, 40, 41))
    with pytest.raises(ValueError, match="shapes"):
        regions_to_model([regions[0], regions[1][:20]], view, 3)
    with pytest.raises(ValueError, match="at least one"):
        regions_to_model([], view, 3)


def test_grey_regions_become_three_equal_channels_when_the_model_wants_colour() -> None:
    grey = [np.arange(64, dtype=np.uint8).reshape(8, 8), np.full((8, 8), 200, np.uint8)]
    for jitter in (Jitter("none"), Jitter("saturation", 0.5), Jitter("hue", 0.2), Jitter("contrast", 1.3)):
        view = View((0.0, 0.0, 8.0, 8.0), flip=True, jitter=jitter)
        got = regions_to_model(grey, view, 3)
        assert got.shape == (2, 3, 8, 8)
        assert torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 0], got[:, 2])
        torch.testing.assert_close(got[:, :1], regions_to_model(grey, view, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(got[:, :1], torch.stack([reference_to_model(g, view) for g in grey]),
                                   atol=2e-5, rtol=0)


@given(h=st.integers(1, 40), w=st.integers(1, 40), c=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2**16))
def test_pixel_mean_is_numpys_mean(h: int, w: int, c: int, seed: int) -> None:
    shape = (h, w) if c == 0 else (h, w, c)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    expected = tuple(float(m) for m in np.atleast_1d(pixels.reshape(h * w, -1).mean(0) / 255.0))
    assert pixel_mean(pixels) == expected


def test_threaded_reads_equal_serial_reads(colour_reader: PyramidReader) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(1)
    views = [random_view(256, 256, rng) for _ in range(4)]
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.3, 0.9, 1.0]]] * 4)
    serial = PyramidRegionSource([colour_reader] * 4, views, 3).read_regions(boxes, 24)
    with ThreadPoolExecutor(2) as pool:
        threaded = PyramidRegionSource([colour_reader] * 4, views, 3, executor=pool).read_regions(boxes, 24)
    assert serial.shape == (4, 2, 3, 24, 24)
    assert torch.equal(serial, threaded)


_box = st.tuples(st.floats(0, 400), st.floats(0, 300), st.floats(1, 120), st.floats(1, 120)).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])


@given(objects=st.lists(_box, min_size=1, max_size=5), seed=st.integers(0, 2**16),
       min_area=st.floats(0.3, 1.0), max_aspect=st.floats(1.0, 2.0))
def test_random_view_keeping_objects_holds_them_whole(objects: list[list[float]], seed: int, min_area: float,
                                                      max_aspect: float) -> None:
    """Every object (clipped to the image) lies whole inside the crop; the crop lies inside the image
    with the asked area and aspect, or is the whole image (the fallback)."""
    width, height = 512, 384
    view = random_view(width, height, random.Random(seed), flip=False, jitter=False, area=(min_area, 1.0),
                       aspect=(1 / max_aspect, max_aspect), objects=objects, keep_objects=True)
    x0, y0, x1, y1 = view.box
    assert 0 <= x0 < x1 <= width + 1e-6 and 0 <= y0 < y1 <= height + 1e-6
    for ox0, oy0, ox1, oy1 in objects:
        assert x0 <= max(ox0, 0) + 1e-6 and y0 <= max(oy0, 0) + 1e-6
        assert min(ox1, width) <= x1 + 1e-6 and min(oy1, height) <= y1 + 1e-6
    if view.box != (0.0, 0.0, float(width), float(height)):
        w, h = x1 - x0, y1 - y0
        assert min_area * width * height * (1 - 1e-9) <= w * h <= width * height * (1 + 1e-9)
        assert 1 / max_aspect - 1e-9 <= w / h <= max_aspect + 1e-9


def test_random_view_keeping_objects_still_crops() -> None:
    """Small objects leave room: most draws are crops, of varied size, not the whole-image fallback."""
    rng = random.Random(0)
    views = [random_view(1500, 1500, rng, area=(0.5, 1.0), objects=[[600, 600, 628, 628], [900, 700, 928, 728]],
                         keep_objects=True) for _ in range(100)]
    areas = [(v.box[2] - v.box[0]) * (v.box[3] - v.box[1]) / 1500**2 for v in views]
    assert sum(a < 1.0 for a in areas) >= 95 and min(areas) < 0.6


@given(box=_box, view_box=_box, flip=st.booleans())
def test_from_source_inverts_to_source(box: list[float], view_box: list[float], flip: bool) -> None:
    view = View(tuple(view_box), flip=flip)  # type: ignore[arg-type]
    norm = view.from_source(np.array(box))
    np.testing.assert_allclose(view.to_source(norm), box, atol=1e-6)
    assert norm[0] <= norm[2] and norm[1] <= norm[3]  # still x0 <= x1 after a flip
