"""Which pyramid tile size? Storage overhead, build time and lazy-read cost per tile size.

    python benchmarks/tile_size.py [--json] [--side 4096] [--regions 20]

Images (generated, no downloads), each ``side`` x ``side`` RGB:
- ``photo``: multi-scale photo-like texture with sensor-like noise (JPEG ~2-4 bits/pixel);
- ``astronaut``: scikit-image's ``data.astronaut()`` upsampled bicubic (smooth, compresses well).

For tile sizes 128, 192, 256 and 512 (reference):
- storage: pyramid bytes vs one plain JPEG of the image at the same quality (Pillow, 4:2:0),
  and level-0 bytes alone (what tiling costs, apart from the ~1/3 of the coarser levels);
- build_s / build_cpu_s: ``build_pyramid`` wall and CPU time (best of 3);
- reads: ``regions`` TNet-like boxes (square, side 256..1024 px, anywhere in the image, seeded)
  read at 224 x 224 by a fresh ``PyramidReader`` (cold cache), best of 5: wall and CPU ms per
  region (CPU time is steadier on a shared machine), decoded
  pixels per region, and the waste ``decoded / needed`` (needed = the box's area at the level
  read);
- eager baseline (once per image): decode the plain JPEG whole, then crop+resize the same boxes.

Results go to benchmarks/results/tile_size.json with machine info; with --json the last printed
line is the same JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.images import decode_image  # noqa: E402
from pipeline.pyramid import PyramidReader, build_pyramid  # noqa: E402
from pipeline.resample import choose_level, level_box  # noqa: E402

TILES = (128, 192, 256, 512)
QUALITY, OUT = 90, 224


def photo(rng: np.random.Generator, side: int) -> np.ndarray:
    """Photo-like RGB: smooth structure at several scales plus sensor-like noise."""
    out = np.zeros((side, side, 3), np.float32)
    for cells, weight in ((4, 0.5), (32, 0.3), (256, 0.15)):
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        out += weight * np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC), np.float32)
    out += rng.normal(0, 4, out.shape).astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def astronaut(side: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC))


def boxes(rng: np.random.Generator, side: int, n: int) -> list[tuple[float, float, float, float]]:
    out = []
    for _ in range(n):
        s = rng.uniform(256, 1024)
        x, y = rng.uniform(0, side - s, 2)
        out.append((x, y, x + s, y + s))
    return out


def best(fn, repeats: int) -> tuple[float, float, Any]:
    """Best wall time and best CPU time (this process) of ``repeats`` calls, and the last result.

    CPU time is the steadier number on a shared machine: other processes stretch wall time only.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), result


def jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def measure_tile(img: np.ndarray, tile: int, regions: list, plain: int) -> dict[str, Any]:
    build_s, build_cpu_s, data = best(lambda: build_pyramid(img, tile=tile, quality=QUALITY), 3)

    def cold_read() -> PyramidReader:
        reader = PyramidReader(data)
        reader.read_regions(regions, OUT)
        return reader

    read_s, read_cpu_s, reader = best(cold_read, 5)
    side = img.shape[0]
    needed = 0.0
    for box in regions:
        lvl = choose_level(box, (OUT, OUT), reader.levels)
        lb = level_box(box, (side, side), reader.levels[lvl])
        needed += (lb[2] - lb[0]) * (lb[3] - lb[1])
    level0 = reader.level_bytes(0)
    return {
        "tile": tile, "levels": len(reader.levels), "pyramid_bytes": len(data), "level0_bytes": level0,
        "overhead_vs_jpeg": len(data) / plain, "level0_overhead_vs_jpeg": level0 / plain,
        "build_s": build_s, "build_cpu_s": build_cpu_s, "read_ms_per_region": 1e3 * read_s / len(regions),
        "read_cpu_ms_per_region": 1e3 * read_cpu_s / len(regions),
        "decoded_px_per_region": reader.decoded_pixels / len(regions),
        "tiles_per_region": reader.tiles_decoded / len(regions),
        "bytes_read_per_region": reader.bytes_read / len(regions),
        "decode_waste": reader.decoded_pixels / needed,
    }


def eager(plain: bytes, regions: list) -> dict[str, Any]:
    def run() -> None:
        full = decode_image(plain, "plain.jpg", 3)
        im = Image.fromarray(full)
        for box in regions:
            im.resize((OUT, OUT), Image.BILINEAR, box=box)

    seconds, cpu_seconds, _ = best(run, 5)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "ms_per_region": 1e3 * seconds / len(regions),
            "cpu_ms_per_region": 1e3 * cpu_seconds / len(regions)}


def machine() -> dict[str, Any]:
    import PIL
    import tifffile

    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model or platform.processor(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "pillow": PIL.__version__, "numpy": np.__version__,
            "tifffile": tifffile.__version__, "load_avg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--regions", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    regions = boxes(rng, args.side, args.regions)
    images = {"photo": photo(rng, args.side), "astronaut": astronaut(args.side)}
    result: dict[str, Any] = {"side": args.side, "regions": args.regions, "out": OUT, "quality": QUALITY,
                              "machine": machine(), "images": {}}
    for name, img in images.items():
        plain = jpeg_bytes(img)
        rows = [measure_tile(img, t, regions, len(plain)) for t in TILES]
        result["images"][name] = {"jpeg_bytes": len(plain), "eager": eager(plain, regions), "tiles": rows}
        print(f"\n{name}: {args.side}x{args.side} RGB, plain JPEG q{QUALITY} {len(plain) / 1e6:.2f} MB, "
              f"eager (decode whole + {args.regions} crops) {result['images'][name]['eager']['cpu_ms_per_region']:.1f} "
              "CPU ms/region")
        print(f"{'tile':>5} {'levels':>6} {'pyr/jpeg':>9} {'L0/jpeg':>8} {'build s':>8} {'CPU ms/reg':>11} "
              f"{'wall ms/reg':>12} {'MPx/region':>11} {'tiles/reg':>10} {'waste':>6}")
        for r in rows:
            print(f"{r['tile']:>5} {r['levels']:>6} {r['overhead_vs_jpeg']:>9.3f} {r['level0_overhead_vs_jpeg']:>8.3f} "
                  f"{r['build_cpu_s']:>8.2f} {r['read_cpu_ms_per_region']:>11.2f} {r['read_ms_per_region']:>12.2f} "
                  f"{r['decoded_px_per_region'] / 1e6:>11.3f} {r['tiles_per_region']:>10.1f} {r['decode_waste']:>6.2f}")
    out = REPO / "benchmarks" / "results" / "tile_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
