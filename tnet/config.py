"""TNet's model configuration: one frozen dataclass, each field with its reason."""

from __future__ import annotations

from dataclasses import dataclass

from tnet.geometry import features_per_image, level_grids


def check_locations(ks: tuple[int, ...] | list[int], levels: int, grid: int, name: str = "locations") -> None:
    """Raises ValueError naming ``name`` unless ``ks`` holds one k in 1..grid^2 per level after 0."""
    if len(ks) != levels - 1 or any(not 1 <= k <= grid * grid for k in ks):
        raise ValueError(f"{name}={list(ks)}: need one k per level after 0 ({levels - 1}), each in 1..{grid ** 2}")


@dataclass(frozen=True)
class TNetConfig:
    num_classes: int = 10
    backbone: str = "efficientnet_b0"  # any name in tnet.backbones.available()
    backbone_weights: str | None = None  # local state_dict path; never a hub download
    in_chans: int = 3  # 1 for single-channel datasets (Megapixel MNIST)
    input_size: int = 448  # side of the squash-resized image the grids are defined on
    base_size: int = 224  # every region is resized to this before the backbone
    # Side at which attended regions (levels >= 1) are read; None = base_size, the paper. Smaller
    # when a cell is mostly background around a small object: the object fills more of the input.
    patch_size: int | None = None
    levels: int = 2  # scales processed, level 0 (the whole image) included
    grid: int = 3  # N: candidates per row/column of a region
    overlap: float = 0.5  # patch side as a fraction of its region side
    locations: tuple[int, ...] = (2,)  # k per level 1..levels-1; changeable at inference
    # k per level when the model is not training (evaluation, the registered model); None = the
    # training ``locations``. Reading more cells than in training costs decoding and FLOPs linearly
    # and can only add evidence the classifier already knows how to pool: a model trained with 8
    # cells on Megapixel MNIST reads the 3 target digits' near misses with 10 (60 min, the same
    # model: 0.972 against 0.956 at 8, docs/benchmarks.md). A ``locations`` argument overrides both.
    eval_locations: tuple[int, ...] | None = None
    feature_dim: int | None = None  # None keeps the backbone's width (paper: fMoW 1280, ImageNet 512)
    dropout: float = 0.5  # before the classifier (paper: fMoW 0.5)
    drop_path: float = 0.0  # stochastic depth inside the backbone (paper: 0.3 then 0.5)
    pos_channels: int = 320  # sinusoidal encoding width (paper: fMoW 320, ImageNet 512)
    pos_mode: str = "add"  # "add": linear to D, add, swish (fMoW); "concat": concat then linear (ImageNet)
    loc_hidden: int | None = None  # location module width; None = the location map's channels
    loc_concat_feature: bool = False  # ImageNet variant: tile the feature vector into the location input
    loc_act: str = "swish"  # "swish" (fMoW) or "leaky_relu" (ImageNet, slope 0.2)
    loc_se: bool = True  # squeeze-excitation in the location module (fMoW variant)
    # The location module's two coordinate channels (the paper). False feeds zeros instead (same
    # parameters): where objects may be anywhere, position is no evidence, and a module that cannot
    # yet tell digits from background can settle on fixed rows of cells that the coordinates make
    # easy to prefer (seen in the 60-minute Megapixel MNIST run, docs/benchmarks.md).
    loc_coords: bool = True
    # The location module reads the backbone's map at each cell's centre (1, the paper), or max-pools
    # it over a points x points lattice spread over the whole cell. Where objects are small against
    # the cell (a 28 px digit in a 165 px cell of Megapixel MNIST, 3 px in the 160 px base view), the
    # map near the centre says little about a digit by the cell's edge, and the overlapping
    # neighbour whose centre is nearer gets the score of the digit it may hold only in part.
    loc_points: int = 1
    feature_weighting: bool = False  # learned weights instead of the paper's plain mean
    # Self-attention layers over an image's features (whole view and attended cells, each with its
    # position fused in) before they are pooled; 0 = the paper's pooling of independent features.
    # A mean counts a digit held by two overlapping cells twice and lets a cell cut through a digit
    # vote; attention sees every feature with its neighbours' and can discount both, as the
    # transformer pooling of iterative patch selection (IPS) does over its selected patches.
    mixer_layers: int = 0
    mixer_heads: int = 4
    antialias: bool = True  # antialiased resizing; False reproduces the reference code
    # Regions (and the base view) are read from the coarsest pyramid level whose pixels cover the
    # output up to this factor, then upsampled; 1 = never upsample (the paper's full-resolution
    # crops). A 165 px cell read at 96 px then comes from the half-resolution level: a quarter of
    # the tiles decoded for a digit of 14 px instead of 16 (in-memory images pass through the same
    # resolution, tnet.regions.pyramid_factor, so lazy and eager reads agree). Measured at 1500 px,
    # 30 min, two seeds: 1.2 decoded 6-7% of the pixels (13% at 1) and reached 0.900 against 0.850
    # on one, but took off 10 minutes late on the other (0.455 against 0.878). With a 224 px base
    # view, two seeds: 0.912 and 0.908 at 30 min decoding 6.7% (the 160 px config without it:
    # 0.885 and 0.900, 13.3-13.5%); on in configs/megapixel_mnist.yaml (docs/benchmarks.md).
    read_upsample: float = 1.0
    loc_temperature: float = 1.0  # softmax temperature on the L2-normalised logits (1 = paper)
    # Cold start (off = the paper). "gumbel": in training, top-k of log p + Gumbel noise / explore_scale
    # samples k distinct cells from the location distribution, so an untrained module that always
    # ranks the same cells first still shows the classifier other places. Evaluation is top-k.
    explore: str = "none"
    # Multiplies log p before the Gumbel noise. L2-normalised logits keep log p within 2 nats, so
    # at 1 the noise drowns what the module has learnt; 4 let the synthetic test learn (tests/tnet).
    explore_scale: float = 1.0
    # With "gumbel": the first explore_keep of each region's k cells are the module's own top
    # choices (what evaluation picks), the others sampled. Measured at 1500 px: fully sampled
    # training cells held 5% of the target digits while top-k held 36%, so the patch classifier
    # trained on near-random cells and never learnt the digits (docs/benchmarks.md).
    explore_keep: int = 0
    # Anneal toward the paper's top-k: explore_scale grows geometrically to explore_scale_end over
    # the first explore_anneal_images training images (counted per process; the count is a buffer,
    # so it resumes with the checkpoint). L2-normalised scores span 2 nats, so at a fixed scale of 4
    # the Gumbel noise keeps choosing near-random cells however well the module ranks them; a
    # growing scale lets the cells the patch classifier trains on follow the module once it has
    # taken off. None = a constant scale.
    explore_scale_end: float | None = None
    explore_anneal_images: int = 0
    # Cold start (0 = the paper's plain top-k). Greedy suppression of near-duplicate cells, in
    # training and evaluation: after each pick, the cells within this many rows and columns of it
    # are not chosen while others remain (tnet.selection). Top-k can spend all k reads on adjacent,
    # overlapping cells around one spot; on Megapixel MNIST the pictures showed blocks of 2-6 such
    # cells while the five digits lay apart. The distribution and its log-probabilities are unchanged.
    suppress: int = 0
    # Cold start: the location module also predicts class logits per cell, trained by the MIL loss
    # (LossConfig.mil_weight) from the image label alone, so its scores learn where class evidence
    # is before the patch classifier can read anything.
    loc_classes: bool = False
    # The paper stops every gradient at the location module's input (True). False lets the
    # location losses (MIL above all) shape the backbone's coarse map, so it learns features that
    # find small objects in the base view instead of only those the global feature needs.
    loc_detach: bool = True
    # Cold start (off = the paper). The features of attended cells are pooled with weights that
    # add each cell's location log-probability (relative to uniform; 0 for the whole view) to the
    # pooling logits, as attention sampling weights patch features by attention. Cross-entropy then
    # reaches the location scores directly: a cell whose feature helps the prediction gains score,
    # a dense gradient for every image instead of a REINFORCE reward alone.
    score_pooling: bool = False
    # Separate BatchNorm running statistics per level (tnet.levelnorm). Off in the paper, where
    # levels look alike; needed where the whole view and the patches differ (Megapixel MNIST).
    level_norm_stats: bool = False
    # Cold start (0 = never, the paper). After this many training images the layers that read the
    # backbone's features (position fusion, feature weighting, per-feature heads, final classifier:
    # TNet.head_modules) start again from new initial weights, once. Before the location module
    # ranks, the heads train on cells without digits and the classifier on the base view's answer;
    # measured at 1500 px, that start halved what the right cells later taught, and restarting
    # these layers at the switch made the model learn from them as a fresh one does (the backbone
    # was not harmed; docs/benchmarks.md). Set it to when the module has taken off. Adam keeps its
    # moments for these weights (clearing them made no difference in the same measurement).
    restart_heads_at: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: must be >= 2")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans={self.in_chans}: must be 1 or 3")
        if self.base_size < 16 or self.input_size < self.base_size:
            raise ValueError(f"input_size={self.input_size}, base_size={self.base_size}: need input >= base >= 16")
        if self.patch_size is not None and self.patch_size < 16:
            raise ValueError(f"patch_size={self.patch_size}: must be >= 16 (or null for base_size)")
        check_locations(self.locations, self.levels, self.grid)
        if self.eval_locations is not None:
            check_locations(self.eval_locations, self.levels, self.grid, "eval_locations")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        if self.pos_mode not in ("add", "concat"):
            raise ValueError(f"pos_mode={self.pos_mode!r}: must be 'add' or 'concat'")
        if self.loc_act not in ("swish", "leaky_relu"):
            raise ValueError(f"loc_act={self.loc_act!r}: must be 'swish' or 'leaky_relu'")
        if self.pos_channels < 6:
            raise ValueError(f"pos_channels={self.pos_channels}: must be >= 6 (sin and cos of y, x, level)")
        if not 1 <= self.loc_points <= 8:
            raise ValueError(f"loc_points={self.loc_points}: must be in 1..8 (1 = the cell's centre, the paper)")
        if self.explore not in ("none", "gumbel"):
            raise ValueError(f"explore={self.explore!r}: must be 'none' or 'gumbel'")
        if not 0 <= self.explore_keep <= min(self.locations, default=0):
            raise ValueError(f"explore_keep={self.explore_keep}: must be in 0..min(locations)={min(self.locations, default=0)}")
        if not 0 <= self.suppress < self.grid:
            raise ValueError(f"suppress={self.suppress}: must be in 0..grid-1={self.grid - 1}")
        if self.explore_scale <= 0:
            raise ValueError(f"explore_scale={self.explore_scale}: must be > 0")
        if self.explore_scale_end is not None:
            if self.explore != "gumbel":
                raise ValueError(f"explore_scale_end={self.explore_scale_end}: needs explore='gumbel'")
            if self.explore_scale_end <= 0:
                raise ValueError(f"explore_scale_end={self.explore_scale_end}: must be > 0")
            if self.explore_anneal_images < 1:
                raise ValueError(f"explore_anneal_images={self.explore_anneal_images}: must be >= 1 with explore_scale_end")
        if self.restart_heads_at < 0:
            raise ValueError(f"restart_heads_at={self.restart_heads_at}: must be >= 0 training images (0 = never)")
        if not self.read_upsample >= 1.0:
            raise ValueError(f"read_upsample={self.read_upsample}: must be >= 1 (1 = never upsample)")
        if self.loc_temperature <= 0:
            raise ValueError(f"loc_temperature={self.loc_temperature}: must be > 0")
        if not 0 <= self.mixer_layers <= 8 or self.mixer_heads < 1:
            raise ValueError(f"mixer_layers={self.mixer_layers}, mixer_heads={self.mixer_heads}: need 0..8 layers, >= 1 head")
        level_grids(self.input_size, self.levels, self.grid, self.overlap)  # raises on bad geometry

    @property
    def region_size(self) -> int:
        """Side at which attended regions are read (``patch_size``, else ``base_size``)."""
        return self.base_size if self.patch_size is None else self.patch_size

    def explore_scale_at(self, images: int) -> float:
        """Exploration scale after ``images`` training images (geometric from start to end)."""
        if self.explore_scale_end is None:
            return self.explore_scale
        done = min(max(images, 0) / self.explore_anneal_images, 1.0)
        return self.explore_scale * (self.explore_scale_end / self.explore_scale) ** done

    @property
    def inference_locations(self) -> tuple[int, ...]:
        """k per level outside training: ``eval_locations``, else ``locations``."""
        return tuple(self.locations if self.eval_locations is None else self.eval_locations)

    @property
    def features_per_image(self) -> int:
        """Features per image at inference (the count FLOPs and decoding scale with)."""
        return features_per_image(self.inference_locations)
