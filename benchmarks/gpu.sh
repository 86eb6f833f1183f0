#!/usr/bin/env bash
# One command for a bare CUDA machine with torch already installed:
#
#     bash benchmarks/gpu.sh            # from the repository root (or anywhere: it cd's there)
#
# 1. checks that torch sees a CUDA device;
# 2. installs only the Python modules that are missing, from the package index, with the installed
#    torch pinned (so pip never replaces it): torchvision, timm, webdataset, tifffile, imagecodecs,
#    pyarrow, fsspec, pyyaml, psutil, matplotlib, tqdm and ray (pipeline/ray_shard.py imports it,
#    even for the serial sharding the benchmark uses);
# 3. installs this project with `pip install -e . --no-deps`;
# 4. runs benchmarks/lazy_vs_full.py --quick --device cuda (448 and 896 px, batch 16; tiles of the
#    attended regions decoded by nvJPEG through pipeline/gpu_decode.py) within 5 minutes and prints
#    its JSON (also written to benchmarks/results/lazy_vs_full_cuda.quick.json and .png).
#
# PYTHON=/path/to/python overrides the interpreter; GPU_BENCH_ARGS adds arguments to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: torch sees no CUDA device")'

missing=$("$PY" - <<'PYEOF'
import importlib.util

modules = {"torchvision": "torchvision", "timm": "timm", "webdataset": "webdataset", "tifffile": "tifffile",
           "imagecodecs": "imagecodecs", "pyarrow": "pyarrow", "fsspec": "fsspec", "yaml": "pyyaml",
           "psutil": "psutil", "matplotlib": "matplotlib", "tqdm": "tqdm", "ray": "ray", "PIL": "pillow",
           "numpy": "numpy"}
print(" ".join(pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
    pins=$(mktemp)
    "$PY" -c 'import torch; print(f"torch=={torch.__version__}")' > "$pins"
    echo "gpu.sh: installing $missing (torch pinned: $(cat "$pins"))" >&2
    # shellcheck disable=SC2086  # one argument per package
    "$PY" -m pip install --quiet -c "$pins" $missing
    rm -f "$pins"
fi
"$PY" -m pip install --quiet --no-deps -e .

timeout 300 "$PY" benchmarks/lazy_vs_full.py --quick --device cuda --json ${GPU_BENCH_ARGS:-} | tail -n 1
