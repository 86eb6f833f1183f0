"""``access: random``: ranged reads of one pyramid inside its shard, on local files and on S3 (moto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.gigapixel_synth import make_scene, write_tiff
from pipeline.loader import StreamSpec, make_loader
from pipeline.pyramid import PyramidReader
from pipeline.random_access import manifest_rows
from pipeline.ranged import ByteCounter, RangedFile
from pipeline.ray_shard import run_serial, run_sharding
from pipeline.shard_config import ShardConfig
from pipeline.storage import open_url

SIDE = 8192


@pytest.fixture(scope="module")
def gigadata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 8k x 8k synthetic images (classes disc, ring) sharded streaming into one local dataset."""
    root = tmp_path_factory.mktemp("giga")
    for label, cls in ((0, "disc"), (2, "ring")):
        (root / "src" / cls).mkdir(parents=True)
        write_tiff(str(root / "src" / cls / "img.tif"), make_scene(SIDE, SIDE, label, seed=label), tile=512)
    cfg = ShardConfig(dataset="folder", src=str(root / "src"), dst=str(root / "out"), calibrate=0, progress=False,
                      source_options={"stream_pixels": 1_000_000})
    assert run_sharding(cfg, runner=run_serial).samples == 2
    return root / "out"


def _upload(moto_s3, local: Path) -> str:
    url = moto_s3.bucket("giga")
    moto_s3.filesystem().put(str(local) + "/", url.removeprefix("s3://") + "/", recursive=True)
    return url


@pytest.mark.slow
def test_read_region_random_equals_streaming(gigadata: Path, moto_s3) -> None:
    url = _upload(moto_s3, gigadata)
    rows = manifest_rows(url, "train", moto_s3.storage_options)
    row = rows[0]
    whole = (gigadata / row.ref.shard).read_bytes()[row.ref.offset:row.ref.offset + row.ref.size]
    counter = ByteCounter()
    ranged = PyramidReader(row.ref.open(counter), defer_index=True)
    local = PyramidReader(whole)
    boxes = [(0, 0, SIDE, SIDE), (1000.5, 2000, 1500, 2600), (7000, 7000, 9000, 9000), (100, 100, 356, 356)]
    for box in boxes:
        for size in (224, 96):
            assert np.array_equal(ranged.read_region(box, size), local.read_region(box, size))
    assert counter.bytes < 0.05 * row.ref.size and counter.requests < 40


@pytest.mark.slow
def test_tnet_forward_reads_under_5_percent_from_s3(gigadata: Path, moto_s3) -> None:
    """3-level TNet with k=2 per level over random-access batches from S3: bytes fetched (counted
    at the fsspec calls) stay under 5% of the samples' pyramid bytes."""
    import s3fs

    from tnet.config import TNetConfig
    from tnet.model import TNet

    url = _upload(moto_s3, gigadata)
    fetched = {"bytes": 0}
    original = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *args, **kwargs):  # the fsspec layer itself, not our counter
        data = await original(self, path, *args, **kwargs)
        fetched["bytes"] += len(data)
        return data

    cfg = TNetConfig(num_classes=4, backbone="tiny", levels=3, locations=(2, 2), base_size=64, input_size=256)
    model = TNet(cfg).eval()
    spec = StreamSpec(url=url, split="train", shards=(), base_size=cfg.base_size, channels=3, quota=2,
                      train=True, storage_options=moto_s3.storage_options, access="random")
    s3fs.S3FileSystem._cat_file = counting
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances hold sync wrappers of the original
    try:
        batches = list(make_loader(spec, batch_size=2))
        batch = batches[0]
        with torch.no_grad():
            out = model(batch.region_source(3))
    finally:
        s3fs.S3FileSystem._cat_file = original
        s3fs.S3FileSystem.clear_instance_cache()
    assert len(batch) == 2 and batch.skipped == 0 and out.logits.shape == (2, 4)
    assert batch.sample_bytes > 10_000_000
    assert fetched["bytes"] >= batch.bytes_fetched() > 0
    manifest_and_json = 200_000
    assert fetched["bytes"] - manifest_and_json < 0.05 * batch.sample_bytes, (fetched, batch.sample_bytes)
    assert batch.bytes_fetched() < 0.05 * batch.sample_bytes


def test_ranged_file_reads_and_merges(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "blob").write_bytes(data)
    fs, path = open_url(str(tmp_path / "blob"))
    f = RangedFile(fs, path, 100, 5000, record=True)
    assert f.seek(0, 2) == 5000 and f.seek(10) == 10 and f.read(5) == data[110:115]
    assert f.read_ranges([(0, 4), (4, 6), (3000, 2)]) == [data[100:104], data[104:110], data[3100:3102]]
    assert f.counter.requests == 3 and f.counter.bytes == 5 + 10 + 2  # (0, 4) and (4, 6) merged
    again = RangedFile(fs, path, 100, 5000, known=f.chunks)
    assert again.seek(10) == 10 and again.read(3) == data[110:113] and again.counter.bytes == 0
    with pytest.raises(Exception, match="outside the member"):
        f.read_ranges([(4999, 2)])


@pytest.mark.slow
def test_random_access_loader_matches_streaming_base_views(gigadata: Path) -> None:
    common = dict(url=str(gigadata), split="train", base_size=64, channels=3, quota=2, train=False)
    from pipeline.loader import split_shards

    shards = tuple(s for s, _ in split_shards(str(gigadata), "train"))
    stream = {k: v for b in make_loader(StreamSpec(shards=shards, **common), 2) for k, v in zip(b.keys, b.base_views)}
    batch = next(iter(make_loader(StreamSpec(shards=(), access="random", **common), 2)))
    assert sorted(batch.keys) == sorted(stream)
    for key, view in zip(batch.keys, batch.base_views):
        assert torch.equal(view, stream[key])
    assert 0 < batch.base_fetched < 0.02 * batch.sample_bytes
    with pytest.raises(ValueError, match="access='sideways'"):
        StreamSpec(access="sideways", shards=(), **common)
