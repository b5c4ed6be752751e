"""PIL-exact resampling as matrix products: the tensor decoder's tiling, and the PIL path's bounded one.

PIL resamples in two separable passes (horizontal, then vertical), each a sum of 8-bit pixels times fixed-point
coefficients (22 fractional bits) rounded and clipped back to 8 bits. A pass is therefore a matrix product with an
integer-valued coefficient matrix followed by a shift: done here in float64 (every partial sum is an integer below
2^53, so the result is exact), batched over views as two ``bmm`` per view group. On CPU this reproduces
``geometry.pil_views`` bit for bit.

Coefficients are computed in numpy with PIL's own operation order (``precompute_coeffs`` + ``normalize_coeffs_8bpc``
in libImaging/Resample.c: float32 box edges, double filter, sequential normalisation sum, round-half-away), only
for the output rows/columns the center crop keeps. That is also why ``pil_views`` uses it for extreme aspect
ratios: PIL would resize a 1 x 5000 image to 448 x 2240000 pixels (4 GB) before cropping 448 x 448 from it; here
only the kept 448 rows and columns are ever computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, ImageDecodeError
from .geometry import _RESAMPLE, ViewSpec, oversized, resize_crop, view_boxes, view_geometry

PRECISION_BITS = 22  # PIL: 32 - 8 - 2
_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
TENSOR_INTERPOLATIONS = tuple(_SUPPORT)
_CHUNK_BYTES = 64 << 20  # float64 working set of one horizontal-pass chunk


def _filter(x: np.ndarray, interpolation: str) -> np.ndarray:
    """PIL's filter functions, vectorised (same expressions, float64)."""
    ax = np.abs(x)
    if interpolation == "bilinear":
        return np.where(ax < 1.0, 1.0 - ax, 0.0)
    if interpolation == "bicubic":
        a = -0.5
        inner = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1
        outer = (((ax - 5) * ax + 8) * ax - 4) * a
        return np.where(ax < 1.0, inner, np.where(ax < 2.0, outer, 0.0))
    if interpolation == "lanczos":
        def sinc(v: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                pv = v * math.pi
                return np.where(v == 0.0, 1.0, np.sin(pv) / pv)

        return np.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3), 0.0)
    raise ConfigError(f"interpolation {interpolation!r} has no tensor resampler; use one of {TENSOR_INTERPOLATIONS}")


def pil_coefficients(in_size: int, in0: np.ndarray, in1: np.ndarray, out_size: np.ndarray, keep0: np.ndarray,
                     keep: int, interpolation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-point coefficients of PIL's resize of [in0, in1) to ``out_size``, for outputs ``keep0 .. keep0+keep``.

    Vectorised over views: ``in0, in1, out_size, keep0`` are [Vg] arrays. Returns ``(xmin int64 [Vg, keep],
    count int64 [Vg, keep], k float64 [Vg, keep, ksize])``: output ``i`` of view ``v`` is
    ``sum_{t < count} k[v, i, t] * in[xmin[v, i] + t]`` (then ``+ 2^21 >> 22``, clipped to 0..255); ``k`` holds
    integers, zero from ``count`` on.
    """
    f0 = np.asarray(in0, dtype=np.float32)
    f1 = np.asarray(in1, dtype=np.float32)
    scale = (f1 - f0).astype(np.float64) / np.asarray(out_size, dtype=np.float64)  # C: float edges, double ratio
    filterscale = np.maximum(scale, 1.0)
    support = _SUPPORT[interpolation] * filterscale
    ksize = int(np.ceil(support).max()) * 2 + 1
    xx = np.asarray(keep0, dtype=np.float64)[:, None] + np.arange(keep, dtype=np.float64)[None, :]
    center = f0.astype(np.float64)[:, None] + (xx + 0.5) * scale[:, None]
    ss = (1.0 / filterscale)[:, None, None]
    xmin = np.maximum(np.trunc(center - support[:, None] + 0.5).astype(np.int64), 0)  # C (int) truncates
    count = np.minimum(np.trunc(center + support[:, None] + 0.5).astype(np.int64), in_size) - xmin
    t = np.arange(ksize, dtype=np.int64)
    valid = t[None, None, :] < count[:, :, None]
    arg = ((t[None, None, :] + xmin[:, :, None]) - center[:, :, None] + 0.5) * ss
    w = np.where(valid, _filter(arg, interpolation), 0.0)
    ww = np.zeros(w.shape[:2], dtype=np.float64)
    for j in range(ksize):  # PIL's sequential sum (order matters for the last bit)
        ww = ww + w[:, :, j]
    w = np.where((ww != 0.0)[:, :, None], w / np.where(ww == 0.0, 1.0, ww)[:, :, None], w)
    k = np.trunc(np.where(w < 0, -0.5 + w * _ONE, 0.5 + w * _ONE))
    return xmin, count, np.where(valid, k, 0.0)


@dataclass(frozen=True)
class _AxisPlan:
    """One axis of one view group: window starts [Vg], width, and compact coefficients relative to the window."""

    starts: np.ndarray  # int64 [Vg]
    width: int
    cols: np.ndarray  # int64 [Vg, S, ksize]: column inside the window (unique per output; padded past width)
    k: np.ndarray  # float64 [Vg, S, ksize]

    def dense(self, device: torch.device) -> torch.Tensor:
        """float64 [Vg, S, width] coefficient matrices, built on ``device`` from the compact form (one scatter)."""
        vg, s, ksize = self.k.shape
        m = torch.zeros((vg, s, self.width + ksize), dtype=torch.float64, device=device)
        m.scatter_(2, torch.as_tensor(self.cols, device=device), torch.as_tensor(self.k, device=device))
        return m[:, :, :self.width]


def _axis_plan(in_size: int, boxes: np.ndarray, sizes: np.ndarray, offsets: np.ndarray, out: int,
               interpolation: str) -> _AxisPlan:
    xmin, count, k = pil_coefficients(in_size, boxes[:, 0], boxes[:, 1], sizes, offsets, out, interpolation)
    lo = xmin.min(axis=1)
    width = int(((xmin + count).max(axis=1) - lo).max())
    starts = np.minimum(lo, in_size - width)
    cols = (xmin - starts[:, None])[:, :, None] + np.arange(k.shape[2])[None, None, :]
    return _AxisPlan(starts=starts, width=width, cols=cols, k=k)


@functools.lru_cache(maxsize=2048)
def _image_plan(height: int, width: int, spec: ViewSpec) -> tuple[tuple[np.ndarray, _AxisPlan, _AxisPlan], ...]:
    """Per view group (the whole image; the grid cells): view indices, row plan, column plan. Cached per size:
    collections repeat a few image sizes, and the plan depends on nothing else."""
    g = view_geometry(width, height, spec)
    plans = []
    # the whole image and the grid cells differ ~G-fold in extent: one batched group each keeps the windows tight
    for group in (np.arange(1), np.arange(1, len(g))):
        if group.size == 0:
            continue
        gg = g[group]
        rows = _axis_plan(height, gg[:, [0, 2]], gg[:, 4], gg[:, 6], spec.image_size, spec.interpolation)
        cols = _axis_plan(width, gg[:, [1, 3]], gg[:, 5], gg[:, 7], spec.image_size, spec.interpolation)
        plans.append((group, rows, cols))
    return tuple(plans)


def _round_clip(acc: torch.Tensor) -> torch.Tensor:
    """PIL's ``clip8((acc + 2^21) >> 22)`` on exact float64 integer sums."""
    return torch.floor((acc + _HALF) * (1.0 / _ONE)).clamp_(0.0, 255.0)


def check_interpolation(spec: ViewSpec) -> None:
    """PIL's NEAREST resize is not a filter of the two-pass kind: the tensor path refuses it with a way out."""
    if spec.interpolation not in _SUPPORT:
        raise ConfigError(f"--decoder nvjpeg resamples with {', '.join(TENSOR_INTERPOLATIONS)}; this CLIP asks "
                          f"for {spec.interpolation!r}: use --decoder pil")


def resample_views(img: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """uint8 [H, W, 3] (any device) -> uint8 [V, S, S, 3], exactly as ``views.pil_views`` cuts and resamples it."""
    check_interpolation(spec)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {img.dtype} {tuple(img.shape)}")
    h_in, w_in = int(img.shape[0]), int(img.shape[1])
    if h_in < 1 or w_in < 1:
        raise ImageDecodeError(f"image has no pixels ({w_in}x{h_in})")
    size, dev = spec.image_size, img.device
    out = torch.empty((spec.num_views, size, size, 3), dtype=torch.uint8, device=dev)
    for group, rp, cp in _image_plan(h_in, w_in, spec):
        rows = torch.as_tensor(rp.starts[:, None] + np.arange(rp.width)[None, :], device=dev)
        cols = torch.as_tensor(cp.starts[:, None] + np.arange(cp.width)[None, :], device=dev)
        vg, nr, nc = len(group), rp.width, cp.width
        wx_t = cp.dense(dev).transpose(1, 2)  # [Vg, nc, S]
        # horizontal pass, [Vg, rows*3, nc] @ [Vg, nc, S], in row chunks: float64 copies of a 10000 x 10000 photo
        # would take GBs, a chunk takes at most _CHUNK_BYTES
        tmp = torch.empty((vg, nr, 3, size), dtype=torch.float64, device=dev)
        step = max(1, _CHUNK_BYTES // (vg * nc * 3 * 8))
        for r0 in range(0, nr, step):
            r1 = min(nr, r0 + step)
            win = img[rows[:, r0:r1, None], cols[:, None, :]].to(torch.float64)  # [Vg, r, nc, 3]
            part = torch.bmm(win.permute(0, 1, 3, 2).reshape(vg, (r1 - r0) * 3, nc), wx_t)
            tmp[:, r0:r1] = _round_clip(part).view(vg, r1 - r0, 3, size)
        # vertical pass: [Vg, S, nr] @ [Vg, nr, 3*S] -> [Vg, S, 3, S]
        res = _round_clip(torch.bmm(rp.dense(dev), tmp.view(vg, nr, 3 * size))).view(vg, size, 3, size)
        out[int(group[0]):int(group[-1]) + 1] = res.permute(0, 1, 3, 2).to(torch.uint8)
    return out


def pil_views(img: Image.Image, spec: ViewSpec) -> np.ndarray:
    """uint8 [V, S, S, 3]: view 0 = whole image, views 1.. = grid cells; ``img`` must already be RGB.

    The reference tiling (PIL). Extreme aspect ratios (``geometry.oversized`` views) take ``resample_views``, which
    gives the same bytes without PIL's full-size intermediate; NEAREST, which it does not implement, resamples the
    kept region directly (``view_geometry(bounded=True)``)."""
    resample = _RESAMPLE[spec.interpolation]
    w, h = img.size
    big = oversized(view_geometry(w, h, spec), spec.image_size)
    if big.any():
        if spec.interpolation in _SUPPORT:
            return resample_views(torch.from_numpy(np.array(img)), spec).numpy()
        g = view_geometry(w, h, spec, bounded=True)
        return np.stack([np.asarray(img.resize((spec.image_size, spec.image_size), resample,
                                               box=(float(x0), float(y0), float(x1), float(y1))))
                         for y0, x0, y1, x1 in g[:, :4]])
    boxes = view_boxes(w, h, spec.grid)
    out = np.empty((len(boxes), spec.image_size, spec.image_size, 3), dtype=np.uint8)
    for i, box in enumerate(boxes):
        out[i] = np.asarray(resize_crop(img, box, spec.image_size, resample))
    return out
