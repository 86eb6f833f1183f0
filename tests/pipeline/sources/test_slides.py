"""The slides source: labels CSV, rejects for missing/unlabelled slides, OpenSlide and libvips reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DatasetError
from pipeline.gigapixel_synth import make_scene, render, write_tiff, write_with_vips
from pipeline.pyramid import PyramidReader
from pipeline.ray_shard import list_inputs, run_serial, run_sharding
from pipeline.shard_config import ShardConfig
from pipeline.sources import make_source
from pipeline.sources.base import Reject
from pipeline.sources.slides import OpenSlideBands
from pipeline.streaming import VipsBands


def _slides(root: Path) -> dict[str, object]:
    (root / "batch1").mkdir(parents=True)
    scenes = {"batch1/a.tif": make_scene(700, 500, 0, 1), "b.tif": make_scene(520, 640, 2, 2)}
    for rel, scene in scenes.items():
        write_tiff(str(root / rel), scene, tile=256, compression="jpeg", quality=95)
    write_with_vips(str(root / "b.tif"), str(root / "c.png"))
    write_tiff(str(root / "stray.tif"), make_scene(300, 300, 1, 3), tile=256)
    (root / "labels.csv").write_text("slide,label,split\nbatch1/a.tif,tumour,train\nb.tif,normal,train\n"
                                     "c.png,normal,test\ngone.svs,tumour,train\n")
    return scenes


def test_records_and_rejects(tmp_path: Path) -> None:
    _slides(tmp_path)
    src = make_source("slides", str(tmp_path))
    assert src.classes == ["normal", "tumour"] and src.splits == ["test", "train"]
    items = list(src.records(["train", "test"]))
    records = [i for i in items if not isinstance(i, Reject)]
    rejects = sorted((r.reason, Path(r.source).name) for r in items if isinstance(r, Reject))
    assert [(r.key, r.split, r.label_name, r.label) for r in records] == [
        ("slide-b_tif", "train", "normal", 0), ("slide-batch1_a_tif", "train", "tumour", 1),
        ("slide-c_png", "test", "normal", 0)]
    assert rejects == [("missing file", "gone.svs"), ("unlabelled", "stray.tif")]


def test_bands_come_from_openslide_or_vips(tmp_path: Path) -> None:
    scenes = _slides(tmp_path)
    src = make_source("slides", str(tmp_path))
    by_key = {r.key: r for r in src.records(["train", "test"]) if not isinstance(r, Reject)}
    sample = src.load_stream(by_key["slide-batch1_a_tif"])
    assert isinstance(sample.bands, OpenSlideBands) and len(sample.sha256) == 64
    band = sample.bands.read_band(0, 256).astype(int)
    sample.close()
    assert np.abs(band - render(scenes["batch1/a.tif"], 0, 0, 700, 256)).mean() < 3
    png = src.load_stream(by_key["slide-c_png"])
    assert isinstance(png.bands, VipsBands) and (png.bands.width, png.bands.height) == (520, 640)
    png.close()
    assert src.load(by_key["slide-b_tif"]).image.shape == (640, 520, 3)


def test_bad_csv_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,label\nx.tif,a\n")
    with pytest.raises(DatasetError, match="lacks column"):
        _ = make_source("slides", str(tmp_path)).classes
    with pytest.raises(DatasetError, match="labels CSV not readable"):
        _ = make_source("slides", str(tmp_path), {"labels": str(tmp_path / "nope.csv")}).classes
    with pytest.raises(ValueError, match="slides.channels"):
        make_source("slides", str(tmp_path), {"channels": 2})


def test_slides_shard_streaming(tmp_path: Path) -> None:
    scenes = _slides(tmp_path / "src")
    cfg = ShardConfig(dataset="slides", src=str(tmp_path / "src"), dst=str(tmp_path / "out"), tile=128,
                      calibrate=0, progress=False)
    summary = run_sharding(cfg, runner=run_serial)
    assert summary.samples == 3 and summary.rejects == {"missing file": 1, "unlabelled": 1}
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    row = rows["slide-batch1_a_tif"]
    data = (tmp_path / "out" / row["shard"]).read_bytes()[row["offset"]:row["offset"] + row["size"]]
    reader = PyramidReader(data)
    assert reader.levels == [(700, 500), (350, 250), (175, 125), (88, 63)]
    obj = scenes["batch1/a.tif"].objects[0].box
    got = reader.read_region(obj, (obj[2] - obj[0], obj[3] - obj[1]), level=0).astype(int)
    assert np.abs(got - render(scenes["batch1/a.tif"], *obj)).mean() < 10  # two JPEG passes on noise
    records, rejects = list_inputs(make_source("slides", str(tmp_path / "src")), ["train"])
    assert len(records) == 2 and len(rejects) == 2
