import dataclasses

import pytest
import torch

from tnet.config import TNetConfig
from tnet.geometry import features_per_image
from tnet.losses import LossConfig, TNetLoss
from tnet.model import TNet
from tnet.profiling import count_flops, profile
from tnet.regions import TensorRegionSource

CFG = TNetConfig(
    num_classes=4, backbone="tiny", input_size=256, base_size=64, levels=3, grid=3, overlap=0.5,
    locations=(2, 2), pos_channels=24, dropout=0.0,
)


def images(b=3, c=3, size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


def test_output_shapes_and_counts():
    out = TNet(CFG)(images())
    assert out.logits.shape == (3, 4)
    assert [lg.shape for lg in out.level_logits] == [(3, 4)] * 3
    assert [f.shape[1] for f in out.feature_logits] == [1, 2, 4]
    assert out.features_per_image == 7 == features_per_image(CFG.locations)
    assert out.pixels_processed == 7 * 64 * 64
    sel1, sel2 = out.selections
    assert sel1.boxes.shape == (3, 2, 4) and sel2.boxes.shape == (3, 4, 4)
    assert sel1.probs.shape == (3, 1, 9) and sel2.probs.shape == (3, 2, 9)
    assert torch.allclose(sel1.probs.sum(-1), torch.ones(3, 1))


def test_boxes_follow_the_grid_and_nest():
    out = TNet(CFG).eval()(images())
    sel1, sel2 = out.selections
    side1 = (sel1.boxes[..., 2] - sel1.boxes[..., 0]) * 256
    side2 = (sel2.boxes[..., 2] - sel2.boxes[..., 0]) * 256
    assert torch.allclose(side1, torch.full_like(side1, 128))
    assert torch.allclose(side2, torch.full_like(side2, 64))
    # children lie inside their parent
    parents = sel1.boxes.repeat_interleave(2, dim=1)
    assert (sel2.boxes[..., :2] >= parents[..., :2] - 1e-6).all()
    assert (sel2.boxes[..., 2:] <= parents[..., 2:] + 1e-6).all()
    # the two chosen cells of a region are distinct (top-k, no repeats)
    assert (sel1.cells[:, 0] != sel1.cells[:, 1]).all()


def test_source_boxes_are_in_source_pixels():
    imgs = [torch.zeros(3, 300, 600), torch.zeros(3, 900, 450)]
    out = TNet(CFG).eval()(TensorRegionSource(imgs))
    sb = out.selections[0].source_boxes
    assert torch.allclose(sb[0, :, 2] - sb[0, :, 0], torch.full((2,), 300.0))  # half of 600 px wide
    assert torch.allclose(sb[1, :, 3] - sb[1, :, 1], torch.full((2,), 450.0))  # half of 900 px tall


def test_locations_change_features_and_flops():
    model = TNet(CFG).eval()
    x = images(1)
    with torch.no_grad():
        assert model(x, [1, 1]).features_per_image == 3
        assert model(x, [3, 2]).features_per_image == 1 + 3 + 6
    small = count_flops(model, x, [1, 1])
    large = count_flops(model, x, [3, 2])
    # FLOPs scale with the number of processed patches (each patch costs the same)
    assert large / small == pytest.approx(10 / 3, rel=0.05)
    with pytest.raises(ValueError, match="locations"):
        model(x, [10, 1])


def test_eval_locations_apply_outside_training_only():
    cfg = dataclasses.replace(CFG, eval_locations=(3, 1))
    model, x = TNet(cfg), images(2)
    assert cfg.inference_locations == (3, 1) and cfg.features_per_image == 1 + 3 + 3
    with torch.no_grad():
        assert model.train()(x).features_per_image == 1 + 2 + 4  # training: ``locations``
        assert model.eval()(x).features_per_image == 1 + 3 + 3
        assert model(x, [1, 1]).features_per_image == 3  # an explicit argument wins
    assert profile(cfg).features_per_image == 7  # FLOPs are counted at the inference k
    assert TNet(CFG).eval()(x).features_per_image == 7 and CFG.inference_locations == CFG.locations
    for bad in ((3,), (10, 1), (0, 1)):
        with pytest.raises(ValueError, match="eval_locations"):
            dataclasses.replace(CFG, eval_locations=bad)


def test_selection_is_deterministic_top_k_in_training_mode():
    model = TNet(CFG).train()
    x = images()
    a = model(x).selections[0].cells
    b = model(x).selections[0].cells
    assert torch.equal(a, b)


def _grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    loc = [p.grad for p in model.location.parameters()]
    bb = [p.grad for p in model.backbone.parameters()]
    return loc, bb


def _is_zero(grads):
    return all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_gradient_isolation():
    torch.manual_seed(0)
    model = TNet(CFG).train()
    loss_fn = TNetLoss(LossConfig(w_ce=0.5, w_rf=0.5))
    target = torch.tensor([0, 1, 2])
    terms = loss_fn(model(images()), target)
    ce = terms["ce_final"] + terms["ce_features"]
    rf = terms["rf_final"] + terms["rf_features"]
    loc, bb = _grads(model, ce)
    assert _is_zero(loc), "cross-entropy reached the location module"
    assert not _is_zero(bb)
    loc, bb = _grads(model, rf)
    assert _is_zero(bb), "REINFORCE reached the backbone"
    assert not _is_zero(loc)


def test_loss_weights_and_baseline_update():
    torch.manual_seed(0)
    cfg = LossConfig(w_ce=0.3, w_rf=0.4, reinforce_lambda=0.1)
    loss_fn = TNetLoss(cfg)
    out = TNet(CFG)(images())
    terms = loss_fn(out, torch.tensor([0, 1, 2]))
    expected = (0.3 * terms["ce_final"] + 0.1 * 0.4 * terms["rf_final"]
                + 0.7 * terms["ce_features"] + 0.1 * 0.6 * terms["rf_features"])
    assert torch.allclose(terms["total"], expected)
    before = float(loss_fn.baseline)
    loss_fn.update_baseline(terms)
    mixed = 0.4 * float(terms["reward"]) + 0.6 * float(terms["feature_reward"])
    assert float(loss_fn.baseline) == pytest.approx(0.9 * before + 0.1 * mixed)


def test_per_feature_level_cap_counts_T():
    out = TNet(CFG)(images())
    full = TNetLoss(LossConfig())(out, torch.tensor([0, 1, 2]))
    capped = TNetLoss(LossConfig(per_feature_levels=1))(out, torch.tensor([0, 1, 2]))
    assert not torch.allclose(full["ce_features"], capped["ce_features"])


def test_paper_configs_profile():
    from training.config import load_job_config

    p = profile(load_job_config("configs/fmow_896.yaml").model)
    assert p.features_per_image == 5
    assert p.flops_ratio >= 3.0
