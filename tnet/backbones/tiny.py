"""A small CNN for tests, demos and CPU training (Megapixel MNIST).

Four stride-2 conv stages with batch norm; the stride-8 map feeds the location module. It costs
a few MFLOPs at 64-128 px, so TNet trains on two CPU cores in minutes.
"""

from __future__ import annotations

from torch import Tensor, nn

from tnet.backbones.registry import Backbone, register


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(Backbone):
    def __init__(self, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        widths = (width, width * 2, width * 2, width * 4)
        self.s1 = _stage(in_chans, widths[0])
        self.s2 = _stage(widths[0], widths[1])
        self.s3 = _stage(widths[1], widths[2])
        self.s4 = _stage(widths[2], widths[3])
        self.num_features = widths[3]
        self.loc_channels = widths[2]
        self.loc_reduction = 8

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc_map = self.s3(self.s2(self.s1(x)))  # (B, 2w, H/8, W/8)
        x = self.s4(loc_map)
        return x.mean(dim=(-2, -1)), loc_map  # (B, 4w), (B, 2w, H/8, W/8)


@register("tiny")
def tiny(in_chans: int = 3, drop_path: float = 0.0) -> Backbone:
    return TinyCNN(in_chans, width=32)


@register("tiny_s")
def tiny_s(in_chans: int = 3, drop_path: float = 0.0) -> Backbone:
    """A quarter of tiny's FLOPs: what two CPU cores afford at 160 px and seven patches."""
    return TinyCNN(in_chans, width=16)
