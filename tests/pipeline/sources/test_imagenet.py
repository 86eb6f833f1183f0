"""ImageNet: the three validation label sources, sorted-wnid indices, known bad files, rejects."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DatasetError, SampleError
from pipeline.sources import make_source
from pipeline.sources.base import Reject, SourceRecord
from pipeline.sources.imagenet import ImageNet, parse_devkit_meta, parse_kaggle_val, parse_synset_mapping
from tests.fixtures.datasets import DEVKIT_IDS, WNIDS, WORDS, make_imagenet

FORMATS = ["kaggle", "devkit", "folders"]


@pytest.fixture(scope="module", params=FORMATS)
def imagenet(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f"imagenet-{request.param}"))
    return root, request.param, make_imagenet(root, np.random.default_rng(0), val_format=request.param)


def _split(items):
    items = list(items)
    return [r for r in items if isinstance(r, SourceRecord)], [r for r in items if isinstance(r, Reject)]


def test_counts_indices_and_rejects(imagenet):
    root, fmt, expected = imagenet
    source = ImageNet(root)
    assert source.classes == WNIDS and source.splits == ["train", "val"]
    records, rejects = _split(source.records(["train", "val"]))
    counts = {s: dict(Counter(r.label_name for r in records if r.split == s)) for s in ("train", "val")}
    assert counts == expected["records"]
    assert dict(Counter(r.reason for r in rejects)) == expected["listing_rejects"]
    for record in records:
        assert record.label == WNIDS.index(record.label_name)  # sorted wnids, not devkit IDs
    val = {r.key: r.label for r in records if r.split == "val"}
    assert val["imagenet-val-ILSVRC2012_val_00000001"] == 0
    assert val["imagenet-val-ILSVRC2012_val_00000006"] == 2
    assert DEVKIT_IDS[WNIDS[0]] == 2  # so "ILSVRC2012_ID - 1" would have given class 1 above
    failures = Counter()
    for record in records:
        try:
            sample = source.load(record)
        except SampleError as err:
            failures[err.reason] += 1
            continue
        assert sample.image.ndim == 3 and sample.image.shape[2] == 3 and sample.image.dtype == np.uint8
    assert dict(failures) == expected["load_rejects"]


def test_known_bad_files_are_converted(imagenet):
    root, _, expected = imagenet
    source = ImageNet(root)
    records = {r.key: r for r in source.records(["train"]) if isinstance(r, SourceRecord)}
    png = records[expected["png_named_jpeg"]]
    assert png.source.endswith(".JPEG") and Path(png.source).read_bytes().startswith(b"\x89PNG")
    assert source.load(png).image.shape == (70, 90, 3)
    cmyk = records[expected["cmyk"]]
    assert Image.open(io.BytesIO(Path(cmyk.source).read_bytes())).mode == "CMYK"
    assert source.load(cmyk).image.shape == (60, 80, 3)


def test_words_and_keys(imagenet):
    root, fmt, _ = imagenet
    records, _ = _split(ImageNet(root).records(["train"]))
    assert [r.key for r in records] == [r.key for r in _split(ImageNet(root).records(["train"]))[0]]
    assert records[0].key == "imagenet-train-n01440764_0"
    words = {r.label_name: r.meta["words"] for r in records}
    assert words == (dict(zip(WNIDS, WORDS)) if fmt != "folders" else dict.fromkeys(WNIDS, ""))


def test_flat_val_without_labels_is_a_dataset_error(tmp_path):
    make_imagenet(str(tmp_path), np.random.default_rng(0), val_format="kaggle")
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetError, match="flat validation images but no"):
        list(ImageNet(str(tmp_path)).records(["val"]))
    # explicit label files work from anywhere
    other = tmp_path / "labels"
    other.mkdir()
    (tmp_path / "LOC_synset_mapping.txt").rename(other / "map.txt")
    source = ImageNet(str(tmp_path), synset_mapping=str(other / "map.txt"))
    assert source.classes == WNIDS
    with pytest.raises(DatasetError, match="label file not found"):
        _ = ImageNet(str(tmp_path), val_labels=str(other / "none.csv")).classes


def test_memory_root(memory_root):
    expected = make_imagenet(memory_root, np.random.default_rng(2), val_format="devkit")
    source = make_source("imagenet", memory_root, {})
    records, rejects = _split(source.records(["train", "val"]))
    assert len(records) == sum(sum(c.values()) for c in expected["records"].values())
    assert all(r.source.startswith("memory://") for r in records + rejects)
    assert source.load(records[-1]).image.shape[2] == 3


def test_parsers():
    assert parse_synset_mapping("n01440764 tench, Tinca tinca\n\n") == {"n01440764": "tench, Tinca tinca"}
    csv_text = "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4 n01751748 5 6 7 8 \n"
    assert parse_kaggle_val(csv_text, "x.csv") == {"ILSVRC2012_val_00000001": "n01751748"}
    with pytest.raises(DatasetError, match="^x.csv: expected columns"):
        parse_kaggle_val("a,b\n1,2\n", "x.csv")
    with pytest.raises(DatasetError, match="^meta.mat: not a devkit meta.mat"):
        parse_devkit_meta(b"not a mat file at all" * 10, "meta.mat")


def test_devkit_meta_layout(tmp_path):
    make_imagenet(str(tmp_path), np.random.default_rng(0), val_format="devkit")
    data = (tmp_path / "ILSVRC2012_devkit_t12/data/meta.mat").read_bytes()
    synsets = parse_devkit_meta(data, "meta.mat")
    assert synsets[DEVKIT_IDS["n02102040"]] == ("n02102040", WORDS[2], True)
    assert synsets[4][2] is False  # the non-leaf parent is not a class


def test_bad_options_and_splits(tmp_path):
    with pytest.raises(ValueError, match="imagenet.max_pixels=0"):
        make_source("imagenet", str(tmp_path), {"max_pixels": 0})
    with pytest.raises(ValueError, match="imagenet split='test'"):
        list(ImageNet(str(tmp_path)).records(["test"]))
    with pytest.raises(ValueError, match="a dataset root"):
        make_source("imagenet", None, {})
