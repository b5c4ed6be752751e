"""Batch normalization over the global batch of a DDP run, so the result does not depend on the number of ranks.

With plain DDP each rank normalizes with the statistics of its own share of the batch: 16 images over 8 GPUs is 2
per BatchNorm, another model than one process trains. On CUDA torch's ``SyncBatchNorm`` (NCCL) fixes that; it refuses
CPU tensors, so ``GlobalBatchNorm`` is its CPU twin over gloo (the CI tests and CPU clusters): per-channel sums and
sums of squares (accumulated in float64) all-reduced in the forward pass, the two per-channel gradient sums in the
backward pass; the activations themselves stay in their own dtype.
Parameter gradients stay local (DDP averages them like any other); running statistics are updated from the global
batch on every rank, so they stay equal without a broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn


class _GlobalBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() // max(c, 1)], dtype=torch.float64)
        stats = torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64), count])
        tdist.all_reduce(stats, group=group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        shape = (1, c) + (1,) * (x.dim() - 2)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)  # the activations stay in x's dtype
        ctx.save_for_backward(xhat, invstd.to(x.dtype), weight)
        ctx.group, ctx.n, ctx.shape, ctx.dims = group, n, shape, dims
        y = xhat * weight.view(shape) + bias.view(shape)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        return y, mean.to(x.dtype), unbiased.to(x.dtype)

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        xhat, invstd, weight = ctx.saved_tensors
        shape, dims = ctx.shape, ctx.dims
        c = xhat.shape[1]
        grad_weight = (gy * xhat).sum(dims)
        grad_bias = gy.sum(dims)
        sums = torch.cat([grad_bias, grad_weight]).double()  # sum g and sum g * xhat, over every rank's rows
        tdist.all_reduce(sums, group=ctx.group)
        mean_g = (sums[:c] / ctx.n).to(gy.dtype).view(shape)
        mean_gx = (sums[c:] / ctx.n).to(gy.dtype).view(shape)
        gx = (weight.view(shape) * invstd.view(shape)) * (gy - mean_g - xhat * mean_gx)
        return gx, grad_weight, grad_bias, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training-mode statistics cover the whole global batch (every rank of ``group``)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group=None) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if not (bn.affine and bn.track_running_stats and bn.momentum is not None):
            raise ValueError("GlobalBatchNorm covers affine BatchNorm with running statistics and a momentum")
        self.load_state_dict(bn.state_dict())
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        y, mean, var = _GlobalBN.apply(x, self.weight, self.bias, self.eps, self.group)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
            self.num_batches_tracked.add_(1)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device, group=None) -> nn.Module:
    """Every BatchNorm of ``model`` synchronized over the ranks: torch's SyncBatchNorm on CUDA, GlobalBatchNorm on
    CPU (same math)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, GlobalBatchNorm(child, group).to(child.weight.device))
        else:
            sync_batchnorm(child, device, group)
    return model
