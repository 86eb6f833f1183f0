"""Pyramid building and lazy reading: format, level choice, pixel equivalence, honesty of I/O.

Tolerances (stated once):
- ``read_region`` against a full decode of the chosen level, cropped (fill outside the image) and
  resized with the same Pillow call: max abs diff <= 1 (same JPEG tiles, same crop; this checks
  tile selection and assembly, so it is near-exact).
- ``read_region`` against resizing the ORIGINAL full-resolution array (before JPEG and the
  pyramid's box filter): mean abs diff < 3 and 99th percentile < 20 on smooth textures with mild
  grain; JPEG q90 with 4:2:0 chroma and a different (box, then bilinear) low-pass account for it.
"""

from __future__ import annotations

import io
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.pyramid import DEFAULT_TILE, PyramidReader, build_pyramid
from pipeline.resample import choose_level, level_box, sampling_window, tiles_of
from pipeline.tiff_ifd import READAHEAD
from tnet.regions import pyramid_factor


def _field(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Gaussian noise with features of about ``scale`` pixels (bicubic-upsampled), float32 (h, w)."""
    small = rng.standard_normal((h // scale + 2, w // scale + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def texture(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """A photo-like random texture: multi-scale luminance (amplitude grows with feature size, as
    in natural images), slowly varying colour, mild grain. Seeded, any size."""
    lum = sum(_field(rng, h, w, s) * s**0.5 for s in (6, 18, 54, 162))
    lum = 128 + 45 * (lum - lum.mean()) / (lum.std() + 1e-6)
    if channels == 3:
        c1, c2 = (12 * _field(rng, h, w, 120) for _ in range(2))
        lum = np.stack([lum + c1, lum - 0.5 * c1 + c2, lum - 0.5 * c1 - c2], axis=-1)
    grain = rng.integers(-3, 4, size=lum.shape)
    return np.clip(np.rint(lum) + grain, 0, 255).astype(np.uint8)


def crop_resize(arr: np.ndarray, box, out: tuple[int, int], fill: int) -> np.ndarray:
    """Reference: cut ``box`` snapped outward from ``arr`` padded with ``fill``; Pillow-resize it."""
    h, w = arr.shape[:2]
    x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    crop = np.full((y1 - y0, x1 - x0) + arr.shape[2:], fill, np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    rel = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    return np.asarray(Image.fromarray(crop).resize(out, Image.BILINEAR, box=rel))


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


class CountingFile(io.RawIOBase):
    """A seekable file over bytes that counts the bytes read through it."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.bytes_read = self.reads = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, size: int = -1) -> bytes:
        data = self._buf.read(size)
        self.bytes_read += len(data)
        self.reads += 1
        return data


@pytest.fixture(scope="module")
def grey1500() -> tuple[np.ndarray, bytes]:
    img = texture(np.random.default_rng(1), 1500, 1500, 1)
    return img, build_pyramid(img, tile=256)


# ------------------------------------------------------------------------------------------------
# the format
def test_tifffile_sees_the_pyramid_and_tiles_decode_alone() -> None:
    img = texture(np.random.default_rng(2), 700, 1000, 3)
    data = build_pyramid(img, tile=128, quality=85)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        shapes = [lv.shape for lv in tif.series[0].levels]
        assert shapes == [(700, 1000, 3), (350, 500, 3), (175, 250, 3), (88, 125, 3)]
        assert all(p.is_tiled and p.compression == 7 and p.tilewidth == 128 for p in tif.pages)
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1, 1]
        assert 306 not in tif.pages[0].tags  # no DateTime: deterministic
        assert tif.pages[0].jpegtables is None
        level0 = tif.pages[0].asarray()
        page = tif.pages[1]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            tile = Image.open(io.BytesIO(data[offset:offset + count]))
            assert tile.format == "JPEG" and tile.mode == "RGB" and tile.size == (128, 128)
    assert diff(level0, img).mean() < 3


def test_grey_pyramid_is_single_component_and_deterministic() -> None:
    img = texture(np.random.default_rng(3), 300, 200, 1)
    data = build_pyramid(img, tile=128)
    assert data == build_pyramid(img.copy(), tile=128)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.pages[0].photometric == 1 and tif.pages[0].samplesperpixel == 1
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    assert Image.open(io.BytesIO(data[offset:offset + count])).mode == "L"
    assert PyramidReader(data).levels == [(200, 300), (100, 150), (50, 75)]


def test_small_image_is_one_level_and_default_tile() -> None:
    reader = PyramidReader(build_pyramid(np.zeros((40, 30, 3), np.uint8)))
    assert reader.levels == [(30, 40)] and reader.tile == DEFAULT_TILE and reader.channels == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tile": 100}, "tile=100"), ({"tile": 2048}, "tile=2048"), ({"tile": 0}, "tile=0"),
    ({"quality": 0}, "quality=0"), ({"quality": 101}, "quality=101"),
])
def test_build_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_pyramid(np.zeros((8, 8), np.uint8), **kwargs)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint16), np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8), np.uint8)])
def test_build_rejects_bad_images(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image"):
        build_pyramid(bad)


# ------------------------------------------------------------------------------------------------
# level choice and decoded pixels, hand-computed
def test_levels_and_level_choice_by_hand(grey1500: tuple[np.ndarray, bytes]) -> None:
    reader = PyramidReader(grey1500[1])
    assert reader.levels == [(1500, 1500), (750, 750), (375, 375), (188, 188)]
    assert choose_level((0, 0, 1500, 1500), (188, 188), reader.levels) == 3
    assert choose_level((0, 0, 1500, 1500), (189, 189), reader.levels) == 2
    assert choose_level((0, 0, 1500, 1500), (376, 100), reader.levels) == 1
    assert choose_level((100, 100, 400, 400), (224, 224), reader.levels) == 0
    assert choose_level((0, 0, 448, 896), (224, 224), reader.levels) == 1  # the short side decides
    assert choose_level((0, 0, 10, 10), (224, 224), reader.levels) == 0  # upsampling: level 0
    out = reader.read_region((0, 0, 1500, 1500), 188)
    assert out.shape == (188, 188) and reader.tiles_decoded == 1 and reader.decoded_pixels == 256**2


def test_max_upsample_lets_a_coarser_level_serve(grey1500: tuple[np.ndarray, bytes]) -> None:
    levels = PyramidReader(grey1500[1]).levels
    cell = (100.0, 100.0, 265.0, 265.0)  # a 165 px cell read at 96 px: 82.5 px at level 1
    assert choose_level(cell, (96, 96), levels) == 0
    assert choose_level(cell, (96, 96), levels, max_upsample=1.16) == 0  # 95.7 < 96: still short
    assert choose_level(cell, (96, 96), levels, max_upsample=1.2) == 1
    assert choose_level(cell, (96, 96), levels, max_upsample=2.4) == 2  # 41.25 px x 2.4 = 99
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="max_upsample"):
            choose_level(cell, (96, 96), levels, max_upsample=bad)
    exact, soft = PyramidReader(grey1500[1]), PyramidReader(grey1500[1])
    a, b = exact.read_region(cell, 96), soft.read_region(cell, 96, max_upsample=1.2)
    assert a.shape == b.shape == (96, 96)
    assert (exact.tiles_decoded, soft.tiles_decoded) == (4, 1)  # 100..265 crosses 256 in x and y at level 0 only
    assert soft.decoded_pixels < exact.decoded_pixels


@settings(max_examples=200, deadline=None)
@given(bw=st.floats(1.0, 4096.0), bh=st.floats(1.0, 4096.0), out=st.integers(8, 512), mu=st.floats(1.0, 4.0))
def test_in_memory_pyramid_factor_matches_level_choice(bw: float, bh: float, out: int, mu: float) -> None:
    """tnet.regions.pyramid_factor (the eager path's stand-in for a pyramid) picks the level the
    lazy path reads, on a pyramid of exact halvings deep enough for any box."""
    levels = [(4096 >> i, 4096 >> i) for i in range(13)]
    level = choose_level((0.0, 0.0, bw, bh), (out, out), levels, mu)
    assert pyramid_factor(bw, bh, out, mu) == 2**level
    if level:  # the chosen level covers the request within the allowed upsampling
        assert min(bw, bh) / 2**level * mu >= out * (1 - 1e-9)


def test_decoded_pixels_count_intersecting_tiles_and_cache(grey1500: tuple[np.ndarray, bytes]) -> None:
    reader = PyramidReader(grey1500[1])
    # level 0, box inside tile (1, 1): one tile
    reader.read_region((300, 300, 500, 500), 200)
    assert (reader.tiles_decoded, reader.decoded_pixels) == (1, 256**2)
    # level 1 (400 px -> 200 px), box (100..300) at level 1 crosses tile edge 256: 2 x 2 tiles
    reader.read_region((200, 200, 600, 600), (200, 200))
    assert (reader.tiles_decoded, reader.decoded_pixels) == (5, 5 * 256**2)
    bytes_before = reader.bytes_read
    reader.read_region((200, 200, 600, 600), (200, 200))  # identical read: all from the cache
    assert (reader.tiles_decoded, reader.bytes_read) == (5, bytes_before)
    assert reader.read_region((-900, -900, -500, -500), 64).max() == 0  # wholly outside: no decode
    assert reader.tiles_decoded == 5 and reader.full_pixels() == 1500 * 1500


def test_cache_is_lru_and_bounded(grey1500: tuple[np.ndarray, bytes]) -> None:
    reader = PyramidReader(grey1500[1], cache_tiles=1)
    reader.read_region((10, 10, 100, 100), 90)  # tile (0, 0, 0)
    reader.read_region((300, 10, 400, 100), 90)  # tile (0, 1, 0) evicts (0, 0, 0)
    reader.read_region((10, 10, 100, 100), 90)
    assert reader.tiles_decoded == 3


# ------------------------------------------------------------------------------------------------
# pixel equivalence
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), w=st.integers(100, 1300), h=st.integers(100, 1300),
       channels=st.sampled_from([1, 3]), tile=st.sampled_from([128, 256]), data=st.data())
def test_read_region_equals_level_decode_and_original(seed, w, h, channels, tile, data) -> None:
    rng = np.random.default_rng(seed)
    img = texture(rng, h, w, channels)
    reader = PyramidReader(build_pyramid(img, tile=tile))
    for _ in range(3):
        x0 = data.draw(st.floats(-0.25 * w, 0.95 * w))
        y0 = data.draw(st.floats(-0.25 * h, 0.95 * h))
        bw = data.draw(st.floats(4.0, 1.2 * w))
        bh = data.draw(st.floats(4.0, 1.2 * h))
        out = (data.draw(st.integers(8, 256)), data.draw(st.integers(8, 256)))
        fill = data.draw(st.sampled_from([0, 128]))
        box = (x0, y0, x0 + bw, y0 + bh)
        got = reader.read_region(box, out, fill=fill)
        lvl = choose_level(box, out, reader.levels)
        # the chosen level covers the request and the next coarser one does not
        lw, lh = reader.levels[lvl]
        assert lvl == 0 or (bw * lw / w >= out[0] * (1 - 1e-9) and bh * lh / h >= out[1] * (1 - 1e-9))
        if lvl + 1 < len(reader.levels):
            nw, nh = reader.levels[lvl + 1]
            assert bw * nw / w < out[0] or bh * nh / h < out[1]
        same_level = crop_resize(reader.read_level(lvl), level_box(box, (w, h), (lw, lh)), out, fill)
        assert diff(got, same_level).max() <= 1
        # Against the original the filters differ (box-halved levels, then bilinear, against one
        # bilinear pass), not only JPEG: on an 8 x 8 read from level 2 of a 121 x 342 texture the
        # JPEG-free pyramid alone is 2.98 grey levels off on average (JPEG adds 0.14). A one output
        # pixel shift at that size costs 14, so 4 still catches a misplaced read.
        original = diff(got, crop_resize(img, box, out, fill))
        assert original.mean() < 4 and np.percentile(original, 99) < 20, (original.mean(), box, out, lvl)


def test_no_antialias_is_plain_bilinear_like_torch(grey1500: tuple[np.ndarray, bytes]) -> None:
    reader = PyramidReader(grey1500[1])
    level0 = reader.read_level(0)
    for box, out in [((100, 200, 700, 500), (224, 112)), ((1000, 1000, 1100, 1050), (224, 224))]:
        got = reader.read_region(box, out, antialias=False, level=0)
        crop = torch.from_numpy(level0[box[1]:box[3], box[0]:box[2]]).float()[None, None]
        ref = F.interpolate(crop, size=out[::-1], mode="bilinear", align_corners=False, antialias=False)
        assert diff(got, ref[0, 0].round().clamp(0, 255).byte().numpy()).max() <= 1


def test_antialiased_matches_torch_on_a_crop(grey1500: tuple[np.ndarray, bytes]) -> None:
    """Level 0 + integer box: the same pixels ``tnet.regions.crop_resize`` computes in memory."""
    reader = PyramidReader(grey1500[1])
    level0 = reader.read_level(0)
    box, out = (100, 200, 400, 500), (224, 224)  # 1.34x downscale: level 0 serves it
    got = reader.read_region(box, out)
    crop = torch.from_numpy(level0[200:500, 100:400]).float()[None, None]
    ref = F.interpolate(crop, size=out[::-1], mode="bilinear", align_corners=False, antialias=True)
    assert diff(got, ref[0, 0].round().clamp(0, 255).byte().numpy()).max() <= 1


def test_colour_regions_and_fill_outside() -> None:
    img = texture(np.random.default_rng(4), 300, 400, 3)
    reader = PyramidReader(build_pyramid(img, tile=128))
    out = reader.read_region((-100, -100, 100, 100), 50, fill=255)
    assert out.shape == (50, 50, 3)
    assert (out[:20, :20] == 255).all() and diff(out[30:, 30:], crop_resize(img, (-100, -100, 100, 100), (50, 50), 255)[30:, 30:]).mean() < 3
    with pytest.raises(ValueError, match="box"):
        reader.read_region((10, 10, 5, 20), 8)
    with pytest.raises(ValueError, match="out_size"):
        reader.read_region((0, 0, 5, 5), 0)
    with pytest.raises(ValueError, match="level=9"):
        reader.read_region((0, 0, 5, 5), 4, level=9)


# ------------------------------------------------------------------------------------------------
# I/O honesty and threads
def test_small_region_of_large_pyramid_reads_few_bytes() -> None:
    img = np.tile(texture(np.random.default_rng(5), 1024, 1024, 1), (4, 4))  # 4096 px, built fast
    data = build_pyramid(img, tile=256)
    fh = CountingFile(data)
    reader = PyramidReader(fh, where="big.tif")
    header = fh.bytes_read
    assert header == reader.header_bytes and fh.reads <= len(reader.levels)  # one request per level
    out = reader.read_region((2000.5, 1000.25, 2300.5, 1300.25), 224)
    assert out.shape == (224, 224)
    assert fh.bytes_read == header + reader.bytes_read
    assert fh.bytes_read < 0.05 * len(data), (fh.bytes_read, len(data))
    assert reader.decoded_pixels == 6 * 256**2  # x 2000..2300 spans tiles 7-8, y 1000..1300 tiles 3-5


def test_random_access_on_s3_by_range_requests(moto_s3) -> None:
    """The 2 GB-slide mode: an s3fs file opened without read-ahead; I/O follows the region."""
    img = np.tile(texture(np.random.default_rng(8), 512, 512, 3), (4, 4, 1))  # 2048 px RGB
    data = build_pyramid(img, tile=256)
    fs = moto_s3.filesystem()
    url = moto_s3.bucket("pyramids") + "/sample.tif"
    fs.pipe(url, data)
    with fs.open(url, "rb", cache_type="none") as fh:
        reader = PyramidReader(fh, where=url)
        got = reader.read_region((700.5, 300, 1100.5, 700), 224)
    local = PyramidReader(data).read_region((700.5, 300, 1100.5, 700), 224)
    assert np.array_equal(got, local)
    assert reader.bytes_read < 0.1 * len(data) and reader.header_bytes <= len(reader.levels) * READAHEAD


def test_threads_share_one_reader_and_decode_each_tile_once(grey1500: tuple[np.ndarray, bytes]) -> None:
    reader = PyramidReader(CountingFile(grey1500[1]))
    rng = np.random.default_rng(6)
    boxes = []
    for _ in range(40):
        x, y, s = rng.uniform(0, 1200), rng.uniform(0, 1200), rng.uniform(100, 600)
        boxes.append((x, y, x + s, y + s))
    serial = PyramidReader(grey1500[1]).read_regions(boxes, 96)
    with ThreadPoolExecutor(4) as pool:
        parallel = reader.read_regions(boxes, 96, executor=pool)
        racing = list(pool.map(lambda b: reader.read_region(b, 96), boxes))
    assert all((a == b).all() and (a == c).all() for a, b, c in zip(serial, parallel, racing))
    unique = set()
    for b in boxes:  # expected tiles from the pure geometry functions
        lvl = choose_level(b, (96, 96), reader.levels)
        win = sampling_window(level_box(b, reader.levels[0], reader.levels[lvl])).clip(*reader.levels[lvl])
        unique |= {(lvl, tx, ty) for tx, ty in tiles_of(win, 256)}
    assert reader.tiles_decoded == len(unique) and reader.decoded_pixels == len(unique) * 256**2


def test_concurrent_requests_for_one_tile_decode_it_once(grey1500: tuple[np.ndarray, bytes]) -> None:
    reader = PyramidReader(grey1500[1])
    barrier = threading.Barrier(6)

    def read() -> np.ndarray:
        barrier.wait()
        return reader.read_region((10, 10, 50, 50), 40)

    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: read(), range(6)))
    assert reader.tiles_decoded == 1 and all((o == outs[0]).all() for o in outs)


def test_reads_pyramids_written_by_others() -> None:
    """SubIFD pyramids and BigTIFF (as tifffile/vips write them) read like ours."""
    img = texture(np.random.default_rng(7), 300, 500, 3)
    half = np.asarray(Image.fromarray(img).resize((250, 150), Image.BOX))
    for bigtiff in (False, True):
        buf = io.BytesIO()
        with tifffile.TiffWriter(buf, bigtiff=bigtiff) as tw:
            opts = {"tile": (128, 128), "compression": "jpeg", "photometric": "rgb", "metadata": None}
            tw.write(img, subifds=1, **opts)
            tw.write(half, subfiletype=1, **opts)
        reader = PyramidReader(buf.getvalue())
        assert reader.levels == [(500, 300), (250, 150)]
        got = reader.read_region((0, 0, 500, 300), (250, 150))
        assert diff(got, half).mean() < 3 and reader.tiles_decoded == 4  # level 1: 2 x 2 tiles
