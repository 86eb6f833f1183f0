"""The Ray glue of sharding: list and plan on the driver, one Ray task per shard, then the index files.

Everything else is plain library code (``plan``, ``sharding``, ``dataset_files``), so the only Ray
calls in the pipeline live here: ``@ray.remote`` on ``_shard_task`` and the ``ray.wait`` loop. The
caller (``jobs/shard.py``) starts or joins Ray; this module never calls ``ray.init``.

A task receives the config as plain data (``to_dict(cfg)``) and its records, and rebuilds the
source from ``(dataset, src, source_options)``: no open file, filesystem or decoded pixels cross a
process boundary. A task that fails (worker crash, storage error) is retried ``max_retries``
times; shards that still fail are named in the error after every other shard has finished, and no
dataset.json is written, so the dataset stays visibly incomplete until a re-run completes it.

Each task first calls ``keep_freed_memory`` (see there): measured, it removes about a third of a
worker's CPU time, spent by the kernel re-mapping the pages that malloc handed back after each image.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from pipeline.dataset_files import dataset_record, prepare_dst, write_dataset_files
from pipeline.errors import PipelineError
from pipeline.plan import ShardTask, plan_shards
from pipeline.shard_config import ShardConfig
from pipeline.sharding import ShardResult, calibrate_scale, write_shard
from pipeline.sources import make_source
from pipeline.sources.base import Reject, Source, SourceRecord
from pipeline.storage import redact
from tnet.configtools import from_dict, to_dict

_DECODING_SOURCES = ("fmow", "imagenet", "folder", "slides")  # sources that take a max_pixels option
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 512 << 20  # free memory a worker may keep at the top of its heap


@dataclass
class Summary:
    """What a sharding run did. Wall-clock numbers live only here, never in the dataset files."""

    samples: int
    rejects: dict[str, int]
    shards_written: int
    shards_skipped: int
    bytes_written: int  # tar bytes committed by this run
    dataset_bytes: int  # tar bytes of the whole dataset
    source_megapixels: float  # source pixels decoded by this run, in millions
    wall_s: float
    inputs: int  # records listed plus inputs rejected while listing
    task_cpu_s: float = 0.0  # CPU seconds of all shard tasks (their worker processes)
    driver_cpu_s: float = 0.0  # CPU seconds of the driver process (listing, planning, index files)
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def mp_per_s(self) -> float:
        return self.source_megapixels / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "mp_per_s": self.mp_per_s}

    def format(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.rejects.items())) or "none"
        return (
            f"samples {self.samples} {self.splits} from {self.inputs} inputs; rejects {sum(self.rejects.values())} "
            f"({reasons}); shards written {self.shards_written}, skipped {self.shards_skipped}; "
            f"{self.bytes_written / 1e6:.1f} MB written ({self.dataset_bytes / 1e6:.1f} MB in dataset); "
            f"{self.source_megapixels:.1f} source MP in {self.wall_s:.1f} s = {self.mp_per_s:.1f} MP/s "
            f"(CPU: tasks {self.task_cpu_s:.1f} s, driver {self.driver_cpu_s:.1f} s)"
        )


def source_splits(source: Source, cfg: ShardConfig) -> list[str]:
    """The splits to shard: ``cfg.splits``, else every split the source declares.

    Raises:
        ValueError: no splits given and the source declares none.
    """
    if cfg.splits:
        return list(cfg.splits)
    declared = getattr(source, "splits", None)
    if not declared:
        raise ValueError(f"splits=[]: source {cfg.dataset!r} declares no default splits; pass --splits")
    return list(declared)


def list_inputs(source: Source, splits: list[str]) -> tuple[list[SourceRecord], list[dict[str, Any]]]:
    """The source's records and its listing rejects (as reject rows)."""
    records: list[SourceRecord] = []
    rejects: list[dict[str, Any]] = []
    for item in source.records(splits):
        if isinstance(item, Reject):
            rejects.append({"key": "", "source": item.source, "split": item.split, "reason": item.reason,
                            "detail": item.detail})  # fmt: skip
        else:
            records.append(item)
    return records, rejects


def build_source(cfg: ShardConfig) -> Source:
    """The configured source; file sources get ``cfg.max_pixels`` unless their options set one.

    Passing the limit into the source lets it refuse a decompression bomb from the image header,
    before any pixel is decoded (``write_shard`` checks the decoded array again).
    """
    options = dict(cfg.source_options)
    if cfg.dataset in _DECODING_SOURCES:
        options.setdefault("max_pixels", cfg.max_pixels)
    return make_source(cfg.dataset, cfg.src, options)


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Let glibc malloc keep freed blocks up to ``mmap_threshold`` bytes for reuse; True if applied.

    Why: one image's decode and pyramid allocate ~80 MB in blocks of 1-24 MB (pixels, levels, tile
    buffers) and free them before the next image. With glibc's default, adaptive thresholds a freed
    block often goes back to the kernel (munmap, or a trim of the heap top), so the next image
    page-faults the same memory in again: ~20,000 minor faults per 8 MP image, ~30% of a Ray
    worker's CPU time as kernel time (benchmarks/shard_throughput.py, docs/benchmarks.md). Fixed
    thresholds keep blocks below ``mmap_threshold`` on the heap and return the heap top only past
    ``trim_threshold`` free bytes; blocks above 32 MiB are still mapped and unmapped per use (glibc
    caps the threshold there). Cost: a worker keeps its peak heap resident between tasks (its peak
    is unchanged: 223 MB in the benchmark, against 141 MB resident after the tasks by default).
    Process-wide and idempotent, so it lives in this Ray glue and is called by each task; a no-op
    (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded in this process
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@ray.remote
def _shard_task(task: ShardTask, cfg_data: dict[str, Any]) -> ShardResult:
    """One Ray task = one output shard; the source is rebuilt here from plain data."""
    keep_freed_memory()
    cfg = from_dict(ShardConfig, cfg_data)
    return write_shard(task, build_source(cfg), cfg)


def run_tasks(tasks: list[ShardTask], cfg: ShardConfig) -> list[ShardResult]:
    """Run one Ray task per shard with a progress bar; results in task order.

    Raises:
        PipelineError: naming every shard that failed after its retries.
    """
    cfg_data = to_dict(cfg)
    remote = _shard_task.options(num_cpus=cfg.task_cpus, max_retries=cfg.max_retries, retry_exceptions=True)
    refs = {remote.remote(task, cfg_data): i for i, task in enumerate(tasks)}
    results: list[ShardResult | None] = [None] * len(tasks)
    failures: list[str] = []
    pending = list(refs)
    samples = rejected = 0
    with tqdm(total=len(tasks), unit="shard", desc=f"sharding {cfg.dataset}", disable=not cfg.progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = refs[ref]
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - collect, report after the others finish
                    failures.append(f"{tasks[i].name}: {type(exc).__name__}: {redact(str(exc))[:500]}")
                    bar.update(1)
                    continue
                results[i] = result
                samples += len(result.rows)
                rejected += len(result.rejects)
                bar.set_postfix(samples=samples, rejects=rejected)
                bar.update(1)
    if failures:
        raise PipelineError(f"{cfg.dst}: {len(failures)} shard(s) failed; re-run to resume:\n" + "\n".join(failures))
    return [r for r in results if r is not None]


def run_serial(tasks: list[ShardTask], cfg: ShardConfig) -> list[ShardResult]:
    """Write the shards one after another in this process: same bytes as Ray, for tests and debugging."""
    source = build_source(cfg)
    return [write_shard(task, source, cfg) for task in tasks]


def run_sharding(cfg: ShardConfig, runner: Callable[[list[ShardTask], ShardConfig], list[ShardResult]] = run_tasks) -> Summary:
    """Shard ``cfg.dataset`` into ``cfg.dst``: list, plan, run tasks, write manifest/rejects/dataset.json.

    With the default ``runner`` (``run_tasks``) Ray must already be initialised (the job starts or
    joins it); ``run_serial`` needs no Ray.

    Raises:
        DatasetError: dst holds a dataset with another config (see ``prepare_dst``).
        PipelineError: shards failed after retries.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    source = build_source(cfg)
    splits = source_splits(source, cfg)
    cfg = dataclasses.replace(cfg, splits=tuple(splits))  # recorded resolved: "all" may change later
    records, listing_rejects = list_inputs(source, splits)
    tasks = plan_shards(records, cfg.shard_bytes, cfg.seed, scale=calibrate_scale(records, source, cfg))
    prepare_dst(cfg, tasks)
    results = runner(tasks, cfg)
    rows = [row for r in results for row in r.rows]
    rejects = listing_rejects + [row for r in results for row in r.rejects]
    if len(rows) + len(rejects) != len(records) + len(listing_rejects):
        raise PipelineError(
            f"{cfg.dst}: {len(records) + len(listing_rejects)} inputs but {len(rows)} samples + "
            f"{len(rejects)} rejects (a sample went missing)"
        )
    source_info = {"classes": source.classes, "channels": source.channels, "describe": source.describe()}
    shards = [(r.split, r.shard, r.bytes) for r in results]
    write_dataset_files(cfg, dataset_record(cfg, source_info, splits, rows, rejects, shards), rows, rejects)
    written = [r for r in results if not r.skipped]
    counts = Counter(row["split"] for row in rows)
    return Summary(
        samples=len(rows),
        rejects=dict(sorted(Counter(r["reason"] for r in rejects).items())),
        shards_written=len(written),
        shards_skipped=len(results) - len(written),
        bytes_written=sum(r.bytes for r in written),
        dataset_bytes=sum(r.bytes for r in results),
        source_megapixels=sum(r.source_pixels for r in written) / 1e6,
        wall_s=time.perf_counter() - start,
        inputs=len(records) + len(listing_rejects),
        task_cpu_s=sum(r.cpu_seconds for r in results),
        driver_cpu_s=time.process_time() - cpu_start,
        splits={s: counts.get(s, 0) for s in splits},
    )
