"""Object storage faults: sharding and the training loader through a fault-injecting proxy to moto.

10% of requests fail (5% answered 500/503, 2% stalled past the client's timeout, 3% cut mid-
transfer after the store acted on them): both jobs must end with exactly the bytes and samples of
a fault-free run. With the store down for good they must stop with a clear error, leave nothing
that looks complete (no dataset.json, no partial tar under a final key), and a re-run must finish
the same dataset. Figures (requests, faults) are printed; ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.loader import Prepared, ShardStream, StreamSpec, split_shards
from pipeline.ray_shard import run_serial, run_sharding
from pipeline.storage import RetryPolicy, StorageError, open_url, retry_policy
from tests.reliability.conftest import proxied_options, tiny_config
from tests.reliability.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow
TEN_PERCENT = {"error": 0.05, "stall": 0.02, "drop": 0.03}
DOWN_RETRIES = {"attempts": 2, "timeout_s": 1.0}  # give up fast once the store is gone


def s3_files(moto_s3: Any, url: str) -> dict[str, bytes]:
    """Every object under ``url`` by relative key, read directly from moto (no proxy, no faults)."""
    fs = moto_s3.filesystem()
    root = url.removeprefix("s3://")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in sorted(fs.find(root))}


def read_split(url: str, split: str, options: dict[str, Any] | None) -> dict[str, tuple[int, torch.Tensor]]:
    """Every sample of ``split`` as the training loader yields it: key -> (label, base view)."""
    shards = split_shards(url, split, options)
    spec = StreamSpec(url=url, split=split, shards=tuple(s for s, _ in shards), base_size=32, channels=1,
                      quota=sum(n for _, n in shards), train=False, storage_options=dict(options or {}))
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for item in ShardStream(spec):
        if not isinstance(item, Prepared):
            raise AssertionError(f"loader yielded an error instead of a sample: {item}")
        out[item.key] = (item.label, item.base)
    return out


def report(name: str, proxy: FaultProxy, **extra: Any) -> None:
    print(f"\nFIGURES {name}: {json.dumps({**proxy.stats.as_dict(), **extra})}")


def test_retry_policy_is_validated_and_kept_out_of_fsspec(tmp_path: Path) -> None:
    assert retry_policy(None) == RetryPolicy()
    assert retry_policy({"retries": {"attempts": 3, "timeout_s": 2}}) == RetryPolicy(3, 2)
    for bad, match in (({"attempts": 0}, "retries.attempts=0"), ({"timeout_s": -1}, "retries.timeout_s=-1"),
                       ({"tries": 3}, r"unknown field\(s\) \['tries'\]"), (5, "expected a mapping")):
        with pytest.raises(ValueError, match=match):
            retry_policy({"retries": bad})
    fs, path = open_url(str(tmp_path), {"retries": {"attempts": 2}})  # the local fs would refuse the key
    assert path == str(tmp_path)


def test_s3_gets_standard_retries_and_timeouts(fault_proxy: FaultProxy) -> None:
    fs, _ = open_url("s3://any", proxied_options(fault_proxy, retries={"attempts": 4, "timeout_s": 1.5}))
    assert fs.retries == 4
    assert fs.config_kwargs["retries"] == {"mode": "standard", "max_attempts": 4}
    assert fs.config_kwargs["read_timeout"] == fs.config_kwargs["connect_timeout"] == 1.5


def test_sharding_under_10_percent_faults_is_byte_identical(
    moto_s3: Any, fault_proxy: FaultProxy, tiny_reference: dict[str, bytes]
) -> None:
    url = f"{moto_s3.bucket('faults')}/ds"
    fault_proxy.reset(TEN_PERCENT, seed=1)
    summary = run_sharding(tiny_config(url, proxied_options(fault_proxy)), runner=run_serial)
    stats = fault_proxy.stats
    report("sharding-10pct", fault_proxy, samples=summary.samples)
    assert stats.injected >= 5 and stats.error and stats.drop, stats  # the faults really happened
    assert s3_files(moto_s3, url) == tiny_reference  # same bytes, and no _tmp/ leftovers


@pytest.fixture(scope="module")
def s3_dataset(moto_s3: Any, fault_proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny dataset on moto, written without faults (the loader tests read it)."""
    url = f"{moto_s3.bucket('loader')}/ds"
    fault_proxy.reset()
    run_sharding(tiny_config(url, proxied_options(fault_proxy)), runner=run_serial)
    return url


def test_loader_under_10_percent_faults_reads_every_sample(
    s3_dataset: str, fault_proxy: FaultProxy, tiny_reference: dict[str, bytes], tmp_path: Path
) -> None:
    local = tmp_path / "ds"
    for rel, data in tiny_reference.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    fault_proxy.reset(TEN_PERCENT, seed=2)
    expected = {split: read_split(str(local), split, None) for split in ("train", "test")}
    samples = 0
    for _epoch in range(4):  # four passes: enough requests for the 10% to bite
        for split in ("train", "test"):
            got = read_split(s3_dataset, split, proxied_options(fault_proxy))
            assert sorted(got) == sorted(expected[split])
            for key, (label, base) in expected[split].items():
                assert got[key][0] == label and torch.equal(got[key][1], base), key
            samples += len(got)
    report("loader-10pct", fault_proxy, samples=samples)
    assert fault_proxy.stats.injected >= 4, fault_proxy.stats


def test_sharding_with_the_store_down_stops_clearly_and_resumes(
    moto_s3: Any, fault_proxy: FaultProxy, tiny_reference: dict[str, bytes]
) -> None:
    url = f"{moto_s3.bucket('down')}/ds"
    fault_proxy.reset(seed=3)
    fault_proxy.down_after = 40  # mid-job: after the first shards, before dataset.json
    cfg = tiny_config(url, proxied_options(fault_proxy, retries=DOWN_RETRIES))
    with pytest.raises(StorageError, match=r"storage request failed after retries .*re-run to resume") as caught:
        run_sharding(cfg, runner=run_serial)
    assert url.removeprefix("s3://") in str(caught.value)  # names what it could not reach
    report("sharding-down", fault_proxy)
    left = s3_files(moto_s3, url)
    assert "dataset.json" not in left  # the dataset is visibly incomplete
    for rel, data in left.items():  # whatever sits under a final key is complete and correct
        if not rel.startswith("_tmp/"):
            assert data == tiny_reference[rel], rel
    fault_proxy.reset(seed=4)  # the store is back: the re-run completes the same dataset
    summary = run_sharding(tiny_config(url, proxied_options(fault_proxy)), runner=run_serial)
    assert summary.samples == 9 and s3_files(moto_s3, url) == tiny_reference


def test_loader_with_the_store_down_raises_instead_of_yielding_partial_samples(
    s3_dataset: str, fault_proxy: FaultProxy
) -> None:
    options = proxied_options(fault_proxy, retries=DOWN_RETRIES)
    fault_proxy.reset(seed=5)
    fault_proxy.down = True
    with pytest.raises(StorageError, match="storage request failed after retries"):
        read_split(s3_dataset, "train", options)  # dataset.json cannot be reached: a clear stop
    fault_proxy.reset(seed=5)
    shards = split_shards(s3_dataset, "train", options)
    spec = StreamSpec(url=s3_dataset, split="train", shards=tuple(s for s, _ in shards), base_size=32,
                      channels=1, quota=6, train=False, storage_options=options)
    fault_proxy.down = True  # gone after the manifest was read
    got: list[Any] = []
    with pytest.raises(Exception) as caught:  # noqa: PT011 - botocore's own class; the text is checked
        got.extend(ShardStream(spec))
    report("loader-down", fault_proxy)
    assert not [i for i in got if isinstance(i, Prepared)]  # nothing half-read was presented as a sample
    assert "train/shard-" in str(caught.value)  # names the shard it could not read
