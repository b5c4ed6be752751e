"""In-place latent pseudo-label update (paper eq. 7-8, supplement 6.2) in one elementwise pass.

Per entry: y = sigmoid(latent), w = psi(y) (or 1), grad = latent - logit(clamp(pred, eps, 1 - eps)),
latent <- latent - lr * w * grad, and optionally labels = sigmoid(latent_new). The torch version reads and writes the
[M, C] matrix about ten times through temporaries; this kernel reads latent and pred once and writes latent (and
labels) once. Oracle (the torch twin, same signature): ``cdul_fast.ops.reference.latent_update_``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 4096
"""Elements per program: 8 warps x 32 threads x 16 values, i.e. four 16-byte fp32 vectors per thread in flight."""

_NUM_WARPS = 8


@triton.jit
def _latent_update_kernel(
    latent_ptr,
    pred_ptr,
    labels_ptr,
    n,
    coef,
    sigma,
    c2,
    lr,
    lo,
    hi,
    BLOCK: tl.constexpr,
    USE_PSI: tl.constexpr,
    WRITE_LABELS: tl.constexpr,
):
    """Flat 1-D grid over the M*C entries (int64 offsets: the matrix may exceed 2**31 entries)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lat = tl.load(latent_ptr + offs, mask=mask, other=0.0)
    p = tl.load(pred_ptr + offs, mask=mask, other=0.5).to(tl.float32)
    p = tl.minimum(tl.maximum(p, lo), hi)
    grad = lat - tl.log(p / (1.0 - p))
    if USE_PSI:
        y = 1.0 / (1.0 + tl.exp(-lat))
        z = (y - 0.5) / sigma
        new = lat - lr * (coef * tl.exp(-0.5 * z * z) + c2) * grad  # same association as the reference
    else:
        new = lat - lr * grad
    tl.store(latent_ptr + offs, new, mask=mask)
    if WRITE_LABELS:
        tl.store(labels_ptr + offs, 1.0 / (1.0 + tl.exp(-new)), mask=mask)


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
    *,
    block: int = BLOCK,
) -> torch.Tensor:
    """Update ``latent`` in place (and fill ``labels_out`` with sigmoid of the result); returns ``latent``.

    Same contract as the twin ``reference.latent_update_``; inputs are validated once, by ``ops.dispatch``.
    ``block`` is a testing knob (power of two) to exercise several programs and a ragged tail on small inputs.
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    n = latent.numel()
    if n == 0:
        return latent
    pred = pred.contiguous()  # a copy only for strided predictions; latent itself is never copied
    coef = float(c1) / (float(sigma) * math.sqrt(2.0 * math.pi))
    _latent_update_kernel[(triton.cdiv(n, block),)](
        latent, pred, labels_out if labels_out is not None else latent, n,
        coef, float(sigma), float(c2), float(lr), float(eps), 1.0 - float(eps),
        BLOCK=block, USE_PSI=bool(use_psi), WRITE_LABELS=labels_out is not None,
        num_warps=_NUM_WARPS if block >= 1024 else 4,
    )
    return latent
