"""Training losses on pseudo labels: CDUL's KL loss and the baselines of the paper's Table 1 (AN, LS, EPR).

All take logits [B, C] and return a scalar averaged over images and classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def bernoulli_entropy(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(EPS, 1.0 - EPS)
    return -(y * y.log() + (1.0 - y) * (1.0 - y).log())


def kl_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class Bernoulli KL(y_u || sigmoid(logits)) = BCE - H(y_u): zero when predictions equal the soft labels."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (bce - bernoulli_entropy(targets.float())).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Naive assume-negative baseline: BCE on (hard) pseudo labels, every non-positive taken as negative."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def smoothed_bce_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Label-smoothing baseline: hard targets pulled towards 1/2 by ``smoothing``."""
    t = targets.float() * (1.0 - smoothing) + 0.5 * smoothing
    return F.binary_cross_entropy_with_logits(logits.float(), t)


def epr_loss(logits: torch.Tensor, positives: torch.Tensor, expected_positives: float,
             weight: float = 1.0) -> torch.Tensor:
    """Expected positive regularization (Cole et al., CVPR 2021): BCE on positives only, plus a penalty pulling the
    expected number of predicted positives per image towards ``expected_positives`` (scaled by 1/C^2)."""
    lg = logits.float()
    pos = positives.float()
    c = lg.shape[1]
    pos_term = (F.softplus(-lg) * pos).sum(1).mean() / c  # -log sigmoid on the positives
    k = torch.sigmoid(lg).sum(1)
    reg = ((k - expected_positives) ** 2).mean() / (c * c)
    return pos_term + weight * reg
