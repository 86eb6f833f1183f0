"""Hostile and corrupt input on the data path: only our own clear errors, skipped and counted.

- A shard with random bytes flipped: the loader never raises, every sample it yields is whole,
  the rest come back as ``PipelineError`` items that ``collate`` counts in ``Batch.skipped`` (what
  training/loop.py logs to MLflow as ``train_skipped``).
- The sample parser (json / cls / tif members) and the source image decoder under hypothesis:
  ``PipelineError`` / ``SampleError`` only; pixel limits refuse bombs before decoding.
- Tar members with absolute or ``..`` names: never written anywhere, never a usable key.
- No pickle and no unsafe ``torch.load`` / ``yaml.load`` / ``np.load(allow_pickle)`` in our code.

The pyramid reader's own fuzzing lives in tests/pipeline/test_pyramid_hostile.py.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import PipelineError, SampleError
from pipeline.images import decode_image
from pipeline.loader import Prepared, ShardStream, StreamSpec, collate
from pipeline.tarshard import TarShardWriter, check_key

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def spec_for(url: str, shards: list[str], quota: int) -> StreamSpec:
    return StreamSpec(url=url, split="train", shards=tuple(shards), base_size=32, channels=1, quota=quota,
                      train=False, shuffle_buffer=1)


def write_dataset(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def members_of(shard: bytes) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a (valid) shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(shard), mode="r|") as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


# ----------------------------------------------------------------------------- corrupted shards


def test_flipped_bytes_in_a_shard_are_skipped_and_counted(tiny_reference: dict[str, bytes], tmp_path: Path) -> None:
    shards = sorted(p for p in tiny_reference if p.startswith("train/") and p.endswith(".tar"))
    clean = {k: v for s in shards for k, v in members_of(tiny_reference[s]).items()}
    rng = random.Random(0)
    totals = {"corrupted_shards": 0, "flips": 0, "good": 0, "skipped": 0}
    for trial in range(30):
        files = dict(tiny_reference)
        victim = rng.choice(shards)
        blob = bytearray(files[victim])
        for _ in range(rng.randint(1, 16)):
            pos = rng.randrange(len(blob))
            blob[pos] ^= rng.randint(1, 255)
            totals["flips"] += 1
        files[victim] = bytes(blob)
        root = tmp_path / f"t{trial}"
        write_dataset(root, files)
        items = list(ShardStream(spec_for(str(root), shards, quota=len(clean))))  # never raises
        batch = collate(items)
        good = [i for i in items if isinstance(i, Prepared)]
        assert batch.skipped == len(items) - len(good) == len(batch.errors)
        assert all(isinstance(i, Prepared | PipelineError) for i in items)
        assert len(items) == len(clean)  # every sample is accounted for: decoded or counted as skipped
        for item in good:  # a sample that decoded is a whole sample of the clean data set
            assert item.key in clean and item.label == int(clean[item.key]["cls"])
        totals["corrupted_shards"] += 1
        totals["good"] += len(good)
        totals["skipped"] += batch.skipped
    print(f"\nFIGURES corrupted-shards: {json.dumps(totals)}")
    assert totals["skipped"] > 0  # the flips were noticed, not all silently decoded


@FUZZ
@given(field=st.sampled_from(["json", "cls", "tif"]), data=st.data())
def test_sample_parser_fuzz_gives_errors_not_exceptions(field: str, data: Any, tiny_reference: dict[str, bytes]) -> None:
    shard = tiny_reference["train/shard-000000.tar"]
    key, sample = next(iter(members_of(shard).items()))
    blob = bytearray(sample[field])
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    for _ in range(data.draw(st.integers(0, 12))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    fuzzed = {**sample, field: bytes(blob), "__key__": key, "__url__": "mem://shard-000000.tar"}
    stream = ShardStream(spec_for("mem://", [], quota=1))
    out = stream._prepare(fuzzed, random.Random(0))
    assert isinstance(out, Prepared | PipelineError)
    if isinstance(out, PipelineError):
        assert str(out).startswith(key)


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=80)
    return buf.getvalue()


JPEG = _jpeg(1)


@FUZZ
@given(data=st.data())
def test_source_decoder_fuzz_raises_sample_error_only(data: Any) -> None:
    blob = bytearray(JPEG)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    for _ in range(data.draw(st.integers(0, 12))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        arr = decode_image(bytes(blob), "raw/x.jpg", channels=3, max_pixels=10_000)
    except SampleError as exc:
        assert str(exc).startswith("raw/x.jpg")
    else:
        assert arr.dtype == np.uint8 and arr.shape[0] * arr.shape[1] <= 10_000


def test_declared_size_over_the_pixel_limit_is_refused_before_decoding() -> None:
    with pytest.raises(SampleError, match="decompression bomb"):
        decode_image(JPEG, "raw/bomb.jpg", channels=3, max_pixels=48 * 64 - 1)


# ----------------------------------------------------------------------------- hostile tar names


@pytest.mark.parametrize("stem", ["../escape", "/tmp/absolute-escape", "a/../../escape", "..\\escape"])
def test_tar_members_with_hostile_paths_never_become_keys_or_files(
    stem: str, tiny_reference: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, sample = next(iter(members_of(tiny_reference["train/shard-000000.tar"]).items()))
    names = [f"{stem}.{ext}" for ext in ("tif", "json", "cls")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, ext in zip(names, ("tif", "json", "cls")):
            info = tarfile.TarInfo(name)
            info.size = len(sample[ext])
            tar.addfile(info, io.BytesIO(sample[ext]))
    work = tmp_path / "a" / "b"
    (work / "train").mkdir(parents=True)
    (work / "train" / "evil.tar").write_bytes(buf.getvalue())
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    items = list(ShardStream(spec_for(str(work), ["train/evil.tar"], quota=1)))
    assert not [i for i in items if isinstance(i, Prepared)]  # no key made of a hostile name
    assert all(isinstance(i, PipelineError) and "unsafe sample key" in str(i) for i in items)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("/tmp/absolute-escape.tif").exists()


def test_our_writer_refuses_keys_the_reader_would_refuse() -> None:
    writer = TarShardWriter(io.BytesIO())
    for bad in ("../x", "/x", "a.b", ""):
        with pytest.raises(ValueError):
            writer.add_sample(bad, [("cls", b"1")])
        with pytest.raises(PipelineError, match="unsafe sample key"):
            check_key(bad, "shard.tar")
    assert check_key("mpmnist-train-000002") == "mpmnist-train-000002"


# ----------------------------------------------------------------------------- no pickle anywhere

UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M), "pickle-like import"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)[^)]*\)"), "yaml.load without SafeLoader"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
]


def test_no_pickle_or_unsafe_load_on_the_data_or_checkpoint_path() -> None:
    files = sorted(p for d in ("pipeline", "training", "tnet", "jobs") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20
    found = [f"{p.relative_to(REPO)}: {what}: {m.group(0)[:80]}" for p in files for rx, what in UNSAFE
             for m in rx.finditer(p.read_text())]
    assert found == []
    torch_loads = [p for p in files if "torch.load(" in p.read_text()]
    assert torch_loads  # the pattern above really met our checkpoint loaders, and they are safe
