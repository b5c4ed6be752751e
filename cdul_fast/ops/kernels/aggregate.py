"""Fused CDUL view aggregation (paper eq. 2, 4-6, supplement 6.1) in one pass over the cosine scores.

The cosine matrix [B, V, C] comes out of a cuBLAS GEMM; everything after it (V softmaxes, min/max over snippets, the
lambda combine, mean and max over views) is elementwise or a reduction over at most a few thousand classes, so the
torch version is a chain of ~10 memory-bound kernels with [B, V, C] float32 intermediates. Here each program reads its
images' V rows once, keeps every accumulator in fp32 registers and writes only the requested [B, C] outputs.

Oracle (the torch twin, same signature): ``cdul_fast.ops.reference.cdul_aggregate``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from ..checks import OUTPUTS

MAX_BLOCK_C = 8192
"""Widest class row handled in one register tile; wider rows take the two-pass tiled kernel (online softmax)."""

TILE_C = 4096
"""Class tile of the tiled kernel (C > MAX_BLOCK_C)."""

_TARGET_TILE = 2048
"""Elements per [BLOCK_B, BLOCK_C] view tile when packing several images into one program (small C)."""

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _softmax_rows(ptrs, load_mask, col_mask, logit_scale):
    """Softmax over the last axis of cos * logit_scale in fp32; masked classes get probability 0.

    Only the class mask feeds the -inf fill, so rows past B (masked loads, value 0) stay finite: no NaN anywhere.
    """
    x = tl.load(ptrs, mask=load_mask, other=0.0).to(tl.float32) * logit_scale
    x = tl.where(col_mask, x, float("-inf"))
    m = tl.max(x, axis=1)
    e = tl.exp(x - m[:, None])
    d = tl.sum(e, axis=1)
    return e / d[:, None]


@triton.jit
def _store_outputs(
    offs,
    mask,
    g,
    alpha,
    beta,
    s_sum,
    inv_v,
    zeta,
    lam,
    glob_ptr,
    agg_ptr,
    cdul_ptr,
    avg_ptr,
    max_ptr,
    WANT_GLOBAL: tl.constexpr,
    WANT_AGG: tl.constexpr,
    WANT_CDUL: tl.constexpr,
    WANT_AVG: tl.constexpr,
    WANT_MAX: tl.constexpr,
):
    """Epilogue shared by both kernels: only the requested outputs are formed and stored."""
    if WANT_GLOBAL:
        tl.store(glob_ptr + offs, g, mask=mask)
    if WANT_AGG or WANT_CDUL:
        a = tl.where(alpha >= zeta, alpha, beta)
        if WANT_AGG:
            tl.store(agg_ptr + offs, a, mask=mask)
        if WANT_CDUL:
            tl.store(cdul_ptr + offs, 0.5 * (g + a + lam * tl.abs(g - a)), mask=mask)
    if WANT_AVG:
        tl.store(avg_ptr + offs, s_sum * inv_v, mask=mask)
    if WANT_MAX:
        tl.store(max_ptr + offs, tl.maximum(g, alpha), mask=mask)


@triton.jit
def _cdul_aggregate_kernel(
    cos_ptr,
    glob_ptr,
    agg_ptr,
    cdul_ptr,
    avg_ptr,
    max_ptr,
    B,
    V,
    C,
    stride_b,
    stride_v,
    logit_scale,
    zeta,
    lam,
    inv_v,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WANT_GLOBAL: tl.constexpr,
    WANT_AGG: tl.constexpr,
    WANT_CDUL: tl.constexpr,
    WANT_AVG: tl.constexpr,
    WANT_MAX: tl.constexpr,
):
    """BLOCK_B images per program, the whole class row in one tile; a loop over the V views of those images.

    alpha (max over snippets) also gives "max over all views" as max(global, alpha), so the accumulators are
    alpha (aggregate, cdul, max), beta (aggregate, cdul) and a running sum (avg); each exists only when requested,
    and with only "global" requested the snippet views are never read.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_mask = (cols < C)[None, :]
    mask = (rows < B)[:, None] & col_mask
    ptrs = cos_ptr + rows[:, None] * stride_b + cols[None, :]

    g = _softmax_rows(ptrs, mask, col_mask, logit_scale)
    alpha = g  # placeholders so every name exists; constexpr branches below decide what is really computed
    beta = g
    s_sum = g
    if WANT_AGG or WANT_CDUL or WANT_MAX:
        alpha = tl.full([BLOCK_B, BLOCK_C], float("-inf"), tl.float32)
    if WANT_AGG or WANT_CDUL:
        beta = tl.full([BLOCK_B, BLOCK_C], float("inf"), tl.float32)
    if WANT_AGG or WANT_CDUL or WANT_MAX or WANT_AVG:
        for v in range(1, V):
            p = _softmax_rows(ptrs + v * stride_v, mask, col_mask, logit_scale)
            if WANT_AGG or WANT_CDUL or WANT_MAX:
                alpha = tl.maximum(alpha, p)
            if WANT_AGG or WANT_CDUL:
                beta = tl.minimum(beta, p)
            if WANT_AVG:
                s_sum += p

    offs = rows[:, None] * C + cols[None, :]
    _store_outputs(
        offs, mask, g, alpha, beta, s_sum, inv_v, zeta, lam, glob_ptr, agg_ptr, cdul_ptr, avg_ptr, max_ptr,
        WANT_GLOBAL, WANT_AGG, WANT_CDUL, WANT_AVG, WANT_MAX,
    )


@triton.jit
def _pick(vec, idx, i):
    """vec[i] for a small register vector (V_BLOCK lanes) without a memory round trip."""
    return tl.sum(tl.where(idx == i, vec, 0.0), axis=0)


@triton.jit
def _cdul_aggregate_tiled_kernel(
    cos_ptr,
    glob_ptr,
    agg_ptr,
    cdul_ptr,
    avg_ptr,
    max_ptr,
    V,
    C,
    stride_b,
    stride_v,
    logit_scale,
    zeta,
    lam,
    inv_v,
    TILE: tl.constexpr,
    V_BLOCK: tl.constexpr,
    WANT_GLOBAL: tl.constexpr,
    WANT_AGG: tl.constexpr,
    WANT_CDUL: tl.constexpr,
    WANT_AVG: tl.constexpr,
    WANT_MAX: tl.constexpr,
):
    """One image per program for rows wider than MAX_BLOCK_C: pass 1 finds each view's softmax max and
    denominator with an online softmax over class tiles (kept in V_BLOCK-lane register vectors), pass 2 re-reads
    the tiles and forms the outputs. Reads the scores twice, which only matters for C > MAX_BLOCK_C."""
    b = tl.program_id(0).to(tl.int64)
    row = cos_ptr + b * stride_b
    cols = tl.arange(0, TILE)
    vids = tl.arange(0, V_BLOCK)
    NEED_LOCAL: tl.constexpr = WANT_AGG or WANT_CDUL or WANT_MAX or WANT_AVG
    n_views = V if NEED_LOCAL else 1

    m_vec = tl.zeros([V_BLOCK], tl.float32)
    d_vec = tl.full([V_BLOCK], 1.0, tl.float32)
    for v in range(0, n_views):
        m = tl.full([], float("-inf"), tl.float32)
        d = tl.full([], 0.0, tl.float32)
        for c0 in range(0, C, TILE):
            cmask = c0 + cols < C
            x = tl.load(row + v * stride_v + c0 + cols, mask=cmask, other=0.0).to(tl.float32) * logit_scale
            x = tl.where(cmask, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        m_vec = tl.where(vids == v, m, m_vec)
        d_vec = tl.where(vids == v, d, d_vec)

    m0 = _pick(m_vec, vids, 0)
    d0 = _pick(d_vec, vids, 0)
    for c0 in range(0, C, TILE):
        cmask = c0 + cols < C
        x0 = tl.load(row + c0 + cols, mask=cmask, other=0.0).to(tl.float32) * logit_scale
        g = tl.exp(x0 - m0) / d0
        alpha = g
        beta = g
        s_sum = g
        if WANT_AGG or WANT_CDUL or WANT_MAX:
            alpha = tl.full([TILE], float("-inf"), tl.float32)
        if WANT_AGG or WANT_CDUL:
            beta = tl.full([TILE], float("inf"), tl.float32)
        if NEED_LOCAL:
            for v in range(1, V):
                x = tl.load(row + v * stride_v + c0 + cols, mask=cmask, other=0.0).to(tl.float32) * logit_scale
                p = tl.exp(x - _pick(m_vec, vids, v)) / _pick(d_vec, vids, v)
                if WANT_AGG or WANT_CDUL or WANT_MAX:
                    alpha = tl.maximum(alpha, p)
                if WANT_AGG or WANT_CDUL:
                    beta = tl.minimum(beta, p)
                if WANT_AVG:
                    s_sum += p
        _store_outputs(
            b * C + c0 + cols, cmask, g, alpha, beta, s_sum, inv_v, zeta, lam,
            glob_ptr, agg_ptr, cdul_ptr, avg_ptr, max_ptr,
            WANT_GLOBAL, WANT_AGG, WANT_CDUL, WANT_AVG, WANT_MAX,
        )


def _num_warps(tile_elems: int) -> int:
    """Enough threads for ~4-8 fp32 values per thread per tile (wide vector loads, no register spills)."""
    if tile_elems <= 1024:
        return 4
    if tile_elems <= 4096:
        return 8
    return 16


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewest programs is fastest


def _block_b(B: int, block_c: int, device: torch.device) -> int:
    """Images per program.

    For small C (VOC 20, COCO 80, NUS 81) a one-image program moves only V*C*2 bytes and leaves most threads of
    even a 4-warp program idle (BLOCK_C = 32 or 128), so rows are packed until a view tile holds ~2048 values:
    full warps, wide loads, fewer per-program reductions. The packing stops while it would leave fewer than two
    programs per SM, since a memory-bound kernel needs many loads in flight on every SM.
    """
    bb = max(1, _TARGET_TILE // block_c)
    bb = min(bb, triton.next_power_of_2(max(B, 1)))
    min_programs = 2 * _sm_count(device)
    while bb > 1 and triton.cdiv(B, bb) < min_programs:
        bb //= 2
    return bb


def cdul_aggregate(
    cos: torch.Tensor,
    logit_scale: float,
    zeta: float,
    lam: float,
    outputs: Iterable[str] | str = ("cdul",),
    *,
    max_block_c: int = MAX_BLOCK_C,
    block_b: int | None = None,
) -> dict[str, torch.Tensor]:
    """Requested aggregates of cosine scores [B, V, C] (fp32/fp16/bf16, last dim contiguous) as float32 [B, C].

    Same contract as the twin ``reference.cdul_aggregate``; inputs are validated once, by ``ops.dispatch``. Checked
    here are only the kernel's own needs (dtype, contiguous classes) and the tuning/testing knobs: rows wider than
    ``max_block_c`` use the tiled kernel, ``block_b`` overrides the images-per-program heuristic (power of two).
    """
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    if cos.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"cosine scores must be float32, float16 or bfloat16, got {cos.dtype}")
    if cos.stride(2) != 1:
        raise ValueError("the class dimension of the cosine scores must be contiguous (stride 1)")
    B, V, C = cos.shape
    outs = {n: torch.empty((B, C), dtype=torch.float32, device=cos.device) for n in names}
    if B == 0:
        return outs
    dummy = next(iter(outs.values()))  # never written: its output flag is off
    ptrs = [outs.get(n, dummy) for n in OUTPUTS]
    flags = {f"WANT_{k}": n in outs for k, n in zip(("GLOBAL", "AGG", "CDUL", "AVG", "MAX"), OUTPUTS)}
    scalars = (float(logit_scale), float(zeta), float(lam), 1.0 / V)

    block_c = triton.next_power_of_2(C)
    if block_c <= max_block_c:
        bb = block_b if block_b is not None else _block_b(B, block_c, cos.device)
        if bb < 1 or bb & (bb - 1):
            raise ValueError(f"block_b must be a power of two >= 1, got {bb}")
        _cdul_aggregate_kernel[(triton.cdiv(B, bb),)](
            cos, *ptrs, B, V, C, cos.stride(0), cos.stride(1), *scalars,
            BLOCK_B=bb, BLOCK_C=block_c, num_warps=_num_warps(bb * block_c), **flags,
        )
    else:
        tile = min(TILE_C, triton.next_power_of_2(max_block_c))
        _cdul_aggregate_tiled_kernel[(B,)](
            cos, *ptrs, V, C, cos.stride(0), cos.stride(1), *scalars,
            TILE=tile, V_BLOCK=triton.next_power_of_2(V), num_warps=_num_warps(tile), **flags,
        )
    return outs
