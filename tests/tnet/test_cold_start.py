"""The cold-start options of TNet (all off in the paper's configs): what each one changes."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet.config import TNetConfig
from tnet.losses import (
    LossConfig,
    TNetLoss,
    cell_mil_loss,
    found_cell_loss,
    instance_weights,
    relative_confidence,
    relative_likelihood,
)
from tnet.model import LevelSelection, TNet, TNetOutput
from tnet.regions import TensorRegionSource

CFG = TNetConfig(
    num_classes=4, backbone="tiny_s", in_chans=1, input_size=256, base_size=64, levels=3, grid=3,
    overlap=0.5, locations=(2, 2), pos_channels=24, dropout=0.0,
)


def images(b=4, size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g) * 2 - 1


class SizeRecorder(TensorRegionSource):
    def __init__(self, images):
        super().__init__(images)
        self.sizes = []

    def read_regions(self, boxes, out_size):
        self.sizes.append(out_size)
        return super().read_regions(boxes, out_size)


def test_patch_size_reads_attended_regions_smaller():
    cfg = dataclasses.replace(CFG, patch_size=32)
    src = SizeRecorder(images())
    out = TNet(cfg)(src)
    assert src.sizes == [64, 32, 32]
    assert out.pixels_processed == 64 * 64 + 6 * 32 * 32
    assert TNetConfig(**{**dataclasses.asdict(CFG), "locations": (2, 2)}).region_size == 64
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(CFG, patch_size=8)


def test_level_norm_stats_keep_one_set_of_running_statistics_per_level():
    torch.manual_seed(0)
    model = TNet(dataclasses.replace(CFG, level_norm_stats=True)).train()
    first_bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = first_bn.running_mean.clone()
    model(images())
    level0 = first_bn.running_mean.clone()
    level1 = model.level_norms.l1_0_running_mean
    level2 = model.level_norms.l2_0_running_mean
    assert not torch.equal(level0, before)  # level 0 updated the backbone's own statistics
    assert not torch.equal(level1, before) and not torch.equal(level2, before)
    assert not torch.equal(level0, level1) and not torch.equal(level1, level2)
    # Outside a forward the backbone holds level 0's statistics; they travel in the state_dict.
    state = model.state_dict()
    assert "level_norms.l1_0_running_mean" in state
    clone = TNet(dataclasses.replace(CFG, level_norm_stats=True))
    clone.load_state_dict(state)
    model.eval(), clone.eval()
    x = images(seed=1)
    assert torch.allclose(model(x).logits, clone(x).logits, atol=1e-6)


def test_level_norm_stats_change_evaluation_only_through_statistics():
    """Same weights, same batch: training-mode outputs are identical with and without the option."""
    torch.manual_seed(0)
    plain = TNet(CFG).train()
    per_level = TNet(dataclasses.replace(CFG, level_norm_stats=True)).train()
    per_level.load_state_dict(plain.state_dict(), strict=False)
    x = images()
    assert torch.allclose(plain(x).logits, per_level(x).logits, atol=1e-6)


def test_cell_classes_and_mil_loss_train_the_location_module_only():
    cfg = dataclasses.replace(CFG, loc_classes=True)
    model = TNet(cfg).train()
    out = model(images())
    assert out.selections[0].cell_logits.shape == (4, 1, 9, 4)
    assert out.selections[1].cell_logits.shape == (4, 2, 9, 4)
    target = torch.tensor([0, 1, 2, 3])
    mil = cell_mil_loss(out, target)
    assert mil.ndim == 0 and mil.item() > 0
    mil.backward()
    assert model.location.cell_head.weight.grad.abs().sum() > 0
    assert model.location.out.weight.grad.abs().sum() > 0  # the scores are the MIL attention
    assert all(p.grad is None for p in model.backbone.parameters())  # detached input (the paper)


def test_loc_detach_false_lets_location_losses_shape_the_backbone():
    model = TNet(dataclasses.replace(CFG, loc_classes=True, loc_detach=False)).train()
    cell_mil_loss(model(images()), torch.tensor([0, 1, 2, 3])).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_mil_weight_enters_the_total_and_needs_cell_classes():
    target = torch.tensor([0, 1, 2, 3])
    model = TNet(dataclasses.replace(CFG, loc_classes=True)).train()
    out = model(images())
    plain = TNetLoss(LossConfig())(out, target)
    with_mil = TNetLoss(LossConfig(mil_weight=0.5))(out, target)
    assert torch.allclose(with_mil["total"], plain["total"] + 0.5 * with_mil["mil"])
    out = TNet(CFG).train()(images())
    with pytest.raises(ValueError, match="loc_classes"):
        TNetLoss(LossConfig(mil_weight=1.0))(out, target)
    with pytest.raises(ValueError, match="mil_weight"):
        LossConfig(mil_weight=-1.0)


def test_recalibrated_norms_hold_each_levels_statistics_of_the_passes():
    """Precise BN: after the block, every level's running statistics are the plain average of the
    batch statistics of that level's inputs over the passes made inside it."""
    from tnet.levelnorm import recalibrating_norms

    torch.manual_seed(0)
    model = TNet(dataclasses.replace(CFG, level_norm_stats=True, explore="gumbel")).train()
    model(images(seed=3))  # running statistics now hold something else
    first_bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = first_bn.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    with recalibrating_norms(model), torch.no_grad():
        assert not model.training and first_bn.training  # eval selection, batch statistics in the norms
        cells = [model(images(seed=seed)).selections[0].cells for seed in (4, 5, 4)]
    hook.remove()
    assert model.training and first_bn.momentum == 0.1
    # the deterministic top-k inside the block: the same image twice picks the same cells (the
    # config explores with Gumbel noise in training mode, which would pick others)
    assert torch.equal(cells[0], cells[2]) and torch.equal(seen[1], seen[7])
    assert len(seen) == 9  # three passes of three levels
    stored = [first_bn.running_mean, model.level_norms.l1_0_running_mean, model.level_norms.l2_0_running_mean]
    variances = [first_bn.running_var, model.level_norms.l1_0_running_var, model.level_norms.l2_0_running_var]
    for level in range(3):
        passes = [seen[level], seen[3 + level], seen[6 + level]]
        mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in passes]).mean(0)
        var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in passes]).mean(0)
        assert torch.allclose(stored[level], mean, atol=1e-5), level
        assert torch.allclose(variances[level], var, rtol=1e-4, atol=1e-6), level
    for name, value in model.state_dict().items():
        if name in weights:
            assert torch.equal(value, weights[name]), name  # only statistics change


def test_explore_keep_trains_on_the_modules_own_top_cells_and_samples_the_rest():
    model = TNet(dataclasses.replace(CFG, grid=4, locations=(3, 2), explore="gumbel", explore_keep=2))
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(64, 16, generator=g).log_softmax(-1)
    top = logp.topk(3, dim=-1).indices
    model.eval()
    assert torch.equal(model.choose(logp, 3), top)  # evaluation: the paper's top-k
    model.train()
    torch.manual_seed(0)
    chosen = model.choose(logp, 3)
    assert torch.equal(chosen[:, :2], top[:, :2])  # the kept ones are the module's best two
    assert all(len(set(row.tolist())) == 3 for row in chosen)  # the sampled one is another cell
    assert not torch.equal(chosen[:, 2], top[:, 2])  # and sampled: not the third best every time
    assert torch.equal(model.choose(logp, 2), top[:, :2])  # k at or below keep: nothing sampled
    # explore_keep 0 is plain Gumbel top-k sampling, draw for draw
    plain = TNet(dataclasses.replace(CFG, grid=4, locations=(3, 2), explore="gumbel", explore_scale=4.0)).train()
    torch.manual_seed(1)
    got = plain.choose(logp, 3)
    torch.manual_seed(1)
    u = torch.rand_like(logp).clamp_(1e-9, 1 - 1e-9)
    assert torch.equal(got, (logp * 4.0 - torch.log(-torch.log(u))).topk(3, dim=-1).indices)
    with pytest.raises(ValueError, match="explore_keep"):
        dataclasses.replace(CFG, explore="gumbel", explore_keep=3)  # above min(locations) = 2


def test_explore_scale_anneals_geometrically_and_resumes_with_the_checkpoint():
    cfg = dataclasses.replace(CFG, explore="gumbel", explore_scale=4.0, explore_scale_end=64.0, explore_anneal_images=8)
    assert [cfg.explore_scale_at(n) for n in (0, 4, 8, 100)] == pytest.approx([4.0, 16.0, 64.0, 64.0])
    assert dataclasses.replace(CFG, explore="gumbel", explore_scale=4.0).explore_scale_at(10**6) == 4.0
    model = TNet(cfg).train()
    model(images(b=4))
    assert model.explore_scale() == pytest.approx(16.0)  # 4 training images seen
    with torch.no_grad():
        model(images(b=4))  # no gradient (norm recalibration): not a training image
    model.eval()
    model(images(b=4))
    assert int(model.explore_images) == 4
    clone = TNet(cfg)
    clone.load_state_dict(model.state_dict())
    assert clone.explore_scale() == pytest.approx(16.0)
    # Late in the anneal the noise no longer moves the module's choice away from its top-k.
    late = TNet(cfg).train()
    late.explore_images.fill_(8)
    g = torch.Generator().manual_seed(5)
    logp = torch.nn.functional.normalize(torch.randn(256, 9, generator=g), dim=-1).log_softmax(-1)
    early = TNet(cfg).train()
    top = logp.topk(2, dim=-1).indices.sort(-1).values
    agree = {name: (m.choose(logp, 2).sort(-1).values == top).all(-1).float().mean().item()
             for name, m in (("early", early), ("late", late))}
    assert agree["late"] > 0.9 > agree["early"]
    for bad in ({"explore": "none"}, {"explore_scale_end": 0.0}, {"explore_anneal_images": 0}):
        with pytest.raises(ValueError, match="explore"):
            dataclasses.replace(cfg, **bad)


def test_forced_cells_replace_the_modules_choice_and_are_checked():
    model = TNet(dataclasses.replace(CFG, levels=2, locations=(2,))).eval()
    x = images(b=3)
    forced = torch.tensor([[[0, 8]], [[4, 5]], [[7, 1]]])  # (B, R=1, k=2)
    out = model(x, cells=[forced])
    assert torch.equal(out.selections[0].cells, forced[:, 0])
    grid = model.grids[0]
    expected = torch.tensor([[grid.cell_offset(c) for c in row] for row in forced[:, 0].tolist()], dtype=torch.float32)
    assert torch.allclose(out.selections[0].boxes[..., :2] * CFG.input_size, expected)
    chosen = model(x).selections[0].cells
    assert torch.equal(model(x, cells=[chosen[:, None]]).logits, model(x).logits)  # replaying = not forcing
    for bad, match in (([], "levels given"), ([forced[:, :, :1]], "shape"), ([forced + 9], "indices")):
        with pytest.raises(ValueError, match=match):
            model(x, cells=bad)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_relative_likelihood_is_leave_one_out_and_sums_to_zero(batch, regions, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, regions, classes, generator=gen)
    target = torch.randint(0, classes, (batch,), generator=gen)
    adv = relative_likelihood(logits, target)
    assert adv.shape == (batch, regions)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(batch), atol=1e-6)  # only the ranking within an image
    p = logits.softmax(-1)[torch.arange(batch), :, target]  # (B, R)
    if regions > 1:
        f = regions - 1  # the last feature against the mean of the others, spelled out
        assert torch.allclose(adv[:, f], p[:, f] - p[:, :f].mean(dim=1), atol=1e-6)


def test_relative_feature_reward_raises_the_cells_the_heads_read_best():
    target = torch.tensor([2])
    head_probs = torch.tensor([[0.45, 0.3, 0.1]])  # p(class 2) of three attended cells' heads
    feature_logits = torch.full((1, 3, 4), -9.0)
    feature_logits[0, :, 2] = head_probs.log()[0]
    feature_logits[0, :, 0] = (1 - head_probs).log()[0]  # the rest of the mass on a wrong class
    log_probs = torch.log(torch.full((1, 3), 1 / 9)).requires_grad_()

    def grads(feature_reward: str) -> torch.Tensor:
        sel = LevelSelection(
            boxes=torch.zeros(1, 3, 4), source_boxes=torch.zeros(1, 3, 4), cells=torch.tensor([[0, 4, 8]]),
            log_probs=log_probs, probs=torch.full((1, 1, 9), 1 / 9), logits=torch.zeros(1, 1, 9),
        )
        out = TNetOutput(
            logits=torch.zeros(1, 4), level_logits=[torch.zeros(1, 4)] * 2,
            feature_logits=[torch.zeros(1, 1, 4), feature_logits], selections=[sel],
        )
        terms = TNetLoss(LossConfig(feature_reward=feature_reward))(out, target)
        (grad,) = torch.autograd.grad(terms["rf_features"], log_probs)
        return grad[0]

    relative = grads("relative")
    assert relative[0] < 0 < relative[2]  # gradient descent raises the best cell's log p, lowers the worst
    assert abs(float(relative.sum())) < 1e-6
    correct = grads("correct")  # the paper: every head wrong here (argmax class 0), all pushed down alike
    assert torch.all(correct > 0) and torch.allclose(correct, correct[0].expand(3))
    # label-free: the top probabilities are 0.55 (class 0), 0.7 (class 0), 0.9 (class 0): the third
    # cell's head is the surest, though of a wrong class, and is raised; the first is lowered
    confidence = grads("confidence")
    assert confidence[0] > 0 > confidence[2] and abs(float(confidence.sum())) < 1e-6
    with pytest.raises(ValueError, match="feature_reward"):
        LossConfig(feature_reward="likely")


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_relative_confidence_ranks_the_surest_heads_whatever_the_label(batch, regions, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, regions, classes, generator=gen, requires_grad=True)
    adv = relative_confidence(logits)
    assert adv.shape == (batch, regions) and not adv.requires_grad  # a reward, not a path
    assert torch.allclose(adv.sum(dim=1), torch.zeros(batch), atol=1e-6)
    top = logits.detach().softmax(-1).amax(-1)
    if regions > 1:  # the order of the advantages is the order of the heads' top probabilities
        assert torch.equal(adv.argmax(dim=1), top.argmax(dim=1))
        f = regions - 1
        assert torch.allclose(adv[:, f], top[:, f] - top[:, :f].mean(dim=1), atol=1e-6)
    else:
        assert torch.equal(adv, torch.zeros(batch, 1))


def test_score_pooling_lets_cross_entropy_reach_the_location_scores_only():
    target = torch.tensor([0, 1, 2, 3])

    def ce_grads(score_pooling: bool) -> tuple[bool, bool]:
        torch.manual_seed(0)
        model = TNet(dataclasses.replace(CFG, score_pooling=score_pooling, feature_weighting=True)).train()
        out = model(images())
        torch.nn.functional.cross_entropy(out.logits, target).backward()
        location = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.location.parameters())
        backbone = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
        return location, backbone

    assert ce_grads(False) == (False, True)  # the paper: cross-entropy never reaches the location module
    assert ce_grads(True) == (True, True)  # the pooling weights carry it to the scores


def test_score_pooling_weights_the_attended_features_by_their_location_probability():
    model = TNet(dataclasses.replace(CFG, levels=2, locations=(2,), score_pooling=True)).eval()
    feats = torch.randn(1, 3, model.classifier.in_features)
    scores = torch.tensor([[0.0, 2.0, -1.0]])  # the whole view (0), then two cells' log(p * cells)
    weights = scores[0].exp()
    expected = model.classifier((weights[:, None] * feats[0]).sum(0) / weights.sum())
    assert torch.allclose(model.aggregate(feats, scores)[0], expected, atol=1e-5)
    uniform = torch.zeros(1, 3)  # an indifferent module (uniform p) leaves the paper's plain mean
    assert torch.allclose(model.aggregate(feats, uniform), model.classifier(feats.mean(1)), atol=1e-5)


def test_loc_coords_false_makes_the_scores_independent_of_position():
    model = TNet(dataclasses.replace(CFG, loc_coords=False)).eval()
    plain = TNet(CFG).eval()
    plain.load_state_dict(model.state_dict())  # same parameters either way
    cells = torch.ones(2, model.backbone.loc_channels, 3, 3)  # identical features in every cell
    with torch.no_grad():
        for p in (model.location.coord_scale, plain.location.coord_scale):
            p.fill_(3.0)
        scores, _ = model.location(cells)
        with_coords, _ = plain.location(cells)
    assert torch.allclose(scores, scores[:, :1].expand_as(scores))  # nothing but the features
    assert not torch.allclose(with_coords, with_coords[:, :1].expand_as(with_coords))


def _found_case(head_p_true, cells, parents=1, n_cells=9):
    """A one-image output whose attended cells' heads give p(class 2) = ``head_p_true``."""
    p = torch.tensor([head_p_true])
    feature_logits = torch.full((1, p.shape[1], 4), -9.0)
    feature_logits[0, :, 2] = p.log()[0]
    feature_logits[0, :, 0] = (1 - p).clamp_min(1e-6).log()[0]
    logits = torch.zeros(1, parents, n_cells, requires_grad=True)
    probs = logits.softmax(-1)
    sel = LevelSelection(
        boxes=torch.zeros(1, p.shape[1], 4), source_boxes=torch.zeros(1, p.shape[1], 4),
        cells=torch.tensor([cells]), log_probs=probs.flatten(1).log()[:, : p.shape[1]], probs=probs,
        logits=logits,
    )
    out = TNetOutput(
        logits=torch.zeros(1, 4), level_logits=[torch.zeros(1, 4)] * 2,
        feature_logits=[torch.zeros(1, 1, 4), feature_logits], selections=[sel],
    )
    return out, logits


def test_found_cell_loss_raises_the_cells_whose_heads_read_the_label_and_is_silent_otherwise():
    target = torch.tensor([2])
    out, logits = _found_case([0.9, 0.3, 0.6], [0, 4, 8])  # cells 0 and 8 found at threshold 0.5
    loss, found = found_cell_loss(out, target, 0.5)
    assert float(found) == 2.0
    # uniform start: the cross-entropy towards {0, 8} is -log(1/9)
    assert torch.isclose(loss, torch.log(torch.tensor(9.0)))
    (grad,) = torch.autograd.grad(loss, logits)
    raised = {c for c in range(9) if grad[0, 0, c] < 0}  # gradient descent raises these scores
    assert raised == {0, 8}
    assert grad[0, 0, 4] > 0 and torch.isclose(grad[0, 0, 4], grad[0, 0, 1])  # read but not found: like untried
    # no head sure enough: no signal at all, rather than pushing the tried cells down
    quiet, _ = _found_case([0.4, 0.3, 0.2], [0, 4, 8])
    loss, found = found_cell_loss(quiet, target, 0.5)
    assert float(loss) == 0.0 and float(found) == 0.0
    # a wrong top class is not found, however likely the label is
    wrong, _ = _found_case([0.45], [3])
    wrong.feature_logits[1][0, 0, 1] = 0.0  # class 1 now beats p(class 2) = 0.45
    assert float(found_cell_loss(wrong, target, 0.4)[1]) == 0.0


def test_found_cell_loss_maps_each_cell_to_its_own_region_and_enters_the_total():
    target = torch.tensor([2])
    out, logits = _found_case([0.9, 0.1, 0.1, 0.8], [5, 5, 1, 1], parents=2)  # k = 2 per region
    loss, _ = found_cell_loss(out, target, 0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 0, 5] < 0 and grad[0, 1, 1] < 0  # region 0's first cell, region 1's second cell
    assert grad[0, 0, 1] > 0 and grad[0, 1, 5] > 0
    out, _ = _found_case([0.9, 0.3, 0.6], [0, 4, 8])
    base = TNetLoss(LossConfig())(out, target)
    with_found = TNetLoss(LossConfig(found_weight=2.0))(out, target)
    assert torch.isclose(with_found["total"], base["total"] + 2.0 * with_found["found"])
    for bad in ({"found_weight": -1.0}, {"found_threshold": 0.0}, {"found_threshold": 1.5}):
        with pytest.raises(ValueError, match="found_"):
            LossConfig(**bad)


def test_found_weight_trains_the_location_module_through_a_real_forward():
    torch.manual_seed(0)
    model = TNet(dataclasses.replace(CFG, levels=2, locations=(3,))).train()
    out = model(images())
    target = out.feature_logits[1].detach().argmax(-1)[:, 0]  # each image's first cell reads "its label"
    loss, found = found_cell_loss(out, target, 1e-3)
    assert float(found) >= 1.0  # per image: at least its first cell
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.location.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.parameters())  # loc_detach


def test_restart_heads_at_gives_the_feature_readers_new_weights_once_and_the_same_on_every_rank():
    """``restart_heads_at``: when the training-image count crosses it, the fusion, weighting, heads and
    classifier are drawn again (from the count alone, as DDP ranks need); the backbone and the location
    module keep what they learnt; later steps and evaluation restart nothing."""
    cfg = dataclasses.replace(CFG, feature_weighting=True, restart_heads_at=6)
    model = TNet(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = TNetLoss(LossConfig())
    labels = torch.tensor([0, 1, 2, 0])

    def step():
        loss_fn(model(images(b=4)), labels)["total"].backward()
        opt.step()
        opt.zero_grad()

    heads = lambda m: [p.detach().clone() for mod in m.head_modules() for p in mod.parameters()]  # noqa: E731
    others = lambda m: [p.detach().clone() for n, p in m.named_parameters() if n.startswith(("backbone", "location"))]  # noqa: E731
    step()  # images 0-3: before the restart
    trained_heads, trained_rest = heads(model), others(model)
    fresh = TNet(cfg)
    fresh.restart_heads(6)
    model.eval()
    model(images(b=4))  # evaluation never restarts
    assert all(torch.equal(a, b) for a, b in zip(heads(model), trained_heads))
    model.train()
    with torch.no_grad():
        model(images(b=4))  # norm recalibration neither
    assert int(model.explore_images) == 4
    # images 4-7 cross 6: the forward starts from fresh heads, drawn as any other rank draws them
    torch.manual_seed(123)  # the rank's own random state does not matter
    lr, opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"], 0.0
    step()
    assert all(torch.equal(a, b) for a, b in zip(heads(model), heads(fresh)))
    assert all(torch.equal(a, b) for a, b in zip(others(model), trained_rest))
    opt.param_groups[0]["lr"] = lr
    step()  # images 8-11: trained on, not restarted again
    assert not all(torch.equal(a, b) for a, b in zip(heads(model), heads(fresh)))
    assert int(model.explore_images) == 12
    with pytest.raises(ValueError, match="restart_heads_at"):
        dataclasses.replace(CFG, restart_heads_at=-1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_instance_weights_average_one_and_follow_each_cells_p_of_the_label(b, r, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, r, 4, generator=g) * 3
    target = torch.randint(0, 4, (b,), generator=g)
    w = instance_weights(logits, target)
    assert w.shape == (b, r) and torch.allclose(w.mean(dim=1), torch.ones(b), atol=1e-5)
    p = logits.softmax(-1).gather(2, target[:, None, None].expand(-1, r, 1))[..., 0]
    assert torch.all(w.gather(1, p.argsort(dim=1)).diff(dim=1) >= -1e-6)  # more p(label), more weight
    assert torch.allclose(instance_weights(logits[:, :1].expand(-1, r, -1), target), torch.ones(b, r))  # equal heads


def test_feature_ce_mil_teaches_the_cell_that_explains_the_label_and_equals_the_paper_at_chance():
    """``feature_ce: mil``: a cell that gives the label low probability (an empty or distractor cell)
    gets less of the per-feature cross-entropy's gradient than one that reads it; same loss as the
    paper's when the heads agree."""
    target = torch.tensor([2])
    heads = torch.tensor([[[0.0, 0.0, 3.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    out, _ = _found_case([0.5, 0.5, 0.5], [0, 4, 8])
    out.feature_logits[1] = heads
    grads = [torch.autograd.grad(TNetLoss(LossConfig(feature_ce=c))(out, target)["ce_features"], heads)[0][0].norm(dim=-1)
             for c in ("mil", "mean")]  # fmt: skip
    ratio = grads[0] / grads[1]  # each cell's gradient against the paper's
    assert ratio[0] > 1 and ratio[0] > ratio[2] > ratio[1]  # the reading cell, the undecided one, the distractor
    flat, _ = _found_case([0.5, 0.5, 0.5], [0, 4, 8])
    flat.feature_logits[1] = torch.zeros(1, 3, 4)
    assert torch.isclose(TNetLoss(LossConfig(feature_ce="mil"))(flat, target)["ce_features"],
                         TNetLoss(LossConfig())(flat, target)["ce_features"])
    with pytest.raises(ValueError, match="feature_ce"):
        LossConfig(feature_ce="max")
