"""Train TNet with Ray Train on shards written by jobs/shard.py, tracked in MLflow.

    python jobs/train.py --config configs/megapixel_mnist.yaml [--set train.epochs=3 ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/fmow_448.yaml

Without a cluster (no --address, no RAY_ADDRESS) a local Ray starts on 127.0.0.1. Re-running
with the same train.run_name and train.storage_path resumes from the latest checkpoint. At the end
the model is registered in MLflow under tracking.model_name with alias "candidate", and the
attention pictures are written under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

# jobs/ must not shadow the standard library (jobs/profile.py vs profile): the project root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from training.config import load_job_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/*.yaml (sections model, loss, data, train, tracking)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--out", default="outputs/train", help="folder for attention pictures and the summary")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the outcome")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from training.driver import train

    cfg = load_job_config(args.config, args.overrides)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray replaces 127.0.0.1 with the host's network address so other nodes can join; with
        # this switch at "0" a private local cluster stays on the loopback interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        cpus = max(2, int(cfg.train.num_workers * cfg.train.cpus_per_worker + 0.999))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    outcome = train(cfg, Path(args.out).resolve() / cfg.train.run_name)
    summary = asdict(outcome)
    summary.pop("metrics")
    print(f"run {outcome.run_id}: test accuracy {outcome.test_accuracy:.4f}, decoded pixel fraction "
          f"{outcome.decoded_pixel_fraction:.4f}, model {outcome.model_uri}")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
