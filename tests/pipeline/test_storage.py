"""Storage: atomic commits (local and S3 via moto), range reads, temp cleanup, credential redaction."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.storage import (
    TMP_DIR,
    atomic_writer,
    clean_tmp,
    exists,
    file_sha256,
    join,
    open_url,
    read_range,
    redact,
    write_atomic,
)


class Boom(RuntimeError):
    pass


def test_open_url_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = open_url("rel/dir")
    assert path == str(tmp_path / "rel" / "dir")
    fs2, path2 = open_url(f"file://{tmp_path}/x/")
    assert path2 == str(tmp_path / "x")
    with pytest.raises(ValueError, match="empty storage URL"):
        open_url("")


def test_local_atomic_write_commits_and_cleans(tmp_path: Path) -> None:
    fs, root = open_url(str(tmp_path / "ds"))
    done = write_atomic(fs, join(root, "a", "obj.bin"), b"hello", root)
    assert (tmp_path / "ds" / "a" / "obj.bin").read_bytes() == b"hello"
    assert done.sha256 == hashlib.sha256(b"hello").hexdigest() and done.size == 5
    assert list((tmp_path / "ds" / TMP_DIR).iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    fs, root = open_url(str(tmp_path))
    with pytest.raises(Boom), atomic_writer(fs, join(root, "obj.bin"), root) as (writer, _):
        writer.write(b"partial")
        raise Boom
    assert not (tmp_path / "obj.bin").exists()
    assert list((tmp_path / TMP_DIR).iterdir()) == []


def test_clean_tmp_removes_leftovers(tmp_path: Path) -> None:
    (tmp_path / TMP_DIR).mkdir()
    (tmp_path / TMP_DIR / "train-shard-000000.tar.abc").write_bytes(b"x")
    fs, root = open_url(str(tmp_path))
    assert clean_tmp(fs, root) == 1
    assert not (tmp_path / TMP_DIR).exists()
    assert clean_tmp(fs, root) == 0


def test_redact_hides_credentials_everywhere() -> None:
    options = {
        "key": "AKIA123",
        "secret": "s3cr3t",
        "token": "",
        "client_kwargs": {"endpoint_url": "http://user:pw@minio:9000", "aws_session_token": "t0k-xyz", "region_name": "x"},
        "anon": False,
        "list": ["https://a:b@host/x"],
    }
    out = redact(options)
    text = repr(out)
    for secret in ("AKIA123", "s3cr3t", "t0k-xyz", "pw@", "a:b@"):
        assert secret not in text
    assert out["client_kwargs"]["region_name"] == "x" and out["anon"] is False
    assert out["client_kwargs"]["endpoint_url"] == "http://***@minio:9000"
    assert options["key"] == "AKIA123"  # input untouched


def test_s3_atomic_write_range_read_and_cleanup(moto_s3) -> None:
    bucket = moto_s3.bucket("storage")
    fs, root = open_url(f"{bucket}/ds", moto_s3.storage_options)
    data = bytes(range(256)) * 100
    done = write_atomic(fs, join(root, "train", "obj.bin"), data, root)
    assert done.size == len(data)
    assert exists(fs, join(root, "train", "obj.bin"))
    assert file_sha256(fs, join(root, "train", "obj.bin")) == hashlib.sha256(data).hexdigest()
    assert read_range(fs, join(root, "train", "obj.bin"), 1000, 300) == data[1000:1300]
    assert fs.find(join(root, TMP_DIR)) == []
    with pytest.raises(Boom), atomic_writer(fs, join(root, "bad.bin"), root) as (writer, _):
        writer.write(b"partial")
        raise Boom
    assert not exists(fs, join(root, "bad.bin"))
    assert fs.find(join(root, TMP_DIR)) == []


def test_s3_from_environment_variables(moto_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """No storage options: s3fs/botocore read AWS_ENDPOINT_URL and the keys from the environment."""
    bucket = moto_s3.bucket("envcreds")
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    fs, root = open_url(bucket, {"skip_instance_cache": True})
    write_atomic(fs, join(root, "x.txt"), b"env", root)
    assert moto_s3.filesystem().cat_file(f"{bucket[5:]}/x.txt") == b"env"
