"""The paper's baseline: the plain backbone on the whole image at full input resolution."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tnet.backbones import create_backbone


class WholeImageClassifier(nn.Module):
    """Backbone + dropout + linear head on the whole image resized to ``input_size``."""

    def __init__(
        self, backbone: str, num_classes: int, input_size: int, in_chans: int = 3, dropout: float = 0.0,
        drop_path: float = 0.0, weights: str | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.backbone = create_backbone(backbone, in_chans=in_chans, drop_path=drop_path, weights=weights)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, classes); squash-resized to input_size first."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        features, _ = self.backbone(images)
        return self.head(self.dropout(features))
