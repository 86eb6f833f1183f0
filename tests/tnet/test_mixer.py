"""``model.mixer_layers``: self-attention over an image's features before they are pooled."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet.config import TNetConfig
from tnet.model import TNet

CFG = TNetConfig(
    num_classes=4, backbone="tiny", input_size=256, base_size=64, levels=2, grid=3, overlap=0.5,
    locations=(3,), pos_channels=24, dropout=0.0, feature_weighting=True, mixer_layers=1,
)  # fmt: skip


def images(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 256, 256, generator=g) * 2 - 1


def test_mixer_off_is_the_paper_model_and_on_adds_only_the_mixer() -> None:
    plain = TNet(dataclasses.replace(CFG, mixer_layers=0))
    mixed = TNet(CFG)
    assert plain.mixer is None
    extra = set(mixed.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("mixer.") for key in extra)
    assert set(plain.state_dict()) <= set(mixed.state_dict())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 9), st.integers(0, 10_000))
def test_pooling_is_a_set_function_of_the_features(n, seed) -> None:
    """No order enters: the features carry their positions, the mixer and the pooling see a set."""
    torch.manual_seed(0)
    model = TNet(CFG).eval()
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, n, model.classifier.in_features, generator=g)
    order = torch.randperm(n, generator=g)
    with torch.no_grad():
        assert torch.allclose(model.aggregate(feats), model.aggregate(feats[:, order]), atol=1e-5)


def test_each_feature_is_read_with_the_others() -> None:
    """Unlike a weighted mean, adding a feature changes how the others are read: a duplicate of one
    feature does not enter the pooled vector as a plain second copy would."""
    torch.manual_seed(0)
    model = TNet(CFG).eval()
    feats = torch.randn(1, 3, model.classifier.in_features)
    with torch.no_grad():
        before = model.mixer(feats)
        after = model.mixer(torch.cat([feats, feats[:, :1]], dim=1))
    assert not torch.allclose(before, after[:, :3], atol=1e-4)


def test_mixer_trains_from_the_final_loss_only_and_restarts_with_the_heads() -> None:
    torch.manual_seed(0)
    model = TNet(CFG)
    out = model(images())
    out.feature_logits[-1].sum().backward()  # the per-feature heads read each feature alone
    assert all(p.grad is None for p in model.mixer.parameters())
    model.zero_grad()
    model(images()).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mixer.parameters() if p.requires_grad)
    assert model.mixer in model.head_modules()
    before = [p.detach().clone() for p in model.mixer.parameters()]
    model.restart_heads(7)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.mixer.parameters())]
    assert any(changed)
    again = TNet(CFG)
    again.restart_heads(7)
    assert all(torch.equal(a, b) for a, b in zip(model.mixer.parameters(), again.mixer.parameters()))


def test_more_locations_at_evaluation_and_bf16() -> None:
    model = TNet(CFG).eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = model(images(), [5])
    assert out.logits.shape == (2, 4) and out.features_per_image == 6


def test_bad_mixer_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="mixer_layers"):
        dataclasses.replace(CFG, mixer_layers=-1)
    with pytest.raises(ValueError, match="mixer_heads"):
        TNet(dataclasses.replace(CFG, mixer_heads=5))  # tiny's 128 features do not split into 5 heads
