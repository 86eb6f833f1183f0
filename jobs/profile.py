"""FLOPs and parameters of TNet versus the plain backbone at full input resolution.

    python jobs/profile.py --config configs/fmow_896.yaml [--locations 2 1] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# This file is named like the standard library's profile module, which torch imports: put the
# project root, not jobs/, first on the path.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from tnet.config import TNetConfig  # noqa: E402
from tnet.configtools import from_dict, load_yaml  # noqa: E402
from tnet.profiling import profile  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a configs/*.yaml file (its model: section is used)")
    parser.add_argument("--locations", type=int, nargs="+", help="k per level, overriding the config")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = parser.parse_args(argv)
    cfg = from_dict(TNetConfig, load_yaml(args.config).get("model", {}), "model")
    result = dataclasses.asdict(profile(cfg, args.locations))
    result["config"] = args.config
    result["locations"] = list(args.locations or cfg.inference_locations)
    print(f"{args.config}: {cfg.backbone}, input {cfg.input_size} px, base {cfg.base_size} px, "
          f"{cfg.levels} levels, locations {result['locations']}")
    print(f"  features/image {result['features_per_image']}, TNet {result['gflops']:.3f} GFLOPs, "
          f"baseline {result['baseline_gflops']:.3f} GFLOPs, ratio {result['flops_ratio']:.2f}x, "
          f"params {result['params'] / 1e6:.2f} M")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
