"""timm networks as TNet backbones: EfficientNet-B0 and ResNet-18/50.

The location map is captured with a forward hook on a named block, so the timm network runs
unchanged (and any timm improvement or local checkpoint applies). No pretrained download: weights
come only from a local path (see ``registry.load_local_weights``).
"""

from __future__ import annotations

import timm
from torch import Tensor

from tnet.backbones.registry import Backbone, register


class TimmBackbone(Backbone):
    """A timm classifier without its head, plus a spatial map taken from ``loc_module``."""

    def __init__(self, name: str, loc_module: str, in_chans: int, drop_path: float) -> None:
        super().__init__()
        self.model = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path
        )
        module = self.model.get_submodule(loc_module)
        self._captured: list[Tensor] = []
        module.register_forward_hook(lambda _m, _i, out: self._captured.append(out))
        self.num_features = self.model.num_features
        self.loc_channels, self.loc_reduction = _probe(self, in_chans)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._captured.clear()
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, D)
        return features, self._captured[-1]  # (B, C, h, w)


def _probe(backbone: TimmBackbone, in_chans: int) -> tuple[int, int]:
    import torch

    size = 64
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        _, fmap = backbone(torch.zeros(1, in_chans, size, size))
    backbone.train(was_training)
    return int(fmap.shape[1]), size // int(fmap.shape[-1])


@register("efficientnet_b0")
def efficientnet_b0(in_chans: int = 3, drop_path: float = 0.0) -> Backbone:
    # blocks.3 is the paper's 80-channel stride-16 map (14 x 14 at 224 px).
    return TimmBackbone("efficientnet_b0", "blocks.3", in_chans, drop_path)


@register("resnet18")
def resnet18(in_chans: int = 3, drop_path: float = 0.0) -> Backbone:
    return TimmBackbone("resnet18", "layer3", in_chans, drop_path)


@register("resnet50")
def resnet50(in_chans: int = 3, drop_path: float = 0.0) -> Backbone:
    return TimmBackbone("resnet50", "layer3", in_chans, drop_path)
