"""Shard writing without Ray (``run_serial``): format, manifest offsets, rejects, resume, overwrite."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import resource
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from pipeline.dataset_files import read_dataset_json
from pipeline.errors import DatasetError, FormatError, SampleError
from pipeline.plan import ShardTask
from pipeline.pyramid import PyramidReader
from pipeline.ray_shard import keep_freed_memory, run_serial, run_sharding
from pipeline.shard_config import ShardConfig, parse_size
from pipeline.sharding import write_shard
from pipeline.sources.base import LoadedSample, SourceRecord
from pipeline.tarshard import BLOCK, parse_member_header, read_member
from tests.fixtures.datasets import make_fmow, make_imagenet

MNIST = {"n_train": 10, "n_test": 4, "size": 256}


def mnist_cfg(dst: Path, **kw: Any) -> ShardConfig:
    base = dict(dataset="megapixel-mnist", dst=str(dst), source_options=MNIST, shard_bytes=60_000, tile=128,
                progress=False)  # fmt: skip
    return ShardConfig(**{**base, **kw})


def load_dataset(dst: Path) -> tuple[dict, list[dict], list[dict]]:
    meta = read_dataset_json(str(dst))
    return meta, pq.read_table(dst / "manifest.parquet").to_pylist(), pq.read_table(dst / "rejects.parquet").to_pylist()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_mnist_shards_are_tar_webdataset_and_pyramids(tmp_path: Path) -> None:
    import webdataset as wds

    summary = run_sharding(mnist_cfg(tmp_path / "ds"), runner=run_serial)
    meta, rows, rejects = load_dataset(tmp_path / "ds")
    assert summary.samples == 14 and rejects == [] and meta["counts"] == {"train": 10, "test": 4}
    assert meta["classes"] == [str(d) for d in range(10)] and meta["config"]["splits"] == ["train", "test"]
    assert len(meta["shards"]["train"]) >= 2
    by_key = {r["key"]: r for r in rows}
    for split, shards in meta["shards"].items():
        for rel in shards:
            path = tmp_path / "ds" / rel
            with tarfile.open(path) as tar:
                names = tar.getnames()
                keys = [n.split(".")[0] for n in names[::3]]
                assert names == [f"{k}.{e}" for k in keys for e in ("tif", "json", "cls")]
                for key in keys:
                    row = by_key[key]
                    assert (row["shard"], row["split"]) == (rel, split)
                    tif = tar.extractfile(f"{key}.tif").read()
                    info = json.loads(tar.extractfile(f"{key}.json").read())
                    assert tar.extractfile(f"{key}.cls").read() == str(row["label"]).encode()
                    # the manifest's offsets point at the member's bytes, and at its header
                    assert read_member(str(path), row["offset"], row["size"]) == tif
                    header = read_member(str(path), row["header_offset"], BLOCK)
                    assert parse_member_header(header) == (f"{key}.tif", row["size"])
                    reader = PyramidReader(tif)
                    assert (reader.width, reader.height, reader.channels) == (256, 256, 1)
                    assert (info["width"], info["height"], info["label"], info["split"]) == (256, 256, row["label"], split)
                    assert info["pyramid"] == {"levels": len(reader.levels), "tile": 128, "quality": 90,
                                               "format": "tiff-jpeg-tiled"}  # fmt: skip
                    assert info["sha256"] == row["sha256"] and len(info["meta"]["digits"]) == 5
                    with tifffile.TiffFile(io.BytesIO(tif)) as tf:
                        assert len(tf.series[0].levels) == len(reader.levels) == 2
                        assert tf.series[0].levels[0].shape == (256, 256)
            got = list(wds.WebDataset([str(path)], shardshuffle=False))
            assert [s["__key__"] for s in got] == keys
            assert all(set(s) >= {"tif", "json", "cls"} for s in got)
    assert sorted(by_key) == sorted(f"mpmnist-{s}-{i:06d}" for s, n in (("train", 10), ("test", 4)) for i in range(n))


def test_two_runs_are_byte_identical_and_rerun_skips(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_sharding(mnist_cfg(a), runner=run_serial)
    run_sharding(mnist_cfg(b, verify="size"), runner=run_serial)  # run-only fields don't matter
    assert files_of(a) == files_of(b)
    tars = sorted(a.rglob("*.tar"))
    mtimes = {p: p.stat().st_mtime_ns for p in tars}
    again = run_sharding(mnist_cfg(a), runner=run_serial)
    assert again.shards_written == 0 and again.shards_skipped == len(tars)
    assert {p: p.stat().st_mtime_ns for p in tars} == mtimes
    assert files_of(a) == files_of(b)
    # a corrupted shard (same size) fails its checksum and is rewritten; the others are skipped
    data = bytearray(tars[0].read_bytes())
    data[600] ^= 0xFF
    tars[0].write_bytes(bytes(data))
    fixed = run_sharding(mnist_cfg(a), runner=run_serial)
    assert fixed.shards_written == 1
    assert files_of(a) == files_of(b)


def test_index_records_the_sha256_and_size_hashed_while_writing(tmp_path: Path) -> None:
    """The tar is not read back on commit: the index's sha256 is of the bytes as they were written."""
    run_sharding(mnist_cfg(tmp_path, splits=("test",)), runner=run_serial)
    indexes = sorted((tmp_path / "test").glob("shard-*.json"))
    assert indexes
    for path in indexes:
        index = json.loads(path.read_text())
        data = (tmp_path / index["shard"]).read_bytes()
        assert (index["bytes"], index["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert not list((tmp_path / "_tmp").glob("*"))  # nothing left behind in the scratch area


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_stops_refaulting_freed_blocks() -> None:
    """Why the shard tasks call it: freed image-sized blocks are reused, not page-faulted in again."""
    if not keep_freed_memory():
        pytest.skip("C library without glibc's mallopt")
    assert keep_freed_memory()  # idempotent

    def churn() -> None:  # like one image: several big blocks alive at once, then all freed
        for _ in range(10):
            blocks = [np.ones(20 << 20, np.uint8) for _ in range(3)]
            del blocks

    churn()  # the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()  # glibc's default thresholds trim the 60 MB heap top each time: ~10,000 faults here
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1_000


def test_other_config_is_refused_unless_overwrite(tmp_path: Path) -> None:
    dst = tmp_path / "ds"
    run_sharding(mnist_cfg(dst), runner=run_serial)
    n_before = len(list(dst.rglob("shard-*.tar")))
    with pytest.raises(DatasetError, match=r"ds: holds a dataset built with a different config \(differs in: quality\)"):
        run_sharding(mnist_cfg(dst, quality=80), runner=run_serial)
    assert (dst / "dataset.json").exists()  # refused: the old dataset is untouched
    run_sharding(mnist_cfg(dst, quality=80, shard_bytes=10**9, overwrite=True), runner=run_serial)
    meta, rows, _ = load_dataset(dst)
    assert meta["config"]["quality"] == 80 and len(rows) == 14
    assert n_before > 2
    assert len(list(dst.rglob("shard-*"))) == 4  # stale shards of the old plan were pruned
    assert not (dst / "_tmp").exists()


def test_max_side_downscales_and_records_it(tmp_path: Path) -> None:
    run_sharding(mnist_cfg(tmp_path, max_side=100, splits=("test",)), runner=run_serial)
    _, rows, _ = load_dataset(tmp_path)
    assert {(r["width"], r["height"]) for r in rows} == {(100, 100)}
    with tarfile.open(tmp_path / rows[0]["shard"]) as tar:
        info = json.loads(tar.extractfile(f"{rows[0]['key']}.json").read())
    assert (info["source_width"], info["scale"]) == (256, 100 / 256)


class TroubleSource:
    """A source whose records fail in every way a source can fail (not project code: a test double)."""

    name = "trouble"
    classes = ["a", "b"]
    channels = 3

    def records(self, splits: list[str]) -> list[SourceRecord]:
        return []

    def load(self, record: SourceRecord) -> LoadedSample:
        kind = record.meta["kind"]
        rgb = np.full((40, 50, 3), 100, np.uint8)
        if kind == "sample-error":
            raise SampleError(record.source, "zero bytes")
        if kind == "crash":
            raise RuntimeError("decoder segfault avoided")
        if kind == "float":
            return LoadedSample(rgb.astype(np.float32), {}, "x")
        if kind == "nan":
            return LoadedSample(rgb, {"gsd": float("nan")}, "x")
        if kind == "huge":
            return LoadedSample(np.zeros((300, 300), np.uint8), {}, "x")
        return LoadedSample(rgb, {"note": np.int64(7)}, "sha-" + record.key)


def trouble_task(kinds: list[str], index: int = 0) -> ShardTask:
    records = [SourceRecord(f"k{i}-{k}", "train", f"/raw/{k}.jpg", i % 2, "ab"[i % 2], meta={"kind": k})
               for i, k in enumerate(kinds)]  # fmt: skip
    return ShardTask("train", index, tuple(records))


def test_bad_inputs_become_rejects_and_never_kill_the_shard(tmp_path: Path) -> None:
    cfg = ShardConfig(dataset="megapixel-mnist", dst=str(tmp_path), max_pixels=50_000, progress=False)
    kinds = ["good", "sample-error", "crash", "float", "nan", "huge", "good"]
    result = write_shard(trouble_task(kinds), TroubleSource(), cfg)
    reasons = {r["key"].split("-", 1)[1]: r["reason"] for r in result.rejects}
    assert reasons == {"sample-error": "zero bytes", "crash": "unexpected RuntimeError", "float": "unsupported mode",
                       "nan": "bad metadata", "huge": "decompression bomb"}  # fmt: skip
    assert [r["key"] for r in result.rows] == ["k0-good", "k6-good"]
    assert len(result.rows) + len(result.rejects) == len(kinds)
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        info = json.loads(tar.extractfile("k0-good.json").read())
    assert info["meta"] == {"kind": "good", "note": 7} and info["channels"] == 3


def test_all_rejected_shard_has_no_tar_but_an_index(tmp_path: Path) -> None:
    cfg = ShardConfig(dataset="megapixel-mnist", dst=str(tmp_path), progress=False)
    task = trouble_task(["crash", "sample-error"], index=4)
    result = write_shard(task, TroubleSource(), cfg)
    assert result.shard is None and result.rows == [] and len(result.rejects) == 2
    assert not (tmp_path / "train" / "shard-000004.tar").exists()
    index = json.loads((tmp_path / "train" / "shard-000004.json").read_text())
    assert index["shard"] is None and index["keys"] == ["k0-crash", "k1-sample-error"]
    again = write_shard(task, TroubleSource(), cfg)
    assert again.skipped and again.rejects == result.rejects


def test_fmow_counts_classes_and_rejects(tmp_path: Path) -> None:
    expected = make_fmow(str(tmp_path / "raw"), np.random.default_rng(0))
    cfg = ShardConfig(dataset="fmow", src=str(tmp_path / "raw"), dst=str(tmp_path / "ds"), tile=64,
                      source_options={"test_mapping": expected["test_mapping"]}, progress=False)  # fmt: skip
    summary = run_sharding(cfg, runner=run_serial)
    meta, rows, rejects = load_dataset(tmp_path / "ds")
    assert meta["counts"] == expected["samples"]
    assert Counter(r["reason"] for r in rejects) == Counter(expected["listing_rejects"]) + Counter(expected["load_rejects"])
    assert meta["rejects"] == dict(Counter(r["reason"] for r in rejects))
    assert all(meta["classes"][r["label"]] == r["label_name"] for r in rows)
    assert summary.samples + sum(summary.rejects.values()) == summary.inputs


def test_imagenet_counts_classes_and_rejects(tmp_path: Path) -> None:
    expected = make_imagenet(str(tmp_path / "raw"), np.random.default_rng(1))
    cfg = ShardConfig(dataset="imagenet", src=str(tmp_path / "raw"), dst=str(tmp_path / "ds"), tile=64, progress=False)
    run_sharding(cfg, runner=run_serial)
    meta, rows, rejects = load_dataset(tmp_path / "ds")
    n_load = sum(expected["load_rejects"].values())
    records = {s: sum(c.values()) for s, c in expected["records"].items()}
    assert meta["counts"] == {"train": records["train"] - n_load, "val": records["val"]}
    assert Counter(r["reason"] for r in rejects) == Counter(expected["listing_rejects"]) + Counter(expected["load_rejects"])
    by_key = {r["key"]: r for r in rows}
    assert by_key[expected["png_named_jpeg"]]["label"] == 1 and by_key[expected["cmyk"]]["label"] == 2
    assert Counter((r["split"], r["label_name"]) for r in rows)[("val", meta["classes"][0])] == 2


def test_read_dataset_json_refuses_unknown_versions(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no dataset.json"):
        read_dataset_json(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(FormatError, match=r"format_version=99; this reader knows \[1\]"):
        read_dataset_json(str(tmp_path / "dataset.json"))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_dataset_json(str(tmp_path))


def test_config_validation_and_sizes() -> None:
    assert parse_size("512MB") == 512_000_000 and parse_size("1GiB") == 2**30 and parse_size("200k") == 200_000
    assert parse_size("4096") == 4096 and parse_size("1.5KiB") == 1536
    for bad in ("12 apples", "MiB", "1iB"):
        with pytest.raises(ValueError, match="size="):
            parse_size(bad)
    for field, value in (("tile", 100), ("quality", 0), ("dst", ""), ("verify", "md5"), ("splits", ("a", "a"))):
        with pytest.raises(ValueError, match=f"{field}="):
            dataclasses.replace(ShardConfig(dst="x"), **{field: value})
    assert os.sep not in ShardConfig(dst="x").dataset
