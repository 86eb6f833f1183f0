"""Two cores, one training job: one worker, two torch threads, or two DDP workers?

    python benchmarks/ddp_scaling.py [--quick] [--json] [--config configs/megapixel_mnist_demo.yaml]
        [--set KEY=VALUE ...] [--data DIR] [--images N] [--rounds R] [--out-dir DIR]

The training step of ``training/loop.py`` (the rank's shard stream, the lazy region source, TNet,
its loss, Adam; the config's precision and layout), timed in fresh processes on the same shards:

- ``one_thread``: one process, one torch thread (the second core idle);
- ``two_threads``: one process, two torch threads (intra-op parallelism);
- ``independent``: two processes of one thread each that never talk: the bound for two workers;
- ``ddp``: two processes as Ray Train runs them (DDP over gloo on 127.0.0.1 with
  ``find_unused_parameters``, and the per-step check that every rank has a batch);
- ``ddp_double_batch``: the same with twice the batch per rank: half the synchronisations per image.

Images/s of a variant add up its processes; ratios are against ``one_thread``, and ``ddp`` /
``independent`` is what the per-step synchronisation costs (each step waits for the slower rank
and for the gradient all-reduce). Variants run in interleaved rounds (median kept), each after a
few untimed warm-up steps. Ray itself is not in the loop: its cost is what the demo's per-epoch
images/s show beside these.

Data: Megapixel MNIST at the demo's geometry (640 px canvases, 9 noise stamps, tile 64), sharded
once into benchmarks/.cache/ (``--data`` to choose). Results: benchmarks/results/ddp_scaling[.quick].json
and a PNG; with --json the last output line is one JSON object holding ``images_per_s`` (by
variant), ``speedup_vs_one_thread`` and ``ddp_vs_independent``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == _ROOT / "benchmarks":
    sys.path[0] = str(_ROOT)  # run as a script: the project root, not benchmarks/, comes first
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.common import bar_panels, finish, load_avg, machine_info, ratio, result_path  # noqa: E402
from training.local_head import free_ports  # noqa: E402

DEMO_CONFIG = _ROOT / "configs" / "megapixel_mnist_demo.yaml"
TILE = 64
# variant: (processes, torch threads per process, DDP, batch multiplier)
VARIANTS: dict[str, tuple[int, int, bool, int]] = {
    "one_thread": (1, 1, False, 1),
    "two_threads": (1, 2, False, 1),
    "independent": (2, 1, False, 1),
    "ddp": (2, 1, True, 1),
    "ddp_double_batch": (2, 1, True, 2),
}
QUICK = {"images": 240, "rounds": 1, "n_train": 400, "warmup_steps": 3}
FULL = {"images": 800, "rounds": 3, "n_train": 3000, "warmup_steps": 5}


# -- one process of a variant ------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.images`` images after ``args.warmup_steps`` untimed steps; return this process's timing."""
    import torch
    import torch.distributed as dist

    from pipeline.loader import make_loader, split_shards
    from tnet.losses import TNetLoss
    from tnet.model import TNet
    from training.config import load_job_config
    from training.data_errors import TolerantRegionSource, every_rank_has
    from training.loop import epoch_quota, epoch_spec, train_step
    from training.optim import make_optimizer
    from training.precision import apply_layout, autocast_dtype

    torch.set_num_threads(args.threads)
    cfg = load_job_config(args.config, [*args.overrides, f"data.url={args.url}", f"train.batch_size={args.batch}"])
    torch.manual_seed(cfg.train.seed)
    cpu = torch.device("cpu")
    model = apply_layout(TNet(cfg.model), cfg.train.channels_last)
    loss_fn, opt = TNetLoss(cfg.loss), make_optimizer(model, cfg.train)
    world = args.world if args.ddp else 1
    if args.ddp:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # as the loop
    rank = args.rank if args.ddp else 0
    amp_dtype = autocast_dtype(cpu, cfg.train)
    shards = split_shards(cfg.data.url, cfg.data.train_split)
    quota = epoch_quota(cfg, shards, world)
    steps_needed = args.warmup_steps + -(-args.images // args.batch)
    executor = ThreadPoolExecutor(cfg.data.decode_threads)
    model.train()
    step = images = 0
    t0 = c0 = 0.0
    epoch = 0
    while step < steps_needed:
        for batch in make_loader(epoch_spec(cfg, shards, quota, rank, world, epoch), args.batch, 0):
            if step == args.warmup_steps:
                t0, c0, images = time.perf_counter(), time.process_time(), 0
            if not every_rank_has(len(batch) > 0, world, cpu):
                continue
            source = TolerantRegionSource(batch.model_source(cfg.model, executor), batch.keys)
            train_step(model, loss_fn, opt, source, batch.labels, cpu, amp_dtype)
            images += len(batch)
            step += 1
            if step >= steps_needed:
                break
        epoch += 1
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    executor.shutdown()
    if args.ddp:
        dist.destroy_process_group()
    return {"rank": rank, "images": images, "wall_s": wall, "cpu_s": cpu_s, "precision": str(amp_dtype or torch.float32)}


# -- the variants ---------------------------------------------------------------------------------------
def run_variant(name: str, args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Start the variant's processes together; images/s is the sum of theirs (each over its own timed steps)."""
    processes, threads, ddp, mult = VARIANTS[name]
    port = free_ports(("gloo",))["gloo"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    cmds = [[sys.executable, str(Path(__file__).resolve()), "--worker", "--url", url, "--config", str(args.config),
             "--threads", str(threads), "--batch", str(args.batch * mult), "--images", str(args.images),
             "--warmup-steps", str(args.warmup_steps), "--rank", str(r), "--world", str(processes),
             "--port", str(port), *(["--ddp"] if ddp else []), *[f"--set={o}" for o in args.overrides]]
            for r in range(processes)]  # fmt: skip
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"variant {name}: a worker exited with {p.returncode}:\n{err[-2000:]}")
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {"images_per_s": sum(r["images"] / r["wall_s"] for r in rows),
            "images_per_cpu_s": sum(r["images"] for r in rows) / sum(r["cpu_s"] for r in rows),
            "processes": rows}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 canvases, 240 images per variant, one round")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="job config (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as jobs/train.py (repeatable)")  # fmt: skip
    parser.add_argument("--data", type=Path, help="dataset folder (default: benchmarks/.cache/<parameters>)")
    parser.add_argument("--images", type=int, help="timed images per process and round (default 800, quick 240)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--batch", type=int, help="batch per process (default: the config's train.batch_size)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps before each timing (default 5, quick 3)")
    parser.add_argument("--n-train", type=int, help="training canvases to shard (default 3000, quick 400)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default benchmarks/results)")
    worker_args = parser.add_argument_group("internal (one process of a variant)")
    worker_args.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("url", str), ("threads", int), ("rank", int), ("world", int), ("port", int)):
        worker_args.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    worker_args.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    mode = QUICK if args.quick else FULL
    for key in ("images", "rounds", "warmup_steps"):
        if getattr(args, key) is None:
            setattr(args, key, mode[key])
    args.n_train = args.n_train or mode["n_train"]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or not args.variants:
        parser.error(f"--variants {sorted(unknown) or 'empty'}: choose among {', '.join(VARIANTS)}")
    if min(args.images, args.rounds, args.n_train, args.batch or 1) < 1 or args.warmup_steps < 0:
        parser.error("--images, --rounds, --batch and --n-train must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}
    from benchmarks.megapixel_mnist import cache_folder, prepare_data
    from training.config import load_job_config

    cfg = load_job_config(args.config, args.overrides)  # a bad config fails before any sharding
    args.batch = args.batch or cfg.train.batch_size
    options = {"size": cfg.model.input_size, "n_train": args.n_train, "n_test": 8, "n_noise": 9}
    dst = args.data or cache_folder(options, TILE)
    url = prepare_data(dst.resolve(), options, TILE)
    load_before = load_avg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for name in args.variants:
            runs[name].append(run_variant(name, args, url))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]['images_per_s']:.1f} images/s", flush=True)
    per_s = {v: statistics.median(x["images_per_s"] for x in rows) for v, rows in runs.items()}
    result: dict[str, Any] = {
        "benchmark": "ddp_scaling", "mode": "quick" if args.quick else "full",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("json", "out_dir", "worker", "url", "threads", "rank", "world", "port", "ddp")},
        "machine": machine_info(), "load_avg_before": load_before, "load_avg_after": load_avg(), "data": url,
        "variants": {v: {"processes": VARIANTS[v][0], "torch_threads": VARIANTS[v][1], "ddp": VARIANTS[v][2],
                         "batch_per_process": args.batch * VARIANTS[v][3]} for v in args.variants},
        "images_per_s": per_s, "rounds": runs,
        "speedup_vs_one_thread": {v: ratio(x, per_s["one_thread"]) for v, x in per_s.items()} if "one_thread" in per_s else {},
        "ddp_vs_independent": ratio(per_s["ddp"], per_s["independent"]) if {"ddp", "independent"} <= set(per_s) else None,
    }  # fmt: skip
    path = result_path("ddp_scaling", args.quick, "json", args.out_dir)
    result["plot"] = str(bar_panels(path.with_suffix(".png"), "Training images/s on this machine's cores",
                                    ["training step"], {"images/s": {v: [x] for v, x in per_s.items()}}, "images/s"))
    return finish(result, path, args.json)


if __name__ == "__main__":
    main()
