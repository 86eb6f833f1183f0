"""fMoW-rgb: class order, counts, rejects, boxes and warnings, options, mapping formats, memory://."""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import DatasetError, SampleError
from pipeline.sources import make_source
from pipeline.sources.base import Reject, SourceRecord
from pipeline.sources.fmow import FMoW, fmow_classes, parse_mapping
from pipeline.sources.fmow_boxes import capped_size, clip_boxes, context_crop
from tests.fixtures.datasets import make_fmow

SPLITS = ["train", "val", "test"]


@pytest.fixture(scope="module")
def fmow(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fmow"))
    return root, make_fmow(root, np.random.default_rng(0))


def _split(items):
    items = list(items)
    records = [r for r in items if isinstance(r, SourceRecord)]
    rejects = [r for r in items if isinstance(r, Reject)]
    return records, rejects


def _load_all(source, records):
    samples, failures = {}, Counter()
    for record in records:
        try:
            samples[record.key] = source.load(record)
        except SampleError as err:
            failures[err.reason] += 1
    return samples, failures


def test_class_order_is_the_paper_codes():
    classes = fmow_classes()
    assert len(classes) == 62 and len(set(classes)) == 62
    assert classes[0] == "airport" and classes[-1] == "zoo"
    assert classes.index("impoverished_settlement") == 42
    assert classes.index("recreational_facility") == 41 and classes.index("interchange") == 25
    assert fmow_classes(include_false_detection=True)[62] == "false_detection"
    shared = Path("/work/shared/data/fmow_classes.txt")
    if shared.exists():
        assert shared.read_text().split() == classes


def test_counts_rejects_and_samples(fmow):
    root, expected = fmow
    source = FMoW(root, test_mapping=expected["test_mapping"])
    assert source.splits == SPLITS
    records, rejects = _split(source.records(SPLITS))
    counts = {s: dict(Counter(r.label_name for r in records if r.split == s)) for s in SPLITS}
    assert counts == expected["records"]
    assert dict(Counter(r.reason for r in rejects)) == expected["listing_rejects"]
    assert all(r.source and r.split for r in rejects)
    samples, failures = _load_all(source, records)
    assert dict(failures) == expected["load_rejects"]
    assert dict(Counter(k.split("-")[1] for k in samples)) == expected["samples"]
    for record in records:
        assert record.label == source.classes.index(record.label_name)
        assert "." not in record.key
    assert {r.label for r in records if r.label_name == "impoverished_settlement"} == {42}


def test_keys_are_deterministic_and_unique(fmow):
    root, expected = fmow
    source = FMoW(root, test_mapping=expected["test_mapping"], include_msrgb=True)
    first = [r.key for r in source.records(SPLITS) if isinstance(r, SourceRecord)]
    again = [r.key for r in FMoW(root, test_mapping=expected["test_mapping"], include_msrgb=True).records(SPLITS)
             if isinstance(r, SourceRecord)]  # fmt: skip
    assert first == again and len(set(first)) == len(first)
    assert "fmow-train-airport_0_0" in first and "fmow-train-airport_0_0_msrgb" in first
    assert "fmow-test-0000001_1" in first


def test_boxes_placeholder_other_category_clipping_and_size_warnings(fmow):
    root, expected = fmow
    source = FMoW(root)
    records = {r.key: r for r in source.records(["train"]) if isinstance(r, SourceRecord)}
    plain = source.load(records["fmow-train-airport_0_0"])
    assert [b["id"] for b in plain.meta["boxes"]] == [101]  # the ID -1 placeholder is skipped
    assert plain.meta["boxes"][0]["box"] == [10.0, 12.0, 50.0, 42.0] and plain.meta["warnings"] == []
    assert plain.image.shape == (80, 96, 3) and plain.meta["label_name"] == "airport"
    assert plain.meta["fmow"]["gsd"] == 0.5
    path = records["fmow-train-airport_0_0"].source
    assert plain.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()

    clipped = source.load(records["fmow-train-airport_0_1"])
    assert clipped.meta["boxes"][0]["box"] == [100.0, 70.0, 120.0, 90.0]
    assert clipped.meta["source_size"] == [120, 90]
    warnings = " | ".join(clipped.meta["warnings"])
    assert "json size 240x180 differs from pixels 120x90" in warnings and "box 102" in warnings

    zero = source.load(records["fmow-train-airport_1_0"])
    assert [b["id"] for b in zero.meta["boxes"]] == [104]
    assert any("box 103" in w and "zero area" in w for w in zero.meta["warnings"])

    other = source.load(records["fmow-train-impoverished_settlement_0_2"])
    assert [b["id"] for b in other.meta["boxes"]] == [112]  # the airport box is ignored

    with pytest.raises(SampleError, match="no valid box") as err:
        source.load(records["fmow-train-airport_1_1"])
    assert "box 105" in str(err.value)


def test_test_split_without_mapping_is_rejected_per_view(fmow):
    root, expected = fmow
    records, rejects = _split(FMoW(root).records(["test"]))
    assert records == []
    assert Counter(r.reason for r in rejects) == {"no label mapping": expected["anonymised_views"]}


def test_msrgb_and_false_detection_options(fmow):
    root, expected = fmow
    base = Counter(r.split for r in FMoW(root, test_mapping=expected["test_mapping"]).records(SPLITS)
                   if isinstance(r, SourceRecord))  # fmt: skip
    ms = FMoW(root, test_mapping=expected["test_mapping"], include_msrgb=True)
    ms_counts = Counter(r.split for r in ms.records(SPLITS) if isinstance(r, SourceRecord))
    assert {s: ms_counts[s] - base[s] for s in SPLITS} == {**{"val": 0}, **expected["msrgb"]}
    fd = FMoW(root, test_mapping=expected["test_mapping"], include_false_detection=True)
    assert len(fd.classes) == 63
    fd_records = [r for r in fd.records(SPLITS) if isinstance(r, SourceRecord) and r.label == 62]
    assert Counter(r.split for r in fd_records) == expected["false_detection"]
    assert all(r.label_name == "false_detection" for r in fd_records)
    assert fd.load(fd_records[0]).meta["boxes"][0]["category"] == "false_detection"


def test_per_box_crops_with_context(fmow):
    root, expected = fmow
    source = FMoW(root, per_box=True, context=0.5)
    records, rejects = _split(source.records(["train"]))
    assert Counter(r.reason for r in rejects) == {"unknown category": 1}
    keys = [r.key for r in records]
    assert "fmow-train-airport_1_0-box0" in keys and "fmow-train-airport_1_0-box1" in keys
    assert "fmow-train-impoverished_settlement_0_2-box1" not in keys  # the airport box
    by_key = {r.key: r for r in records}
    crop = source.load(by_key["fmow-train-airport_0_0-box1"])
    assert crop.meta["crop"] == [0, 0, 70, 57]  # box [10, 12, 50, 42] grown by 20 x 15 px
    assert crop.image.shape == (57, 70, 3)
    box = {"index": 1, "id": 101, "category": "airport", "box": [10.0, 12.0, 50.0, 42.0]}
    assert crop.meta["boxes"] == [box]
    with pytest.raises(SampleError, match="no valid box"):
        source.load(by_key["fmow-train-airport_1_0-box0"])  # the zero-area box


def test_max_short_side_scales_image_and_boxes(fmow):
    root, _ = fmow
    source = FMoW(root, max_short_side=100)
    records, _ = _split(source.records(["val"]))
    record = next(r for r in records if "settlement_2_0" in r.key)
    sample = source.load(record)
    assert sample.image.shape == (100, 150, 3)
    assert sample.meta["scale"] == [0.5, 0.5] and sample.meta["source_size"] == [300, 200]
    assert sample.meta["boxes"][0]["box"] == [50.0, 25.0, 110.0, 75.0]
    assert (sample.meta["width"], sample.meta["height"]) == (150, 100)


def test_memory_root_and_pickling(memory_root):
    expected = make_fmow(memory_root, np.random.default_rng(1))
    source = make_source("fmow", memory_root, {"test_mapping": expected["test_mapping"]})
    records, rejects = _split(source.records(SPLITS))
    counts = {s: dict(Counter(r.label_name for r in records if r.split == s)) for s in SPLITS}
    assert counts == expected["records"]
    assert all(r.source.startswith("memory://") for r in records + rejects)
    clone = pickle.loads(pickle.dumps(source))
    sample = clone.load(records[0])
    assert sample.image.ndim == 3 and sample.meta["label_name"] == records[0].label_name


def test_mapping_formats():
    fmow_list = b'[{"input": "test_gt/airport/airport_9", "output": "test/0000000"}]'
    assert parse_mapping(fmow_list, "m.json") == {"0000000": "airport"}
    assert parse_mapping(b'{"0000004": "zoo"}', "m.json") == {"0000004": "zoo"}
    assert parse_mapping(b"id,category\n0000005,dam\n", "m.csv") == {"0000005": "dam"}
    for bad in (b"[1, 2]", b"{bad json", b"anon,label\n1,dam\n", b'{"a": 3}'):
        with pytest.raises(DatasetError, match="^m.x: "):
            parse_mapping(bad, "m.x")


def test_bad_options_and_splits(fmow, tmp_path):
    root, _ = fmow
    for options, message in [
        ({"context": -0.1}, "fmow.context=-0.1"),
        ({"per_box": "yes"}, "fmow.per_box='yes'"),
        ({"max_short_side": 0}, "fmow.max_short_side=0"),
        ({"box_mode": 1}, r"unknown option\(s\) \['box_mode'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_source("fmow", root, options)
    with pytest.raises(ValueError, match="fmow split='seq'"):
        list(FMoW(root).records(["seq"]))
    with pytest.raises(DatasetError, match="dataset folder not found"):
        list(FMoW(str(tmp_path)).records(["train"]))
    with pytest.raises(DatasetError, match="test mapping file not found"):
        list(FMoW(root, test_mapping=str(tmp_path / "none.json")).records(["test"]))


@given(
    box=st.lists(st.integers(-50, 250), min_size=4, max_size=4),
    width=st.integers(1, 200),
    height=st.integers(1, 200),
)
def test_clipped_boxes_lie_inside_and_warn_when_changed(box, width, height):
    warnings: list[str] = []
    out = clip_boxes([(0, {"ID": 9, "box": box})], width, height, warnings)
    x, y, w, h = box
    inside = x >= 0 and y >= 0 and x + w <= width and y + h <= height
    assert (warnings == []) == (inside and w > 0 and h > 0)
    for b in out:
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@given(
    box=st.tuples(st.floats(0, 90), st.floats(0, 90), st.floats(1, 50), st.floats(1, 50)),
    context=st.floats(0, 2),
)
def test_context_crop_contains_the_box(box, context):
    x, y, w, h = box
    x1, y1 = min(x + w, 100.0), min(y + h, 100.0)
    cx0, cy0, cx1, cy1 = context_crop([x, y, x1, y1], context, 100, 100)
    assert 0 <= cx0 <= x and 0 <= cy0 <= y and x1 <= cx1 <= 100 and y1 <= cy1 <= 100


def test_capped_size_keeps_aspect():
    assert capped_size(3000, 2000, 1000) == (1500, 1000)
    assert capped_size(2000, 3001, 1000) == (1000, 1500)
    assert capped_size(800, 900, 1000) == (800, 900)
