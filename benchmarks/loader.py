"""Training-loader throughput: samples/s against the bound of decoding the same pixels, and a peer.

    python benchmarks/loader.py [--quick] [--json] [--profile] [--resolutions 1792 ...]

Data: generated photo-like RGB images with one object (``R x R``, JPEG quality 90), sharded by the
project's sharding code (tile 256) into a temporary local folder; the same JPEGs also written as
plain WebDataset shards (``{key}.jpg``, ``{key}.cls``), the usual way such data is stored.

Per resolution, in interleaved rounds (common.interleaved), each one pass over the same samples,
one thread, no worker processes (a per-core comparison):

- ``loader``: ``pipeline.loader.make_loader`` in training mode (random view, flip, colour jitter:
  the base view decoded from the pyramid's coarse levels) and, per batch, a TNet-like walk through
  ``PyramidRegionSource``: the geometry of ``lazy_vs_full.tnet_config(R)`` with random cells in
  place of a location module (k = 2, then 1 per selected region at every further level), every
  region read at 224 px;
- ``bound``: exactly the JPEG tiles the loader decoded (planned with ``gpu_decode.plan_region``,
  the reader's own plan, and checked against the reader's decoded-pixel count), decoded by
  pillow-simd in a tight loop (``pipeline.jpeg_tile.decode_jpeg_tile``, the reader's decoder): no
  tar, no resampling, no tensors. What one core can do at best;
- ``webdataset_full``: ``webdataset.WebDataset(...).decode("rgb8")`` over the plain JPEG shards,
  each image decoded whole and made a model-ready float tensor: what a full-resolution model's
  loader does.

fraction_of_decode_bound = loader / bound (samples/s; target >= 0.7); speedup_vs_webdataset_full_decode
= loader / webdataset_full. The headline figures are at 1792 px; ``*_by_resolution`` has them all.
``--profile`` adds a cProfile of one more loader pass (top functions by own time) to the JSON.
Results: benchmarks/results/loader[.quick].json and .png; with --json the last line is the JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import random
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == _ROOT / "benchmarks":
    sys.path[0] = str(_ROOT)  # run as a script: the project root, not benchmarks/, comes first
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import tifffile  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from benchmarks.common import (  # noqa: E402
    bar_panels,
    finish,
    interleaved,
    load_avg,
    machine_info,
    ratio,
    result_path,
    shard_folder,
    write_image_folder,
    write_json,
)
from benchmarks.lazy_vs_full import tnet_config  # noqa: E402
from pipeline.gpu_decode import plan_region  # noqa: E402
from pipeline.jpeg_tile import decode_jpeg_tile  # noqa: E402
from pipeline.loader import Batch, StreamSpec, make_loader, split_shards  # noqa: E402
from tnet.geometry import level_grids  # noqa: E402

HEADLINE = "1792"
BASE = 224
TARGET = 0.7


def tnet_like_boxes(resolution: int, batch: int, rng: random.Random) -> list[torch.Tensor]:
    """Normalised view boxes (B, R_l, 4) per level >= 1, as TNet's walk makes them, cells drawn at random."""
    cfg = tnet_config(resolution)
    size = float(cfg.input_size)
    regions = [[(0.0, 0.0, size, size)] for _ in range(batch)]
    out = []
    for grid, k in zip(level_grids(cfg.input_size, cfg.levels, cfg.grid, cfg.overlap), cfg.locations):
        children = []
        for sample in regions:
            kids = []
            for x0, y0, _, _ in sample:
                for cell in rng.sample(range(grid.cells), k):
                    dx, dy = grid.cell_offset(cell)
                    kids.append((x0 + dx, y0 + dy, x0 + dx + grid.patch, y0 + dy + grid.patch))
            children.append(kids)
        regions = children
        out.append(torch.tensor(regions, dtype=torch.float32) / size)
    return out


class LoaderRun:
    """One resolution's dataset, its three timed passes and the tile lists the bound decodes."""

    def __init__(self, url: str, wds_urls: list[str], resolution: int, samples: int, batch: int) -> None:
        shards = tuple(s for s, _ in split_shards(url, "train"))
        self.spec = StreamSpec(url=url, split="train", shards=shards, base_size=BASE, channels=3, quota=samples,
                               train=True, shuffle_buffer=1)  # fmt: skip
        self.wds_urls, self.resolution, self.samples, self.batch = wds_urls, resolution, samples, batch
        self.tiles: list[bytes] = []  # the JPEG tiles the last loader pass decoded
        self.batches: list[tuple[Batch, list[torch.Tensor]]] = []  # the last pass's batches and boxes
        self.decoded = self.planned = 0

    def loader(self, colour_jitter: bool = True) -> tuple[int, dict[str, float]]:
        rng = random.Random(0)
        seen = decoded = 0
        kept: list[tuple[Batch, list[torch.Tensor]]] = []
        spec = self.spec if colour_jitter else dataclasses.replace(self.spec, colour_jitter=False)
        for batch in make_loader(spec, self.batch, 0):
            source = batch.region_source(3)
            boxes = tnet_like_boxes(self.resolution, len(batch), rng)
            for level_boxes in boxes:
                source.read_regions(level_boxes, BASE)
            seen += len(batch)
            decoded += source.decoded_pixels()
            kept.append((batch, boxes))
        if colour_jitter:
            self.decoded, self.batches = decoded, kept
        return seen, {"decoded_px_per_sample": decoded / max(seen, 1)}

    def prepare_bound(self) -> None:
        """The tiles the last loader pass decoded, as JPEG bytes (untimed), and their pixel count.

        Per sample: the base view's tiles (the worker's reader) plus the union of its regions'
        tiles (the region source's reader, whose cache decodes a shared tile once).
        """
        self.tiles, self.planned = [], 0
        for batch, boxes in self.batches:
            source = batch.region_source(3)
            src = [source.source_boxes(b).numpy() for b in boxes]
            for i, (tif, view) in enumerate(zip(batch.pyramids, batch.views)):
                with tifffile.TiffFile(io.BytesIO(tif)) as tf:
                    pages = list(tf.pages)
                    levels = [(p.imagewidth, p.imagelength) for p in pages]
                    tile = pages[0].tilewidth
                    keys = list(plan_region(levels, tile, view.box, BASE).tiles)
                    keys += sorted({k for b in src for box in b[i] for k in plan_region(levels, tile, tuple(box), BASE).tiles})
                    for level, tx, ty in keys:
                        page = pages[level]
                        index = ty * -(-page.imagewidth // page.tilewidth) + tx
                        off, count = page.dataoffsets[index], page.databytecounts[index]
                        self.tiles.append((tif[off:off + count], page.tilewidth))
                        self.planned += page.tilewidth * page.tilelength

    def bound(self) -> tuple[int, dict[str, float]]:
        for data, side in self.tiles:  # the loader's own decoder: pillow-simd without Python header parsing
            decode_jpeg_tile(data, side, "RGB")
        return self.samples, {"tiles_per_sample": len(self.tiles) / self.samples}

    def webdataset_full(self) -> tuple[int, dict[str, float]]:
        seen = 0
        dataset = wds.WebDataset(self.wds_urls, shardshuffle=False, empty_check=False).decode("rgb8")
        with warnings.catch_warnings():  # webdataset's arrays are read-only; torch warns once about it
            warnings.simplefilter("ignore", UserWarning)
            for sample in _take(dataset, self.samples):
                torch.from_numpy(sample["jpg"]).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
                seen += 1
        return seen, {}


def _take(items: Any, n: int) -> Iterator[Any]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def write_wds(raw: Path, dst: Path) -> list[str]:
    """The source JPEGs as plain WebDataset shards (one tar); their paths."""
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / "plain-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, f in enumerate(sorted(raw.glob("*/*.jpg"))):
            sink.write({"__key__": f"{f.parent.name}-{f.stem}", "jpg": f.read_bytes(), "cls": str(i % 2).encode()})
    return [str(path)]


def profile_pass(run: LoaderRun, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of one loader pass: the functions with the most own time."""
    prof = cProfile.Profile()
    prof.runcall(run.loader)
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls": v[1], "tottime_s": v[2], "cumtime_s": v[3],
             "share_of_total": v[2] / total} for (f, line, name), v in rows]  # fmt: skip


def bench_resolution(tmp: Path, resolution: int, args: argparse.Namespace) -> dict[str, Any]:
    raw = tmp / f"raw{resolution}"
    source_bytes = write_image_folder(raw, args.images, resolution, seed=resolution)
    url = shard_folder(raw, tmp / f"shards{resolution}")
    run = LoaderRun(url, write_wds(raw, tmp / f"wds{resolution}"), resolution, args.images, args.batch)
    run.loader()  # warm-up pass: imports, file cache, and the tile lists for the bound
    run.prepare_bound()
    load_before = load_avg()
    steps = {"loader": run.loader, "bound": run.bound, "webdataset_full": run.webdataset_full,
             "loader_no_colour_jitter": lambda: run.loader(colour_jitter=False)}  # a diagnostic: what jitter costs
    timings = interleaved(steps, args.rounds, warmup=0)
    row: dict[str, Any] = {
        "resolution": resolution, "samples": args.images, "batch": args.batch, "source_jpeg_bytes": source_bytes,
        "timings": {k: t.summary() for k, t in timings.items()},
        "decoded_px_per_sample": run.decoded / args.images, "full_px_per_sample": resolution**2,
        "tiles_match": run.planned == run.decoded, "tiles_per_sample": len(run.tiles) / args.images,
        "load_avg_before": load_before, "load_avg_after": load_avg(),
    }  # fmt: skip
    per = {k: t.per_s() for k, t in timings.items()}
    per_cpu = {k: t.per_cpu_s() for k, t in timings.items()}
    row["fraction_of_decode_bound"] = ratio(per["loader"], per["bound"])
    row["fraction_of_decode_bound_cpu"] = ratio(per_cpu["loader"], per_cpu["bound"])
    row["speedup_vs_webdataset_full_decode"] = ratio(per["loader"], per["webdataset_full"])
    row["fraction_of_decode_bound_no_colour_jitter"] = ratio(per["loader_no_colour_jitter"], per["bound"])
    if args.profile:
        row["profile_top"] = profile_pass(run)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1792 px only, 12 images")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of one loader pass to the JSON")
    parser.add_argument("--resolutions", type=int, nargs="+", help="default 896 1792 3584 (quick: 1792)")
    parser.add_argument("--images", type=int, help="samples per pass (default 32, quick 12)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5, quick 3)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.resolutions = args.resolutions or ([1792] if args.quick else [896, 1792, 3584])
    args.images = args.images or (12 if args.quick else 32)
    args.rounds = args.rounds or (3 if args.quick else 5)
    for r in args.resolutions:
        tnet_config(r)  # refuse a bad resolution before generating anything
    if min(args.images, args.batch, args.rounds) < 1:
        parser.error("--images, --batch and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one core for every variant: the bound is single-threaded
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        for r in args.resolutions:
            rows[str(r)] = row = bench_resolution(Path(tmp), r, args)
            t = row["timings"]
            print(f"{r} px: loader {t['loader']['per_s']:.1f} samples/s, bound {t['bound']['per_s']:.1f}, "
                  f"webdataset full decode {t['webdataset_full']['per_s']:.1f}; fraction of bound "
                  f"{row['fraction_of_decode_bound']:.2f} (CPU time {row['fraction_of_decode_bound_cpu']:.2f}), "
                  f"vs webdataset {row['speedup_vs_webdataset_full_decode']:.2f}x; decoded "
                  f"{row['decoded_px_per_sample'] / row['full_px_per_sample']:.1%} of the pixels; "
                  f"load {row['load_avg_before']:.1f}", flush=True)  # fmt: skip
    head = HEADLINE if HEADLINE in rows else next(iter(rows))
    result: dict[str, Any] = {
        "benchmark": "loader", "mode": "quick" if args.quick else "full", "headline_resolution": int(head),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out_dir")},
        "machine": machine_info(), "resolutions": rows, "target_fraction_of_decode_bound": TARGET,
    }  # fmt: skip
    for key in ("fraction_of_decode_bound", "fraction_of_decode_bound_cpu", "speedup_vs_webdataset_full_decode",
                "fraction_of_decode_bound_no_colour_jitter"):
        result[key] = rows[head][key]
        result[f"{key}_by_resolution"] = {r: row[key] for r, row in rows.items()}
    result["target_met"] = result["fraction_of_decode_bound"] >= TARGET
    path = write_json(result, result_path("loader", args.quick, "json", args.out_dir))
    panels = {"samples/s (one core)": {k: [row["timings"][k]["per_s"] for row in rows.values()]
                                       for k in ("bound", "loader", "loader_no_colour_jitter", "webdataset_full")}}  # fmt: skip
    result["plot"] = str(bar_panels(path.with_suffix(".png"), "Training loader vs. decode bound vs. webdataset full decode",
                                    [f"{r} px" for r in rows], panels, "samples/s", log=True))  # fmt: skip
    return finish(result, path, args.json)


if __name__ == "__main__":
    main()
