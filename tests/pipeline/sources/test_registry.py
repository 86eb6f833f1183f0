"""The source registry: names, option checking, and the contract every source keeps."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.sources import SOURCES, make_source
from pipeline.sources.base import SourceRecord
from tests.fixtures.datasets import make_fmow, make_folder, make_imagenet


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match=r"dataset='coco': unknown; known datasets: \['fmow', 'folder'"):
        make_source("coco", "/data", {})


def test_registry_is_write_once():
    with pytest.raises(TypeError):
        SOURCES["mine"] = None  # type: ignore[index]


def test_construction_is_lazy(tmp_path):
    """Building a source does no I/O, so a Ray task can rebuild it from plain data cheaply."""
    for name in ("fmow", "imagenet", "folder"):
        make_source(name, str(tmp_path / "does-not-exist"), {"storage_options": {}})


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_keeps_the_contract(tmp_path, name):
    rng = np.random.default_rng(0)
    options = {}
    if name == "fmow":
        options = {"test_mapping": make_fmow(str(tmp_path), rng)["test_mapping"]}
    elif name == "imagenet":
        make_imagenet(str(tmp_path), rng)
    elif name == "folder":
        make_folder(str(tmp_path), rng)
    elif name == "slides":
        from pipeline.gigapixel_synth import make_scene, write_tiff

        write_tiff(str(tmp_path / "s.tif"), make_scene(200, 150, 1, 0), tile=128)
        (tmp_path / "labels.csv").write_text("slide,label\ns.tif,tumour\n")
    else:
        options = {"size": 160, "n_train": 3, "n_test": 2, "n_noise": 5}
    source = make_source(name, None if name == "megapixel-mnist" else str(tmp_path), options)
    assert source.name == name and source.channels in (1, 3) and source.classes
    assert isinstance(source.describe(), dict) and source.splits
    clone = pickle.loads(pickle.dumps(source))
    record = next(r for r in source.records(source.splits) if isinstance(r, SourceRecord))
    sample = clone.load(record)
    assert sample.image.dtype == np.uint8
    assert sample.image.ndim == (2 if source.channels == 1 else 3)
    assert len(sample.sha256) == 64 and sample.meta["label"] == record.label
