"""The location module: scores every candidate cell of a region from the backbone's map.

The map is gradient-stopped (the backbone learns only from cross-entropy) and sampled bilinearly
at the N x N candidate centres, which generalises the reference code's "rows and columns 2, 6, 10
of the 14 x 14 map" to any backbone stride and grid. Then (fMoW variant) 1x1 conv + swish,
squeeze-excitation, two coordinate channels with a learned scale and offset, 1x1 conv + swish,
1x1 conv to one logit per cell; or (ImageNet variant) the tiled feature vector concatenated in and
leaky ReLU 0.2. Logits are L2-normalised over the N*N cells before the softmax, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _act(name: str) -> nn.Module:
    return nn.SiLU() if name == "swish" else nn.LeakyReLU(0.2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(-2, -1), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


def sample_cells(fmap: Tensor, centres: Tensor, base_size: int, span: float = 0.0, points: int = 1) -> Tensor:
    """Bilinear samples of ``fmap`` (R, C, h, w) at cell centres (N,) in pixels of the region as
    read (``base_size`` px a side).

    Returns (R, C, N, N). The map covers the base image, so a centre c maps to 2c/base - 1 in
    grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the outer edges).
    With ``points`` > 1 each cell is sampled on a points x points lattice spread over its side
    (``span`` px as read, lattice points at the centres of equal sub-squares) and the map's
    channels are max-pooled over it: an object anywhere in the cell, not only near its centre,
    reaches the cell's score.
    """
    n = centres.shape[0]
    if points > 1:
        steps = (torch.arange(points, device=centres.device, dtype=centres.dtype) + 0.5) / points - 0.5
        centres = (centres[:, None] + steps[None] * span).reshape(-1)  # (N * points,), cell by cell
    m = centres.shape[0]
    coords = centres / base_size * 2 - 1  # (M,)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).to(fmap.dtype)  # (M, M, 2) as (x, y)
    grid = grid[None].expand(fmap.shape[0], m, m, 2)
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if points == 1:
        return out
    r, c = out.shape[:2]
    return out.reshape(r, c, n, points, n, points).amax(dim=(3, 5))


class LocationModule(nn.Module):
    """Scores of the N*N candidates of each region: (R, C, h, w) -> (R, N*N) logits.

    With ``cell_classes`` (a cold-start option, off in the paper) each cell also gets class logits,
    which ``tnet.losses.cell_mil_loss`` pools with the scores as attention weights.
    """

    def __init__(
        self,
        map_channels: int,
        hidden: int,
        feature_dim: int,
        act: str,
        se: bool,
        concat_feature: bool,
        cell_classes: int = 0,
        coords: bool = True,
    ) -> None:
        super().__init__()
        self.coords = coords  # False: zeros in the coordinate channels (same parameters)
        cin = map_channels + (feature_dim if concat_feature else 0)
        self.concat_feature = concat_feature
        self.conv1 = nn.Conv2d(cin, hidden, 1)
        self.act = _act(act)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.coord_scale = nn.Parameter(torch.ones(2, 1, 1))
        self.coord_offset = nn.Parameter(torch.zeros(2, 1, 1))
        self.conv2 = nn.Conv2d(hidden + 2, hidden, 1)
        self.out = nn.Conv2d(hidden, 1, 1)
        # Cold start: class logits per cell from the same hidden features, for the MIL loss.
        self.cell_head = nn.Conv2d(hidden, cell_classes, 1) if cell_classes else None

    def forward(self, cells: Tensor, features: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Returns the logits (R, N*N) and, with ``cell_classes``, class logits (R, N*N, classes)."""
        r, _, n, _ = cells.shape
        x = cells
        if self.concat_feature:
            if features is None:
                raise ValueError("features: required by the concat_feature location module")
            x = torch.cat([x, features[:, :, None, None].expand(-1, -1, n, n)], dim=1)
        x = self.se(self.act(self.conv1(x)))  # (R, hidden, N, N)
        lin = torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        coords = torch.stack([yy, xx]) * self.coord_scale + self.coord_offset if self.coords else x.new_zeros(2, n, n)
        x = torch.cat([x, coords[None].expand(r, -1, -1, -1)], dim=1)
        x = self.act(self.conv2(x))
        cell_logits = None
        if self.cell_head is not None:
            cell_logits = self.cell_head(x).flatten(2).transpose(1, 2)  # (R, N*N, classes)
        return self.out(x).flatten(1), cell_logits  # (R, N*N)


def normalised_log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax of the L2-normalised logits (paper), optionally sharpened by a temperature."""
    unit = F.normalize(logits, p=2, dim=-1)
    return F.log_softmax(unit / temperature, dim=-1)
