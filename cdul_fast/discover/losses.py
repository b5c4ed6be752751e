"""The losses of Jia et al. (ICCV 2021), section 3: unified contrastive learning (eq. 1-3), the consistency term
(eq. 9) and the ramp-up that trades one for the other (eq. 10). The pairwise BCE (eq. 6-8) is in ``ops``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nce_losses(zhat: torch.Tensor, labels: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE-I and NCE-C (eq. 1-2), each averaged over the 2N embeddings as in eq. 3.

    ``zhat`` [2N, d] L2-normalized projections, rows i and i + N the two views of item i; ``labels`` [N] the known
    class of each item, -1 for unlabelled ones (whose Q(i) is empty: their NCE-C term is 0). Both losses share the
    denominator sum_{n != i} exp(z_i . z_n / tau).
    """
    n2 = zhat.shape[0]
    n = n2 // 2
    logits = (zhat.float() @ zhat.float().t()) / tau
    self_mask = torch.eye(n2, dtype=torch.bool, device=zhat.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    partner = torch.arange(n2, device=zhat.device).roll(n)  # i <-> i + N
    nce_i = -log_prob.gather(1, partner[:, None]).squeeze(1)
    y = labels.to(zhat.device).repeat(2)
    same = (y[:, None] == y[None, :]) & (y[:, None] >= 0) & ~self_mask  # Q(i): same known label, q != i
    count = same.sum(dim=1)
    nce_c = -(log_prob * same).sum(dim=1) / count.clamp_min(1)
    return nce_i.mean(), nce_c.mean()


def consistency_mse(p: torch.Tensor, p_other: torch.Tensor) -> torch.Tensor:
    """Eq. 9: squared difference between the class predictions of the two views, summed over classes, averaged
    over items."""
    return ((p.float() - p_other.float()) ** 2).sum(dim=1).mean()


def ramp_up(epoch: float, total: float, lam: float) -> float:
    """omega(r) = lambda exp(-5 (1 - r/T)^2) (Laine & Aila), from ~0 at the start to lambda at r = T."""
    r = min(max(float(epoch) / float(total), 0.0), 1.0)
    return float(lam) * math.exp(-5.0 * (1.0 - r) ** 2)


def known_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of the known head on the labelled items of a batch (0 when the batch has none)."""
    keep = labels >= 0
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), labels[keep])
