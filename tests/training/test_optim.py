"""training.optim: Adam by default; with train.weight_decay, decay on weight tensors only; the step schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import TrainConfig, load_job_config
from training.optim import lr_at, make_optimizer, warmup_factor

ROOT = Path(__file__).resolve().parents[2]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))


def test_no_decay_is_the_papers_adam() -> None:
    opt = make_optimizer(model(), TrainConfig(lr=0.01))
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0


def test_decay_shrinks_kernels_and_matrices_but_not_biases_or_norm_scales() -> None:
    net = model()
    net(torch.zeros(1, 1, 5, 5))  # materialise the lazy layer
    opt = make_optimizer(net, TrainConfig(lr=0.01, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves anything
    opt.step()
    for name, p in net.named_parameters():
        factor = 1 - 0.01 * 0.5 if p.ndim >= 2 else 1.0
        assert torch.allclose(p.detach(), before[name] * factor), name
    assert {n for n, p in net.named_parameters() if p.ndim >= 2} == {"0.weight", "3.weight"}
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-1)


def test_warmup_ramps_linearly_then_holds() -> None:
    train = TrainConfig(lr=0.01, warmup_images=100)
    assert [warmup_factor(train, n) for n in (0, 16, 50, 99, 100, 5000)] == [0.01, 0.16, 0.5, 0.99, 1.0, 1.0]
    assert warmup_factor(TrainConfig(), 0) == 1.0  # off by default: the paper
    with pytest.raises(ValueError, match="warmup_images"):
        TrainConfig(warmup_images=-1)


def decayed_epochs(train: TrainConfig) -> list[int]:
    return [e for e in range(train.epochs) if lr_at(train, e) < train.lr]


def test_step_schedule_decays_once_lr_decay_at_of_the_epochs_have_passed() -> None:
    paper = TrainConfig(lr=0.01, epochs=12)  # lr_decay_at 0.8: the last three
    assert decayed_epochs(paper) == [9, 10, 11]
    assert lr_at(paper, 9) == pytest.approx(0.001) and lr_at(paper, 8) == 0.01


def test_the_demo_decays_in_its_last_epoch_only() -> None:
    """The demo's late take-offs still rise at the paper's decay point (docs/benchmarks.md, "The demo")."""
    demo = load_job_config(ROOT / "configs" / "megapixel_mnist_demo.yaml").train
    assert decayed_epochs(demo) == [demo.epochs - 1]
