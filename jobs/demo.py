"""`make demo`: the whole pipeline on built-in Megapixel MNIST, on this machine, in a few minutes.

1. generate and shard Megapixel MNIST with jobs/shard.py into a local folder store (.demo/data);
2. start a local Ray head on 127.0.0.1 (`ray start --head`);
3. submit jobs/train.py with `ray job submit` (tracking to a SQLite MLflow store in .demo/);
4. evaluate the registered candidate with jobs/evaluate.py (accuracy/complexity curve, promotion);
5. stop Ray and say where to look; the last line is one JSON object with the same facts.

    python jobs/demo.py [--config configs/megapixel_mnist_demo.yaml] [--n-train 3000] [--n-test 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path[0] = str(Path(__file__).resolve().parents[1])
from training.local_head import free_ports, start_head, stop_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run(cmd: list[str], env: dict[str, str], capture: bool = False) -> str:
    """Run a command, streaming its output; return it too when ``capture``."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print("   " + line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return "".join(lines) if capture else ""


def last_json(text: str, key: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and key in line:
            return json.loads(line)
    raise SystemExit(f"demo: no JSON line with {key!r} in the output")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/megapixel_mnist_demo.yaml")
    parser.add_argument("--workdir", default=".demo", help="where data, checkpoints and MLflow go")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=640, help="canvas side (digits stay 28 px)")
    parser.add_argument("--n-noise", type=int, default=9,
                        help="line-noise stamps; 9 on 640 px keeps the benchmark's 50 per 1500 px density")
    parser.add_argument("--fresh", action="store_true", help="delete the work folder first")
    args = parser.parse_args(argv)
    start = time.monotonic()
    work = (ROOT / args.workdir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    data, results, outputs = work / "data" / "megapixel-mnist", work / "ray_results", work / "outputs"
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    # A new run each time (same name = resume in jobs/train.py, which would hand back the last
    # demo's finished model); MLflow keeps every demo run and the registry gets a new version.
    run_name = f"{yaml.safe_load((ROOT / args.config).read_text())['train']['run_name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the local Ray on 127.0.0.1 (Ray otherwise swaps
    # 127.0.0.1 for the host's network address so that other machines could join).
    env = dict(os.environ, RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=tracking_uri,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")

    step(f"1/4 Generating and sharding Megapixel MNIST ({args.n_train} train / {args.n_test} test canvases)")
    run([PY, "jobs/shard.py", "megapixel-mnist", "--dst", str(data), "--option", f"n_train={args.n_train}",
         "--option", f"n_test={args.n_test}", "--option", f"size={args.size}",
         "--option", f"n_noise={args.n_noise}", "--tile", "64",
         "--shard-bytes", "4MB", "--workers", "2"], env)

    step("2/4 Starting a local Ray head on 127.0.0.1")
    ray_bin = str(Path(PY).parent / "ray")
    ray_temp = tempfile.mkdtemp(prefix="ray-demo-", dir="/tmp")  # short: Ray's socket paths live under it
    head_log = work / "ray_head.log"
    head, address = start_head(ray_bin, ray_temp, free_ports(), 2, head_log, env)
    print(f"   Ray head up, job server {address} (log: {head_log})", flush=True)
    try:
        step("3/4 Submitting training with `ray job submit`")
        train_out = run([ray_bin, "job", "submit", "--address", address, "--working-dir", ".",
                         "--", "python", "jobs/train.py", "--config", args.config, "--address", "auto",
                         "--set", f"data.url={data}", "--set", f"train.storage_path={results}",
                         "--set", f"train.run_name={run_name}",
                         "--set", f"tracking.tracking_uri={tracking_uri}", "--out", str(outputs), "--json"],
                        env, capture=True)
        trained = last_json(train_out, '"run_id"')
    finally:
        step("Stopping the demo's Ray head (other Ray clusters on this machine are left alone)")
        stop_tree(head)
        shutil.rmtree(ray_temp, ignore_errors=True)

    step("4/4 Evaluating models:/…@candidate across numbers of locations, promoting to champion if better")
    model_uri = trained["model_uri"]
    eval_out = run([PY, "jobs/evaluate.py", "--model", model_uri, "--data", str(data), "--split", "test",
                    "--locations", "1", "2", "4", "6", "--tracking-uri", tracking_uri,
                    "--out", str(outputs / "evaluate"), "--promote", "--json"], env, capture=True)
    evaluated = last_json(eval_out, '"accuracy_by_locations"')

    minutes = (time.monotonic() - start) / 60
    shards = str(data)
    print("\n" + "=" * 78)
    print(f"Demo finished in {minutes:.1f} min.")
    print(f"  Test accuracy        {evaluated['accuracy']:.1%} on {evaluated['images']} canvases "
          f"(accuracy by locations: {evaluated['accuracy_by_locations']})")
    print(f"  Decoded pixels       {evaluated['decoded_pixel_fraction']:.1%} of the full-resolution pixels")
    print(f"  Registered model     {model_uri}  (promotion: {evaluated.get('promotion')})")
    pictures = trained.get("pictures") or []
    print(f"  Attention pictures   {Path(pictures[0]).parent if pictures else outputs}")
    for p in pictures[:3]:
        print(f"                       {p}")
    print(f"  Accuracy/GFLOPs      {evaluated.get('curve')}")
    print(f"  Shards + manifest    {shards}")
    print(f"  MLflow UI            {Path(PY).parent / 'mlflow'} ui --backend-store-uri {tracking_uri}")
    print("=" * 78)
    summary = {"tracking_uri": tracking_uri, "model_uri": model_uri, "test_accuracy": evaluated["accuracy"],
               "decoded_pixel_fraction": evaluated["decoded_pixel_fraction"], "shards": shards,
               "minutes": round(minutes, 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
