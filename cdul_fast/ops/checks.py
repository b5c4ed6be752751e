"""Input checks, run once per call by ``cdul_fast.ops.dispatch`` before it picks a twin (no Triton import here, so
the torch path works on installs without Triton)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..config import OUTPUTS  # the aggregates a caller may request; each is a float32 [B, C] tensor

PRED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes both twins take (cosine scores, predictions); they compute in float32."""


def check_outputs(outputs: Iterable[str] | str) -> tuple[str, ...]:
    """Requested output names, de-duplicated in order; a bare string is one name."""
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown or not names:
        raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {names!r}")
    return tuple(dict.fromkeys(names))


def _finite(**vals: float) -> None:
    for name, val in vals.items():
        if not math.isfinite(float(val)):
            raise ValueError(f"{name} must be finite, got {val!r}")


def check_aggregate(cos: torch.Tensor, logit_scale: float, zeta: float, lam: float) -> None:
    """Cosine scores [B, V >= 2, C >= 1] and finite parameters (clear errors instead of NaN pseudo labels)."""
    if not isinstance(cos, torch.Tensor) or cos.dim() != 3:
        shape = tuple(cos.shape) if isinstance(cos, torch.Tensor) else type(cos).__name__
        raise ValueError(f"expected cosine scores [B, V, C], got {shape}")
    if cos.shape[1] < 2:
        raise ValueError(f"expected V = 1 + G*G >= 2 views (view 0 = whole image), got V = {cos.shape[1]}")
    if cos.shape[2] < 1:
        raise ValueError("expected at least one class (C >= 1)")
    if cos.dtype not in PRED_DTYPES:
        raise ValueError(f"cosine scores must be float32, float16 or bfloat16, got {cos.dtype}")
    _finite(logit_scale=logit_scale, zeta=zeta, lam=lam)
    if float(logit_scale) <= 0:
        raise ValueError(f"logit_scale (1/tau) must be > 0, got {logit_scale!r}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")


def check_latent_params(c1: float, sigma: float, c2: float, lr: float, eps: float) -> None:
    """Finite psi/step parameters, sigma > 0, eps in (0, 0.5) so the clamp interval is not empty."""
    _finite(c1=c1, sigma=sigma, c2=c2, lr=lr, eps=eps)
    if float(sigma) <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not 0.0 < float(eps) < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")


def check_latent_tensors(latent: torch.Tensor, pred: torch.Tensor, labels_out: torch.Tensor | None) -> None:
    """latent: contiguous float32 (updated in place); pred: same shape and device; labels_out: like latent."""
    if latent.dtype != torch.float32:
        raise ValueError(f"latent must be float32 (it is updated in place), got {latent.dtype}")
    if not latent.is_contiguous():
        raise ValueError("latent must be contiguous (it is updated in place through a flat view)")
    if pred.shape != latent.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != latent shape {tuple(latent.shape)}")
    if pred.dtype not in PRED_DTYPES:
        raise ValueError(f"pred must be float32, float16 or bfloat16, got {pred.dtype}")
    if pred.device != latent.device:
        raise ValueError(f"pred is on {pred.device}, latent on {latent.device}")
    if labels_out is not None:
        if labels_out.shape != latent.shape or labels_out.dtype != torch.float32 or not labels_out.is_contiguous():
            raise ValueError("labels_out must be a contiguous float32 tensor shaped like latent")
        if labels_out.device != latent.device:
            raise ValueError(f"labels_out is on {labels_out.device}, latent on {latent.device}")
