"""``training.precision``: bf16 autocast and NHWC weights change speed, not what TNet computes."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.fixtures.ray_runs import train_in_process
from tests.fixtures.tiny_mnist import tiny_job, tiny_model
from tnet.losses import LossConfig, TNetLoss
from tnet.model import TNet
from training.config import TrainConfig, load_job_config
from training.loop import CHECKPOINT_FILE, load_state
from training.precision import apply_layout, autocast, autocast_dtype, cpu_has_native_bf16

CPU = torch.device("cpu")


def canvases(seed: int = 0, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 512, 512, generator=g) * 2 - 1


def test_cpu_bf16_choices() -> None:
    assert autocast_dtype(CPU, TrainConfig()) is None  # the default: fp32, as the paper trains
    assert autocast_dtype(CPU, TrainConfig(cpu_bf16="always")) == torch.bfloat16
    auto = autocast_dtype(CPU, TrainConfig(cpu_bf16="auto"))
    assert auto == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype(torch.device("cuda"), TrainConfig(amp=False)) is None  # no GPU needed to decide
    with pytest.raises(ValueError, match="train.cpu_bf16='on'"):
        TrainConfig(cpu_bf16="on")


def test_cpu_bf16_from_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  cpu_bf16: auto\n  channels_last: true\n")
    cfg = load_job_config(path, ["train.cpu_bf16=always"])
    assert cfg.train.cpu_bf16 == "always" and cfg.train.channels_last is True
    with pytest.raises(ValueError, match="cpu_bf16"):
        load_job_config(path, ["train.cpu_bf16=off"])  # YAML reads a bare off as a boolean


def test_channels_last_computes_the_same_and_checkpoints_load_anywhere() -> None:
    torch.manual_seed(0)
    plain = TNet(tiny_model()).eval()
    nhwc = apply_layout(TNet(tiny_model()), True).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = canvases()
    with torch.no_grad():
        a, b = plain(images), nhwc(images)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    for sa, sb in zip(a.selections, b.selections):
        assert torch.equal(sa.cells, sb.cells)
    back = TNet(tiny_model())
    back.load_state_dict(nhwc.state_dict())  # an NHWC checkpoint loads into a plain model
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(images).logits, a.logits, atol=1e-4, rtol=1e-4)


def test_a_bf16_training_step_keeps_fp32_weights_and_tracks_fp32() -> None:
    torch.manual_seed(0)
    ref = TNet(tiny_model(dropout=0.0))
    model = apply_layout(TNet(tiny_model(dropout=0.0)), True)
    model.load_state_dict(ref.state_dict())
    loss_fn = TNetLoss(LossConfig())
    images, labels = canvases(1, 8), torch.arange(8) % 10
    with torch.no_grad():  # same cells chosen in both: compare the numbers, not the selection
        cells = [ref.eval()(images).selections[0].cells[:, None, :]]
    ref.train(), model.train()
    with autocast(CPU, torch.bfloat16):
        out = model(images, cells=cells)
        terms = loss_fn(out, labels)
    ref_terms = loss_fn(ref(images, cells=cells), labels)
    assert torch.isfinite(terms["total"])
    ce, ref_ce = float(terms["ce_final"].detach()), float(ref_terms["ce_final"].detach())
    assert abs(ce - ref_ce) < 0.05 * ref_ce
    terms["total"].backward()
    ref_terms["total"].backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and (p.grad is None) == (q.grad is None), name
        if p.grad is not None and q.grad.norm() > 1e-3:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
            assert cos > 0.9, (name, float(cos))


@pytest.mark.slow
def test_the_training_job_trains_in_bf16_nhwc_and_its_checkpoint_serves_in_fp32(
        ray_local: Any, tiny_mnist: Path, tmp_path: Path) -> None:
    cfg = tiny_job(tiny_mnist, tmp_path, run_name="bf16", lr_decay_at=1.0, cpu_bf16="always", channels_last=True)
    cfg = replace(cfg, tracking=replace(cfg.tracking, register=False, overlays=0))
    outcome = train_in_process(cfg, tmp_path / "out")
    run = MlflowClient(outcome.tracking_uri).get_run(outcome.run_id)
    assert run.data.metrics["train_bf16"] == 1.0 and run.data.params["train.cpu_bf16"] == "always"
    state = load_state(os.path.join(outcome.checkpoint, CHECKPOINT_FILE))
    initial = TNet(cfg.model).state_dict()
    assert all(v.dtype == initial[k].dtype for k, v in state["model"].items())  # fp32 weights were trained
    assert any(not torch.equal(v, initial[k]) for k, v in state["model"].items() if v.is_floating_point())
    model = TNet(cfg.model)
    model.load_state_dict(state["model"])  # a plain fp32 NCHW model serves it
    with torch.no_grad():
        assert torch.isfinite(model.eval()(canvases()).logits).all()
