"""Shard planning: every record in exactly one shard, deterministic, balanced, classes mixed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.plan import ShardTask, plan_shards, shard_stem
from pipeline.sources.base import SourceRecord


def make_records(sizes: list[int], splits: tuple[str, ...] = ("train",), n_classes: int = 10) -> list[SourceRecord]:
    out = []
    for split in splits:
        for i, size in enumerate(sizes):
            label = i * n_classes // max(len(sizes), 1)  # grouped by class, like a source listing
            out.append(SourceRecord(f"{split}-{i:05d}", split, f"/raw/{split}/{i}.jpg", label, str(label), size_hint=size))
    return out


record_sizes = st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(sizes=record_sizes, shard_bytes=st.integers(1, 20_000), seed=st.integers(0, 2**32))
def test_every_record_in_exactly_one_shard(sizes: list[int], shard_bytes: int, seed: int) -> None:
    records = make_records(sizes, ("train", "val"))
    tasks = plan_shards(records, shard_bytes, seed, default_bytes=100)
    keys = [(t.split, r.key) for t in tasks for r in t.records]
    assert sorted(keys) == sorted((r.split, r.key) for r in records)
    for t in tasks:
        assert t.records and all(r.split == t.split for r in t.records)
    for split in ("train", "val"):
        assert [t.index for t in tasks if t.split == split] == list(range(sum(t.split == split for t in tasks)))


@settings(max_examples=25, deadline=None)
@given(sizes=record_sizes, shard_bytes=st.integers(1, 20_000), seed=st.integers(0, 2**32))
def test_plan_is_deterministic_and_ignores_listing_order(sizes: list[int], shard_bytes: int, seed: int) -> None:
    records = make_records(sizes)
    a = plan_shards(records, shard_bytes, seed)
    b = plan_shards(list(reversed(records)), shard_bytes, seed)
    assert a == b


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 1000), min_size=2, max_size=200), shard_bytes=st.integers(1000, 50_000))
def test_shards_are_balanced(sizes: list[int], shard_bytes: int) -> None:
    tasks = plan_shards(make_records(sizes), shard_bytes, seed=3)
    totals = [sum(r.size_hint for r in t.records) for t in tasks]
    assert len(tasks) <= -(-sum(sizes) // shard_bytes)
    # contiguous cuts at equal fractions: a shard misses its share by at most one record each side
    share = sum(sizes) / len(tasks)
    assert all(abs(t - share) <= 2 * max(sizes) for t in totals)


def test_shards_mix_classes() -> None:
    records = make_records([100] * 500)  # listed grouped by class, 50 per class
    tasks = plan_shards(records, shard_bytes=2000, seed=0)  # 25 shards of 20 records
    assert len(tasks) == 25
    for task in tasks:
        assert len({r.label for r in task.records}) >= 4, task.name


def test_seed_changes_the_order_but_not_the_split_sizes() -> None:
    records = make_records([10] * 50, ("train", "test"))
    a, b = plan_shards(records, 100, seed=0), plan_shards(records, 100, seed=1)
    assert [len(t.records) for t in a] == [len(t.records) for t in b]
    assert [t.keys for t in a] != [t.keys for t in b]


def test_adding_a_split_keeps_the_other_splits_plan() -> None:
    train = make_records([10] * 30, ("train",))
    test = make_records([10] * 30, ("test",))
    only_train = plan_shards(train, 100, seed=5)
    both = plan_shards(train + test, 100, seed=5)
    assert [t for t in both if t.split == "train"] == only_train


def test_names_and_errors() -> None:
    assert shard_stem("train", 12) == "train/shard-000012"
    assert ShardTask("val", 3, ()).name == "val/shard-000003"
    with pytest.raises(ValueError, match="shard_bytes=0"):
        plan_shards(make_records([1]), 0, seed=0)
    dup = make_records([1, 1])
    dup.append(dup[0])
    with pytest.raises(ValueError, match="train-00000: key appears twice"):
        plan_shards(dup, 10, seed=0)


def test_record_bigger_than_a_shard_gets_its_own() -> None:
    tasks = plan_shards(make_records([10, 10_000, 10]), shard_bytes=100, seed=0)
    assert sorted(len(t.records) for t in tasks)[-1] <= 2
    assert sum(len(t.records) for t in tasks) == 3
