"""Pure-torch reference of CDUL's math (paper eq. 1-8, supplement 6.1-6.2).

This module is the oracle: ``cdul_aggregate`` and ``latent_update_`` have exactly the signatures and contracts of the
Triton kernels in ``cdul_fast.ops.kernels`` (same outputs, same in-place behaviour), so ``ops.dispatch`` only picks a
module. It is also the CPU path used when Triton cannot run. Everything is computed in float32 regardless of the
input dtype.

Shapes: ``B`` images, ``V = 1 + N`` views per image (view 0 is the whole image, views 1..N the G x G snippets in
row-major order), ``C`` classes, ``K`` embedding width, ``M`` rows of the pseudo-label matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_scores(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. 1 and 3: cosine similarity of every view embedding [B, V, K] with every class embedding [C, K]."""
    f = F.normalize(feats.float(), dim=-1)
    w = F.normalize(text.float(), dim=-1)
    return f @ w.t()


def view_softmax(cos: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Eq. 2 and 4: softmax over classes of cosine / tau, where ``logit_scale`` = 1/tau (CLIP's exp(logit_scale))."""
    return torch.softmax(cos.float() * float(logit_scale), dim=-1)


def minmax_aggregate(local: torch.Tensor, zeta: float) -> torch.Tensor:
    """Eq. 5-6: per class, the max over snippets if it reaches ``zeta``, else their min. [B, N, C] -> [B, C]."""
    alpha = local.amax(dim=1)
    beta = local.amin(dim=1)
    return torch.where(alpha >= zeta, alpha, beta)


def combine(s_global: torch.Tensor, s_aggregate: torch.Tensor, lam: float) -> torch.Tensor:
    """Supplement 6.1: 1/2 (g + a + lambda |g - a|); lambda=0 is the average, lambda=1 the element-wise max."""
    return 0.5 * (s_global + s_aggregate + lam * (s_global - s_aggregate).abs())


def cdul_aggregate(
    cos: torch.Tensor, logit_scale: float, zeta: float, lam: float, outputs: tuple[str, ...] = ("cdul",)
) -> dict[str, torch.Tensor]:
    """The twin of ``kernels.aggregate.cdul_aggregate``: the requested aggregates of cosine scores [B, V, C] as
    contiguous float32 [B, C] tensors, in the order asked for.

    Names: ``global`` (whole image), ``aggregate`` (min-max over snippets, eq. 6), ``cdul`` (combine of the two),
    ``avg`` (mean over all V views), ``max`` (max over all V views). Inputs are validated by the dispatch
    (``ops.dispatch.aggregate_scores``); only what ``outputs`` needs is formed.
    """
    if set(outputs) == {"global"}:
        return {"global": view_softmax(cos[:, :1], logit_scale)[:, 0].contiguous()}
    s = view_softmax(cos, logit_scale)
    res: dict[str, torch.Tensor] = {"global": s[:, 0]}
    if "aggregate" in outputs or "cdul" in outputs:
        res["aggregate"] = minmax_aggregate(s[:, 1:], zeta)
        res["cdul"] = combine(res["global"], res["aggregate"], lam)
    if "avg" in outputs:
        res["avg"] = s.mean(dim=1)
    if "max" in outputs:
        res["max"] = s.amax(dim=1)
    return {n: res[n].contiguous() for n in outputs}


def psi_c2_auto(c1: float, sigma: float) -> float:
    """The c2 that makes psi(0) = psi(1) = 0 (supplement 6.2: c2 keeps psi near zero for confident labels)."""
    return -c1 / (sigma * math.sqrt(2.0 * math.pi)) * math.exp(-0.5 * (0.5 / sigma) ** 2)


def psi(y: torch.Tensor, c1: float, sigma: float, c2: float) -> torch.Tensor:
    """Supplement 6.2: c1 / (sigma sqrt(2 pi)) exp(-1/2 ((y - 0.5) / sigma)^2) + c2, the confidence weight."""
    z = (y.float() - 0.5) / sigma
    return c1 / (sigma * math.sqrt(2.0 * math.pi)) * torch.exp(-0.5 * z * z) + c2


def kl_grad_wrt_labels(latent: torch.Tensor, pred: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d/dy_u of the per-class Bernoulli KL(y_u || y_p) = logit(y_u) - logit(y_p), with y_u = sigmoid(latent).

    ``pred`` are predicted probabilities y_p, clamped to [eps, 1 - eps] so the gradient stays finite.
    """
    p = pred.float().clamp(eps, 1.0 - eps)
    return latent.float() - torch.log(p / (1.0 - p))


def latent_update_(
    latent: torch.Tensor,
    pred: torch.Tensor,
    c1: float,
    sigma: float,
    c2: float,
    lr: float = 1.0,
    use_psi: bool = True,
    eps: float = 1e-6,
    labels_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The twin of ``kernels.latent.latent_update_``, in place on the float32 ``latent`` (returned):
    eq. 7-8, latent <- latent - lr * psi(sigmoid(latent)) * dKL/dy_u (psi replaced by 1 when ``use_psi`` is off);
    ``labels_out`` (optional) gets sigmoid of the new latent. Inputs are validated by the dispatch."""
    grad = kl_grad_wrt_labels(latent, pred, eps)
    weight = psi(torch.sigmoid(latent), c1, sigma, c2) if use_psi else torch.ones_like(latent)
    latent.sub_(lr * weight * grad)
    if labels_out is not None:
        torch.sigmoid(latent, out=labels_out)
    return latent


def labels_to_latent(labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Latent parameters of pseudo labels: sigma^-1(y), with y clamped to [eps, 1 - eps]."""
    y = labels.float().clamp(eps, 1.0 - eps)
    return torch.log(y / (1.0 - y))


# ------------------------------------------------------------------------------------------------------------------
# Novel category discovery (Jia et al., ICCV 2021, section 3.2): WTA hashing and the pairwise BCE of eq. 6-8.
# ``M`` items, ``D`` feature width, ``H`` hashes (permutations), ``k`` the WTA window, ``C`` novel classes.


def wta_permutations(dim: int, hashes: int, seed: int = 0) -> torch.Tensor:
    """H random permutations of range(dim), int64 [H, dim]; seeded, the same on every device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(dim, generator=g) for _ in range(hashes)])


def wta_codes(z: torch.Tensor, perms: torch.Tensor, k: int) -> torch.Tensor:
    """WTA hash codes [M, H] (int64): for permutation h, the position in 0..k-1 of the largest of the first k
    permuted entries of each row of ``z`` [M, D] (ties: the first). Only the order of the entries matters."""
    window = perms[:, :k].to(z.device)  # [H, k]
    return z.float()[:, window].argmax(dim=-1)  # [M, H, k] -> [M, H]


def wta_pair_labels(codes: torch.Tensor, mu: int) -> torch.Tensor:
    """Eq. 6: s_ij = 1 where the codes of i and j agree on at least ``mu`` of the H hashes; float32 [M, M]."""
    agree = (codes[:, None, :] == codes[None, :, :]).sum(dim=-1)
    return (agree >= mu).float()


def pairwise_bce(probs: torch.Tensor, pairs: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 7-8: mean over all M x M pairs of the BCE between s_ij and p_i . p_j, ``probs`` [M, C] the softmax of
    the novel head; p_i . p_j is clamped to [eps, 1 - eps]. A scalar float32 tensor (differentiable in probs)."""
    p = probs if probs.dtype == torch.float64 else probs.float()  # float64 stays (gradient checks)
    sim = (p @ p.t()).clamp(eps, 1.0 - eps)
    s = pairs.to(p.dtype)
    return -(s * sim.log() + (1.0 - s) * (1.0 - sim).log()).mean()


def wta_pairwise_bce(probs: torch.Tensor, codes: torch.Tensor, mu: int, eps: float = 1e-7) -> torch.Tensor:
    """The twin of the fused kernel: WTA codes [M, H] -> agreement counts -> s_ij -> BCE with p_i . p_j (eq. 6-8),
    a scalar. The reference forms the M x M matrices; the kernel tiles them."""
    return pairwise_bce(probs, wta_pair_labels(codes, mu), eps)
