"""Deterministic tar shards: standard tar, WebDataset-readable, offsets that point at the bytes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import FormatError
from pipeline.tarshard import BLOCK, RECORD, TarShardWriter, member_header, parse_member_header, read_member

keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=140)
samples = st.dictionaries(keys, st.tuples(st.binary(max_size=3000), st.binary(max_size=200), st.integers(0, 999)),
                          min_size=0, max_size=8)  # fmt: skip


def write(samples_: dict[str, tuple[bytes, bytes, int]]) -> tuple[bytes, dict]:
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    spans = {}
    for key, (tif, meta, label) in samples_.items():
        spans[key] = writer.add_sample(key, [("tif", tif), ("json", meta), ("cls", str(label).encode())])
    size = writer.close()
    assert size == len(buf.getvalue())
    return buf.getvalue(), spans


@settings(max_examples=50, deadline=None)
@given(samples_=samples)
def test_tarfile_reads_back_members_in_order_with_fixed_headers(samples_: dict) -> None:
    data, spans = write(samples_)
    assert len(data) % RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        expected = [f"{k}.{ext}" for k in samples_ for ext in ("tif", "json", "cls")]
        assert [m.name for m in members] == expected
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            key, ext = m.name.split(".")
            span = spans[key][ext]
            assert (span.header_offset, span.offset, span.size) == (m.offset, m.offset_data, m.size)
            assert data[span.offset : span.offset + span.size] == tar.extractfile(m).read()


@settings(max_examples=30, deadline=None)
@given(samples_=samples)
def test_same_samples_give_identical_bytes(samples_: dict) -> None:
    assert write(samples_)[0] == write(dict(samples_))[0]


def test_webdataset_groups_members_by_key(tmp_path: Path) -> None:
    import webdataset as wds

    samples_ = {f"s{i:03d}": (bytes([i]) * (100 + i), b'{"i": %d}' % i, i % 7) for i in range(5)}
    data, _ = write(samples_)
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(data)
    got = list(wds.WebDataset([str(shard)], shardshuffle=False))
    assert [s["__key__"] for s in got] == list(samples_)
    for s in got:
        tif, meta, label = samples_[s["__key__"]]
        assert (s["tif"], s["json"], s["cls"]) == (tif, meta, str(label).encode())


def test_read_member_by_range_and_header_check(tmp_path: Path) -> None:
    samples_ = {"a": (b"A" * 700, b"{}", 1), "b" * 120: (b"B" * 5, b"{}", 2)}  # long name: PAX header
    data, spans = write(samples_)
    shard = tmp_path / "x.tar"
    shard.write_bytes(data)
    for key, (tif, _, _) in samples_.items():
        span = spans[key]["tif"]
        assert read_member(str(shard), span.offset, span.size) == tif
    short = spans["a"]["tif"]
    name, size = parse_member_header(data[short.header_offset : short.header_offset + BLOCK])
    assert (name, size) == ("a.tif", 700)
    with pytest.raises(FormatError, match="where.tar: not a tar header"):
        parse_member_header(b"\x01" * BLOCK, "where.tar")


def test_bad_keys_are_refused() -> None:
    writer = TarShardWriter(io.BytesIO())
    for bad in ("", "a.b", "a/b"):
        with pytest.raises(ValueError, match="key="):
            writer.add_sample(bad, [("tif", b"")])
    writer.add_sample("k", [("tif", b"")])
    with pytest.raises(ValueError, match="k: key written twice"):
        writer.add_sample("k", [("tif", b"")])
    writer.close()
    with pytest.raises(ValueError, match="already closed"):
        writer.add_sample("z", [("tif", b"")])


def test_header_is_one_block_for_short_names() -> None:
    assert len(member_header("x.tif", 10)) == BLOCK
    assert len(member_header("y" * 150 + ".tif", 10)) > BLOCK  # PAX extended header first
