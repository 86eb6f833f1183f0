"""Attention overlays and confusion matrices as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.evaluation import Example

LEVEL_COLOURS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0)]


def overlay(example: Example, class_names: Sequence[str], scale: int = 3) -> Image.Image:
    """The base view, enlarged, with every attended box drawn per level and its probability."""
    img = Image.fromarray(example.base_view).convert("RGB")
    side = img.width * scale
    img = img.resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for level, (boxes, scores) in enumerate(zip(example.boxes, example.scores)):
        colour = LEVEL_COLOURS[level % len(LEVEL_COLOURS)]
        for box, score in zip(boxes, scores):
            x0, y0, x1, y1 = (max(0.0, min(1.0, v)) * (side - 1) for v in box)
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
            draw.text((x0 + 3, y0 + 2), f"{score:.2f}", fill=colour)
    truth, pred = class_names[example.label], class_names[example.prediction]
    mark = "ok" if example.label == example.prediction else "WRONG"
    draw.rectangle([0, 0, side, 14], fill=(0, 0, 0))
    draw.text((3, 1), f"{example.key}: true {truth}, predicted {pred} ({mark})", fill=(255, 255, 255))
    return img


def write_overlays(examples: Sequence[Example], class_names: Sequence[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ex in examples:
        path = folder / f"{ex.key}.png"
        overlay(ex, class_names).save(path)
        paths.append(path)
    return paths


def confusion_png(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.35), max(4, n * 0.35)))
    ax.imshow(confusion, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_png(points: Sequence[tuple[float, float, str]], path: Path, xlabel: str, ylabel: str) -> Path:
    """A labelled line plot, e.g. accuracy against GFLOPs for each number of locations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, marker="o")
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
