"""The training job's configuration: one frozen dataclass tree, loaded from configs/*.yaml.

Sections: ``model`` (tnet.config.TNetConfig), ``loss`` (tnet.losses.LossConfig), ``data``,
``train``, ``tracking``. Ray workers receive ``to_dict(cfg)`` and rebuild it with ``from_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.loader import check_crop
from tnet.config import TNetConfig
from tnet.configtools import from_dict, load_config, to_dict
from tnet.losses import LossConfig


@dataclass(frozen=True)
class DataConfig:
    url: str = "data/megapixel-mnist"  # dataset prefix written by jobs/shard.py (path, file:// or s3://)
    train_split: str = "train"
    val_split: str = "test"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # fsspec options (never logged)
    access: str = "stream"  # "stream": whole samples in order; "random": ranged tile reads
    shuffle_buffer: int = 128  # samples held for shuffling within a worker's stream
    loader_workers: int = 1  # DataLoader processes per training worker
    decode_threads: int = 2  # threads decoding selected tiles
    augment: bool = True  # crop 85-100% area, flip, colour jitter, expressed as a view box
    flip: bool = True  # horizontal flips (off for digits, where a mirror changes the class)
    colour_jitter: bool = True
    crop_min_area: float = 0.85  # the training crop keeps 85-100% of the area (the paper)
    crop_max_aspect: float = 2.0  # at an aspect ratio in [1/2, 2] (the paper)
    # The crop holds every class-defining object whole (fMoW's boxes, Megapixel MNIST's target
    # digits; pipeline.loader.object_boxes) instead of 10% of the first: where the label counts
    # objects, a cut-off one changes the answer.
    keep_objects: bool = False
    samples_per_epoch: int | None = None  # None: the manifest's train count
    val_samples: int | None = None  # None: the whole validation split
    max_bad_fraction: float = 0.05  # stop when more than this fraction of samples fail to decode

    def __post_init__(self) -> None:
        if self.access not in ("stream", "random"):
            raise ValueError(f"data.access={self.access!r}: must be 'stream' or 'random'")
        if self.shuffle_buffer < 1 or self.loader_workers < 0 or self.decode_threads < 1:
            raise ValueError("data.shuffle_buffer/decode_threads must be >= 1 and loader_workers >= 0")
        check_crop(self.crop_min_area, self.crop_max_aspect, "data.")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16  # per worker
    lr: float = 1e-3  # Adam; no weight decay for TNet (paper)
    lr_decay_at: float = 0.8  # fraction of training after which lr is multiplied by lr_decay
    lr_decay: float = 0.1
    # Linear warm-up: the rate rises from lr / N to lr over the first N training images (all workers
    # together; 0 = none, the paper). Adam's first steps are full-size whatever the gradient, and at
    # a high rate they move the still-random location module and heads furthest from where learning
    # can start (the demo at 4e-3 began slower than at 2e-3); a ramp keeps the high rate for later.
    # Measured on the demo's weakest seed: 81.5% with 3,000 images against 82.5% without
    # (docs/benchmarks.md, "The demo"), so no config turns it on.
    warmup_images: int = 0
    # Decoupled weight decay (AdamW) on weights of 2+ dimensions; 0 = Adam without decay, the paper.
    # Adam's steps, of about lr per weight whatever the gradient, keep growing the norm of every
    # convolution that feeds a BatchNorm, and the larger the norm the smaller a step's effect; decay
    # holds it. Measured on Megapixel MNIST after 13,000 images on cells without digits: decay 0.5
    # held the backbone's norm at 1.18x its initial (1.67x without) and the model learnt no faster
    # from the digit cells after (docs/benchmarks.md); what had slowed it were the heads.
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    amp: bool = True  # mixed precision on GPU: bf16 where the GPU has it, else fp16
    # bf16 autocast on CPU: "auto" when the CPU has native bf16 units (AMX, AVX512-BF16), where it
    # is 1.3x faster on TNet's small convolutions; elsewhere emulated and slower ("always" forces it).
    cpu_bf16: str = "never"  # "never" | "auto" | "always" (YAML would read on / off as booleans)
    channels_last: bool = False  # NHWC convolution weights: oneDNN's native layout on CPU (1.12x)
    torch_threads: int = 0  # 0: as many as the worker's CPUs
    max_failures: int = 2  # worker/node losses survived by resuming from the last checkpoint
    storage_path: str = "outputs/ray_results"  # local folder or s3:// for checkpoints
    run_name: str = "tnet"  # same name again resumes
    log_every: int = 10  # steps between step-level metrics
    max_steps_per_epoch: int | None = None  # cap, for smoke runs
    # After each epoch, recompute the BatchNorm running statistics from this many training samples
    # (no augmentation, the model's deterministic selection) before validation and the checkpoint:
    # short runs evaluated with the lagging running averages score far below what their weights can
    # (tnet.levelnorm.recalibrating_norms). 0 = off, the paper.
    recalibrate_norms: int = 0
    debug_dir: str | None = None  # tests: every rank writes its pid, node and trained keys here (JSON)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("train.epochs, batch_size and num_workers must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr}: must be > 0")
        if self.warmup_images < 0:
            raise ValueError(f"train.warmup_images={self.warmup_images}: must be >= 0 (0 = no warm-up)")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay={self.weight_decay}: must be >= 0 (0 = Adam, no decay)")
        if self.recalibrate_norms < 0:
            raise ValueError(f"train.recalibrate_norms={self.recalibrate_norms}: must be >= 0 (0 = off)")
        if not 0.0 < self.lr_decay_at <= 1.0:
            raise ValueError(f"train.lr_decay_at={self.lr_decay_at}: must be in (0, 1]")
        if self.cpu_bf16 not in ("never", "auto", "always"):
            raise ValueError(f"train.cpu_bf16={self.cpu_bf16!r}: must be 'never', 'auto' or 'always'")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "tnet"
    model_name: str = "tnet"  # registry name; the new version gets alias "candidate"
    register: bool = True
    overlays: int = 8  # validation images drawn with their attended boxes


@dataclass(frozen=True)
class JobConfig:
    model: TNetConfig = field(default_factory=TNetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_job_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    return load_config(JobConfig, path, overrides)


def job_config_from_dict(data: dict[str, Any]) -> JobConfig:
    return from_dict(JobConfig, data)


__all__ = ["DataConfig", "JobConfig", "TrackingConfig", "TrainConfig", "job_config_from_dict",
           "load_job_config", "to_dict"]
