"""Numeric precision and memory layout of a training step: what the worker's hardware runs fast.

On CPU, TNet's small convolutions spend most of a step in oneDNN; CPUs with native bf16 (AMX or
AVX512-BF16 units) run them in bf16 at a fraction of the fp32 cost, and NHWC ("channels last")
weights spare oneDNN a layout conversion on every call. Measured on the demo's step (tiny_s,
batch 8, one thread, docs/benchmarks.md "The demo"): channels last 1.12x, with bf16 1.44x.
Without native units bf16 is emulated and slower than fp32, hence ``auto``.
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import TrainConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: torch.device, train: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of a training step on ``device``, or None for full fp32.

    GPU (``train.amp``): bf16 where supported (no loss scaling needed), else fp16. CPU
    (``train.cpu_bf16``): bf16 when "always", or when "auto" and the CPU has native bf16 units.
    """
    if device.type == "cuda":
        if not train.amp:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if train.cpu_bf16 == "always" or (train.cpu_bf16 == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The autocast context for ``autocast_dtype``'s answer (disabled for None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def apply_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """Convolution weights in NHWC when ``channels_last`` (``train.channels_last``; inputs follow
    the weights' layout)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
