"""BagNet-77: a ResNet-50-shaped network whose receptive field is capped at 77 pixels.

As used by TNet on ImageNet (base resolution 77): no batch normalisation, leaky ReLU 0.2, valid
(unpadded) 3x3 convolutions in only two bottlenecks per stage, 1x1 elsewhere. The receptive field
grows by 2 * jump per 3x3 conv: stem 3; stage 1 (jump 1 -> 2): 5, 9; stage 2: 13, 21; stage 3:
29, 45; stage 4 (stride 1): 61, 77. ``receptive_field()`` recomputes it from the layers and a test
checks it is 77. The stage-3 map (1024 channels) feeds the location module; stage 4 is 512 wide, the
paper's feature dimension.
"""

from __future__ import annotations

from torch import Tensor, nn

from tnet.backbones.registry import Backbone, register

BLOCKS = (3, 4, 6, 3)
KERNEL3 = (2, 2, 2, 2)  # bottlenecks per stage that use a 3x3 conv
PLANES = (64, 128, 256, 128)
STRIDES = (2, 2, 2, 1)
EXPANSION = 4


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, kernel: int) -> None:
        super().__init__()
        cout = planes * EXPANSION
        self.conv1 = nn.Conv2d(cin, planes, 1)
        self.conv2 = nn.Conv2d(planes, planes, kernel, stride=stride, padding=0)
        self.conv3 = nn.Conv2d(planes, cout, 1)
        self.act = _act()
        self.kernel, self.stride = kernel, stride
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.conv1(x))
        out = self.act(self.conv2(out))
        out = self.conv3(out)
        skip = self.shortcut(x)
        if skip.shape[-1] != out.shape[-1]:  # valid 3x3 trims a border: centre-crop the skip path
            d = (skip.shape[-1] - out.shape[-1]) // 2
            skip = skip[..., d : d + out.shape[-2], d : d + out.shape[-1]]
        return self.act(out + skip)


class BagNet(Backbone):
    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 1), _act(), nn.Conv2d(64, 64, 3), _act())
        stages, cin = [], 64
        for n, k3, planes, stride in zip(BLOCKS, KERNEL3, PLANES, STRIDES):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(cin, planes, stride if i == 0 else 1, 3 if i < k3 else 1))
                cin = planes * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = cin
        self.loc_channels = PLANES[2] * EXPANSION
        self.loc_reduction = STRIDES[0] * STRIDES[1] * STRIDES[2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem(x)
        loc_map = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == 2:
                loc_map = x  # (B, 1024, h, w)
        return x.mean(dim=(-2, -1)), loc_map  # (B, 512), (B, 1024, h, w)

    def receptive_field(self) -> int:
        rf, jump = 3, 1  # the stem's 3x3
        for stage in self.stages:
            for block in stage:
                if block.kernel == 3:
                    rf += 2 * jump
                jump *= block.stride
        return rf


@register("bagnet77")
def bagnet77(in_chans: int = 3, drop_path: float = 0.0) -> Backbone:
    return BagNet(in_chans)
