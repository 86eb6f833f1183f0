"""`make bench`: every benchmark, one after another, in quick mode (``--full``: full mode).

    python benchmarks/run_all.py [--full] [--only NAME ...]

Results go to benchmarks/results/ (``NAME.quick.json`` / ``NAME.json`` and a PNG per benchmark).
Each benchmark runs in its own process, so one failing does not stop the others; the exit status
is 1 when any failed. benchmarks/gpu.sh is separate: it needs a CUDA machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, arguments in quick mode, arguments in full mode)
BENCHMARKS = [
    ("tile_size.py", ["--json"], ["--json"]),  # no quick mode: always its 4096 px run
    ("shard_throughput.py", ["--quick", "--json"], ["--json"]),
    ("lazy_vs_full.py", ["--quick", "--json"], ["--json"]),
    ("loader.py", ["--quick", "--json"], ["--json"]),
    ("accuracy_complexity.py", ["--quick", "--json"], ["--json"]),
    ("ddp_scaling.py", ["--quick", "--json"], ["--json"]),  # quick ~2 min, full ~10 min (3 rounds of 800 images)
    # quick ~7 min; full: TNet and the baseline at once, one core each, 60 min + ~5 min sharding and evaluation
    ("megapixel_mnist.py", ["--quick", "--json"], ["--jobs", "2", "--threads", "1", "--json"]),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full mode (minutes to tens of minutes each)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. loader lazy_vs_full)")
    args = parser.parse_args(argv)
    selected = [b for b in BENCHMARKS if not args.only or b[0].removesuffix(".py") in args.only]
    if args.only and len(selected) != len(args.only):
        known = [b[0].removesuffix(".py") for b in BENCHMARKS]
        parser.error(f"--only {args.only}: known benchmarks are {known}")
    failed = []
    for script, quick, full in selected:
        cmd = [sys.executable, str(HERE / script), *(full if args.full else quick)]
        print(f"==> {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=HERE.parent).returncode:
            failed.append(script)
        print(f"<== {script}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
