"""The streaming loader (pipeline/loader.py): ranks x DataLoader workers split an epoch exactly.

Ranks are simulated by building ``StreamSpec(rank=r, world=2)``; each rank iterates its
``ShardStream`` through a real ``DataLoader`` with 2 worker processes, so there are 4 slots. The
tiny Megapixel MNIST has 8 train shards of 3 samples (shards >= slots: whole shards per slot) and
3 test shards of 3, 2, 3 samples (shards < slots: every slot reads all, keeps every 4th sample).

Worker processes come from a forkserver that preloads the loader: a spawned worker re-imports
torch and costs seconds (12 s per 2-worker loader on a busy 2-core machine, 0.3 s this way);
``make_loader``'s own spawn context is exercised once.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from pipeline.errors import PipelineError
from pipeline.loader import (
    Batch,
    ShardStream,
    StreamSpec,
    collate,
    make_loader,
    object_boxes,
    slot_plan,
    split_shards,
)
from tests.fixtures.tiny_mnist import shard_tiny_mnist

WORLD, WORKERS = 2, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_tiny_mnist(tmp_path_factory.mktemp("loader") / "mnist")


@pytest.fixture(scope="module")
def forkserver() -> Iterator[BaseContext]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.loader"])  # no effect if a forkserver already runs: only slower
    yield ctx


def manifest_keys(url: Path, split: str) -> list[str]:
    table = pq.read_table(url / "manifest.parquet", columns=["key", "split"]).to_pylist()
    return sorted(r["key"] for r in table if r["split"] == split)


def spec_for(url: Path, split: str, rank: int, quota: int, **changes: object) -> StreamSpec:
    shards = split_shards(str(url), split)
    fields: dict[str, object] = {"world": WORLD, **changes}
    return StreamSpec(url=str(url), split=split, shards=tuple(s for s, _ in shards), base_size=64, channels=1,
                      quota=quota, rank=rank, **fields)  # type: ignore[arg-type]


def run_rank(spec: StreamSpec, ctx: BaseContext | None, workers: int = WORKERS, batch_size: int = 2) -> list[Batch]:
    loader = DataLoader(ShardStream(spec), batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        multiprocessing_context=ctx if workers else None)
    return list(loader)


@pytest.mark.parametrize("split, shards", [("train", 8), ("test", 3)], ids=["shards>=slots", "shards<slots"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_ranks_and_workers_cover_the_split_once_per_pass(dataset: Path, forkserver: BaseContext, split: str,
                                                         shards: int, epoch: int) -> None:
    keys = manifest_keys(dataset, split)
    assert len(split_shards(str(dataset), split)) == shards
    quota = len(keys) // WORLD
    seen: list[str] = []
    for rank in range(WORLD):
        batches = run_rank(spec_for(dataset, split, rank, quota, epoch=epoch, train=True), forkserver)
        got = [k for b in batches for k in b.keys]
        assert len(got) == quota  # every rank makes the same number of samples: DDP never waits
        assert sum(b.skipped for b in batches) == 0
        for b in batches:
            assert b.base_views.shape == (len(b), 1, 64, 64) and len(b.pyramids) == len(b.views) == len(b)
            assert float(b.base_views.min()) >= -1.0 and float(b.base_views.max()) <= 1.0
        seen += got
    assert Counter(seen) == Counter(keys)  # the union is the split, nothing twice


def test_slot_plan_gives_disjoint_shards_or_disjoint_strides() -> None:
    import random

    shards = [f"train/shard-{i:06d}.tar" for i in range(8)]
    plans = [slot_plan(shards, s, 4, random.Random("0-0")) for s in range(4)]
    assert all(stride is None for _, stride in plans)
    assert sorted(s for p, _ in plans for s in p) == shards
    few = shards[:3]
    plans = [slot_plan(few, s, 4, random.Random("0-0")) for s in range(4)]
    assert all(stride == 4 and sorted(p) == few for p, stride in plans)
    assert slot_plan(shards, 0, 4, random.Random("0-1"))[0] != slot_plan(shards, 0, 4, random.Random("0-0"))[0]


def test_uneven_shards_keep_exact_quotas_and_disjoint_ranks(dataset: Path) -> None:
    """3 test shards of 3, 2, 3 samples over 2 single-worker ranks: whole shards per rank, so a
    rank whose shards hold fewer samples than its quota wraps around its own stream (documented
    epoch-sized streams) while the other stops early; ranks still never share a sample."""
    quota = 4
    per_rank = []
    for rank in range(WORLD):
        batches = run_rank(spec_for(dataset, "test", rank, quota, train=False), None, workers=0)
        per_rank.append([k for b in batches for k in b.keys])
    assert [len(k) for k in per_rank] == [quota, quota]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) <= set(manifest_keys(dataset, "test"))


def test_quota_above_the_split_wraps_around(dataset: Path) -> None:
    batches = run_rank(spec_for(dataset, "test", 0, quota=10, world=1), None, workers=0, batch_size=4)
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 10 and set(keys) == set(manifest_keys(dataset, "test"))


def test_make_loader_spawned_workers_yield_the_quota(dataset: Path) -> None:
    """The production path: ``make_loader`` with its spawn context (what Ray Train workers use)."""
    batches = list(make_loader(spec_for(dataset, "train", 1, 12), batch_size=4, workers=2))
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 12 == len(set(keys))


# ----------------------------------------------------------------------------- bad data


def corrupt_member(shard: Path, suffix: str) -> str:
    """Flip the first 64 bytes of the first ``suffix`` member in place (the tar stays valid)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    with shard.open("r+b") as f:
        f.seek(member.offset_data)
        data = f.read(64)
        f.seek(member.offset_data)
        f.write(bytes(b ^ 0xFF for b in data))
    return member.name.split(".")[0]


def test_corrupted_member_is_skipped_and_counted(dataset: Path, tmp_path: Path, forkserver: BaseContext) -> None:
    copy = tmp_path / "mnist"
    shutil.copytree(dataset, copy)
    bad_key = corrupt_member(copy / "train" / "shard-000005.tar", ".tif")
    total = len(manifest_keys(copy, "train"))  # 8 shards of 3: 12 samples for each of 2 workers
    batches = run_rank(spec_for(copy, "train", 0, total, world=1), forkserver, batch_size=4)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(k for k in manifest_keys(copy, "train") if k != bad_key)
    assert sum(b.skipped for b in batches) == 1
    errors = [e for b in batches for e in b.errors]
    assert len(errors) == 1 and errors[0].startswith(bad_key) and "undecodable sample" in errors[0]


def test_truncated_shard_is_reported_with_its_url(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mnist"
    shutil.copytree(dataset, copy)
    shard = copy / "test" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    batches = run_rank(spec_for(copy, "test", 0, 8, world=1, train=False), None, workers=0, batch_size=8)
    errors = [e for b in batches for e in b.errors]
    assert errors and all("shard-000000.tar" in e for e in errors)
    assert sum(len(b) for b in batches) + sum(b.skipped for b in batches) == 8  # the quota is still met


def test_split_without_samples_names_the_url(dataset: Path) -> None:
    with pytest.raises(PipelineError, match=rf"{dataset}.*'validation' has no samples"):
        split_shards(str(dataset), "validation")


def test_training_without_augmentation_still_shuffles(dataset: Path) -> None:
    """``augment=False`` (Megapixel MNIST: a crop can cut a target digit off) keeps whole views but
    not a fixed sample order: the shuffle buffer still mixes samples within and across shards."""
    n = len(manifest_keys(dataset, "train"))

    def order(**changes: object) -> tuple[list[str], list[Batch]]:
        batches = run_rank(spec_for(dataset, "train", 0, n, world=1, shuffle_buffer=8, **changes), None, workers=0)
        return [k for b in batches for k in b.keys], batches

    plain, _ = order(train=False)
    orders = {tuple(order(train=True, augment=False, epoch=e, flip=True)[0]) for e in range(3)}
    assert len(orders) == 3 and tuple(plain) not in orders  # a different order every epoch
    assert all(sorted(o) == sorted(plain) for o in orders)  # the same samples
    _, batches = order(train=True, augment=False, flip=True)
    for b in batches:  # whole, unflipped views
        for view in b.views:
            assert view.box[0] == view.box[1] == 0.0 and not view.flip
    augmented = [v for b in order(train=True, epoch=0)[1] for v in b.views]
    assert any(v.box[0] > 0 or v.box[1] > 0 for v in augmented)  # augmentation on: random crops


def _digit_boxes(url: Path, split: str) -> dict[str, list[list[float]]]:
    """Each sample's target digit boxes, from its ``.json`` member in the shards."""
    out: dict[str, list[list[float]]] = {}
    for shard in sorted((url / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    out[meta["key"]] = [d["box"] for d in meta["meta"]["digits"] if d["target"]]
    return out


@pytest.mark.parametrize("access", ["stream", "random"])
def test_crops_that_keep_objects_hold_every_target_digit_whole(dataset: Path, access: str) -> None:
    """``keep_objects``: random crops (here down to half the area) that never cut a target digit,
    whichever way the samples are read; without it, crops of that size do cut some off."""
    n = len(manifest_keys(dataset, "train"))
    targets = _digit_boxes(dataset, "train")

    def views(keep: bool) -> list[tuple[str, tuple[float, ...]]]:
        spec = spec_for(dataset, "train", 0, 4 * n, world=1, flip=False, colour_jitter=False, access=access,
                        crop_min_area=0.5, crop_max_aspect=1.25, keep_objects=keep)
        return [(k, v.box) for b in run_rank(spec, None, workers=0) for k, v in zip(b.keys, b.views)]

    kept = views(True)
    assert len(kept) == 4 * n
    cropped = [box for _, box in kept if box != (0.0, 0.0, 512.0, 512.0)]
    assert len(cropped) >= 0.9 * len(kept)  # crops, not the whole-image fallback
    assert min((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in cropped) < 0.7 * 512 * 512
    for key, (x0, y0, x1, y1) in kept:
        for bx0, by0, bx1, by1 in targets[key]:
            assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1, (key, (x0, y0, x1, y1))

    def cut(box: tuple[float, ...], key: str) -> bool:
        return any(not (box[0] <= d[0] and box[1] <= d[1] and d[2] <= box[2] and d[3] <= box[3]) for d in targets[key])

    assert any(cut(box, key) for key, box in views(False))


def test_object_boxes_reads_boxes_and_target_digits_in_stored_pixels() -> None:
    meta = {"scale": 0.5, "meta": {
        "boxes": [{"box": [10, 20, 30, 40], "category": "x"}],
        "digits": [{"box": [0, 0, 28, 28], "target": True}, {"box": [50, 50, 78, 78], "target": False}]}}
    assert object_boxes(meta) == [[5.0, 10.0, 15.0, 20.0], [0.0, 0.0, 14.0, 14.0]]
    assert object_boxes({"meta": {}}) == []
    with pytest.raises(ValueError, match=r"\[1, 2, 3\] has 3 numbers"):
        object_boxes({"meta": {"boxes": [{"box": [1, 2, 3]}]}})


def test_crop_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="crop_min_area=0.0"):
        StreamSpec(url="x", split="train", shards=(), base_size=64, channels=1, quota=1, crop_min_area=0.0)
    with pytest.raises(ValueError, match="crop_max_aspect=0.5"):
        StreamSpec(url="x", split="train", shards=(), base_size=64, channels=1, quota=1, crop_max_aspect=0.5)
