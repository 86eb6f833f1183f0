"""Lazy TNet vs. eager TNet vs. the full-resolution backbone: images/s from the same shards, decode included.

    python benchmarks/lazy_vs_full.py [--quick] [--json] [--device cuda] [--bf16] [--resolutions 448 896 ...]

Data: generated photo-like RGB images with one object (a disk or a square), ``R x R`` pixels,
sharded by the project's own sharding code (folder source, tile 256, JPEG quality 90) into a
local folder in a temporary directory. Every variant reads the same shards:

- ``tnet_lazy``: the training loader (``pipeline.loader.make_loader``, no worker processes)
  decodes the base view from the pyramid's coarse levels; TNet reads the attended regions
  through ``PyramidRegionSource`` (only their tiles decoded, 2 decode threads), or through
  ``pipeline.gpu_decode.GpuPyramidRegionSource`` (tiles decoded by nvJPEG) with ``--device cuda``;
- ``tnet_eager``: each pyramid's level 0 decoded whole (the 2 decode threads over the batch),
  TNet fed the full-resolution tensors through ``TensorRegionSource``;
- ``full_res``: the same full decode fed to the plain backbone at ``R`` px
  (``tnet.baseline.WholeImageClassifier``, the paper's baseline).

Inference: ``no_grad`` forward. Training step: forward, loss (``TNetLoss``; cross-entropy for the
backbone), backward, Adam step. The lazy training step uses the loader's random views (crop, flip,
colour); the eager and full ones take the whole image (a little less work: the comparison favours
them). Geometry: the fMoW recipe extended by levels: 448 px = 2 levels, k = [2] (configs/fmow_448);
896 = 3 levels, k = [2, 1] (configs/fmow_896); each doubling adds one level with k = 1, the same
3 x 3 grid and overlap 0.5, base 224 px, EfficientNet-B0. Stochastic depth is off in both models.

Timing: interleaved rounds (common.interleaved), median per image. Batch on CPU: 8 images up to
896 px, 2 above (the full-resolution baseline then takes 3-20 s per image on 2 cores); on CUDA 16.
The batch matters on CPU: TNet runs its backbone on a few 224 px regions per level, which keep
two cores busy only in batches (at 896 px, batch 2 gave 2.8x over the baseline, batch 8 5.0x,
docs/benchmarks.md); ``--batch`` sets one batch for every resolution. The full-res
training step is skipped (and said so) when its activations would need more than half of the
free memory. FLOPs per image come from ``tnet.profiling.profile`` (torch's counter).

``--bf16``: every variant in bf16 autocast with NHWC weights, as the training job runs with
``train.cpu_bf16`` and ``train.channels_last`` (CPUs with AMX / AVX512-BF16 units run it fast);
results then go to lazy_vs_full_bf16[.quick].json.

Results: benchmarks/results/lazy_vs_full[.quick].json and .png; with --json the last printed line
is the JSON object; it holds ``speedup_vs_full_res`` and ``speedup_vs_eager`` (inference, keyed by
resolution as a string) and the ``*_train`` counterparts.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == _ROOT / "benchmarks":
    sys.path[0] = str(_ROOT)  # run as a script: the project root, not benchmarks/, comes first
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from webdataset.tariterators import group_by_keys, tar_file_iterator  # noqa: E402

from benchmarks.common import (  # noqa: E402
    bar_panels,
    interleaved,
    load_avg,
    machine_info,
    print_json_line,
    ratio,
    result_path,
    shard_folder,
    write_image_folder,
    write_json,
)
from pipeline.loader import Batch, StreamSpec, make_loader, split_shards  # noqa: E402
from pipeline.pyramid import PyramidReader  # noqa: E402
from pipeline.storage import join, open_url  # noqa: E402
from tnet.baseline import WholeImageClassifier  # noqa: E402
from tnet.config import TNetConfig  # noqa: E402
from tnet.losses import LossConfig, TNetLoss  # noqa: E402
from tnet.model import TNet  # noqa: E402
from tnet.profiling import profile  # noqa: E402
from tnet.regions import RegionSource, TensorRegionSource  # noqa: E402
from training.precision import apply_layout, autocast  # noqa: E402

RESOLUTIONS = (448, 896, 1792, 3584)
QUICK_RESOLUTIONS = (448, 896)
TARGETS = {"speedup_vs_full_res": {"896": 3.0, "1792": 8.0, "3584": 20.0}, "speedup_vs_eager": {"896": 1.5}}
VARIANTS = ("tnet_lazy", "tnet_eager", "full_res")
NUM_CLASSES = 62  # fMoW's head; the generated data uses labels 0 and 1
BASE = 224


def tnet_config(resolution: int, backbone: str = "efficientnet_b0") -> TNetConfig:
    """fMoW geometry extended by levels: 448 -> 2 levels k=[2]; every doubling adds a level with k=1.

    Raises:
        ValueError: a resolution that is not 448 times a power of two.
    """
    doublings = math.log2(resolution / 448) if resolution >= 448 else -1.0
    if doublings < 0 or doublings != int(doublings):
        raise ValueError(f"resolution={resolution}: must be 448 * 2^n (448, 896, 1792, 3584, ...)")
    levels = 2 + int(doublings)
    return TNetConfig(num_classes=NUM_CLASSES, backbone=backbone, input_size=resolution, base_size=BASE,
                      levels=levels, grid=3, overlap=0.5, locations=(2,) + (1,) * (levels - 2),
                      feature_dim=1280, dropout=0.5, drop_path=0.0, pos_channels=320)  # fmt: skip


def raw_samples(url: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, pyramid bytes, label) of the train split, read from the tars, in order, forever."""
    fs, root = open_url(url)
    shards = [s for s, _ in split_shards(url, "train")]
    for shard in itertools.cycle(shards):
        url = join(root, shard)
        with fs.open(url, "rb") as f:
            for sample in group_by_keys(dict(m, __url__=url) for m in tar_file_iterator(f)):
                yield sample["__key__"], sample["tif"], int(sample["cls"])


def saved_activation_bytes(model: nn.Module, size: int, device: torch.device) -> int:
    """Bytes autograd keeps for backward of one image at ``size`` px (measured: distinct storages saved)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(1, 3, size, size, device=device)).sum()
    return sum(storages.values())


class TimedSource:
    """Delegates to a RegionSource and adds up the seconds its ``read_regions`` calls take.

    TNet reads regions inside its forward; this separates that data time from the compute.
    """

    def __init__(self, inner: RegionSource, sync: Callable[[], None] | None = None) -> None:
        self.inner, self.sync, self.seconds = inner, sync, 0.0

    def __len__(self) -> int:
        return len(self.inner)

    def read_regions(self, boxes: torch.Tensor, out_size: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner.read_regions(boxes, out_size)
        if self.sync:
            self.sync()
        self.seconds += time.perf_counter() - t0
        return out

    def source_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.inner.source_boxes(boxes)

    def full_pixels(self) -> torch.Tensor:
        return self.inner.full_pixels()

    def decoded_pixels(self) -> int:
        return self.inner.decoded_pixels()


class Bench:
    """The models, optimisers and data streams of one resolution, and its six timed steps."""

    def __init__(self, url: str, resolution: int, args: argparse.Namespace, device: torch.device,
                 pool: ThreadPoolExecutor) -> None:  # fmt: skip
        torch.manual_seed(0)
        self.cfg = tnet_config(resolution, args.backbone)
        self.device, self.pool, self.batch = device, pool, batch_for(resolution, args)
        self.full_train_batch = self.batch  # lowered when the full-res activations would not fit
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        # --bf16: every variant under bf16 autocast with NHWC weights (training/precision.py), as the
        # training job runs with train.cpu_bf16 and train.channels_last
        self.amp = torch.bfloat16 if args.bf16 else None
        self.output_dtypes: dict[str, str] = {}  # what the models computed in (the JSON says)
        self.tnet = apply_layout(TNet(self.cfg), args.bf16).to(device)
        self.full = apply_layout(WholeImageClassifier(args.backbone, NUM_CLASSES, resolution, dropout=0.5), args.bf16).to(device)
        self.loss = TNetLoss(LossConfig(w_ce=0.05, w_rf=0.05, per_feature_levels=2)).to(device)
        self.opt_tnet = torch.optim.Adam(self.tnet.parameters(), lr=1e-4)
        self.opt_full = torch.optim.Adam(self.full.parameters(), lr=1e-4)
        shards = tuple(s for s, _ in split_shards(url, "train"))
        calls = (args.warmup + args.rounds) * self.batch
        spec = StreamSpec(url=url, split="train", shards=shards, base_size=BASE, channels=3, quota=calls,
                          shuffle_buffer=1, train=False)  # fmt: skip
        self.infer_batches = iter(make_loader(spec, self.batch, 0))
        train_spec = dataclasses.replace(spec, train=True)
        self.train_batches = iter(make_loader(train_spec, self.batch, 0))
        self.raw = raw_samples(url)

    # -- data ---------------------------------------------------------------------------------------
    def lazy_source(self, batch: Batch) -> RegionSource:
        if self.device.type == "cpu":
            return batch.region_source(3, self.pool)
        from pipeline.gpu_decode import GpuPyramidRegionSource

        readers = [PyramidReader(t, where=k) for t, k in zip(batch.pyramids, batch.keys)]
        return GpuPyramidRegionSource(readers, batch.views, 3, batch.base_views, batch.base_decoded, self.device)

    def full_decode(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The next ``n`` samples decoded whole at full resolution: images (n, 3, R, R) in [-1, 1], labels, pixels."""
        samples = [next(self.raw) for _ in range(n)]

        def decode(sample: tuple[str, bytes, int]) -> tuple[torch.Tensor, int]:
            reader = PyramidReader(sample[1], where=sample[0])
            if self.device.type == "cpu":
                pixels = torch.from_numpy(reader.read_level(0)).permute(2, 0, 1)
            else:
                from pipeline.gpu_decode import decode_level

                pixels = decode_level(reader, 0, self.device)
            return pixels.float().div_(127.5).sub_(1.0), reader.decoded_pixels

        decoded = list(self.pool.map(decode, samples))
        images = torch.stack([d[0] for d in decoded]).to(self.device)
        labels = torch.tensor([s[2] for s in samples], device=self.device)
        return images, labels, sum(d[1] for d in decoded)

    # -- steps --------------------------------------------------------------------------------------
    def run_tnet(self, source: RegionSource, labels: torch.Tensor, train: bool) -> None:
        if not train:
            self.tnet.eval()
            with torch.no_grad(), autocast(self.device, self.amp):
                self.output_dtypes["tnet"] = str(self.tnet(source).logits.dtype)
            return
        self.tnet.train()
        with autocast(self.device, self.amp):
            terms = self.loss(self.tnet(source), labels)
        self.opt_tnet.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.opt_tnet.step()
        self.loss.update_baseline(terms)

    def lazy(self, train: bool) -> tuple[int, dict[str, float]]:
        t0 = time.perf_counter()
        batch = next(self.train_batches if train else self.infer_batches)
        source = TimedSource(self.lazy_source(batch), self.sync)
        loaded = time.perf_counter() - t0
        self.run_tnet(source, batch.labels.to(self.device), train)
        return len(batch), {"decoded_px_per_image": source.decoded_pixels() / len(batch),
                            "full_px_per_image": batch.full_pixels / len(batch),
                            "data_s_per_image": (loaded + source.seconds) / len(batch)}  # fmt: skip

    def eager(self, train: bool) -> tuple[int, dict[str, float]]:
        t0 = time.perf_counter()
        images, labels, decoded = self.full_decode(self.batch)
        source = TimedSource(TensorRegionSource(images), self.sync)
        loaded = time.perf_counter() - t0
        self.run_tnet(source, labels, train)
        return len(labels), {"decoded_px_per_image": decoded / len(labels),
                             "data_s_per_image": (loaded + source.seconds) / len(labels)}  # fmt: skip

    def baseline(self, train: bool) -> tuple[int, dict[str, float]]:
        t0 = time.perf_counter()
        images, labels, decoded = self.full_decode(self.full_train_batch if train else self.batch)
        loaded = time.perf_counter() - t0
        if train:
            self.full.train()
            with autocast(self.device, self.amp):
                loss = F.cross_entropy(self.full(images), labels)
            self.opt_full.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_full.step()
        else:
            self.full.eval()
            with torch.no_grad(), autocast(self.device, self.amp):
                self.output_dtypes["full_res"] = str(self.full(images).dtype)
        return len(labels), {"decoded_px_per_image": decoded / len(labels), "data_s_per_image": loaded / len(labels)}

    def steps(self, with_full_train: bool) -> dict[str, Callable[[], tuple[int, dict[str, float]]]]:
        steps = {"tnet_lazy_infer": lambda: self.lazy(False), "tnet_eager_infer": lambda: self.eager(False),
                 "full_res_infer": lambda: self.baseline(False), "tnet_lazy_train": lambda: self.lazy(True),
                 "tnet_eager_train": lambda: self.eager(True)}  # fmt: skip
        if with_full_train:
            steps["full_res_train"] = lambda: self.baseline(True)
        return steps


def bench_resolution(url: str, resolution: int, args: argparse.Namespace, device: torch.device,
                     pool: ThreadPoolExecutor) -> dict[str, Any]:  # fmt: skip
    bench = Bench(url, resolution, args, device, pool)
    # 1.5x the saved activations: the peak RSS of a measured 896 px step was 1.4x them
    probe = WholeImageClassifier(args.backbone, NUM_CLASSES, BASE).to(device)  # measured at 224, scaled by area
    need = 1.5 * saved_activation_bytes(probe, BASE, device) * (resolution / BASE) ** 2
    free = psutil.virtual_memory().available if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
    bench.full_train_batch = min(bench.batch, int(0.5 * free // need))
    full_train = bench.full_train_batch >= 1
    load_before = load_avg()
    timings = interleaved(bench.steps(full_train), args.rounds, args.warmup, bench.sync)
    prof = profile(bench.cfg)
    out: dict[str, Any] = {
        "resolution": resolution, "levels": bench.cfg.levels, "locations": list(bench.cfg.locations),
        "features_per_image": prof.features_per_image, "tnet_gflops": prof.gflops,
        "full_res_gflops": prof.baseline_gflops, "flops_ratio": prof.flops_ratio,
        "full_res_train_gb_per_image": need / 1e9, "free_memory_gb": free / 1e9,
        "batch": bench.batch, "full_res_train_batch": bench.full_train_batch,
        "load_avg_before": load_before, "load_avg_after": load_avg(),
        "timings": {name: t.summary() for name, t in timings.items()}, "output_dtypes": bench.output_dtypes,
    }  # fmt: skip
    if not full_train:
        out["full_res_train_skipped"] = (f"needs ~{need / 1e9:.1f} GB per image for its activations, "
                                         f"over half of the {free / 1e9:.1f} GB free")  # fmt: skip
    return out


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios per resolution (string keys): wall-clock images/s, and the same by CPU time."""
    def per(row: dict[str, Any], name: str, key: str = "per_s") -> float:
        return row["timings"].get(name, {}).get(key, 0.0)

    out: dict[str, Any] = {}
    for mode in ("infer", "train"):
        suffix = "" if mode == "infer" else "_train"
        for peer, label in (("full_res", "speedup_vs_full_res"), ("tnet_eager", "speedup_vs_eager")):
            out[label + suffix] = {r: ratio(per(row, f"tnet_lazy_{mode}"), per(row, f"{peer}_{mode}"))
                                   for r, row in rows.items()}  # fmt: skip
            out[label + suffix + "_cpu"] = {r: ratio(per(row, f"tnet_lazy_{mode}", "per_cpu_s"),
                                                     per(row, f"{peer}_{mode}", "per_cpu_s")) for r, row in rows.items()}  # fmt: skip
        for peer, label in (("full_res", "data_speedup_vs_full_res"), ("tnet_eager", "data_speedup_vs_eager")):
            out[label + suffix] = {r: ratio(per(row, f"{peer}_{mode}", "data_s_per_image_mean"),
                                            per(row, f"tnet_lazy_{mode}", "data_s_per_image_mean")) for r, row in rows.items()}  # fmt: skip
    out["targets"] = TARGETS
    out["targets_met"] = {f"{key}[{r}]": out[key].get(r, 0.0) >= t for key, by_res in TARGETS.items()
                          for r, t in by_res.items() if r in out[key]}  # fmt: skip
    return out


def plot(rows: dict[str, dict[str, Any]], path: Path, device: str) -> Path:
    groups = [f"{r} px" for r in rows]
    panels = {f"{'inference' if mode == 'infer' else 'training step'} (images/s, log)": {
        v: [row["timings"].get(f"{v}_{mode}", {}).get("per_s", 0.0) for row in rows.values()] for v in VARIANTS}
        for mode in ("infer", "train")}  # fmt: skip
    return bar_panels(path, f"TNet lazy vs eager vs full-resolution EfficientNet-B0 ({device}, decode included)",
                      groups, panels, "images/s", log=True)


def batch_for(resolution: int, args: argparse.Namespace) -> int:
    """Images per step at ``resolution``: ``--batch``, else 16 on CUDA, else 8 up to 896 px and 2 above."""
    if args.batch:
        return int(args.batch)
    if args.device == "cuda":
        return 16
    return 8 if resolution <= 896 else 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="448 and 896 px only, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--resolutions", type=int, nargs="+", help="default 448 896 1792 3584 (quick: 448 896)")
    parser.add_argument("--batch", type=int,
                        help="images per step at every resolution (default: CPU 8 up to 896 px and 2 above, CUDA 16)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--images", type=int, help="generated images per resolution (default 2 batches)")
    parser.add_argument("--backbone", default="efficientnet_b0", help="tests use 'tiny' to run in seconds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--decode-threads", type=int, default=2, help="threads decoding tiles/images")
    parser.add_argument("--bf16", action="store_true",
                        help="all variants in bf16 autocast with NHWC weights (fast on CPUs with AMX / AVX512-BF16)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default benchmarks/results)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else RESOLUTIONS)
    args.rounds = args.rounds or (2 if args.quick else 3)
    for r in args.resolutions:
        tnet_config(r)  # refuse a bad resolution before generating anything
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if min(args.batch or 1, args.rounds, args.images or 1) < 1:
        parser.error("--batch, --rounds and --images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or psutil.cpu_count() or 1)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lazy-vs-full-") as tmp, ThreadPoolExecutor(args.decode_threads) as pool:
        for r in args.resolutions:
            raw, dst = Path(tmp) / f"raw{r}", Path(tmp) / f"shards{r}"
            source_bytes = write_image_folder(raw, args.images or 2 * batch_for(r, args), r, seed=r)
            url = shard_folder(raw, dst)
            rows[str(r)] = bench_resolution(url, r, args, device, pool) | {"source_jpeg_bytes": source_bytes}
            print(format_row(rows[str(r)]), flush=True)
    result = {
        "benchmark": "lazy_vs_full", "mode": "quick" if args.quick else "full", "device": args.device,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out_dir")},
        "machine": machine_info(), "resolutions": rows, **summarise(rows),
    }  # fmt: skip
    name = "lazy_vs_full" + ("_cuda" if args.device == "cuda" else "") + ("_bf16" if args.bf16 else "")
    path = write_json(result, result_path(name, args.quick, "json", args.out_dir))
    result["plot"] = str(plot(rows, path.with_suffix(".png"), args.device))
    write_json(result, path)
    for key in ("speedup_vs_full_res", "speedup_vs_eager", "speedup_vs_full_res_train", "speedup_vs_eager_train"):
        print(f"{key}: " + ", ".join(f"{r} px {v:.2f}x" for r, v in result[key].items()))
    print(f"results: {path}")
    if args.json:
        print_json_line(result)
    return result


def format_row(row: dict[str, Any]) -> str:
    t = row["timings"]
    cells = "  ".join(f"{name} {v['per_s']:.2f}/s" for name, v in t.items())
    lazy_px = t["tnet_lazy_infer"]["decoded_px_per_image_mean"] / max(t["tnet_lazy_infer"]["full_px_per_image_mean"], 1)
    return (f"{row['resolution']} px ({row['levels']} levels, {row['features_per_image']} features, "
            f"{row['tnet_gflops']:.2f} vs {row['full_res_gflops']:.2f} GFLOPs; lazy decodes {lazy_px:.1%} of the "
            f"pixels; load {row['load_avg_before']:.1f}): {cells}")


if __name__ == "__main__":
    main()
