"""Gigapixel mode: streaming sharding and random-access training steps, by image side.

    python benchmarks/gigapixel.py [--quick] [--json] [--sides 2048 8192 32768]

Input: one synthetic scene per side (``pipeline.gigapixel_synth``: texture plus a few objects,
written as a JPEG-tiled BigTIFF, streaming; generation time is reported apart). Each measurement
runs in a fresh subprocess so its peak RSS (``VmHWM``; ``ru_maxrss`` would include the pre-exec fork) is its own:

- shard: ``run_sharding`` (serial, no Ray) of a folder holding that one image; peak RSS, source
  MP/s, pyramid bytes.
- train: ``data.access: random`` batches of that dataset (batch 1, 3 samples), TNet with 3 levels
  and k=2 per level (``tiny`` backbone: bytes and pixels do not depend on the backbone), forward,
  loss and backward per step; per step: bytes fetched (loader + region reads, counted at the
  fsspec calls), their fraction of the pyramid's bytes, decoded pixels, seconds, peak RSS.

Targets: peak RSS flat (within 2x) from 2k to 32k; bytes read and time per step flat in image
size. Results go to benchmarks/results/gigapixel.json (``.quick.json`` with --quick); with --json
the last printed line is one JSON object with ``shard_peak_rss_mb``, ``train_peak_rss_mb`` and
``bytes_read_fraction`` keyed by side (as a string), and everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SHARD = textwrap.dedent("""
    import json, sys, time
    from pipeline.ray_shard import run_serial, run_sharding
    from pipeline.shard_config import ShardConfig
    src, dst = sys.argv[1], sys.argv[2]
    cfg = ShardConfig(dataset="folder", src=src, dst=dst, max_pixels=2**36, calibrate=0, progress=False,
                      verify="size", source_options={"stream_pixels": 1})
    t = time.perf_counter()
    s = run_sharding(cfg, runner=run_serial)
    dt = time.perf_counter() - t
    print(json.dumps({"samples": s.samples, "seconds": dt, "mp_per_s": s.source_megapixels / dt,
                      "dataset_bytes": s.dataset_bytes,
                      "peak_rss_mb": int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) / 1024}))
""")

TRAIN = textwrap.dedent("""
    import json, sys, time
    import torch
    from pipeline.loader import StreamSpec, make_loader
    from tnet.config import TNetConfig
    from tnet.losses import LossConfig, TNetLoss
    from tnet.model import TNet
    url, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = TNetConfig(num_classes=4, backbone="tiny", levels=3, locations=(2, 2), base_size=224, input_size=896)
    model, loss_fn = TNet(cfg), TNetLoss(LossConfig()).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    spec = StreamSpec(url=url, split="train", shards=(), base_size=cfg.base_size, channels=3, quota=steps,
                      train=True, access="random")
    out = []
    t = time.perf_counter()
    for batch in make_loader(spec, batch_size=1):
        source = batch.region_source(3)
        res = model(source)
        terms = loss_fn(res, batch.labels)
        opt.zero_grad(); terms["total"].backward(); opt.step()
        now = time.perf_counter()
        out.append({"seconds": now - t, "bytes": batch.bytes_fetched(), "sample_bytes": batch.sample_bytes,
                    "decoded_pixels": source.decoded_pixels(), "full_pixels": batch.full_pixels})
        t = now
    print(json.dumps({"steps": out, "peak_rss_mb": int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) / 1024}))
""")


def _run(script: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(side: int, work: Path, steps: int) -> dict[str, Any]:
    """Generate, shard and train-step one image of ``side`` x ``side``; the per-side record."""
    from pipeline.gigapixel_synth import make_scene, write_tiff

    src = work / f"src{side}" / "train" / "ring"
    src.mkdir(parents=True)
    t = time.perf_counter()
    source_bytes = write_tiff(str(src / "scene.tif"), make_scene(side, side, 2, seed=side), tile=512)
    generate_s = time.perf_counter() - t
    shard = _run(SHARD, str(work / f"src{side}"), str(work / f"out{side}"))
    train = _run(TRAIN, str(work / f"out{side}"), str(steps))
    (src / "scene.tif").unlink()
    rows = train["steps"][1:] or train["steps"]  # the first step also pays imports and warm-up
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("seconds", "bytes", "decoded_pixels", "sample_bytes")}
    return {
        "side": side, "source_bytes": source_bytes, "generate_s": round(generate_s, 2),
        "shard_seconds": round(shard["seconds"], 2), "shard_mp_per_s": round(shard["mp_per_s"], 1),
        "shard_peak_rss_mb": round(shard["peak_rss_mb"], 1), "pyramid_bytes": int(mean["sample_bytes"]),
        "step_seconds": round(mean["seconds"], 3), "step_bytes_read": int(mean["bytes"]),
        "bytes_read_fraction": mean["bytes"] / max(mean["sample_bytes"], 1),
        "step_decoded_pixels": int(mean["decoded_pixels"]),
        "decoded_pixel_fraction": mean["decoded_pixels"] / (side * side),
        "train_peak_rss_mb": round(train["peak_rss_mb"], 1), "steps": len(rows),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sides 2048 and 16384 only")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    parser.add_argument("--sides", type=int, nargs="+", help="image sides (default 2048 8192 32768)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per side (the first is dropped)")
    parser.add_argument("--tmp", default=None, help="scratch folder (needs ~1.5x the largest pyramid)")
    args = parser.parse_args(argv)
    sides = args.sides or ([2048, 16384] if args.quick else [2048, 8192, 32768])
    records = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for side in sides:
            rec = measure(side, Path(tmp), args.steps)
            records.append(rec)
            print(f"{side:>6}: shard {rec['shard_mp_per_s']:6.1f} MP/s, peak {rec['shard_peak_rss_mb']:7.1f} MB | "
                  f"step {rec['step_seconds']:.2f} s, {rec['step_bytes_read'] / 1e3:8.1f} kB "
                  f"({rec['bytes_read_fraction']:.2%} of {rec['pyramid_bytes'] / 1e6:.1f} MB), "
                  f"{rec['step_decoded_pixels'] / 1e6:.2f} MP decoded, peak {rec['train_peak_rss_mb']:.1f} MB",
                  flush=True)
    result = {
        "sides": sides,
        "records": records,
        "shard_peak_rss_mb": {str(r["side"]): r["shard_peak_rss_mb"] for r in records},
        "train_peak_rss_mb": {str(r["side"]): r["train_peak_rss_mb"] for r in records},
        "bytes_read_fraction": {str(r["side"]): r["bytes_read_fraction"] for r in records},
        "step_bytes_read": {str(r["side"]): r["step_bytes_read"] for r in records},
        "step_seconds": {str(r["side"]): r["step_seconds"] for r in records},
        "shard_mp_per_s": {str(r["side"]): r["shard_mp_per_s"] for r in records},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("gigapixel.quick.json" if args.quick else "gigapixel.json")).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
