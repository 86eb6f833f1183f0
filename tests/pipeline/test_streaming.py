"""Streaming pyramid builds: same bytes as the in-memory builder, any source libvips reads, flat memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SampleError
from pipeline.gigapixel_synth import make_scene, render, write_tiff, write_with_vips
from pipeline.pyramid import PyramidReader, build_pyramid
from pipeline.streaming import ArrayBands, VipsBands, build_pyramid_file, build_pyramid_stream

ROOT = Path(__file__).resolve().parents[2]


def _smooth(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(shape[0] // 8, 1), max(shape[1] // 8, 1)) + shape[2:], dtype=np.uint8)
    return np.kron(small, np.ones((8, 8) + (1,) * (len(shape) - 2), np.uint8))[: shape[0], : shape[1]]


@pytest.mark.parametrize("shape", [(768, 1024, 3), (777, 1000, 3), (513, 300), (100, 90, 3)])
def test_stream_build_is_byte_identical_to_in_memory(shape: tuple[int, ...]) -> None:
    img = _smooth(shape, 1)
    out = io.BytesIO()
    info = build_pyramid_stream(ArrayBands(img), out, tile=256)
    assert out.getvalue() == build_pyramid(img, tile=256)
    assert info.levels == PyramidReader(out.getvalue()).levels and info.size == len(out.getvalue())


@settings(max_examples=12, deadline=None)
@given(w=st.integers(17, 300), h=st.integers(17, 300), grey=st.booleans())
def test_stream_build_identical_for_any_size(w: int, h: int, grey: bool) -> None:
    img = _smooth((h, w) if grey else (h, w, 3), w * 1000 + h)
    out = io.BytesIO()
    build_pyramid_stream(ArrayBands(img), out, tile=32)
    assert out.getvalue() == build_pyramid(img, tile=32)


def test_bad_arguments_and_bands_are_refused() -> None:
    with pytest.raises(ValueError, match="tile=100"):
        build_pyramid_stream(ArrayBands(np.zeros((64, 64), np.uint8)), io.BytesIO(), tile=100)
    with pytest.raises(ValueError, match="expected uint8"):
        ArrayBands(np.zeros((64, 64), np.float32))

    class Short(ArrayBands):
        def read_band(self, y0: int, y1: int) -> np.ndarray:
            return self.array[y0 : y1 - 1]

    with pytest.raises(ValueError, match="band rows 0..64"):
        build_pyramid_stream(Short(np.zeros((300, 300), np.uint8)), io.BytesIO(), tile=64)


@pytest.mark.parametrize("kind", ["tiled", "striped", "jpg", "png"])
def test_vips_sources_give_the_scene(tmp_path: Path, kind: str) -> None:
    scene = make_scene(1200, 900, 1, seed=3)
    src = str(tmp_path / "scene.tif")
    write_tiff(src, scene, tile=256, compression="deflate")
    if kind == "striped":
        src = str(tmp_path / "strip.tif")
        write_with_vips(str(tmp_path / "scene.tif"), src, tile=False, compression="deflate", bigtiff=True)
    elif kind in ("jpg", "png"):
        src = str(tmp_path / f"scene.{kind}")
        write_with_vips(str(tmp_path / "scene.tif"), src, **({"Q": 95} if kind == "jpg" else {}))
    f, info = build_pyramid_file(VipsBands.open(src, 3, src, 10**9), tile=128, quality=95)
    with f:
        reader = PyramidReader(f)
        assert reader.levels == info.levels and reader.levels[0] == (1200, 900)
        whole = reader.read_level(0).astype(int)
    ref = render(scene, 0, 0, 1200, 900).astype(int)
    assert np.abs(whole - ref).mean() < (4 if kind != "jpg" else 6)


def test_vips_grey_alpha_and_errors(tmp_path: Path) -> None:
    import pyvips

    rgba = np.dstack([np.full((40, 50, 3), 200, np.uint8), np.full((40, 50), 128, np.uint8)])
    pyvips.Image.new_from_array(rgba, interpretation="srgb").write_to_file(str(tmp_path / "a.png"))
    bands = VipsBands.open(str(tmp_path / "a.png"), 1, "a.png", 10**9)
    band = bands.read_band(0, 40)
    assert band.shape == (40, 50) and abs(int(band[0, 0]) - 100) <= 1  # 200 * 128 / 255, luma of grey
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(SampleError) as err:
        VipsBands.open(str(tmp_path / "bad.jpg"), 3, "bad.jpg", 10**9)
    assert err.value.reason == "unreadable image"
    with pytest.raises(SampleError) as err:
        VipsBands.open(str(tmp_path / "a.png"), 3, "a.png", 100)
    assert err.value.reason == "decompression bomb"


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pipeline.gigapixel_synth import make_scene, write_tiff
    from pipeline.ray_shard import run_serial, run_sharding
    from pipeline.shard_config import ShardConfig
    side, root = int(sys.argv[1]), sys.argv[2]
    scene = make_scene(side, side, 2, seed=0)
    import os; os.makedirs(f"{root}/src/train/ring")
    write_tiff(f"{root}/src/train/ring/big.tif", scene, tile=512, bigtiff=True)
    def hwm_kb():  # VmHWM belongs to this process image; ru_maxrss would include the parent's pre-exec fork
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1])
    before = hwm_kb()
    cfg = ShardConfig(dataset="folder", src=f"{root}/src", dst=f"{root}/out", max_pixels=2**34, calibrate=0,
                      progress=False, source_options={"stream_pixels": 10_000_000})
    t = time.perf_counter()
    summary = run_sharding(cfg, runner=run_serial)
    print(json.dumps({"samples": summary.samples, "rejects": summary.rejects, "seconds": time.perf_counter() - t,
                      "before_mb": before / 1024, "peak_mb": hwm_kb() / 1024}))
""")


@pytest.mark.slow
def test_16k_bigtiff_shards_with_flat_memory(tmp_path: Path) -> None:
    """A 16k x 16k BigTIFF (768 MB of pixels) shards in a process whose peak RSS stays < 1.5 GB."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "16384", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] == 1 and result["rejects"] == {}
    assert result["peak_mb"] < 1500, result
    import pyarrow.parquet as pq

    row = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()[0]
    assert (row["width"], row["height"]) == (16384, 16384)
    with open(tmp_path / "out" / row["shard"], "rb") as f:
        f.seek(row["offset"])
        head = f.read(16)
    assert head[:4] in (b"II*\x00", b"II+\x00")  # the manifest's offset is the pyramid's first byte
