"""TNet's training objective: cross-entropy for what is seen, REINFORCE for where to look.

Exactly DESIGN.md section 2 (the reference code):

    total = w_ce * CE_final
          + lambda * w_rf * mean((R - b) * -sum of log p over all selected cells)
          + (1 - w_ce) / T * sum_t CE_t                        (each feature's own head)
          + lambda * (1 - w_rf) / (T - 1) * sum_f mean((r_f - b) * -log p_f)

R is 1 where the final top-1 prediction is right, r_f where feature f's own head is right; T
counts features of levels up to ``per_feature_levels``. One scalar baseline b (starts at 0.5) is
updated after the loss: b <- m b + (1 - m) (w_rf mean R + (1 - w_rf) mean r_f). (R - b), the
selection and the location input are constants, so cross-entropy never reaches the location
module (its input is detached in the model; ``TNetConfig.score_pooling`` is the exception, on
purpose) and REINFORCE never reaches the backbone.
The cold-start options below (all off by default) add terms or change r_f - b; see LossConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnet.model import TNetOutput

FEATURE_REWARDS = ("correct", "relative", "confidence")  # LossConfig.feature_reward
FEATURE_CE = ("mean", "mil")  # LossConfig.feature_ce


@dataclass(frozen=True)
class LossConfig:
    w_ce: float = 0.2  # weight of the final CE; 1 - w_ce goes to the per-feature CE terms
    w_rf: float = 0.2  # weight of the final REINFORCE term; 1 - w_rf to the per-feature ones
    reinforce_lambda: float = 0.1  # lambda, the paper's scale of every REINFORCE term
    baseline_init: float = 0.5
    baseline_momentum: float = 0.9
    per_feature_levels: int | None = None  # cap: per-feature terms only for levels <= this
    # Cold start (0 = the paper). A dense signal for the location module: the raw score of every
    # attended cell is regressed (binary cross-entropy) onto how sure that patch's own classifier
    # is of the true class, so each selection teaches the module, not only a noisy reward.
    utility_weight: float = 0.0
    # Cold start (0 = the paper; needs TNetConfig.loc_classes). Attention MIL at the coarse level:
    # p(y) = sum over cells of softmax(score) * softmax(cell class logits), NLL of the label. Every
    # image teaches every cell's score, whatever the patch classifier can do yet.
    mil_weight: float = 0.0
    # Cold start ("correct" = the paper). The reward of each attended cell in the per-feature
    # REINFORCE term. "correct": 1 where the cell's own head is right, minus the scalar baseline.
    # "relative": the head's p(true class) on that cell minus its mean over the image's other
    # attended cells of the level. While the patch heads are still near chance, a binary reward
    # is noise from every image's difficulty and the heads' drift; the relative one keeps only
    # which of the image's cells the head reads best, and it moves as soon as p(y) does, before
    # any argmax flips, so the scores get a signal early (the location module learns only from
    # REINFORCE, and Adam scales its steps, so a small but consistent advantage is enough).
    # "confidence": the head's top probability (whatever class it names) minus its mean over the
    # image's other attended cells: label-free, so every legible digit pays, distractors
    # included. Reading all five digits is enough for the patch path (the oracle_all
    # diagnostic, 88% in 10 minutes at 1500 px), while "correct" and "relative" punish a read
    # distractor, which the coarse view cannot tell from a target.
    feature_reward: str = "correct"
    # How the attended cells' own heads share the per-feature cross-entropy. "mean": every cell is
    # taught the image's label with the same weight (the paper). "mil": within each image and level
    # the weights follow each cell's p(label) (a softmax over the cells of log p, detached, summing
    # to the number of cells): the image's label names only some of its cells' contents (3 of 5
    # digits on Megapixel MNIST, none in an empty cell), and the cells that already explain it best
    # are the ones to learn from, as in multiple-instance learning. Equal weights while the heads
    # are at chance, so it starts as the paper does.
    feature_ce: str = "mean"
    # Cold start (0 = the paper). Scores taught by what the patch classifier reads: each attended
    # cell whose own head names the true class with p >= found_threshold is a "found" cell, and
    # the location distribution of its region (over all N*N candidates) is trained by
    # cross-entropy towards the found cells. A dense, direct signal instead of REINFORCE's noisy
    # one (told the labels' boxes instead, the same loss took the module from random to 67-90% of
    # the target digits in 3 minutes at 1500 px); positive-only, so before the heads read
    # anything it is silent rather than pushing every tried cell down as utility_weight does.
    # Measured at 1500 px, 20 minutes: no gain over the annealed exploration (docs/cold_start.md).
    found_weight: float = 0.0
    found_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("w_ce", "w_rf", "baseline_init", "baseline_momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: must be in [0, 1]")
        if self.feature_reward not in FEATURE_REWARDS:
            raise ValueError(f"feature_reward={self.feature_reward!r}: must be one of {', '.join(FEATURE_REWARDS)}")
        if self.feature_ce not in FEATURE_CE:
            raise ValueError(f"feature_ce={self.feature_ce!r}: must be one of {', '.join(FEATURE_CE)}")
        if self.mil_weight < 0:
            raise ValueError(f"mil_weight={self.mil_weight}: must be >= 0")
        if self.found_weight < 0:
            raise ValueError(f"found_weight={self.found_weight}: must be >= 0")
        if not 0.0 < self.found_threshold <= 1.0:
            raise ValueError(f"found_threshold={self.found_threshold}: must be in (0, 1]")
        if self.utility_weight < 0:
            raise ValueError(f"utility_weight={self.utility_weight}: must be >= 0")
        if self.reinforce_lambda < 0:
            raise ValueError(f"reinforce_lambda={self.reinforce_lambda}: must be >= 0")
        if self.per_feature_levels is not None and self.per_feature_levels < 0:
            raise ValueError(f"per_feature_levels={self.per_feature_levels}: must be >= 0")


class TNetLoss(nn.Module):
    """Computes the loss terms; holds the moving-average reward baseline as a buffer."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("baseline", torch.tensor(cfg.baseline_init))

    def forward(self, out: TNetOutput, target: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        lam = cfg.reinforce_lambda
        b = self.baseline.detach()
        terms: dict[str, Tensor] = {}

        terms["ce_final"] = F.cross_entropy(out.logits, target)
        reward = (out.logits.detach().argmax(-1) == target).float()  # (B,)
        if out.selections:
            sum_logp = torch.cat([s.log_probs for s in out.selections], dim=1).sum(dim=1)  # (B,)
            terms["rf_final"] = ((reward - b) * -sum_logp).mean()
        else:
            terms["rf_final"] = out.logits.new_zeros(())

        cap = len(out.feature_logits) - 1 if cfg.per_feature_levels is None else cfg.per_feature_levels
        level_logits = out.feature_logits[: cap + 1]  # per level (B, R_l, classes)
        n_feats = sum(lg.shape[1] for lg in level_logits)  # T
        ce_sum = out.logits.new_zeros(())
        rf_sum = out.logits.new_zeros(())
        feature_rewards = []
        for level, logits in enumerate(level_logits):
            per_feat_target = target[:, None].expand(-1, logits.shape[1])  # (B, R_l)
            ce = F.cross_entropy(logits.flatten(0, 1), per_feat_target.flatten(), reduction="none")
            ce = ce.view_as(per_feat_target)  # (B, R_l)
            if level >= 1 and cfg.feature_ce == "mil":
                ce = ce * instance_weights(logits, target)
            ce_sum = ce_sum + ce.mean(0).sum()
            r_f = (logits.detach().argmax(-1) == per_feat_target).float()  # (B, R_l)
            feature_rewards.append(r_f)
            if level >= 1:
                logp = out.selections[level - 1].log_probs  # (B, R_l): this feature's own location
                if cfg.feature_reward == "correct":
                    advantage = r_f - b
                elif cfg.feature_reward == "relative":
                    advantage = relative_likelihood(logits, target)
                else:
                    advantage = relative_confidence(logits)
                rf_sum = rf_sum + (advantage * -logp).mean(0).sum()
        terms["ce_features"] = ce_sum / n_feats
        terms["rf_features"] = rf_sum / max(n_feats - 1, 1)

        terms["total"] = (
            cfg.w_ce * terms["ce_final"]
            + lam * cfg.w_rf * terms["rf_final"]
            + (1 - cfg.w_ce) * terms["ce_features"]
            + lam * (1 - cfg.w_rf) * terms["rf_features"]
        )
        if cfg.utility_weight > 0 and out.selections:
            terms["utility"] = utility_loss(out, target)
            terms["total"] = terms["total"] + cfg.utility_weight * terms["utility"]
        if cfg.found_weight > 0 and out.selections:
            terms["found"], terms["found_cells"] = found_cell_loss(out, target, cfg.found_threshold)
            terms["total"] = terms["total"] + cfg.found_weight * terms["found"]
        if cfg.mil_weight > 0 and out.selections:
            terms["mil"] = cell_mil_loss(out, target)
            terms["total"] = terms["total"] + cfg.mil_weight * terms["mil"]
        terms["reward"] = reward.mean()
        terms["feature_reward"] = torch.cat(feature_rewards, dim=1).mean()
        terms["baseline"] = b
        return terms

    @torch.no_grad()
    def update_baseline(self, terms: dict[str, Tensor]) -> None:
        """Called after the optimiser step, as in the reference code."""
        m, w = self.cfg.baseline_momentum, self.cfg.w_rf
        mixed = w * terms["reward"] + (1 - w) * terms["feature_reward"]
        self.baseline.mul_(m).add_((1 - m) * mixed.to(self.baseline.dtype))


def true_class_prob(logits: Tensor, target: Tensor) -> Tensor:
    """(B, R, classes) -> (B, R): each feature head's p(target), detached (a reward, not a path)."""
    probs = logits.detach().softmax(-1)
    return probs.gather(2, target[:, None, None].expand(-1, probs.shape[1], 1))[..., 0]


def instance_weights(logits: Tensor, target: Tensor) -> Tensor:
    """(B, R, classes) -> (B, R): softmax over each image's R cells of log p(target), times R
    (mean 1; detached). Uniform when every head gives the label the same probability."""
    logp = logits.detach().log_softmax(-1).gather(2, target[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    return logp.softmax(dim=1) * logits.shape[1]


def relative_likelihood(logits: Tensor, target: Tensor) -> Tensor:
    """(B, R, classes) -> (B, R): each feature's p(target) minus the mean over the image's others."""
    return leave_one_out(true_class_prob(logits, target))


def relative_confidence(logits: Tensor) -> Tensor:
    """(B, R, classes) -> (B, R): each feature head's top probability minus the mean over the image's
    others, detached; needs no label."""
    return leave_one_out(logits.detach().softmax(-1).amax(-1))


def leave_one_out(p: Tensor) -> Tensor:
    """(B, R) -> (B, R): each value minus the mean of the row's others.

    Leave-one-out, so a feature's advantage does not contain its own reward; zero with R = 1.
    """
    regions = p.shape[1]
    if regions < 2:
        return torch.zeros_like(p)
    others = (p.sum(dim=1, keepdim=True) - p) / (regions - 1)
    return p - others


def utility_loss(out: TNetOutput, target: Tensor) -> Tensor:
    """BCE between each attended cell's raw location score and its patch's p(true class).

    The target is detached (it teaches the location module, never the classifier), and the
    location module's input is detached in the model, so this never reaches the backbone.
    """
    losses = []
    for level, sel in enumerate(out.selections, start=1):
        scores = sel.logits[:, sel.parents(), :].gather(2, sel.cells[..., None])[..., 0]  # (B, R_l)
        utility = true_class_prob(out.feature_logits[level], target)  # (B, R_l)
        losses.append(F.binary_cross_entropy_with_logits(scores, utility))
    return torch.stack(losses).mean()


def found_cell_loss(out: TNetOutput, target: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Cross-entropy of each region's location distribution towards its "found" attended cells.

    A cell is found when its patch head's top class is the label with p >= ``threshold``
    (detached: the heads teach the location module, never the reverse). Regions with no found
    cell add nothing; the loss is the mean over those with one. Returns (loss, found cells per image).
    """
    losses, found_total = [], target.new_zeros((), dtype=torch.float32)
    for level, sel in enumerate(out.selections, start=1):
        batch, parents, n_cells = sel.probs.shape
        logits = out.feature_logits[level].detach()  # (B, R_l, classes)
        found = (logits.argmax(-1) == target[:, None]) & (true_class_prob(logits, target) >= threshold)
        slots = sel.parents()[None] * n_cells + sel.cells  # (B, R_l) index into the flattened (parents, N*N)
        goal = sel.probs.new_zeros(batch, parents * n_cells).scatter_add_(1, slots, found.to(sel.probs.dtype))
        goal = goal.clamp_max_(1.0).view(batch, parents, n_cells)  # a cell chosen twice counts once
        mass = goal.sum(-1)  # (B, parents)
        rows = mass > 0
        found_total = found_total + found.sum()
        if rows.any():
            logp = sel.probs.clamp_min(1e-12).log()
            ce = -(goal * logp).sum(-1)[rows] / mass[rows]
            losses.append(ce.mean())
    loss = torch.stack(losses).mean() if losses else out.logits.new_zeros(())
    return loss, found_total / max(len(target), 1)


def cell_mil_loss(out: TNetOutput, target: Tensor) -> Tensor:
    """Attention-MIL NLL of the label from each region's cell class logits, weighted by its scores.

    The weights are a softmax of the raw scores, not of the L2-normalised ones: the MIL pooling
    must be able to become peaked, and the ranking (hence top-k) is the same either way.
    """
    losses = []
    for sel in out.selections:
        if sel.cell_logits is None:
            raise ValueError("mil_weight > 0 needs TNetConfig.loc_classes=True (no cell class logits)")
        weights = sel.logits.softmax(-1)[..., None]  # (B, R, NN, 1)
        probs = (weights * sel.cell_logits.softmax(-1)).sum(dim=2)  # (B, R, classes)
        labels = target[:, None].expand(-1, probs.shape[1])
        losses.append(F.nll_loss(probs.clamp_min(1e-8).log().flatten(0, 1), labels.flatten()))
    return torch.stack(losses).mean()
