"""Evaluation over a split through the lazy loader: accuracy per level, confusion, honesty metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.loader import Batch, StreamSpec, make_loader, split_shards
from tnet.model import TNet, TNetOutput
from training.config import JobConfig


@dataclass
class Example:
    """One evaluated image kept for attention pictures."""

    key: str
    label: int
    prediction: int
    base_view: np.ndarray  # (b, b) or (b, b, 3) uint8
    boxes: list[list[list[float]]]  # per level: attended boxes in normalised view coordinates
    scores: list[list[float]]


def example_of(batch: Batch, out: TNetOutput, i: int) -> Example:
    """Image ``i`` of a batch TNet has just classified, kept for attention pictures."""
    base = ((batch.base_views[i].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return Example(
        key=batch.keys[i], label=int(batch.labels[i]), prediction=int(out.logits[i].argmax()),
        base_view=base[..., 0] if base.shape[-1] == 1 else base,
        boxes=[s.boxes[i].cpu().tolist() for s in out.selections],
        scores=[s.log_probs[i].exp().cpu().tolist() for s in out.selections],
    )


@dataclass
class EvalResult:
    num_classes: int
    correct_by_level: list[int] = field(default_factory=list)
    seen: int = 0
    skipped: int = 0
    decoded: int = 0
    full: int = 0
    seconds: float = 0.0
    features_per_image: int = 0
    confusion: np.ndarray | None = None
    examples: list[Example] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct_by_level[-1] / max(self.seen, 1) if self.correct_by_level else 0.0

    def summary(self) -> dict[str, float]:
        out = {"accuracy": self.accuracy, "images": float(self.seen), "skipped": float(self.skipped),
               "decoded_pixel_fraction": self.decoded / max(self.full, 1),
               "images_per_s": self.seen / max(self.seconds, 1e-9),
               "features_per_image": float(self.features_per_image)}
        for level, c in enumerate(self.correct_by_level):
            out[f"acc_level{level}"] = c / max(self.seen, 1)
        return out


@torch.no_grad()
def evaluate_loader(model: TNet, cfg: JobConfig, split: str, executor: Executor | None,
                    device: torch.device | str = "cpu", limit: int | None = None,
                    locations: Sequence[int] | None = None, keep_examples: int = 0,
                    batch_size: int | None = None) -> EvalResult:
    """Whole-image views (no augmentation), in order; every sample once (up to ``limit``)."""
    model.eval()
    shards = split_shards(cfg.data.url, split, cfg.data.storage_options)
    total = sum(n for _, n in shards)
    spec = StreamSpec(url=cfg.data.url, split=split, shards=tuple(s for s, _ in shards),
                      base_size=cfg.model.base_size, channels=cfg.model.in_chans,
                      quota=min(limit or total, total), train=False,
                      storage_options=dict(cfg.data.storage_options), access=cfg.data.access,
                      max_upsample=cfg.model.read_upsample)
    result = EvalResult(cfg.model.num_classes)
    confusion = np.zeros((cfg.model.num_classes, cfg.model.num_classes), dtype=np.int64)
    t0 = time.monotonic()
    for batch in make_loader(spec, batch_size or cfg.train.batch_size, 0):
        result.skipped += batch.skipped
        if len(batch) == 0:
            continue
        source = batch.model_source(cfg.model, executor)
        out = model(source, locations)
        labels = batch.labels
        if not result.correct_by_level:
            result.correct_by_level = [0] * len(out.level_logits)
        for level, lg in enumerate(out.level_logits):
            result.correct_by_level[level] += int((lg.argmax(-1).cpu() == labels).sum())
        preds = out.logits.argmax(-1).cpu()
        np.add.at(confusion, (labels.numpy(), preds.numpy()), 1)
        result.seen += len(batch)
        result.decoded += source.decoded_pixels()
        result.full += batch.full_pixels
        result.features_per_image = out.features_per_image
        result.examples += [example_of(batch, out, i) for i in range(min(len(batch), keep_examples - len(result.examples)))]
    result.seconds = time.monotonic() - t0
    result.confusion = confusion
    return result
