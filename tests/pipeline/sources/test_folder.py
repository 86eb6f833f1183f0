"""Image folders: split detection, classes, counts, rejects, channels, 16-bit and TIFF inputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.errors import DatasetError, SampleError
from pipeline.sources import make_source
from pipeline.sources.base import Reject, SourceRecord
from pipeline.sources.folder import ImageFolder
from tests.fixtures.datasets import make_folder


def _split(items):
    items = list(items)
    return [r for r in items if isinstance(r, SourceRecord)], [r for r in items if isinstance(r, Reject)]


def _check(source, expected):
    splits = sorted(expected["records"])
    assert source.splits == splits and source.classes == ["cat", "dog"]
    records, rejects = _split(source.records(splits))
    counts = {s: dict(Counter(r.label_name for r in records if r.split == s)) for s in splits}
    assert counts == expected["records"]
    assert dict(Counter(r.reason for r in rejects)) == expected["listing_rejects"]
    failures, samples = Counter(), {}
    for record in records:
        assert record.label == ["cat", "dog"].index(record.label_name)
        try:
            samples[record.key] = source.load(record)
        except SampleError as err:
            failures[err.reason] += 1
    assert dict(failures) == expected["load_rejects"]
    return records, samples


@pytest.mark.parametrize("splits", [True, False])
def test_layouts_counts_and_rejects(tmp_path, splits):
    expected = make_folder(str(tmp_path), np.random.default_rng(0), splits=splits)
    records, samples = _check(ImageFolder(str(tmp_path)), expected)
    assert [r.key for r in records] == [r.key for r in ImageFolder(str(tmp_path)).records(sorted(expected["records"]))
                                        if isinstance(r, SourceRecord)]  # fmt: skip
    assert len({r.key for r in records}) == len(records)
    assert "folder-train-cat-e_JPG" in samples and "folder-train-cat-c_tif" in samples
    for sample in samples.values():
        assert sample.image.ndim == 3 and sample.image.shape[2] == 3 and sample.image.dtype == np.uint8


def test_sixteen_bit_tiff_and_grayscale(tmp_path):
    make_folder(str(tmp_path), np.random.default_rng(0))
    rgb = ImageFolder(str(tmp_path))
    grey = make_source("folder", str(tmp_path), {"channels": 1})
    by_key = {r.key: r for r in rgb.records(["train"]) if isinstance(r, SourceRecord)}
    deep = rgb.load(by_key["folder-train-cat-d16_png"])
    assert deep.image.shape == (50, 70, 3)
    assert deep.image.max() > 32  # scaled from 16 bits, not clipped to the low byte
    assert grey.load(by_key["folder-train-cat-d16_png"]).image.shape == (50, 70)
    assert rgb.load(by_key["folder-train-cat-c_tif"]).image.shape == (90, 120, 3)
    assert grey.load(by_key["folder-train-dog-a_jpeg"]).image.shape == (200, 300)
    assert deep.meta == dict(path="train/cat/d16.png", label=0, label_name="cat", width=70, height=50)


def test_memory_root(memory_root):
    expected = make_folder(memory_root, np.random.default_rng(3))
    records, _ = _check(ImageFolder(memory_root), expected)
    assert all(r.source.startswith("memory://") for r in records)


def test_forced_layout_and_errors(tmp_path):
    make_folder(str(tmp_path), np.random.default_rng(0))
    flat = ImageFolder(str(tmp_path), layout="flat")
    assert flat.classes == []  # split folders read as classes with nested (misplaced) files
    with pytest.raises(DatasetError, match="no split 'test'"):
        list(ImageFolder(str(tmp_path)).records(["test"]))
    with pytest.raises(DatasetError, match="dataset folder not found"):
        _ = ImageFolder(str(tmp_path / "missing")).classes
    for options, message in [
        ({"channels": 4}, "folder.channels=4"),
        ({"layout": "tree"}, "folder.layout='tree'"),
        ({"recursive": True}, r"unknown option\(s\) \['recursive'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_source("folder", str(tmp_path), options)
