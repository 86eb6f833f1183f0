"""Megapixel MNIST: TNet against a whole-image CNN of similar FLOPs, each trained for the same minutes.

    python benchmarks/megapixel_mnist.py [--quick] [--json] [--minutes M] [--eval-at 5,10,30,60]
        [--config configs/megapixel_mnist.yaml] [--set model.locations=[4] ...]
        [--ablation no_explore=model.explore=none,loss.utility_weight=0 ...] [--arms tnet,no_explore]
        [--jobs 2 --threads 1]

Data: Megapixel MNIST generated and sharded in this process by the project's own code (serial
runner, no Ray) into ``--data`` (default: a folder under benchmarks/.cache/ named by the
parameters, reused while its dataset.json records the same ones). Full: 1500 px canvases, 5000 /
1000, 50 noise stamps; ``--quick``: 640 px, 3000 / 200, 9 stamps (the same noise density), the
demo config (configs/megapixel_mnist_demo.yaml) and a budget that keeps the run under 10 minutes
on two cores.

Models ("arms"), each with ``--threads`` torch threads, trained one after another in this process
or, with ``--jobs N``, N at a time in processes of their own (``--jobs 2 --threads 1`` gives each of
TNet and the baseline one of two cores for the same wall-clock budget); from the shards through
the lazy loader (``pipeline.loader.make_loader``, no worker processes, so loading is inside the
timed budget):

- ``tnet``: TNet with the config's model and loss (``--config``, ``--set``); the loader decodes the
  base view, TNet reads the attended regions through ``PyramidRegionSource``, trained as
  training/loop.py does (Adam, TNetLoss, baseline update);
- ``baseline``: ``tnet.baseline.WholeImageClassifier`` with the same backbone on the whole view,
  which the loader decodes at the baseline's input side. That side is chosen so its forward FLOPs
  per image (torch's counter, ``tnet.profiling.count_flops``) match TNet's (the closest multiple
  of 16; both are reported);
- each ``--ablation NAME=a.b=c[,d.e=f]``: TNet with those overrides on top of the config.

``--arms`` trains only the named arms (an ablation study need not retrain the headline pair; the
JSON then holds None for the figures of the arms left out).

Every model gets ``--minutes`` of training (wall clock of its loop: loading, forward, backward,
step). At each ``--eval-at`` checkpoint the clock stops and the model is evaluated on the whole
test split (whole views, deterministic top-k): accuracy, the decoded-pixel fraction, and for TNet
the fraction of target digits lying whole inside an attended region of the last level; TNet's
points also hold that fraction over the training steps since the previous checkpoint
(``train_target_digit_hit_rate``: the cells the patch classifier was trained on, exploration
included, which can differ much from what top-k attends at evaluation). The learning rate drops
by ``train.lr_decay`` once ``train.lr_decay_at`` of the budget has passed. What limits accuracy is
in each TNet point too: the test images grouped by how many of their three target digits are in
view, with each group's accuracy (``accuracy_by_targets_attended``: a missed digit, or a misread
one, is what costs), and how often the cells' own heads name the digit they hold
(``cell_read_rate``, ``target_cell_read_rate``).

``--locations 2,4,6,8,12`` evaluates each learned-location TNet arm again after training with each
k cells at the last level (TNet changes k without retraining): the accuracy/complexity curve, with
the pixels decoded and the target digits in view at each k. ``--save-models`` also writes each
arm's trained weights (a state_dict) beside the JSON, to evaluate them again without retraining.

Results: benchmarks/results/megapixel_mnist[.quick].json and .png (accuracy against training
minutes); with --json the last printed line is the JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import re
import sys
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == _ROOT / "benchmarks":
    sys.path[0] = str(_ROOT)  # run as a script: the project root, not benchmarks/, comes first
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import finish, load_avg, machine_info, result_path, save_figure, write_json  # noqa: E402
from pipeline.dataset_files import read_dataset_json  # noqa: E402
from pipeline.errors import DatasetError  # noqa: E402
from pipeline.loader import Batch, StreamSpec, make_loader, split_shards  # noqa: E402
from pipeline.storage import join, open_url  # noqa: E402
from tnet.baseline import WholeImageClassifier  # noqa: E402
from tnet.configtools import apply_overrides, from_dict, load_yaml, to_dict  # noqa: E402
from tnet.geometry import grid_boxes  # noqa: E402
from tnet.levelnorm import recalibrating_norms  # noqa: E402
from tnet.losses import TNetLoss  # noqa: E402
from tnet.model import TNet  # noqa: E402
from tnet.profiling import count_flops  # noqa: E402
from training.config import JobConfig  # noqa: E402
from training.evaluation import Example, example_of  # noqa: E402
from training.optim import make_optimizer, warmup_factor  # noqa: E402
from training.precision import apply_layout, autocast, autocast_dtype  # noqa: E402

CACHE = _ROOT / "benchmarks" / ".cache"
CPU = torch.device("cpu")  # the arms train on CPU
FULL = {"size": 1500, "n_train": 5000, "n_test": 1000, "n_noise": 50, "minutes": 60.0, "eval_at": "5,10,30,60",
        "config": str(_ROOT / "configs" / "megapixel_mnist.yaml"), "jobs": 1, "threads": 2}  # fmt: skip
# Quick: the demo's data size (3,000 training canvases: with 1,000 the location module had not
# left the plateau by 3 minutes) and both arms at once, one core each, so 7 minutes of training
# each fit the 10-minute budget.
QUICK = {"size": 640, "n_train": 3000, "n_test": 200, "n_noise": 9, "minutes": 7.0, "eval_at": "3,5,7",
         "config": str(_ROOT / "configs" / "megapixel_mnist_demo.yaml"), "jobs": 2, "threads": 1}  # fmt: skip
SIDE_STEP = 16  # baseline input sides are multiples of the backbones' total stride
# Pyramid tile side. 64 px at 1500 px too: six 165 px cells decoded 11.6% of the pixels with 64 px
# tiles against 19% with 128 px ones (same config, docs/benchmarks.md).
TILE = 64
ORACLE_PLACES = ("centre", "edge")
ORACLE_VARIANTS = {"target": "oracle", "all": "oracle_all", "edge": "oracle_edge"}  # --oracle value: arm
# --oracle-reset: what starts afresh at the switch to the oracle's cells ("heads": TNet.head_modules;
# "optimizer": Adam's moments, which remember the delay's gradients for ~1,000 steps).
RESETS = ("heads", "optimizer")
PICTURES = 6  # test images drawn with each TNet arm's attention at its last checkpoint


# -- data -------------------------------------------------------------------------------------------
def cache_folder(options: dict[str, int], tile: int) -> Path:
    """The default dataset folder for these canvas options, named by them (reused across runs)."""
    return CACHE / ("megapixel-mnist-{size}px-{n_train}-{n_test}-noise{n_noise}".format(**options) + f"-tile{tile}")


def prepare_data(dst: Path, options: dict[str, int], tile: int) -> str:
    """Shard Megapixel MNIST into ``dst`` unless dataset.json there already records these options.

    Raises:
        DatasetError: ``dst`` holds a dataset made with other options (pick another ``--data``).
    """
    from pipeline.ray_shard import run_serial, run_sharding
    from pipeline.shard_config import ShardConfig
    from pipeline.sources.megapixel_mnist import MegapixelMNISTParams

    try:
        done = read_dataset_json(str(dst))["config"]
        same = MegapixelMNISTParams(**done.get("source_options", {})) == MegapixelMNISTParams(**options)
        if done.get("dataset") == "megapixel-mnist" and same and done.get("tile") == tile:
            return str(dst)  # made by an earlier run (or by jobs/shard.py) with these parameters
    except (DatasetError, KeyError, TypeError, ValueError):
        pass  # not written yet, half-written (sharding resumes it) or another dataset (refused below)
    cfg = ShardConfig(dataset="megapixel-mnist", dst=str(dst), source_options=dict(options), tile=tile,
                      shard_bytes=8 << 20, calibrate=0, progress=False, verify="size")  # fmt: skip
    start = time.perf_counter()
    try:
        summary = run_sharding(cfg, runner=run_serial)
    except DatasetError as exc:
        raise DatasetError(f"{exc} (here: choose another --data folder, or delete this one)") from None
    print(f"sharded {summary.samples} canvases into {dst} in {time.perf_counter() - start:.0f} s", flush=True)
    return str(dst)


def digit_table(url: str, split: str) -> dict[str, np.ndarray]:
    """Per sample key, its digits as rows ``(x0, y0, x1, y1, digit, target)`` (D, 6), boxes in
    stored-image pixels, from the json members.

    The source writes digit boxes under ``meta.digits`` (``meta.boxes`` is read too), in canvas
    pixels; ``scale`` (stored / source width) maps them onto the pyramid's level 0.
    """
    fs, root = open_url(url)
    out: dict[str, np.ndarray] = {}
    for shard, _ in split_shards(url, split):
        with fs.open(join(root, shard), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                info = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                meta = info.get("meta", {})
                scale = float(info.get("scale", 1.0))
                rows = [[*(float(v) * scale for v in d["box"]), float(d.get("digit", -1)), float(bool(d.get("target")))]
                        for d in meta.get("boxes", meta.get("digits", []))]  # fmt: skip
                out[Path(member.name).name.split(".", 1)[0]] = np.asarray(rows, np.float64).reshape(-1, 6)
    return out


def digit_boxes(rows: np.ndarray, targets_only: bool = True) -> np.ndarray:
    """``digit_table`` rows (D, 6) -> the target digits' boxes (T, 4), or every digit's without ``targets_only``."""
    return rows[rows[:, 5] > 0, :4] if targets_only else rows[:, :4]


def containment(boxes: np.ndarray, digits: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """(T, R) bool: digit t (T, 4 xyxy) lies whole inside box r (R, 4 xyxy)."""
    a, d = np.asarray(boxes, np.float64)[None], np.asarray(digits, np.float64).reshape(-1, 4)[:, None]
    return (d[..., 0] >= a[..., 0] - tol) & (d[..., 1] >= a[..., 1] - tol) & \
           (d[..., 2] <= a[..., 2] + tol) & (d[..., 3] <= a[..., 3] + tol)  # fmt: skip


def digits_inside(attended: np.ndarray, digits: np.ndarray, tol: float = 1e-3) -> int:
    """How many ``digits`` (T, 4 xyxy) lie whole inside at least one ``attended`` box (R, 4 xyxy)."""
    if len(digits) == 0 or len(attended) == 0:
        return 0
    return int(containment(attended, digits, tol).any(axis=1).sum())


# -- compute matching ------------------------------------------------------------------------------
@torch.no_grad()
def tnet_flops(cfg: JobConfig) -> int:
    """TNet's forward FLOPs for one image in eval mode (deterministic top-k)."""
    torch.manual_seed(0)
    model = TNet(cfg.model).eval()
    image = torch.zeros(1, cfg.model.in_chans, cfg.model.input_size, cfg.model.input_size)
    return count_flops(model, image)


@torch.no_grad()
def baseline_flops(cfg: JobConfig, side: int) -> int:
    m = cfg.model
    model = WholeImageClassifier(m.backbone, m.num_classes, side, m.in_chans).eval()
    return count_flops(model, torch.zeros(1, m.in_chans, side, side))


def match_side(cfg: JobConfig, target: int, max_side: int) -> tuple[int, int]:
    """The baseline input side (multiple of 16, <= ``max_side``) whose FLOPs are closest to ``target``.

    Convolution FLOPs grow as side^2, so one probe at the base size gives the estimate; the
    multiples of 16 around it are then counted exactly.
    """
    probe = max(cfg.model.base_size // SIDE_STEP, 1) * SIDE_STEP
    guess = probe * (target / max(baseline_flops(cfg, probe), 1)) ** 0.5
    top = max(max_side // SIDE_STEP, 1) * SIDE_STEP
    centre = min(max(round(guess / SIDE_STEP) * SIDE_STEP, SIDE_STEP), top)
    sides = sorted({min(max(centre + d * SIDE_STEP, SIDE_STEP), top) for d in (-1, 0, 1)})
    counted = [(abs(np.log(baseline_flops(cfg, s) / target)), s) for s in sides]
    side = min(counted)[1]
    return side, baseline_flops(cfg, side)


def kernel_norm(module: torch.nn.Module) -> float:
    """L2 norm of ``module``'s kernels and matrices: before a BatchNorm the larger it is, the smaller
    the effect of Adam's ~lr-sized steps (the backbone's growth is logged at each checkpoint)."""
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in module.parameters() if p.ndim >= 2)))


# -- models under a budget -------------------------------------------------------------------------
class Arm:
    """One model and its optimiser; subclasses add ``step(batch) -> (loss, decoded pixels)`` and
    ``evaluate(split, limit) -> metrics``."""

    def __init__(self, name: str, cfg: JobConfig, url: str, side: int, model: torch.nn.Module) -> None:
        self.name, self.cfg, self.url, self.side = name, cfg, url, side
        self.model = apply_layout(model, cfg.train.channels_last)  # both arms: the same layout and precision
        self.opt = make_optimizer(self.model, cfg.train)
        self.amp_dtype = autocast_dtype(CPU, cfg.train)
        self.max_upsample = 1.0  # TNet arms read as their config says (model.read_upsample)

    def spec(self, split: str, epoch: int, train: bool, quota: int) -> StreamSpec:
        d = self.cfg.data
        shards = tuple(s for s, _ in split_shards(self.url, split))
        return StreamSpec(url=self.url, split=split, shards=shards, base_size=self.side,
                          channels=self.cfg.model.in_chans, quota=quota, epoch=epoch, seed=self.cfg.train.seed,
                          train=train, augment=d.augment, flip=d.flip, colour_jitter=d.colour_jitter,
                          crop_min_area=d.crop_min_area, crop_max_aspect=d.crop_max_aspect,
                          keep_objects=d.keep_objects,
                          shuffle_buffer=d.shuffle_buffer, max_upsample=self.max_upsample)  # fmt: skip

    def window_metrics(self) -> dict[str, float]:
        """Training figures gathered since the previous checkpoint (then reset); none by default."""
        return {}

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def infer(self, batch: Batch) -> Any:
        """The evaluation forward of one batch (the model's output)."""
        raise NotImplementedError

    @torch.no_grad()
    def recalibrate(self) -> None:
        """With ``train.recalibrate_norms`` = N: the norms' running statistics recomputed from N
        training images (whole views, fixed order) before an evaluation, as the training job does
        after each epoch; the clock is stopped. Running averages lag weights that move fast: measured
        here, TNet with the oracle's cells scored 0.23 with them and 0.44 with batch statistics."""
        n = self.cfg.train.recalibrate_norms
        if not n:
            return
        spec = self.spec(self.cfg.data.train_split, 0, False, n)
        with recalibrating_norms(self.model):
            for batch in make_loader(spec, self.cfg.train.batch_size, 0):
                if len(batch):
                    self.infer(batch)

    def _eval_batches(self, split: str, limit: int | None) -> Any:
        total = sum(n for _, n in split_shards(self.url, split))
        self.model.eval()
        return make_loader(self.spec(split, 0, False, min(limit or total, total)), self.cfg.train.batch_size, 0)


class TNetArm(Arm):
    def __init__(self, name: str, cfg: JobConfig, url: str, executor: ThreadPoolExecutor,
                 table: dict[str, np.ndarray]) -> None:  # fmt: skip
        """``table``: every sample's digits (``digit_table`` rows), for the hit and reading metrics."""
        torch.manual_seed(cfg.train.seed)
        super().__init__(name, cfg, url, cfg.model.base_size, TNet(cfg.model))
        self.loss, self.executor, self.table = TNetLoss(cfg.loss), executor, table
        self.max_upsample = cfg.model.read_upsample
        self.examples: list[tuple[Example, np.ndarray]] = []  # the last evaluation's first images, with
        # their target digits' boxes normalised to the view, for attention pictures
        self.train_hits = self.train_targets = 0  # target digits inside the cells trained on
        self.kernel_norm0 = kernel_norm(self.model.backbone)
        self.locations: tuple[int, ...] | None = None  # k per level at evaluation (None: the config's)

    def step(self, batch: Batch) -> tuple[float, int]:
        self.model.train()
        source = batch.model_source(self.cfg.model, self.executor)
        with autocast(CPU, self.amp_dtype):
            out = self.forward(batch, source)
            terms = self.loss(out, batch.labels)
        self.opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.opt.step()
        self.loss.update_baseline(terms)
        if out.selections:  # what the patch classifier is shown (exploration included), not what top-k picks
            hits, targets = self.hits(batch, out)
            self.train_hits, self.train_targets = self.train_hits + hits, self.train_targets + targets
        return float(terms["total"].detach()), source.decoded_pixels()

    def forward(self, batch: Batch, source: Any) -> Any:
        return self.model(source, self.locations)

    def infer(self, batch: Batch) -> Any:
        return self.forward(batch, batch.model_source(self.cfg.model, self.executor))

    def sweep_locations(self, ks: Sequence[int], split: str, limit: int | None) -> dict[str, dict[str, float]]:
        """The trained model evaluated with k cells at the last level for each k in ``ks`` (the norms'
        statistics as recalibrated for the trained k): the accuracy/complexity curve, with the share
        of target digits in view and the pixels decoded, keyed by k."""
        keep, rows = self.examples, {}
        try:
            for k in ks:
                self.locations = (*self.cfg.model.locations[:-1], k)
                row = self.evaluate(split, limit, recalibrate=False)
                rows[str(k)] = {key: row[key] for key in ("accuracy", "decoded_pixel_fraction", "target_digit_hit_rate",
                                                         "digits_attended_per_image", "digit_cell_fraction")}  # fmt: skip
        finally:
            self.locations, self.examples = None, keep
        return rows

    def digits(self, key: str, targets_only: bool = True) -> np.ndarray:
        """The sample's target digits' boxes (T, 4) in stored-image pixels (all digits' without ``targets_only``)."""
        return digit_boxes(self.table.get(key, np.zeros((0, 6))), targets_only)

    def reading(self, batch: Batch, out: Any) -> np.ndarray:
        """Counts of what the last level's attended cells show and read (any digit, distractors too):
        (cells, cells holding a digit whole, cells holding exactly one, of those the ones whose own
        head names that digit, distinct digits inside some cell, one-digit cells holding a target
        digit, of those the ones whose head names it)."""
        counts = np.zeros(7, np.int64)
        if not out.selections:
            return counts
        attended = out.selections[-1].source_boxes.double().numpy()  # (B, F, 4)
        named = out.feature_logits[-1].argmax(-1).cpu().numpy()  # (B, F): each cell's head
        for i, key in enumerate(batch.keys):
            rows = self.table.get(key, np.zeros((0, 6)))
            inside = containment(attended[i], rows[:, :4])  # (D, F)
            per_cell = inside.sum(axis=0)
            single = np.flatnonzero(per_cell == 1)
            which = inside[:, single].argmax(axis=0) if len(single) else np.zeros(0, np.int64)
            digit_of, target = rows[which, 4], rows[which, 5] > 0
            right = named[i, single] == digit_of
            counts += [len(per_cell), int((per_cell > 0).sum()), len(single), int(right.sum()),
                       int(inside.any(axis=1).sum()), int(target.sum()), int((right & target).sum())]  # fmt: skip
        return counts

    def view_digits(self, batch: Batch, i: int) -> np.ndarray:
        """Image ``i``'s target digits as (T, 4) boxes normalised to its view."""
        return batch.views[i].from_source(self.digits(batch.keys[i]))

    def hits(self, batch: Batch, out: Any) -> tuple[int, int]:
        """(target digits lying whole inside an attended region of the last level, target digits)."""
        inside, total = self.image_hits(batch, out)
        return int(inside.sum()), int(total.sum())

    def image_hits(self, batch: Batch, out: Any) -> tuple[np.ndarray, np.ndarray]:
        """(B,) each image's target digits lying whole inside an attended region of the last level,
        and (B,) its target digits."""
        digits = [self.digits(key) for key in batch.keys]
        total = np.array([len(d) for d in digits], np.int64)
        if not out.selections:
            return np.zeros(len(batch), np.int64), total
        attended = out.selections[-1].source_boxes.double().numpy()
        return np.array([digits_inside(a, d) for a, d in zip(attended, digits)], np.int64), total

    def window_metrics(self) -> dict[str, float]:
        hits, total = self.train_hits, self.train_targets
        self.train_hits = self.train_targets = 0
        scale = {"explore_scale": self.model.explore_scale()} if self.cfg.model.explore == "gumbel" else {}
        growth = {"backbone_kernel_growth": kernel_norm(self.model.backbone) / self.kernel_norm0}
        return scale | growth | ({"train_target_digit_hit_rate": hits / total} if total else {})

    @torch.no_grad()
    def evaluate(self, split: str, limit: int | None, recalibrate: bool = True) -> dict[str, float]:
        if recalibrate:
            self.recalibrate()
        seen = decoded = full = hit = targets = 0
        correct: list[int] = []
        read = np.zeros(7, np.int64)
        by_hits: dict[int, list[int]] = {}  # target digits in view -> [wrong, right]
        voted = 0
        self.examples = []
        for batch in self._eval_batches(split, limit):
            if len(batch) == 0:
                continue
            source = batch.model_source(self.cfg.model, self.executor)
            out = self.forward(batch, source)
            correct = correct or [0] * len(out.level_logits)
            rights = [lg.argmax(-1) == batch.labels for lg in out.level_logits]  # the last is out.logits'
            for level, ok in enumerate(rights):
                correct[level] += int(ok.sum())
            image_hits, image_targets = self.image_hits(batch, out)
            right = rights[-1].cpu().numpy()
            if out.selections:  # the cells' own heads as voters: their probabilities summed over the cells
                votes = out.feature_logits[-1].float().softmax(-1).sum(1)
                voted += int((votes.argmax(-1) == batch.labels).sum())
            for n, ok in zip(image_hits, right):
                by_hits.setdefault(int(n), [0, 0])[int(ok)] += 1
            hit, targets = hit + int(image_hits.sum()), targets + int(image_targets.sum())
            read += self.reading(batch, out)
            self.examples += [(example_of(batch, out, i), self.view_digits(batch, i))
                              for i in range(min(len(batch), PICTURES - len(self.examples)))]  # fmt: skip
            seen, decoded, full = seen + len(batch), decoded + source.decoded_pixels(), full + batch.full_pixels
        row = {"accuracy": correct[-1] / max(seen, 1) if correct else 0.0, "images": seen,
               "decoded_pixel_fraction": decoded / max(full, 1), "target_digit_hit_rate": hit / max(targets, 1)}  # fmt: skip
        row |= {f"acc_level{i}": c / max(seen, 1) for i, c in enumerate(correct)}
        cells, with_digit, single, named, distinct, single_target, named_target = (int(v) for v in read)
        row |= {"digit_cell_fraction": with_digit / max(cells, 1),  # attended cells holding a digit (any)
                "digits_attended_per_image": distinct / max(seen, 1),  # distinct digits (of 5) inside some cell
                "cell_read_rate": named / max(single, 1),  # one-digit cells whose own head names the digit
                "target_cell_read_rate": named_target / max(single_target, 1),  # the same, target digits only
                "vote_accuracy": voted / max(seen, 1),  # the last level's heads' summed probabilities (a diagnostic)
                # what limits accuracy: images by how many target digits are in view, and the accuracy of each
                "accuracy_by_targets_attended": {str(n): {"images": sum(c), "accuracy": c[1] / sum(c)}
                                                 for n, c in sorted(by_hits.items())}}  # fmt: skip
        return row


def attention_pictures(examples: list[tuple[Example, np.ndarray]], num_classes: int, path: Path, columns: int = 3) -> Path:
    """One PNG: each image's base view with the attended cells (training/pictures.py colours, with
    their probabilities) and the target digits' boxes in cyan, so a reader sees which were found."""
    from PIL import Image, ImageDraw

    from training.pictures import overlay

    tiles = []
    for ex, digits in examples:
        img = overlay(ex, [str(c) for c in range(num_classes)], scale=3)
        draw = ImageDraw.Draw(img)
        for box in digits:
            x0, y0, x1, y1 = (float(v) * (img.width - 1) for v in box)
            draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 255, 255), width=1)
        tiles.append(img)
    side, rows = tiles[0].width, -(-len(tiles) // columns)
    sheet = Image.new("RGB", (side * min(columns, len(tiles)), side * rows), (255, 255, 255))
    for n, img in enumerate(tiles):
        sheet.paste(img, ((n % columns) * side, (n // columns) * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def oracle_cells(digits: np.ndarray, cells: np.ndarray, k: int, rng: np.random.Generator,
                 place: str = "centre") -> list[int]:  # fmt: skip
    """k distinct indices into ``cells`` (N*N, 4 candidate boxes): for each digit the cell holding it
    whole with the nearest centre (``place="edge"``: the farthest, so the digit sits at the cell's
    border, as in a block of overlapping cells around it), then random others (boxes in the same
    coordinates).

    A diagnostic, not a method: it reads the labels' boxes, so TNet trained and evaluated on these
    cells bounds what its patch path can learn once the locations are right.
    """
    if place not in ORACLE_PLACES:
        raise ValueError(f"place={place!r}: choose among {ORACLE_PLACES}")
    centres = (cells[:, :2] + cells[:, 2:]) / 2
    chosen: list[int] = []
    for box, inside in zip(np.asarray(digits, np.float64).reshape(-1, 4), containment(cells, digits, 1e-6)):
        if inside.any():
            candidates = np.flatnonzero(inside)
            distance = ((centres[candidates] - (box[:2] + box[2:]) / 2) ** 2).sum(1)
            best = int(candidates[np.argmin(distance) if place == "centre" else np.argmax(distance)])
            if best not in chosen:
                chosen.append(best)
    others = [int(c) for c in rng.permutation(len(cells)) if c not in chosen]
    return (chosen + others)[:k]


class OracleArm(TNetArm):
    """TNet reading the cells that hold the target digits (``oracle_cells``) in training and evaluation.

    Variants (arm names): ``oracle`` (target digits, centred cells), ``oracle_all`` (every digit,
    distractors included: the patch path must find the majority, as with a module that finds
    digits but not which are targets), ``oracle_edge`` (target digits at the cells' borders).
    ``delay``: the first that many training images read the location module's own choices, as
    a learned TNet's do before its module takes off (evaluation always reads the oracle's cells).
    ``reset``: what is started afresh when training switches to the oracle's cells (``RESETS``),
    to find where the delay's harm lies.
    """

    def __init__(self, *args: Any, variant: str = "target", delay: int = 0, reset: Sequence[str] = (),
                 **kwargs: Any) -> None:  # fmt: skip
        if delay < 0:
            raise ValueError(f"delay={delay}: must be >= 0 training images")
        if variant not in ORACLE_VARIANTS:
            raise ValueError(f"oracle variant {variant!r}: choose among {sorted(ORACLE_VARIANTS)}")
        if set(reset) - set(RESETS) or (reset and not delay):
            raise ValueError(f"reset={list(reset)}: choose among {sorted(RESETS)}, with a delay > 0")
        super().__init__(*args, **kwargs)
        self.delay, self.trained, self.reset = delay, 0, tuple(reset)
        if self.cfg.model.levels != 2:
            raise ValueError(f"the oracle arm needs model.levels=2 (one attended level), not {self.cfg.model.levels}")
        self.rng = np.random.default_rng(self.cfg.train.seed)
        size = self.cfg.model.input_size  # level 1's candidates, normalised to the view like view_digits
        self.cells = np.array(grid_boxes((0, 0, size, size), self.model.grids[0]), np.float64) / size
        self.place = "edge" if variant == "edge" else "centre"
        self.targets_only = variant != "all"  # whose cells are read

    def forward(self, batch: Batch, source: Any) -> Any:
        if self.model.training and torch.is_grad_enabled():  # a training step, not norm recalibration
            if self.trained <= self.delay < self.trained + len(batch):  # the first oracle step
                self.restart()
            self.trained += len(batch)
            if self.trained <= self.delay:
                return self.model(source)
        rng = self.rng if self.model.training else np.random.default_rng(0)  # evaluation: the same cells each time
        k = self.cfg.model.locations[0]
        digits = [view.from_source(self.digits(key, self.targets_only)) for key, view in zip(batch.keys, batch.views)]
        chosen = [oracle_cells(d, self.cells, k, rng, self.place) for d in digits]
        return self.model(source, self.cfg.model.locations, cells=[torch.tensor(chosen)[:, None, :]])  # k fixed cells

    def restart(self) -> None:
        """Start the ``reset`` parts afresh: new initial weights, or an empty optimiser state."""
        if "heads" in self.reset:
            self.model.restart_heads(self.cfg.train.seed)
            for module in self.model.head_modules():
                for param in module.parameters():
                    self.opt.state.pop(param, None)  # no momentum from the old weights
        if "optimizer" in self.reset:
            self.opt.state.clear()


class BaselineArm(Arm):
    def __init__(self, name: str, cfg: JobConfig, url: str, side: int) -> None:
        m = cfg.model
        torch.manual_seed(cfg.train.seed)
        model = WholeImageClassifier(m.backbone, m.num_classes, side, m.in_chans, dropout=m.dropout)
        super().__init__(name, cfg, url, side, model)

    def step(self, batch: Batch) -> tuple[float, int]:
        self.model.train()
        with autocast(CPU, self.amp_dtype):
            loss = F.cross_entropy(self.model(batch.base_views), batch.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach()), batch.base_decoded

    def infer(self, batch: Batch) -> Any:
        return self.model(batch.base_views)

    @torch.no_grad()
    def evaluate(self, split: str, limit: int | None) -> dict[str, float]:
        self.recalibrate()
        seen = correct = decoded = full = 0
        for batch in self._eval_batches(split, limit):
            if len(batch):
                correct += int((self.model(batch.base_views).argmax(-1) == batch.labels).sum())
                seen, decoded, full = seen + len(batch), decoded + batch.base_decoded, full + batch.full_pixels
        return {"accuracy": correct / max(seen, 1), "images": seen, "decoded_pixel_fraction": decoded / max(full, 1)}


def train_for(arm: TNetArm | BaselineArm, budget_s: float, checkpoints_s: list[float], limit: int | None) -> list[dict[str, Any]]:
    """Train ``arm`` for ``budget_s`` seconds of its own loop; evaluate (clock stopped) at each checkpoint."""
    cfg = arm.cfg
    n_train = sum(n for _, n in split_shards(arm.url, cfg.data.train_split))
    quota = cfg.data.samples_per_epoch or n_train
    pending = sorted({c for c in checkpoints_s if c < budget_s} | {budget_s})
    curve: list[dict[str, Any]] = []
    clock = 0.0
    steps = images = decoded = full = epoch = 0
    losses: list[float] = []
    while pending:
        loader = iter(make_loader(arm.spec(cfg.data.train_split, epoch, True, quota), cfg.train.batch_size, 0))
        epoch += 1
        seen_before = images
        while pending:
            if pending[0] <= clock:  # checkpoint reached: evaluate with the clock stopped
                crossed = [c for c in pending if c <= clock]
                pending = pending[len(crossed):]
                t0 = time.perf_counter()
                row = arm.evaluate(cfg.data.val_split, limit)
                row |= arm.window_metrics() | {"checkpoint_minutes": crossed[-1] / 60, "minutes": clock / 60, "steps": steps,
                        "train_images": images, "epochs": images / max(n_train, 1),
                        "train_images_per_s": images / max(clock, 1e-9),
                        "train_decoded_pixel_fraction": decoded / max(full, 1),
                        "train_loss": float(np.mean(losses)) if losses else None,
                        "eval_seconds": time.perf_counter() - t0}  # fmt: skip
                curve.append(row)
                losses = []
                print(f"{arm.name}: {clock / 60:.2f} min, {steps} steps ({row['epochs']:.2f} epochs): test accuracy "
                      f"{row['accuracy']:.4f}, decoded {row['decoded_pixel_fraction']:.1%}"
                      + (f", target digits attended {row['target_digit_hit_rate']:.1%}" if "target_digit_hit_rate" in row else "")
                      + (f" (in training {row['train_target_digit_hit_rate']:.1%})" if "train_target_digit_hit_rate" in row else ""),
                      flush=True)  # fmt: skip
                continue
            t0 = time.perf_counter()
            batch = next(loader, None)
            if batch is None:
                clock += time.perf_counter() - t0
                break
            if len(batch):
                decay = clock >= cfg.train.lr_decay_at * budget_s
                arm.set_lr(cfg.train.lr * (cfg.train.lr_decay if decay else 1.0)
                           * warmup_factor(cfg.train, images + len(batch)))
                loss, px = arm.step(batch)
                steps, images, decoded, full = steps + 1, images + len(batch), decoded + px, full + batch.full_pixels
                losses.append(loss)
            clock += time.perf_counter() - t0
        if images == seen_before and pending:
            raise RuntimeError(f"{arm.url}: an epoch of split {cfg.data.train_split!r} gave no trainable sample")
    return curve


def run_arm(kind: str, name: str, cfg: JobConfig, url: str, side: int, table: dict[str, np.ndarray], budget_s: float,
            checkpoints_s: list[float], limit: int | None, threads: int, pictures: Path,
            oracle_delay: int = 0, oracle_reset: Sequence[str] = (), locations: Sequence[int] = (),
            save: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Build one arm (``kind`` "tnet", "baseline" or an oracle arm's name) and train it; top level so a spawned process can run it.

    A TNet arm also draws its attention on the first test images at the last checkpoint into
    ``pictures`` with the arm's name inserted (``x.png`` -> ``x.tnet.attention.png``); the last
    curve point names the file. With ``locations``, a learned-location arm is then evaluated with
    each k (``by_locations`` in its last curve point; oracle arms read their fixed cells). With
    ``save`` the trained weights go beside the pictures (``x.png`` -> ``x.tnet.pt``, a state_dict:
    ``torch.load(..., weights_only=True)`` reads it back) for diagnostics without retraining.
    """
    torch.set_num_threads(threads)
    with ThreadPoolExecutor(cfg.data.decode_threads) as pool:
        oracles = {arm: variant for variant, arm in ORACLE_VARIANTS.items()}
        if kind in oracles:
            arm: Arm = OracleArm(name, cfg, url, pool, table, variant=oracles[kind], delay=oracle_delay,
                                 reset=oracle_reset)
        elif kind == "tnet":
            arm = TNetArm(name, cfg, url, pool, table)
        else:
            arm = BaselineArm(name, cfg, url, side)
        curve = train_for(arm, budget_s, checkpoints_s, limit)
        if save:
            weights = pictures.with_suffix(f".{name}.pt")
            torch.save(arm.model.state_dict(), weights)
            curve[-1]["weights"] = weights.name
        if locations and type(arm) is TNetArm:
            curve[-1]["by_locations"] = arm.sweep_locations(locations, cfg.data.val_split, limit)
    if isinstance(arm, TNetArm) and arm.examples:
        path = attention_pictures(arm.examples, cfg.model.num_classes, pictures.with_suffix(f".{name}.attention.png"))
        curve[-1]["attention_png"] = path.name
    return curve


# -- command line ----------------------------------------------------------------------------------
def parse_ablation(text: str) -> tuple[str, list[str]]:
    """``"name=a.b=1,c.d=[2,3]"`` -> ("name", ["a.b=1", "c.d=[2,3]"]); commas inside values are kept.

    Raises:
        ValueError: no name, or no ``key=value`` after it.
    """
    name, _, rest = text.partition("=")
    overrides = [o for o in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", rest) if o.strip()]
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or not overrides or any("=" not in o for o in overrides):
        raise ValueError(f"--ablation {text!r}: expected NAME=key=value[,key=value] (NAME of [A-Za-z0-9_-])")
    return name, overrides


def job_config(path: str, overrides: list[str], url: str) -> JobConfig:
    """The config file with ``overrides`` applied, reading ``url``; validated by the dataclasses.

    Each arm trains in one process, so a config written for several DDP workers (the demo's two)
    becomes one worker with their summed batch: the same images per optimiser step. Counts kept
    per worker (``model.explore_anneal_images``, ``model.restart_heads_at``) are scaled the same way.
    """
    data = apply_overrides(load_yaml(path), overrides)
    data.setdefault("data", {})["url"] = url
    cfg = from_dict(JobConfig, data)
    world = cfg.train.num_workers
    if world > 1:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, num_workers=1, batch_size=cfg.train.batch_size * world),
            model=dataclasses.replace(cfg.model, explore_anneal_images=cfg.model.explore_anneal_images * world,
                                      restart_heads_at=cfg.model.restart_heads_at * world))
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="640 px, 3000/200 canvases, demo config, 7 min each, both arms at once")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--config", help="TNet job config (default configs/megapixel_mnist.yaml, quick: configs/megapixel_mnist_demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as jobs/train.py (repeatable)")  # fmt: skip
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                        help="an extra TNet variant trained for the same budget (repeatable)")  # fmt: skip
    parser.add_argument("--minutes", type=float, help="training budget per model (default 60, quick 7)")
    parser.add_argument("--eval-at", help="comma-separated training minutes to evaluate at (the budget is added)")
    parser.add_argument("--eval-limit", type=int, help="evaluate on at most this many test images")
    parser.add_argument("--data", type=Path, help="dataset folder (default: benchmarks/.cache/<parameters>)")
    for name in ("size", "n-train", "n-test", "n-noise", "tile"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--threads", type=int, help="torch threads per arm (default 2, quick 1)")
    parser.add_argument("--jobs", type=int,
                        help="arms trained at once, each in its own process (default 1, quick 2: with --threads 1 "
                             "each arm gets one of two cores)")
    parser.add_argument("--arms", help="comma-separated arms to train (default all: tnet, baseline and every --ablation)")
    parser.add_argument("--oracle", nargs="*", choices=sorted(ORACLE_VARIANTS), metavar="VARIANT",
                        help="also train diagnostic arms that read the cells holding the digits (from the labels' boxes) "
                             "in training and evaluation, ceilings for the patch path, not results: 'target' (the "
                             "default; arm 'oracle': the target digits, centred), 'all' (arm 'oracle_all': distractors "
                             "too), 'edge' (arm 'oracle_edge': target digits at the cells' borders)")
    parser.add_argument("--oracle-delay", type=int, default=0, metavar="IMAGES",
                        help="the oracle arms' first IMAGES training images read the location module's own cells "
                             "(as before a learned module takes off); evaluation reads the oracle's")
    parser.add_argument("--oracle-reset", nargs="+", default=[], choices=sorted(RESETS), metavar="PART",
                        help="with --oracle-delay: start these parts afresh at the switch to the oracle's cells: "
                             "'heads' (position fusion, feature weighting, per-feature heads, final classifier: as "
                             "model.restart_heads_at does), 'optimizer' (Adam's state)")
    parser.add_argument("--baseline-size", type=int, help="baseline input side (default: FLOPs-matched)")
    parser.add_argument("--locations", default="", metavar="K1,K2,...",
                        help="after training, evaluate each learned-location TNet arm again with each of these k cells "
                             "at the last level (no retraining): the accuracy/complexity curve, in the last curve "
                             "point's by_locations and, for the tnet arm, accuracy_by_locations")
    parser.add_argument("--save-models", action="store_true",
                        help="also write each arm's trained weights beside the JSON (<name>.<arm>.pt)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default benchmarks/results)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for key in ("size", "n_train", "n_test", "n_noise", "minutes", "eval_at", "config", "jobs", "threads"):
        if getattr(args, key) is None:
            setattr(args, key, mode[key])
    args.tile = args.tile or TILE
    try:
        args.eval_at = sorted({float(m) for m in str(args.eval_at).split(",") if m.strip()})
        args.ablation = dict(parse_ablation(a) for a in args.ablation)
        args.arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
        args.locations = sorted({int(k) for k in args.locations.split(",") if k.strip()})
    except ValueError as exc:
        parser.error(str(exc))
    args.oracle = [] if args.oracle is None else [ORACLE_VARIANTS[v] for v in dict.fromkeys(args.oracle or ["target"])]
    if {"tnet", "baseline", *ORACLE_VARIANTS.values()} & set(args.ablation):
        parser.error(f"--ablation names tnet, baseline and {', '.join(ORACLE_VARIANTS.values())} are taken by the "
                     "built-in arms")
    unknown = set(args.arms or ()) - {"tnet", "baseline", *args.ablation, *args.oracle}
    if unknown or args.arms == []:
        parser.error(f"--arms {sorted(unknown) or 'empty'}: choose among tnet, baseline, the --ablation names "
                     "and the oracle arms (with --oracle)")
    if args.minutes <= 0 or args.threads < 1 or args.jobs < 1 or any(m < 0 for m in args.eval_at):
        parser.error("--minutes must be > 0, --threads and --jobs >= 1 and --eval-at minutes >= 0")
    if args.oracle_delay < 0:
        parser.error("--oracle-delay must be >= 0 images")
    if any(k < 1 for k in args.locations):
        parser.error(f"--locations {args.locations}: each k must be >= 1")
    if args.oracle_reset and not args.oracle_delay:
        parser.error("--oracle-reset needs --oracle-delay")
    return args


def plot(path: Path, curves: dict[str, list[dict[str, Any]]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, curve in curves.items():
        ax.plot([p["minutes"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=name)
    ax.set_xlabel("training minutes (evaluation not counted)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start, load_before = time.perf_counter(), load_avg()
    torch.set_num_threads(args.threads)
    options = {"size": args.size, "n_train": args.n_train, "n_test": args.n_test, "n_noise": args.n_noise}
    dst = args.data or cache_folder(options, args.tile)
    url = str(dst.resolve())
    cfg = job_config(args.config, args.overrides, url)  # a bad config fails before any sharding
    variants = {"tnet": cfg} | {n: job_config(args.config, [*args.overrides, *o], url) for n, o in args.ablation.items()}
    too_many = [k for k in args.locations for c in variants.values() if k > c.model.grid**2]
    if too_many:
        raise ValueError(f"--locations {sorted(set(too_many))}: more cells than a model's grid has")
    prepare_data(dst.resolve(), options, args.tile)
    if cfg.model.input_size != args.size:
        print(f"note: model.input_size={cfg.model.input_size} differs from the {args.size} px canvases", flush=True)
    flops = {name: tnet_flops(c) for name, c in variants.items()}
    if args.baseline_size:
        side, base_flops = args.baseline_size, baseline_flops(cfg, args.baseline_size)
    else:
        side, base_flops = match_side(cfg, flops["tnet"], args.size)
    print(f"TNet {flops['tnet'] / 1e9:.4f} GFLOPs/image; baseline at {side} px {base_flops / 1e9:.4f} GFLOPs/image",
          flush=True)  # fmt: skip
    table = digit_table(url, cfg.data.val_split) | digit_table(url, cfg.data.train_split)  # keys hold the split
    budget, checkpoints = args.minutes * 60, [m * 60 for m in args.eval_at]
    arms = [("tnet", "tnet", cfg), ("baseline", "baseline", cfg)] + [("tnet", n, c) for n, c in variants.items() if n != "tnet"]
    arms += [(name, name, cfg) for name in args.oracle]
    arms = [a for a in arms if args.arms is None or a[1] in args.arms]
    path = result_path("megapixel_mnist", args.quick, "json", args.out_dir)
    common = (url, side, table, budget, checkpoints, args.eval_limit, args.threads, path.with_suffix(".png"),
              args.oracle_delay, args.oracle_reset, args.locations, args.save_models)  # fmt: skip
    if args.jobs == 1:
        curves = {name: run_arm(kind, name, c, *common) for kind, name, c in arms}
    else:  # one process per arm, at most --jobs at once: each arm keeps its own cores for its budget
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as procs:
            futures = {name: procs.submit(run_arm, kind, name, c, *common) for kind, name, c in arms}
            curves = {name: f.result() for name, f in futures.items()}
    final = {name: curve[-1] for name, curve in curves.items()}
    missing = {"accuracy": None, "decoded_pixel_fraction": None, "target_digit_hit_rate": None}  # an arm left out
    result: dict[str, Any] = {
        "benchmark": "megapixel_mnist", "mode": "quick" if args.quick else "full",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out_dir")},
        "machine": machine_info(), "dataset": {"url": url, "tile": args.tile, **options},
        "options": {"model": to_dict(cfg.model), "loss": to_dict(cfg.loss)},
        "train": {k: to_dict(cfg)[k] for k in ("train", "data")}, "minutes": args.minutes,
        "flops": {"tnet_gflops": flops["tnet"] / 1e9, "baseline_gflops": base_flops / 1e9,
                  "baseline_input_size": side, "baseline_over_tnet": base_flops / max(flops["tnet"], 1)},
        "test_accuracy": final.get("tnet", missing)["accuracy"],
        "baseline_test_accuracy": final.get("baseline", missing)["accuracy"],
        "decoded_pixel_fraction": final.get("tnet", missing)["decoded_pixel_fraction"],
        "baseline_decoded_pixel_fraction": final.get("baseline", missing)["decoded_pixel_fraction"],
        "target_digit_hit_rate": final.get("tnet", missing)["target_digit_hit_rate"], "curves": curves,
        "accuracy_by_locations": {k: r["accuracy"] for k, r in final.get("tnet", {}).get("by_locations", {}).items()},
        "oracle_test_accuracy": final["oracle"]["accuracy"] if "oracle" in final else None,
        "ablation": {name: {"overrides": args.ablation[name], "gflops": flops[name] / 1e9,
                            "options": {"model": to_dict(variants[name].model), "loss": to_dict(variants[name].loss)},
                            **{k: final[name][k] for k in ("accuracy", "decoded_pixel_fraction", "target_digit_hit_rate")},
                            "curve": curves[name]} for name in args.ablation if name in curves},
        "load_avg_before": load_before, "load_avg_after": load_avg(),
    }  # fmt: skip
    result["versions"] = {k: result["machine"][k] for k in ("python", "torch", "torchvision", "pillow", "numpy")}
    path = write_json(result, path)
    title = (f"Megapixel MNIST {args.size} px, {args.minutes:g} min each: TNet {flops['tnet'] / 1e9:.3f} GFLOPs, "
             f"whole-image {side} px {base_flops / 1e9:.3f} GFLOPs")  # fmt: skip
    result["plot"] = str(plot(path.with_suffix(".png"), curves, title))
    result["wall_s"] = time.perf_counter() - start
    return finish(result, path, args.json)


if __name__ == "__main__":
    main()
