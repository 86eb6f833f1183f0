"""TNet: top-down walk through an image's scale-space, attending to a few regions per level.

Level 0 reads the whole view at ``base_size``; the location module scores an N x N grid of
candidates of each processed region; the top-k (deterministic) are read at ``region_size`` (the
paper: ``base_size``) from higher-resolution pixels and processed by the same backbone, recursively. All feature vectors,
each fused with a sinusoidal encoding of its global grid position and level, are averaged and
classified. Pixels come from a ``RegionSource``, so lazy pyramids and in-memory tensors are the
same to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tnet.backbones import create_backbone
from tnet.config import TNetConfig, check_locations
from tnet.geometry import level_grids
from tnet.levelnorm import LevelNormStats
from tnet.location import LocationModule, normalised_log_probs, sample_cells
from tnet.positional import PositionalFusion
from tnet.regions import RegionSource, TensorRegionSource
from tnet.selection import neighbourhood, suppressed_topk


@dataclass
class LevelSelection:
    """What the location module chose at one level (l >= 1) for the whole batch."""

    boxes: Tensor  # (B, R_l, 4) normalised view xyxy of the attended patches
    source_boxes: Tensor  # (B, R_l, 4) the same in source-image pixels
    cells: Tensor  # (B, R_l) chosen cell index within its parent's grid
    log_probs: Tensor  # (B, R_l) log p of each chosen cell (REINFORCE reads this)
    probs: Tensor  # (B, R_{l-1}, N*N) the full distributions the choice was made from
    logits: Tensor  # (B, R_{l-1}, N*N) raw location scores (auxiliary losses read these)
    cell_logits: Tensor | None = None  # (B, R_{l-1}, N*N, classes) with cfg.loc_classes

    def parents(self) -> Tensor:
        """(R_l,) the parent region of each chosen cell: each parent's k cells are consecutive."""
        regions = self.probs.shape[1]
        return torch.arange(regions, device=self.cells.device).repeat_interleave(self.cells.shape[1] // regions)


@dataclass
class TNetOutput:
    logits: Tensor  # (B, classes) from all features
    level_logits: list[Tensor]  # per level l: (B, classes) from features of levels <= l
    feature_logits: list[Tensor]  # per level l: (B, R_l, classes), each feature's own head
    selections: list[LevelSelection] = field(default_factory=list)  # levels 1..L-1
    features_per_image: int = 1
    pixels_processed: int = 0  # per image: base_size^2 + attended regions * region_size^2
    decoded_pixels: int = 0  # by the region source during this forward (0 for in-memory)

    def level_probs(self) -> list[Tensor]:
        return [lg.softmax(-1) for lg in self.level_logits]


class TNet(nn.Module):
    def __init__(self, cfg: TNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(
            cfg.backbone, in_chans=cfg.in_chans, drop_path=cfg.drop_path, weights=cfg.backbone_weights
        )
        width = self.backbone.num_features
        dim = cfg.feature_dim or width
        self.project = nn.Identity() if dim == width else nn.Linear(width, dim)
        self.position = PositionalFusion(dim, cfg.pos_channels, cfg.pos_mode)
        self.location = LocationModule(
            self.backbone.loc_channels,
            cfg.loc_hidden or self.backbone.loc_channels,
            dim,
            cfg.loc_act,
            cfg.loc_se,
            cfg.loc_concat_feature,
            cfg.num_classes if cfg.loc_classes else 0,
            cfg.loc_coords,
        )
        self.weighting = nn.Linear(dim, 1) if cfg.feature_weighting else None
        if cfg.mixer_layers and dim % cfg.mixer_heads:
            raise ValueError(f"mixer_heads={cfg.mixer_heads}: must divide the feature width {dim}")
        self.mixer = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, cfg.mixer_heads, 2 * dim, cfg.dropout, batch_first=True, norm_first=True),
                cfg.mixer_layers,
                enable_nested_tensor=False,
            )
            if cfg.mixer_layers
            else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(dim, cfg.num_classes)
        self.feature_heads = nn.ModuleList(nn.Linear(dim, cfg.num_classes) for _ in range(cfg.levels))
        self.level_norms = LevelNormStats(self.backbone, cfg.levels) if cfg.level_norm_stats else None
        if cfg.explore_scale_end is not None or cfg.restart_heads_at:  # training images seen, for the
            # exploration anneal and the heads' restart (a buffer: it resumes with the checkpoint)
            self.register_buffer("explore_images", torch.zeros((), dtype=torch.long))
        if cfg.suppress:  # which cells each pick suppresses (the same N x N grid at every level)
            self.register_buffer("neighbours", neighbourhood(cfg.grid, cfg.suppress), persistent=False)
        self.grids = level_grids(cfg.input_size, cfg.levels, cfg.grid, cfg.overlap)
        for i, grid in enumerate(self.grids):
            offsets = torch.tensor([grid.cell_offset(c) for c in range(grid.cells)], dtype=torch.float32)
            self.register_buffer(f"offsets_{i}", offsets, persistent=False)  # (N*N, 2) as (dx, dy)
            read = cfg.base_size if i == 0 else cfg.region_size
            centres = torch.tensor(grid.centres(), dtype=torch.float32) * read / grid.side
            self.register_buffer(f"centres_{i}", centres, persistent=False)  # (N,) pixels as read

    def head_modules(self) -> list[nn.Module]:
        """The layers that read the backbone's features (``restart_heads_at`` starts them afresh)."""
        return [self.project, self.position, self.classifier, self.feature_heads,
                *([self.weighting] if self.weighting is not None else []),
                *([self.mixer] if self.mixer is not None else [])]  # fmt: skip

    def restart_heads(self, seed: int = 0) -> None:
        """New initial weights for ``head_modules``, drawn from ``seed`` alone, so that every DDP
        rank draws the same ones whatever its own random state."""
        cuda = sorted({p.device.index or 0 for p in self.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):  # the caller's random streams are left as they were
            torch.manual_seed(seed)
            for module in self.head_modules():
                for layer in module.modules():
                    # nn.MultiheadAttention (the mixer) names its initialiser with an underscore
                    reset = getattr(layer, "reset_parameters", None) or getattr(layer, "_reset_parameters", None)
                    if reset is not None:
                        reset()

    # -- pieces ---------------------------------------------------------------------------------
    def encode(self, patches: Tensor, pos: Tensor, level: int = 0) -> tuple[Tensor, Tensor]:
        """(R, C, b, b) patches and (R, 3) positions -> fused features (R, D), map (R, Cm, h, w)."""
        if self.level_norms is None:
            raw, fmap = self.backbone(patches)
        else:
            with self.level_norms.use(level):
                raw, fmap = self.backbone(patches)
        return self.position(self.project(raw), pos), fmap

    def aggregate(self, features: Tensor, scores: Tensor | None = None) -> Tensor:
        """(B, F, D) -> (B, classes): the paper's plain mean, or weights from learned logits
        (``feature_weighting``) plus the cells' location scores (``scores``, (B, F), with
        ``score_pooling``); with ``mixer_layers`` the features attend to each other first."""
        if self.mixer is not None:
            features = self.mixer(features)
        if self.weighting is None and scores is None:
            pooled = features.mean(dim=1)
        else:
            logits = features.new_zeros(features.shape[:2]) if scores is None else scores
            if self.weighting is not None:
                logits = logits + self.weighting(features)[..., 0]
            weights = logits.softmax(dim=1)[..., None]  # (B, F, 1)
            pooled = (weights * features).sum(dim=1)
        return self.classifier(self.dropout(pooled))

    def select(
        self, level: int, fmap: Tensor, feats: Tensor, k: int
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Score the candidates of every region at ``level`` and keep the top-k.

        Returns logits (R, N*N), per-cell class logits (R, N*N, classes) or None,
        log-probabilities (R, N*N) and chosen cells (R, k).
        """
        read = self.cfg.base_size if level == 0 else self.cfg.region_size
        if self.cfg.loc_detach:
            fmap, feats = fmap.detach(), feats.detach()
        grid = self.grids[level]
        span = grid.patch * read / grid.side  # a cell's side in pixels as read (loc_points' lattice)
        cells = sample_cells(fmap, getattr(self, f"centres_{level}"), read, span, self.cfg.loc_points)
        logits, cell_logits = self.location(cells, feats)  # (R, N*N)
        logp = normalised_log_probs(logits, self.cfg.loc_temperature)
        return logits, cell_logits, logp, self.choose(logp, k)

    def choose(self, logp: Tensor, k: int) -> Tensor:
        """Deterministic top-k (the paper's rule), or Gumbel top-k sampling while training.

        With ``suppress`` either rule picks greedily and skips the neighbours of earlier picks.
        """
        sampling = self.training and self.cfg.explore == "gumbel"
        keep = min(self.cfg.explore_keep, k) if sampling else k  # the module's own choices stay
        keys = logp
        if sampling:
            uniform = torch.rand_like(logp).clamp_(1e-9, 1 - 1e-9)
            keys = logp * self.explore_scale() - torch.log(-torch.log(uniform))
        if self.cfg.suppress:
            return suppressed_topk(logp, keys, keep, k, self.neighbours)
        if not sampling:
            return logp.topk(k, dim=-1).indices  # (R, k)
        top = logp.topk(keep, dim=-1).indices  # (R, keep)
        keys = keys.scatter(1, top, float("-inf"))  # the rest: k - keep other cells, sampled
        return torch.cat([top, keys.topk(k - keep, dim=-1).indices], dim=-1)

    @staticmethod
    def _forced(cells: Sequence[Tensor], level: int, batch: int, regions: int, k: int, n_cells: int) -> Tensor:
        if len(cells) <= level:
            raise ValueError(f"cells: {len(cells)} levels given, level {level + 1} needs one")
        forced = torch.as_tensor(cells[level], dtype=torch.long)
        if tuple(forced.shape) != (batch, regions, k):
            raise ValueError(f"cells[{level}]: shape {tuple(forced.shape)}, expected {(batch, regions, k)}")
        if forced.numel() and not 0 <= int(forced.min()) <= int(forced.max()) < n_cells:
            raise ValueError(f"cells[{level}]: indices must be in 0..{n_cells - 1}")
        return forced.reshape(batch * regions, k)

    def explore_scale(self) -> float:
        """The current exploration scale (constant unless ``explore_scale_end`` is set)."""
        seen = getattr(self, "explore_images", None)
        return self.cfg.explore_scale_at(0 if seen is None else int(seen))

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self, source: RegionSource | Tensor, locations: Sequence[int] | None = None, cells: Sequence[Tensor] | None = None
    ) -> TNetOutput:
        """Classify a batch; ``locations`` overrides k per level without retraining (default: the
        config's ``locations`` in training mode, its ``inference_locations`` in eval mode).

        ``cells`` (diagnostics: oracle cells, replaying a selection) gives, per attended level, the
        (B, R, k) cell indices to read instead of the module's choice; its scores still come out.
        """
        if isinstance(source, Tensor):
            source = TensorRegionSource(source, antialias=self.cfg.antialias, max_upsample=self.cfg.read_upsample)
        cfg = self.cfg
        if locations is None:
            locs = tuple(cfg.locations) if self.training else cfg.inference_locations
        else:
            locs = tuple(locations)
            check_locations(locs, cfg.levels, cfg.grid)
        batch, size, base = len(source), float(cfg.input_size), cfg.base_size
        if self.training and torch.is_grad_enabled() and cfg.restart_heads_at:  # before any head is used
            seen = int(self.explore_images)
            if seen < cfg.restart_heads_at <= seen + batch:
                self.restart_heads(cfg.restart_heads_at)
        decoded_before = source.decoded_pixels()
        device = self.classifier.weight.device

        boxes = torch.tensor([0.0, 0.0, size, size], device=device).expand(batch, 1, 4)  # input px
        pos = torch.zeros(batch, 1, 3, device=device)  # (y, x, level)
        patches = source.read_regions(boxes / size, base).to(device)  # (B, 1, C, b, b)
        feats, fmap = self.encode(patches.flatten(0, 1), pos.flatten(0, 1))
        level_feats = [feats.view(batch, 1, -1)]  # per level (B, R_l, D)
        level_scores = [feats.new_zeros(batch, 1)]  # per level (B, R_l): pooling scores (score_pooling)
        selections: list[LevelSelection] = []

        for level, (grid, k) in enumerate(zip(self.grids, locs)):
            regions = boxes.shape[1]
            logits, cell_logits, logp, chosen = self.select(level, fmap, feats, k)  # (B*R, NN), (B*R, NN), (B*R, k)
            if cells is not None:
                chosen = self._forced(cells, level, batch, regions, k, grid.cells).to(chosen.device)
            offsets = getattr(self, f"offsets_{level}")[chosen]  # (B*R, k, 2)
            origin = boxes.reshape(-1, 4)[:, None, :2]  # (B*R, 1, 2)
            top_left = origin + offsets
            boxes = torch.cat([top_left, top_left + grid.patch], dim=-1).reshape(batch, regions * k, 4)
            parent = pos.reshape(-1, 1, 3)
            rows, cols = chosen // grid.n, chosen % grid.n
            pos = torch.stack(
                [parent[..., 0] * grid.n + rows, parent[..., 1] * grid.n + cols, torch.full_like(rows, level + 1)],
                dim=-1,
            ).reshape(batch, regions * k, 3).float()
            norm_boxes = boxes / size
            selections.append(
                LevelSelection(
                    boxes=norm_boxes,
                    source_boxes=source.source_boxes(norm_boxes.detach().cpu()),
                    cells=chosen.reshape(batch, regions * k),
                    log_probs=logp.gather(1, chosen).reshape(batch, regions * k),
                    probs=logp.exp().reshape(batch, regions, -1),
                    logits=logits.reshape(batch, regions, -1),
                    cell_logits=None if cell_logits is None else cell_logits.reshape(batch, regions, *cell_logits.shape[1:]),
                )
            )
            # log p relative to uniform: 0 for an indifferent module, like the whole view's score
            level_scores.append(selections[-1].log_probs + math.log(grid.cells))
            patches = source.read_regions(norm_boxes.detach().cpu(), cfg.region_size).to(device)  # (B, R*k, C, p, p)
            feats, fmap = self.encode(patches.flatten(0, 1), pos.flatten(0, 1), level + 1)
            level_feats.append(feats.view(batch, regions * k, -1))

        if self.training and torch.is_grad_enabled() and hasattr(self, "explore_images"):  # not norm recalibration
            self.explore_images += batch
        level_logits = [
            self.aggregate(
                torch.cat(level_feats[: i + 1], dim=1),
                torch.cat(level_scores[: i + 1], dim=1) if cfg.score_pooling else None,
            )
            for i in range(len(level_feats))
        ]
        feature_logits = [head(self.dropout(f)) for head, f in zip(self.feature_heads, level_feats)]
        n_feats = sum(f.shape[1] for f in level_feats)
        return TNetOutput(
            logits=level_logits[-1],
            level_logits=level_logits,
            feature_logits=feature_logits,
            selections=selections,
            features_per_image=n_feats,
            pixels_processed=base * base + (n_feats - 1) * cfg.region_size**2,
            decoded_pixels=source.decoded_pixels() - decoded_before,
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

