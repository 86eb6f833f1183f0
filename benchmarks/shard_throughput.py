"""Sharding throughput: source megapixels per second per core, job vs. a single-thread bound.

    python benchmarks/shard_throughput.py [--quick] [--ab N] [--json]

Input: a generated folder of photo-like RGB JPEGs (quality 90; ~190 MP in full mode, ~12 MP with
--quick), read by the ``folder`` source, so decode, pyramid build and JPEG encode are the real ones.

- bound: one thread, no job, no Ray: ``source.load`` (read + decode + sha256) and ``build_pyramid``
  of every image in a tight loop. It is what one core can do at best, so it runs with the same
  malloc settings as the job's tasks (``ray_shard.keep_freed_memory``; its kernel time and minor
  page faults are recorded: without those settings they were ~30% of the CPU time).
- job: ``run_sharding`` on a local Ray with 1 and with 2 CPUs (one task per shard, ~12 shards),
  timed from listing to dataset.json. Ray's own start-up is excluded and reported apart; worker
  processes are warmed (modules imported) first, as they are after the first minute of a real run.
- every measurement is the best of ``--repeats`` (3) runs: the least-disturbed one on a shared machine.
- fraction_of_bound = (job MP/s / workers) / bound MP/s; target >= 0.7.
- scaling_1_to_2 = job MP/s with 2 workers / with 1; target >= 1.8 (needs 2 idle cores: the load
  average before each phase is recorded, since other processes on the machine steal cores).
- cpu_efficiency = (MP per CPU-second of the job's tasks and driver) / (MP per CPU-second of the
  bound): what the job costs beyond the bound's work, whatever else runs on the machine (Ray's
  own daemons are not counted).
- storage overhead = shard bytes / source JPEG bytes.
- ``--ab N``: N alternating fresh-Ray sessions of the 1-worker job, tasks with glibc's default
  malloc thresholds vs with ``keep_freed_memory`` (what a shard task does); medians of task CPU and
  wall. Alternating sessions share the machine's load, so this is the steadier before/after.

Results go to benchmarks/results/shard_throughput.json (``.quick.json`` with --quick) with machine
info; with --json the last printed line is the same JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.plan import ShardTask  # noqa: E402
from pipeline.pyramid import build_pyramid  # noqa: E402
from pipeline.ray_shard import build_source, keep_freed_memory, run_sharding  # noqa: E402
from pipeline.shard_config import ShardConfig  # noqa: E402
from pipeline.sharding import ShardResult, write_shard  # noqa: E402
from pipeline.sources import make_source  # noqa: E402
from tnet.configtools import from_dict, to_dict  # noqa: E402

TILE, QUALITY = 256, 90
FULL = {"images": 24, "side": 2800}  # 24 x 7.84 MP = 188 MP
QUICK = {"images": 8, "side": 1200}  # 8 x 1.44 MP = 11.5 MP


def photo(rng: np.random.Generator, side: int) -> np.ndarray:
    """Photo-like RGB: smooth structure at several scales plus sensor-like noise (JPEGs ~2-4 bpp)."""
    out = np.zeros((side, side, 3), np.float32)
    for cells, weight in ((4, 0.5), (32, 0.3), (256, 0.15)):
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        out += weight * np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    out += rng.normal(0, 4, out.shape).astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def make_folder(root: Path, images: int, side: int, seed: int = 0) -> int:
    """Write ``images`` JPEGs under two class folders; returns the total source bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(photo(rng, side)).save(buf, "JPEG", quality=QUALITY)
        (folder / f"img{i:03d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def bound(root: Path, repeats: int) -> dict[str, float]:
    """Single-thread decode + pyramid of every image, no job; the best of ``repeats`` passes."""
    source = make_source("folder", str(root), {"max_pixels": 10**9})
    records = [r for r in source.records(["train"]) if not hasattr(r, "reason")]
    tuned = keep_freed_memory()
    times, cpu, sys_s, faults = [], [], [], []
    pixels = pyramid_bytes = 0
    for _ in range(repeats):
        start, cpu_start, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        pixels = pyramid_bytes = 0
        for record in records:
            image = source.load(record).image
            pixels += image.shape[0] * image.shape[1]
            pyramid_bytes += len(build_pyramid(image, tile=TILE, quality=QUALITY))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        end = resource.getrusage(resource.RUSAGE_SELF)
        sys_s.append(end.ru_stime - usage.ru_stime)
        faults.append(end.ru_minflt - usage.ru_minflt)
    best = min(times)
    return {"seconds": best, "seconds_all": times, "cpu_s_all": cpu, "sys_s_all": sys_s, "minor_faults_all": faults,
            "malloc_tuned": tuned, "megapixels": pixels / 1e6, "mp_per_s": pixels / 1e6 / best,
            "mp_per_cpu_s": pixels / 1e6 / min(cpu), "pyramid_bytes": pyramid_bytes}  # fmt: skip


def job(root: Path, dst: Path, workers: int, shard_bytes: int, repeats: int, tuned: bool = True) -> dict[str, Any]:
    """``run_sharding`` on a fresh local Ray with ``workers`` CPUs; the best of ``repeats`` runs.

    ``tuned=False`` runs the same ``write_shard`` in tasks that skip ``keep_freed_memory`` (glibc's
    default malloc thresholds), for the A/B comparison of ``--ab``.

    Each repeat writes a new dataset (nothing is skipped); the machine's 1-minute load average
    before the first run is recorded because other processes steal cores from the measurement.
    """
    import ray

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    ray_start = time.perf_counter() - start
    summaries = []
    try:
        warm = ray.remote(num_cpus=1)(_warm)
        ray.get([warm.remote() for _ in range(workers)])
        for i in range(repeats):
            cfg = ShardConfig(dataset="folder", src=str(root), dst=str(dst / f"run{i}"), tile=TILE, quality=QUALITY,
                              shard_bytes=shard_bytes, workers=workers, progress=False)  # fmt: skip
            summaries.append(run_sharding(cfg) if tuned else run_sharding(cfg, runner=_untuned_runner))
    finally:
        ray.shutdown()
    summary = min(summaries, key=lambda s: s.wall_s)
    return {
        "workers": workers,
        "ray_start_s": ray_start,
        "wall_s": summary.wall_s,
        "wall_s_all": [s.wall_s for s in summaries],
        "megapixels": summary.source_megapixels,
        "mp_per_s": summary.mp_per_s,
        "mp_per_s_per_core": summary.mp_per_s / workers,
        "shards": summary.shards_written,
        "samples": summary.samples,
        "dataset_bytes": summary.dataset_bytes,
        "task_cpu_s": summary.task_cpu_s,
        "driver_cpu_s": summary.driver_cpu_s,
        "mp_per_cpu_s": summary.source_megapixels / (summary.task_cpu_s + summary.driver_cpu_s),
        "load_avg_before": load_before,
        "malloc_tuned": tuned,
    }


def _untuned_task(task: ShardTask, cfg_data: dict[str, Any]) -> ShardResult:
    """``ray_shard._shard_task`` without ``keep_freed_memory``: the task path before the fix."""
    cfg = from_dict(ShardConfig, cfg_data)
    return write_shard(task, build_source(cfg), cfg)


def _untuned_runner(tasks: list[ShardTask], cfg: ShardConfig) -> list[ShardResult]:
    import ray

    remote = ray.remote(num_cpus=cfg.task_cpus)(_untuned_task)
    return ray.get([remote.remote(task, to_dict(cfg)) for task in tasks])


def malloc_ab(root: Path, dst: Path, shard_bytes: int, sessions: int) -> dict[str, Any]:
    """1-worker job with default vs tuned malloc, alternating fresh Ray sessions (so a worker
    never carries the other variant's settings); medians over sessions x 2 runs each."""
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "tuned": []}
    for i in range(sessions):
        for name, tuned in (("default", False), ("tuned", True)):
            runs[name].append(job(root, dst / f"ab{i}{name}", 1, shard_bytes, 2, tuned=tuned))
    out: dict[str, Any] = {"sessions": sessions}
    for name, rs in runs.items():
        out[name] = {"task_cpu_s_median": float(np.median([r["task_cpu_s"] for r in rs])),
                     "wall_s_median": float(np.median([r["wall_s"] for r in rs])),
                     "task_cpu_s_all": [r["task_cpu_s"] for r in rs], "wall_s_all": [r["wall_s"] for r in rs],
                     "load_avg_before": [r["load_avg_before"] for r in rs]}  # fmt: skip
    out["task_cpu_ratio_tuned_over_default"] = out["tuned"]["task_cpu_s_median"] / out["default"]["task_cpu_s_median"]
    return out


def _warm() -> bool:
    import pipeline.pyramid  # noqa: F401
    import pipeline.sharding  # noqa: F401
    import pipeline.sources  # noqa: F401

    return True


def machine() -> dict[str, Any]:
    import PIL
    import ray
    import tifffile

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "pillow": PIL.__version__, "numpy": np.__version__,
            "ray": ray.__version__, "tifffile": tifffile.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~12 MP instead of ~190 MP")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best one counts")
    parser.add_argument("--ab", type=int, default=0, metavar="N",
                        help="also N alternating sessions of 1 worker with default vs tuned malloc")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        root = Path(tmp) / "raw"
        source_bytes = make_folder(root, size["images"], size["side"])
        load_bound = os.getloadavg()[0]
        ref = bound(root, args.repeats)
        runs = [job(root, Path(tmp) / f"out{w}", w, max(1, source_bytes // 12), args.repeats) for w in (1, 2)]
        ab = malloc_ab(root, Path(tmp) / "ab", max(1, source_bytes // 12), args.ab) if args.ab else None
    one, two = runs
    result = {
        "benchmark": "shard_throughput",
        "mode": "quick" if args.quick else "full",
        "input": {**size, "megapixels": ref["megapixels"], "source_bytes": source_bytes, "tile": TILE, "quality": QUALITY},
        "bound": {**ref, "load_avg_before": load_bound},
        "jobs": runs,
        "fraction_of_bound": {str(r["workers"]): r["mp_per_s_per_core"] / ref["mp_per_s"] for r in runs},
        "scaling_1_to_2": two["mp_per_s"] / one["mp_per_s"],
        # contention-free view: MP per CPU-second of the job's tasks + driver, over the bound's
        "cpu_efficiency": {str(r["workers"]): r["mp_per_cpu_s"] / ref["mp_per_cpu_s"] for r in runs},
        "storage_overhead": {"dataset_over_source": one["dataset_bytes"] / source_bytes,
                             "pyramids_over_source": ref["pyramid_bytes"] / source_bytes},  # fmt: skip
        "targets": {"fraction_of_bound": 0.7, "scaling_1_to_2": 1.8},
        "malloc_ab": ab,
        "machine": machine(),
    }
    out = REPO / "benchmarks" / "results" / ("shard_throughput.quick.json" if args.quick else "shard_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"input: {size['images']} JPEGs, {ref['megapixels']:.0f} MP, {source_bytes / 1e6:.1f} MB")
    print(f"bound (1 thread, no job): {ref['mp_per_s']:.1f} MP/s")
    for r in runs:
        print(f"job, {r['workers']} worker(s): {r['mp_per_s']:.1f} MP/s = {r['mp_per_s_per_core']:.1f} MP/s/core "
              f"({r['mp_per_s_per_core'] / ref['mp_per_s']:.2f} of bound), {r['shards']} shards, "
              f"wall {r['wall_s']:.1f} s, Ray start {r['ray_start_s']:.1f} s, load avg {r['load_avg_before']:.1f}, "
              f"CPU efficiency {r['mp_per_cpu_s'] / ref['mp_per_cpu_s']:.2f}")  # fmt: skip
    print(f"scaling 1 -> 2 workers: {result['scaling_1_to_2']:.2f}x; storage: shards/source = "
          f"{result['storage_overhead']['dataset_over_source']:.2f}; results in {out.relative_to(REPO)}")
    if ab:
        print(f"malloc A/B, 1 worker, {ab['sessions']} sessions: task CPU {ab['default']['task_cpu_s_median']:.2f} s "
              f"(default) -> {ab['tuned']['task_cpu_s_median']:.2f} s (tuned), wall {ab['default']['wall_s_median']:.2f} "
              f"-> {ab['tuned']['wall_s_median']:.2f} s")  # fmt: skip
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
