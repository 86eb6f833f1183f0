"""Accuracy and GFLOPs against the number of attended locations, through the evaluation job's code.

    python benchmarks/accuracy_complexity.py --model models:/tnet-megapixel-mnist@champion \\
        --data data/megapixel-mnist [--split test] [--locations 1 2 4 6 8] [--limit 500] [--json]
    python benchmarks/accuracy_complexity.py --quick [--json]

TNet's k (locations per level) can change at inference without retraining: this sweeps it and
records, per setting, the accuracy over the split (``training.evaluation.evaluate_loader``, the
lazy loader and ``PyramidRegionSource``, as ``jobs/evaluate.py`` uses through
``training.assessment``), GFLOPs per image (``tnet.profiling.profile``, torch's counter), the
decoded-pixel fraction and images/s; plus the full-resolution backbone's GFLOPs for reference.

With ``--model`` (an MLflow model URI, loaded as ``jobs/evaluate.py`` does) ``--data`` is required.
Without a model nothing is trained: a freshly initialised (seeded) TNet runs on a generated
Megapixel MNIST test split (``--quick``: the tiny 512 px geometry of the tests, 16 canvases; full:
configs/megapixel_mnist.yaml's 1500 px geometry, 48 canvases). Its accuracy is chance: that run
only exercises the pipeline and the FLOPs curve, and the JSON says so (``"untrained": true``).

Results: benchmarks/results/accuracy_complexity[.quick].json and .png (accuracy vs. GFLOPs);
with --json the last printed line is the JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == _ROOT / "benchmarks":
    sys.path[0] = str(_ROOT)  # run as a script: the project root, not benchmarks/, comes first
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from benchmarks.common import finish, load_avg, machine_info, result_path, write_json  # noqa: E402
from tnet.config import TNetConfig  # noqa: E402
from tnet.configtools import from_dict, load_yaml  # noqa: E402
from tnet.model import TNet  # noqa: E402
from tnet.profiling import profile  # noqa: E402
from training.assessment import parse_locations  # noqa: E402
from training.config import DataConfig, JobConfig  # noqa: E402
from training.evaluation import evaluate_loader  # noqa: E402
from training.pictures import curve_png  # noqa: E402

QUICK_MODEL = TNetConfig(num_classes=10, backbone="tiny_s", in_chans=1, input_size=512, base_size=64, levels=2,
                         grid=4, overlap=0.3, locations=(2,), pos_channels=48)  # fmt: skip
QUICK_DATA = {"n_train": 0, "n_test": 16, "size": 512}
FULL_DATA = {"n_train": 0, "n_test": 48, "size": 1500}


def default_settings(cfg: TNetConfig, quick: bool) -> list[str]:
    """k = 1, 2, 4, 8, ... at every level, up to the grid's cells (quick: the first three)."""
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= cfg.grid**2]
    return [str(k) for k in (ks[:3] if quick else ks)]


def generated_data(tmp: Path, quick: bool) -> tuple[str, TNetConfig]:
    """A Megapixel MNIST test split sharded by the project's code, and the untrained model's config."""
    from pipeline.ray_shard import run_serial, run_sharding
    from pipeline.shard_config import ShardConfig

    if quick:
        options, tile, cfg = QUICK_DATA, 128, QUICK_MODEL
    else:
        options, tile = FULL_DATA, 256
        cfg = from_dict(TNetConfig, load_yaml(_ROOT / "configs" / "megapixel_mnist.yaml")["model"], "model")
    dst = tmp / "megapixel-mnist"
    run_sharding(ShardConfig(dataset="megapixel-mnist", dst=str(dst), splits=("test",), source_options=dict(options),
                             tile=tile, calibrate=0, progress=False, verify="size"), runner=run_serial)  # fmt: skip
    return str(dst), cfg


def sweep(model: TNet, data: DataConfig, split: str, settings: list[str], limit: int | None,
          batch_size: int) -> list[dict[str, Any]]:  # fmt: skip
    """One evaluation pass per setting (the model's own first): accuracy, GFLOPs, decoded fraction, speed."""
    cfg = JobConfig(model=model.cfg, data=data)
    default = ",".join(str(k) for k in model.cfg.inference_locations)
    rows = []
    with ThreadPoolExecutor(data.decode_threads) as pool:
        for text in dict.fromkeys([default, *settings]):
            locs = parse_locations(text, model.cfg.levels)
            ev = evaluate_loader(model, cfg, split, pool, limit=limit, locations=locs, batch_size=batch_size)
            prof = profile(model.cfg, locs)
            summary = ev.summary()
            rows.append({"locations": ",".join(map(str, locs)), "default": text == default,
                         "accuracy": ev.accuracy, "gflops": prof.gflops, "features_per_image": prof.features_per_image,
                         "pixels_processed": prof.pixels_processed, "images": ev.seen,
                         "decoded_pixel_fraction": summary["decoded_pixel_fraction"],
                         "images_per_s": summary["images_per_s"],
                         "accuracy_by_level": [summary[f"acc_level{i}"] for i in range(len(ev.correct_by_level))],
                         "full_res_gflops": prof.baseline_gflops})  # fmt: skip
            print(f"locations {rows[-1]['locations']}: accuracy {ev.accuracy:.4f} over {ev.seen} images, "
                  f"{prof.gflops:.3f} GFLOPs ({prof.features_per_image} features), decoded "
                  f"{summary['decoded_pixel_fraction']:.1%} of the pixels, {summary['images_per_s']:.1f} images/s",
                  flush=True)  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="MLflow model URI, e.g. models:/NAME@champion (default: untrained, generated data)")
    parser.add_argument("--data", help="dataset prefix written by jobs/shard.py (required with --model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--locations", nargs="*", default=None, help="settings such as 2 or 2,1 (default 1 2 4 8 ...)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per setting")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the project's SQLite")
    parser.add_argument("--quick", action="store_true", help="without --model: the tiny geometry, 16 canvases")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.model and not args.data:
        parser.error("--model needs --data (the dataset prefix the model is evaluated on)")
    if args.data and not args.model:
        parser.error("--data needs --model (without a model the data is generated)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    load_before = load_avg()
    with tempfile.TemporaryDirectory(prefix="acc-flops-") as tmp:
        if args.model:
            import mlflow

            from training.assessment import load_tnet
            from training.tracking import resolve_tracking_uri

            mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
            model = load_tnet(args.model)
            url = args.data if "://" in args.data else str(Path(args.data).resolve())
        else:
            url, cfg = generated_data(Path(tmp), args.quick)
            model = TNet(cfg)
        settings = args.locations if args.locations is not None else default_settings(model.cfg, args.quick)
        data = DataConfig(url=url, val_split=args.split, decode_threads=2)
        rows = sweep(model, data, args.split, settings, args.limit, args.batch)
    result: dict[str, Any] = {
        "benchmark": "accuracy_complexity", "mode": "quick" if args.quick else "full",
        "model": args.model or "untrained TNet (seeded init)", "untrained": not args.model,
        "data": args.data or "generated Megapixel MNIST test split", "split": args.split,
        "model_config": {k: getattr(model.cfg, k) for k in ("backbone", "input_size", "base_size", "levels", "grid",
                                                             "overlap", "locations", "num_classes")},
        "points": rows, "machine": machine_info(), "load_avg_before": load_before, "load_avg_after": load_avg(),
    }  # fmt: skip
    if not args.model:
        result["note"] = ("no model given: a freshly initialised TNet, trained on nothing, on generated data; "
                          "the accuracy is chance and only the pipeline and the GFLOPs curve are exercised")  # fmt: skip
    path = write_json(result, result_path("accuracy_complexity", args.quick, "json", args.out_dir))
    points = sorted((r["gflops"], r["accuracy"], f"k={r['locations']}") for r in rows)
    result["plot"] = str(curve_png(points, path.with_suffix(".png"), "GFLOPs per image", "accuracy"))
    return finish(result, path, args.json)


if __name__ == "__main__":
    main()
