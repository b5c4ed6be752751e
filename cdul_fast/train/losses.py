"""Training losses on pseudo labels: CDUL's KL loss and the baselines of the paper's Table 1 (AN, LS, EPR, ROLE).

All take logits [B, C] and return a scalar averaged over images and classes (ROLE returns two, one per learner).
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
    batch's mean number of predicted positives per image towards ``expected_positives`` (scaled by 1/C^2). The mean
    is taken before the square, as in Cole et al.: the batch as a whole, not each image, is held to k."""
    lg = logits.float()
    pos = positives.float()
    c = lg.shape[1]
    pos_term = (F.softplus(-lg) * pos).sum(1).mean() / c  # -log sigmoid on the positives
    k = torch.sigmoid(lg).sum(1).mean()
    reg = (k - expected_positives) ** 2 / (c * c)
    return pos_term + weight * reg


def role_estimates(theta: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """ROLE's label estimates y_hat = sigmoid(theta), with the observed positives held at 1 (they are not estimated)."""
    return torch.where(observed, torch.ones_like(theta), torch.sigmoid(theta.float()))


def _batch_expected_positives(q: torch.Tensor, expected_positives: float) -> torch.Tensor:
    """Cole et al.'s regularizer as in their code: (batch mean of sum_i q_ni - k)^2 / C^2 (one count per batch)."""
    return (q.sum(1).mean() - expected_positives) ** 2 / (q.shape[1] ** 2)


def role_losses(logits: torch.Tensor, theta: torch.Tensor, observed: torch.Tensor, expected_positives: float,
                weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularized online label estimation (ROLE, Cole et al., CVPR 2021): ``(loss_f, loss_y)``, the classifier's and
    the label estimator's halves of their joint loss, each against the other's output held fixed (stop-gradient), so
    ``loss_f`` reaches only ``logits`` and ``loss_y`` only ``theta`` and each learner can take its own step.

    With p = sigmoid(logits), y_hat = ``role_estimates(theta, observed)`` and R the expected-positive regularizer:
    loss_f = 1/2 [BCE(p | y_hat) + BCE(p | 1) on the observed + w R(p)], loss_y = 1/2 [BCE(y_hat | p) on the
    unobserved + w R(y_hat)]. The estimator's observed-positive term of Cole et al. vanishes (they are fixed at 1).
    """
    lg, th = logits.float(), theta.float()
    obs = observed.float()
    est = role_estimates(th, observed)
    p = torch.sigmoid(lg)
    n = lg.numel()
    cross_f = F.binary_cross_entropy_with_logits(lg, est.detach(), reduction="sum") / n
    pos_f = (F.softplus(-lg) * obs).sum() / n  # -log p on the observed positives
    loss_f = 0.5 * (cross_f + pos_f + weight * _batch_expected_positives(p, expected_positives))
    cross_y = (F.binary_cross_entropy_with_logits(th, p.detach(), reduction="none") * (1.0 - obs)).sum() / n
    loss_y = 0.5 * (cross_y + weight * _batch_expected_positives(est, expected_positives))
    return loss_f, loss_y
