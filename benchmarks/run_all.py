"""`make bench`: every benchmark in quick mode, one after another; results in benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ["tile_size.py", "--json"],
    ["shard_throughput.py", "--quick", "--json"],
]


def main() -> int:
    failed = []
    for args in BENCHMARKS:
        print(f"==> {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], cwd=HERE.parent).returncode:
            failed.append(args[0])
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
