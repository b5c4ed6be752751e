"""Fused pairwise part of novel category discovery (Jia et al. eq. 6-8): WTA codes -> agreement counts -> s_ij ->
BCE against p_i . p_j, tiled so the M x M matrices are never stored.

Forward: each program takes one (i, j) tile, counts code agreements over the H hashes, forms p_i . p_j with a
tile product and writes the tile's BCE sum (summed in a fixed order afterwards: deterministic). Backward: the
gradient of the mean BCE is (2 / M^2) G P with G_ij = dBCE/d(p_i . p_j) (zero where the clamp is active; G is
symmetric), computed as a tiled product over j without forming G. Oracle (the torch twin, same signature):
``cdul_fast.ops.reference.wta_pairwise_bce``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 32


@triton.jit
def _tile(p_ptr, codes_ptr, m, c, h, mu, eps, offs_i, offs_j, BLOCK_C: tl.constexpr):
    """(sim, s, valid, p_j) of one tile: p_i . p_j, the WTA pair labels, the in-range mask and the p_j rows read."""
    cols = tl.arange(0, BLOCK_C)
    mi, mj = offs_i < m, offs_j < m
    pi = tl.load(p_ptr + offs_i[:, None] * c + cols[None, :], mask=mi[:, None] & (cols[None, :] < c), other=0.0)
    pj = tl.load(p_ptr + offs_j[:, None] * c + cols[None, :], mask=mj[:, None] & (cols[None, :] < c), other=0.0)
    sim = tl.dot(pi, tl.trans(pj), input_precision="ieee")
    agree = tl.zeros(sim.shape, dtype=tl.int32)
    for k in range(0, h):
        ci = tl.load(codes_ptr + offs_i.to(tl.int64) * h + k, mask=mi, other=-1)
        cj = tl.load(codes_ptr + offs_j.to(tl.int64) * h + k, mask=mj, other=-2)
        agree += (ci[:, None] == cj[None, :]).to(tl.int32)
    s = (agree >= mu).to(tl.float32)
    return sim, s, mi[:, None] & mj[None, :], pj


@triton.jit
def _fwd_kernel(p_ptr, codes_ptr, out_ptr, m, c, h, mu, eps, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    sim, s, valid, _ = _tile(p_ptr, codes_ptr, m, c, h, mu, eps, offs_i, offs_j, BLOCK_C)
    sim = tl.minimum(tl.maximum(sim, eps), 1.0 - eps)
    bce = -(s * tl.log(sim) + (1.0 - s) * tl.log(1.0 - sim))
    total = tl.sum(tl.sum(tl.where(valid, bce, 0.0), axis=1), axis=0)
    tl.store(out_ptr + pid_i * tl.num_programs(1) + pid_j, total)


@triton.jit
def _bwd_kernel(p_ptr, codes_ptr, grad_ptr, m, c, h, mu, eps, scale, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad[i] = scale * sum_j G_ij p_j for one block of rows i."""
    pid_i = tl.program_id(0)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for j0 in range(0, m, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        sim, s, valid, pj = _tile(p_ptr, codes_ptr, m, c, h, mu, eps, offs_i, offs_j, BLOCK_C)
        inside = (sim >= eps) & (sim <= 1.0 - eps) & valid
        cl = tl.minimum(tl.maximum(sim, eps), 1.0 - eps)
        g = tl.where(inside, -s / cl + (1.0 - s) / (1.0 - cl), 0.0)
        acc += tl.dot(g, pj, input_precision="ieee")
    mask = (offs_i[:, None] < m) & (cols[None, :] < c)
    tl.store(grad_ptr + offs_i[:, None] * c + cols[None, :], acc * scale, mask=mask)


def _block_c(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


class _WtaPairwiseBce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs: torch.Tensor, codes: torch.Tensor, mu: int, eps: float, block: int) -> torch.Tensor:
        p = probs.detach().float().contiguous()
        cd = codes.to(torch.int32).contiguous()
        m, c = p.shape
        grid = (triton.cdiv(m, block), triton.cdiv(m, block))
        partial = torch.empty(grid[0] * grid[1], device=p.device, dtype=torch.float32)
        _fwd_kernel[grid](p, cd, partial, m, c, cd.shape[1], int(mu), float(eps), BLOCK=block, BLOCK_C=_block_c(c))
        ctx.save_for_backward(p, cd)
        ctx.mu, ctx.eps, ctx.block, ctx.in_dtype = int(mu), float(eps), block, probs.dtype
        return partial.sum() / float(m * m)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        p, cd = ctx.saved_tensors
        m, c = p.shape
        grad = torch.empty_like(p)
        _bwd_kernel[(triton.cdiv(m, ctx.block),)](p, cd, grad, m, c, cd.shape[1], ctx.mu, ctx.eps, 2.0 / float(m * m),
                                                   BLOCK=ctx.block, BLOCK_C=_block_c(c))
        return (grad * grad_out).to(ctx.in_dtype), None, None, None, None


def wta_pairwise_bce(probs: torch.Tensor, codes: torch.Tensor, mu: int, eps: float = 1e-7, *,
                     block: int = BLOCK_M) -> torch.Tensor:
    """The mean BCE of eq. 7-8 with the WTA pair labels of eq. 6, as a differentiable scalar (float32).

    Same contract as the twin ``reference.wta_pairwise_bce``; ``block`` (a power of two >= 16) is a testing knob for
    ragged tiles on small inputs.
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return _WtaPairwiseBce.apply(probs, codes, mu, eps, block)
