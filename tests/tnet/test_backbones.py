"""One contract test over every registered backbone (timm's registry-wide test habit)."""

import pytest
import torch

from tnet.backbones import available, create_backbone


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("in_chans", [1, 3])
def test_backbone_contract(name, in_chans):
    model = create_backbone(name, in_chans=in_chans).eval()
    size = 77 if name == "bagnet77" else 96
    with torch.no_grad():
        feats, fmap = model(torch.randn(2, in_chans, size, size))
    assert feats.shape == (2, model.num_features)
    assert fmap.shape[:2] == (2, model.loc_channels)
    assert fmap.shape[-1] >= 1


def test_registry_covers_the_paper_backbones():
    assert {"efficientnet_b0", "resnet18", "resnet50", "bagnet77", "tiny"} <= set(available())


def test_bagnet77_receptive_field_and_shape():
    model = create_backbone("bagnet77")
    assert model.receptive_field() == 77
    assert model.num_features == 512 and model.loc_channels == 1024
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_efficientnet_location_map_is_the_papers():
    model = create_backbone("efficientnet_b0").eval()
    with torch.no_grad():
        _, fmap = model(torch.randn(1, 3, 224, 224))
    assert fmap.shape == (1, 80, 14, 14)


def test_unknown_backbone_named():
    with pytest.raises(ValueError, match="backbone='nope'"):
        create_backbone("nope")


def test_local_weights_round_trip(tmp_path):
    a = create_backbone("tiny")
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b = create_backbone("tiny", weights=str(path))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
