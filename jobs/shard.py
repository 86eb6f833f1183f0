"""Shard a raw dataset into WebDataset tar shards of tiled pyramids, with a manifest, on Ray.

Runs on a laptop (a local Ray on 127.0.0.1 with --workers CPUs) or on a cluster:

    python jobs/shard.py megapixel-mnist --dst data/mpmnist --option n_train=200 --option n_test=50
    python jobs/shard.py fmow --src s3://raw/fmow-rgb --dst s3://shards/fmow --shard-bytes 1GiB \\
        --storage-option client_kwargs.endpoint_url=http://minio:9000
    ray job submit --working-dir . -- python jobs/shard.py imagenet --src /data/ilsvrc --dst s3://shards/in1k
    python jobs/shard.py slides --src /data/slides --dst s3://shards/wsi --shard-bytes 2GiB  # labels.csv in src

Gigapixel inputs (slides, and folder images over the folder's stream_pixels) are built streaming:
memory stays flat whatever the image size. For slides --max-pixels defaults to 64 Gi pixels.

Settings come from the ShardConfig defaults, then --config YAML, then the flags, then --set a.b=c.
S3 credentials and endpoint come from --storage-option or the standard AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...); they never reach logs or
dataset.json. Killing the job at any time and re-running it resumes: committed shards are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

try:
    import pipeline  # noqa: F401 - installed package, or the working dir of `ray job submit`
except ImportError:  # `python jobs/shard.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import PipelineError
from pipeline.ray_shard import Summary, build_source, run_sharding
from pipeline.shard_config import ShardConfig, parse_size
from pipeline.sources.slides import DEFAULT_SLIDE_MAX_PIXELS
from pipeline.storage import redact
from tnet.configtools import apply_overrides, from_dict, load_yaml

DATASETS = ("fmow", "imagenet", "megapixel-mnist", "folder", "slides")
_FLAGS = {  # argparse dest -> ShardConfig field
    "src": "src", "dst": "dst", "splits": "splits", "tile": "tile", "quality": "quality",
    "max_side": "max_side", "max_pixels": "max_pixels", "shard_bytes": "shard_bytes", "seed": "seed",
    "workers": "workers", "task_cpus": "task_cpus", "max_retries": "max_retries", "verify": "verify",
    "address": "address",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    fields = ", ".join(
        f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f"{f.name}={{}}"
        for f in dataclasses.fields(ShardConfig)
    )
    parser = argparse.ArgumentParser(
        prog="jobs/shard.py",
        description=__doc__,
        epilog=f"ShardConfig fields (YAML keys and --set names, with defaults): {fields}. "
        "Output format: docs/format.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=DATASETS, help="source to read (megapixel-mnist is generated, needs no --src)")
    parser.add_argument("--src", help="raw dataset root: local path, file:// or s3:// URL")
    parser.add_argument("--dst", help="output prefix: local path, file:// or s3:// URL (required)")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT", help="splits to shard (default: all the source has)")
    parser.add_argument("--tile", type=int, help="pyramid tile side in pixels, multiple of 16 (default 256)")
    parser.add_argument("--quality", type=int, help="JPEG quality of the tiles, 1-100 (default 90)")
    parser.add_argument("--max-side", type=int, help="downscale (antialiased) so the longer side is <= PX; 0 keeps (default)")
    parser.add_argument("--max-pixels", type=parse_size, help="decompression-bomb limit on source pixels, e.g. 1G (default 400M)")
    parser.add_argument("--shard-bytes", type=parse_size, help="target shard size: 512MB, 1GiB, 200k, ... (default 512MiB)")
    parser.add_argument("--seed", type=int, help="seed of the shuffle across shards (default 0)")
    parser.add_argument("--workers", type=int, help="CPUs of the local Ray (default: all cores); ignored on a cluster")
    parser.add_argument("--task-cpus", type=float, help="CPUs reserved per shard task (default 1)")
    parser.add_argument("--max-retries", type=int, help="retries of a failed shard task (default 2)")
    parser.add_argument("--verify", choices=("size", "sha256"), help="on a re-run, how already committed shards are checked before being skipped: size, or sha256 (re-reads them; default)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="K=V",
                        help="fsspec option for --dst (repeatable; dotted keys nest: client_kwargs.endpoint_url=URL)")  # fmt: skip
    parser.add_argument("--option", action="append", default=[], metavar="K=V",
                        help="source option (repeatable), e.g. n_train=20 size=512 for megapixel-mnist")  # fmt: skip
    parser.add_argument("--config", help="YAML file with ShardConfig fields (flags and --set override it)")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override any config field")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset at --dst built with another config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    return parser


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected key=value")
    return apply_overrides({}, items)


def resolve(url: str) -> str:
    """Local paths made absolute here in the driver: Ray workers run in other directories."""
    return url if not url or "://" in url else os.path.abspath(os.path.expanduser(url))


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    """Defaults < --config YAML < flags < --set; then validated by ShardConfig."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    data["dataset"] = args.dataset
    for dest, name in _FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            data[name] = value
    if args.storage_option:
        data["storage_options"] = {**data.get("storage_options", {}), **_key_values(args.storage_option, "--storage-option")}
    if args.option:
        data["source_options"] = {**data.get("source_options", {}), **_key_values(args.option, "--option")}
    if args.overwrite:
        data["overwrite"] = True
    if args.no_progress:
        data["progress"] = False
    data = apply_overrides(data, args.set)
    for name in ("shard_bytes", "max_pixels"):
        if isinstance(data.get(name), str):
            data[name] = parse_size(data[name])
    if args.dataset == "slides":  # the in-memory bomb limit means nothing to a streamed build
        data.setdefault("max_pixels", DEFAULT_SLIDE_MAX_PIXELS)
    cfg = from_dict(ShardConfig, data)
    return dataclasses.replace(cfg, src=resolve(cfg.src), dst=resolve(cfg.dst))


# Ray replaces 127.0.0.1 with the host's first network address so that other nodes can join;
# with this switch at "0" it keeps every local-only cluster on the loopback interface.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(cfg: ShardConfig) -> bool:
    """Join a cluster (``--address``/RAY_ADDRESS) or start a private local Ray; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.address:
        ray.init(address=cfg.address)
    elif os.environ.get("RAY_ADDRESS"):  # set in the driver of a `ray job submit` job
        ray.init(address="auto")
    else:
        os.environ.setdefault(LOOPBACK_ONLY, "0")  # a private Ray stays on 127.0.0.1 (see below)
        ray.init(address="local", num_cpus=cfg.workers or os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1")  # "local": never a stale /tmp/ray/ray_current_cluster
    return True


def main(argv: list[str] | None = None) -> Summary:
    """Parse, start or join Ray, shard, print the summary; returns it (tests call this)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        build_parser().error(str(exc))
    print(f"shard: {json.dumps(redact(dataclasses.asdict(cfg)), default=str)}", file=sys.stderr)
    build_source(cfg)  # a bad dataset option fails here, before Ray spends seconds starting
    started = start_ray(cfg)
    try:
        summary = run_sharding(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(summary.format())
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (PipelineError, ValueError) as exc:  # bad dataset/source option: a message, not a traceback
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(1)
