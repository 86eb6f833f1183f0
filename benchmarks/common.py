"""Shared helpers of the benchmarks: machine info, timing in interleaved rounds, data, JSON and plots.

Every benchmark compares against a baseline measured in the same process and the same run, and
reports ratios: the machine these run on is shared, so absolute numbers move with its load. The
load average is recorded before and after each run. Timings are taken in *interleaved rounds*
(round 1: variant a, b, c; round 2: a, b, c; ...) and summarised by their median, so a burst of
load from another process hits every variant alike instead of one of them.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# -- machine --------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU, cores, versions of what shapes the numbers, torch threads, GPU (if any), load average."""
    import PIL
    import tifffile
    import torch
    import torchvision
    import webdataset

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    info: dict[str, Any] = {
        "cpu": model or platform.processor(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "pillow": PIL.__version__, "numpy": np.__version__, "tifffile": tifffile.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"), "torch_threads": torch.get_num_threads(),
        "load_avg": list(os.getloadavg()),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def load_avg() -> float:
    """The 1-minute load average: above the core count, other processes took part of the CPU."""
    return os.getloadavg()[0]


# -- timing -----------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Raw per-call timings of one variant; ``items`` counts images (or samples) per call."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def per_s(self) -> float:
        """Items per second from the median call (robust to a disturbed call on a shared machine)."""
        if not self.wall:
            return 0.0
        per_item = statistics.median(w / max(n, 1) for w, n in zip(self.wall, self.items))
        return 1.0 / per_item if per_item > 0 else 0.0

    def per_cpu_s(self) -> float:
        """Items per CPU-second of this process (all its threads): steadier under foreign load."""
        if not self.cpu:
            return 0.0
        per_item = statistics.median(c / max(n, 1) for c, n in zip(self.cpu, self.items))
        return 1.0 / per_item if per_item > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"per_s": self.per_s(), "per_cpu_s": self.per_cpu_s(), "wall_s": self.wall,
                               "cpu_s": self.cpu, "items": self.items}  # fmt: skip
        for key, values in self.extra.items():
            out[key] = values
            out[f"{key}_mean"] = float(np.mean(values)) if values else 0.0
        return out


def interleaved(steps: dict[str, Callable[[], tuple[int, dict[str, float]]]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Run every step once per round, in order, ``warmup + rounds`` times; keep the last ``rounds``.

    A step returns ``(items, extra)``: how many images it processed and any per-call figures
    (decoded pixels, ...) to keep. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each
    clock read, so asynchronous GPU work is inside the step that queued it.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds}, warmup={warmup}: need rounds >= 1 and warmup >= 0")
    timings = {name: Timing(name) for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            if sync:
                sync()
            t0, c0 = time.perf_counter(), time.process_time()
            items, extra = step()
            if sync:
                sync()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if r < warmup:
                continue
            t = timings[name]
            t.wall.append(wall)
            t.cpu.append(cpu)
            t.items.append(items)
            for key, value in extra.items():
                t.extra.setdefault(key, []).append(float(value))
    return timings


def ratio(a: float, b: float) -> float:
    """a / b, 0.0 when b is 0 (a variant that was skipped)."""
    return a / b if b else 0.0


# -- synthetic images -------------------------------------------------------------------------------
def textured_image(rng: np.random.Generator, side: int, label: int) -> np.ndarray:
    """Photo-like RGB texture (structure at several scales plus sensor-like noise) with one object.

    The object is a bright disk (label 0) or square (label 1) of 1/16 to 1/8 of the side, itself
    textured, at a random place: an image with something to find, compressing like a photo
    (JPEG ~2-4 bits per pixel), so decode costs are realistic.
    """
    out = np.zeros((side, side, 3), np.float32)
    for cells, weight in ((4, 0.5), (32, 0.3), (256, 0.15)):
        small = rng.integers(0, 256, (min(cells, side), min(cells, side), 3), dtype=np.uint8)
        out += weight * np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    size = int(rng.uniform(side / 16, side / 8))
    x, y = (int(v) for v in rng.integers(0, side - size, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.ones((size, size), bool) if label else (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    colour = rng.uniform(150, 255, 3).astype(np.float32)
    patch = out[y:y + size, x:x + size]
    patch[mask] = 0.3 * patch[mask] + 0.7 * colour
    out += rng.normal(0, 4, out.shape).astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def write_image_folder(root: Path, images: int, side: int, seed: int = 0, quality: int = 90) -> int:
    """``images`` JPEGs of ``textured_image`` under class folders ``disk/`` and ``square/``; total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        label = i % 2
        folder = root / ("square" if label else "disk")
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(textured_image(rng, side, label)).save(buf, "JPEG", quality=quality)
        (folder / f"img{i:04d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def shard_folder(src: Path, dst: Path, tile: int = 256, quality: int = 90, shard_bytes: int = 8 << 20) -> str:
    """Shard an image folder with the project's own sharding code (serial runner, no Ray); the URL."""
    from pipeline.ray_shard import run_serial, run_sharding
    from pipeline.shard_config import ShardConfig

    cfg = ShardConfig(dataset="folder", src=str(src), dst=str(dst), tile=tile, quality=quality,
                      shard_bytes=shard_bytes, calibrate=0, progress=False, verify="size")  # fmt: skip
    run_sharding(cfg, runner=run_serial)
    return str(dst)


# -- results ----------------------------------------------------------------------------------------
def result_path(name: str, quick: bool, suffix: str, out_dir: Path | None = None) -> Path:
    """``benchmarks/results/{name}[.quick].{suffix}`` (or under ``out_dir``)."""
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}{'.quick' if quick else ''}.{suffix}"


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` without this machine's paths: a plot beside the JSON by file name, any other
    path inside the project relative to its root (results are committed and read elsewhere)."""
    plot = result.get("plot")
    if plot and Path(plot).parent.resolve() == path.parent.resolve():
        result["plot"] = Path(plot).name
    text = json.dumps(project_relative(result), indent=2, sort_keys=True, default=_plain)
    path.write_text(text + "\n")
    return path


def project_relative(value: Any, root: Path = REPO) -> Any:
    """``value`` with every string or Path under ``root`` made relative to it, recursively."""
    if isinstance(value, dict):
        return {k: project_relative(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [project_relative(v, root) for v in value]
    if isinstance(value, str | Path) and str(value).startswith(f"{root}{os.sep}"):
        return str(Path(value).relative_to(root))
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_json_line(result: dict[str, Any]) -> None:
    """The ``--json`` contract: the last line printed is the whole result as one JSON object."""
    print(json.dumps(result, sort_keys=True, default=_plain), flush=True)


def finish(result: dict[str, Any], path: Path, as_json: bool) -> dict[str, Any]:
    """Write the final result, say where, and honour ``--json``; every script ends with this."""
    write_json(result, path)
    print(f"results: {path}")
    if as_json:
        print_json_line(result)
    return result


def bar_panels(path: Path, title: str, groups: list[str], panels: dict[str, dict[str, list[float]]],
               ylabel: str, log: bool = False) -> Path:
    """Grouped bars, one panel per entry of ``panels`` (one group per x label, one bar per series), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(groups))
        for i, (name, values) in enumerate(series.items()):
            bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(x, groups)
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and release a figure (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
