"""Evaluate a registered TNet on a sharded split, across numbers of locations; optionally promote.

    python jobs/evaluate.py --model models:/tnet-megapixel-mnist@candidate --data data/megapixel-mnist \
        --split test --locations 1 2 4 6 8 --json [--promote]

Accuracy at the model's configured locations (its model.eval_locations, else model.locations: the k
it was trained with) and at each --locations setting ("2" = k=2 at every level, "2,1" = per level),
the accuracy/GFLOPs curve as a PNG (logged to MLflow), the decoded-pixel fraction and images/s.
--promote evaluates models:/NAME@champion on the same data and moves the "champion" alias to the
candidate when the candidate is strictly more accurate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

# jobs/ must not shadow the standard library (jobs/profile.py vs profile): the project root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from tnet.configtools import parse_override  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/NAME@candidate")
    parser.add_argument("--data", required=True, help="dataset prefix written by jobs/shard.py")
    parser.add_argument("--split", default="test")
    parser.add_argument("--locations", nargs="*", default=[], help='settings such as 2 or 2,1 (one per curve point)')
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    parser.add_argument("--storage-option", action="append", default=[], metavar="K=V", help="fsspec option")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the project's SQLite")
    parser.add_argument("--out", default="outputs/evaluate", help="folder for the curve PNG")
    parser.add_argument("--promote", action="store_true", help="candidate -> champion when strictly better")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)

    import mlflow
    from mlflow.tracking import MlflowClient

    from training.assessment import alias_version, assess, promote
    from training.config import DataConfig
    from training.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    options = {}
    for item in args.storage_option:
        path, value = parse_override(item)
        options[".".join(path)] = value
    data_url = args.data if "://" in args.data else str(Path(args.data).resolve())
    data = DataConfig(url=data_url, storage_options=options)
    out_dir = Path(args.out).resolve()
    result = assess(args.model, data, args.split, args.locations, args.limit, out_dir)
    summary = asdict(result)
    mlflow.set_experiment("evaluation")
    with mlflow.start_run(run_name=f"evaluate {args.model}"):
        mlflow.log_params({"model_uri": args.model, "data": args.data, "split": args.split})
        mlflow.log_metrics({"accuracy": result.accuracy, "decoded_pixel_fraction": result.decoded_pixel_fraction,
                            "images_per_s": result.images_per_s})
        for name, acc in result.accuracy_by_locations.items():
            mlflow.log_metric(f"accuracy_k{name.replace(',', '_')}", acc)
        if result.curve:
            mlflow.log_artifact(result.curve)
    print(f"{args.model} on {args.split}: accuracy {result.accuracy:.4f} over {result.images} images, "
          f"decoded pixel fraction {result.decoded_pixel_fraction:.4f}, {result.images_per_s:.1f} images/s")
    for name, acc in result.accuracy_by_locations.items():
        print(f"  locations {name}: accuracy {acc:.4f}, {result.gflops_by_locations[name]:.3f} GFLOPs")
    if args.promote:
        if "@" not in args.model:
            raise SystemExit(f"--promote: {args.model} is not a models:/NAME@ALIAS URI")
        name = args.model.removeprefix("models:/").split("@")[0]
        client = MlflowClient(uri)
        champ_acc = None
        if alias_version(client, name, "champion") is not None:
            champ_acc = assess(f"models:/{name}@champion", data, args.split, (), args.limit).accuracy
        summary["promotion"] = promote(client, name, result.accuracy, champ_acc)
        summary["champion_accuracy"] = champ_acc
        print(f"  promotion: {summary['promotion']}")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
