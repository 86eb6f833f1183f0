"""FLOPs of TNet and of its whole-image baseline, counted by torch, never estimated by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from tnet.baseline import WholeImageClassifier
from tnet.config import TNetConfig
from tnet.model import TNet, count_parameters


@dataclass(frozen=True)
class Profile:
    features_per_image: int
    gflops: float  # TNet forward, one image (multiply-add = 2 FLOPs, torch's convention)
    baseline_gflops: float  # the backbone on the whole image at input_size
    flops_ratio: float  # baseline / TNet
    params: int
    baseline_params: int
    pixels_processed: int
    input_pixels: int


def count_flops(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@torch.no_grad()
def profile(cfg: TNetConfig, locations: Sequence[int] | None = None, seed: int = 0) -> Profile:
    """One image through TNet and through the baseline, in eval mode."""
    torch.manual_seed(seed)
    model = TNet(cfg).eval()
    baseline = WholeImageClassifier(cfg.backbone, cfg.num_classes, cfg.input_size, cfg.in_chans).eval()
    image = torch.rand(1, cfg.in_chans, cfg.input_size, cfg.input_size) * 2 - 1
    out = model(image, locations)  # warm-up, and the feature count
    tnet_flops = count_flops(model, image, locations)
    base_flops = count_flops(baseline, image)
    return Profile(
        features_per_image=out.features_per_image,
        gflops=tnet_flops / 1e9,
        baseline_gflops=base_flops / 1e9,
        flops_ratio=base_flops / max(tnet_flops, 1),
        params=count_parameters(model),
        baseline_params=count_parameters(baseline),
        pixels_processed=out.pixels_processed,
        input_pixels=cfg.input_size**2,
    )
