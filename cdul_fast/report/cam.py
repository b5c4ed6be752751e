"""Grad-CAM of the trained classifier (what the paper's Fig. 5 and 6 show), batched, on CPU or GPU.

The classifier is split where timm splits it: ``forward_features`` (a convolutional map A [B, K, h, w]) and
``forward_head`` (pool + linear). For a class c, Grad-CAM is relu(sum_k alpha_ck A_k) with alpha_ck the spatial mean
of d logit_c / d A_k; for a pooled linear head that is the classic CAM relu(W_c . A) up to a positive scale, so the
map says which cells carry the class's evidence. One backward pass per rank serves the whole batch (the images are
independent in eval mode).

A stride-32 trunk at 128 px gives a 4 x 4 map, coarser than a shapes object. ``stitch`` s > 1 runs the trunk on s x s
copies of the image shifted by a fraction of the stride and interleaves their maps (shift-and-stitch, as in fully
convolutional networks): an (s h) x (s w) map of the same network, each cell the CAM of a receptive field centred
there, without retraining or changing the input scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MAX_STITCH = 4
# auto stitch doubles the map side until it has this many cells: on the shapes boxes a 4 x 4 map stitched to 8 x 8
# localises as well as 16 x 16, at a quarter of the cost (bench/bench_cam.py)
AUTO_CELLS = 8


@dataclass
class CamResult:
    """CAMs of ``classes`` (ranked by score) for a batch of inputs [B, 3, H, W]."""

    maps: torch.Tensor  # float32 [B, K, h', w'] in [0, 1] (each map divided by its maximum), h' = stitch * h
    classes: torch.Tensor  # int64 [B, K]
    scores: torch.Tensor  # float32 [B, K] sigmoid probabilities of the unshifted image
    peaks: torch.Tensor  # float32 [B, K, 2]: (x, y) of each map's maximum cell centre, input pixels; NaN: all zero
    stride: float  # input pixels per map cell (the network's stride / stitch)
    input_size: tuple[int, int]  # (H, W) of the inputs; the cells cover the top-left h' x w' cells of stride pixels
    stitch: int = 1  # shifted copies per axis

    def upsampled(self, size: int) -> torch.Tensor:
        """The maps on a size x size grid over the input ([B, K, size, size]): bilinear over the pixels the cells
        cover (cell centres stay where they are), zero where a trunk that floors its map covers nothing."""
        b, k, h, w = self.maps.shape
        in_h, in_w = self.input_size
        cov_h = min(size, max(1, round(h * self.stride * size / in_h)))
        cov_w = min(size, max(1, round(w * self.stride * size / in_w)))
        up = F.interpolate(self.maps.reshape(b * k, 1, h, w), size=(cov_h, cov_w), mode="bilinear",
                           align_corners=False)
        up = F.pad(up, (0, size - cov_w, 0, size - cov_h))
        return up.reshape(b, k, size, size).clamp_(0.0, 1.0)


def _split(model: nn.Module):
    """(features -> NCHW map, head taking that map): timm's split, with channels-last maps (Swin) permuted."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ConfigError(f"{type(model).__name__} has no forward_features/forward_head split: class activation maps "
                          "need a convolutional classifier (timm CNNs, shapesnet, clipres)")
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return (lambda x: model.forward_features(x).permute(0, 3, 1, 2),
                lambda a: model.forward_head(a.permute(0, 2, 3, 1)))
    return model.forward_features, model.forward_head


def auto_stitch(map_side: int) -> int:
    """The shift count per axis that makes the map side reach AUTO_CELLS (1, 2 or 4)."""
    s = 1
    while s < MAX_STITCH and map_side * s < AUTO_CELLS:
        s *= 2
    return s


def _offsets(stride: int, stitch: int) -> list[int]:
    """Shifts (pixels) that put the s copies' cell centres on a regular grid of stride/s, centred in the image."""
    step = stride // stitch
    return [j * step - stride // 2 + step // 2 for j in range(stitch)]


def _network_stride(size: int, cells: int) -> int:
    """The trunk's stride: a power of two (a trunk that floors its map gives 3 cells at 112 px for stride 32)."""
    return 2 ** max(0, round(math.log2(size / cells)))


def _choose_stitch(stitch: int | str, stride: int, side: int) -> int:
    if stitch == "auto":
        s = auto_stitch(side)
        while s > 1 and stride % (2 * s):
            s //= 2
        return s
    try:
        s = int(stitch)
    except (TypeError, ValueError):
        s = 0
    if s == 1 or (s in (2, 4) and stride % (2 * s) == 0):
        return s
    raise ConfigError(f"stitch must be 'auto' or 1, 2, 4 dividing half the network's stride ({stride} px), "
                      f"got {stitch!r}")


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, top_k: int = 3,
             stitch: int | str = "auto", max_batch: int | None = None) -> CamResult:
    """Grad-CAMs of normalized inputs ``x`` [B, 3, H, W] for ``classes`` [B, K] (default: each image's top_k).

    The model runs in eval mode for the call (every submodule's mode is restored after); its parameters get no
    gradients. ``max_batch`` bounds the images (shifted copies included) per trunk call.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"grad_cam expects images [B, 3, H, W], got {tuple(x.shape)}")
    features, head = _split(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            a0 = features(x)
            if a0.ndim != 4:
                raise ConfigError(f"{type(model).__name__}'s features have shape {tuple(a0.shape)}, not a map "
                                  "[B, K, h, w]: class activation maps need a convolutional classifier")
            probs = torch.sigmoid(head(a0).float())
        if classes is None:
            k = min(int(top_k), probs.shape[1])
            if k < 1:
                raise ConfigError(f"top_k must be >= 1, got {top_k}")
            classes = probs.topk(k, dim=1).indices
        classes = classes.to(device=x.device, dtype=torch.long)
        if classes.ndim != 2 or classes.shape[0] != x.shape[0] or classes.shape[1] < 1:
            raise ConfigError(f"classes must be [B, K] with B = {x.shape[0]} and K >= 1, got {tuple(classes.shape)}")
        if int(classes.min()) < 0 or int(classes.max()) >= probs.shape[1]:
            raise ConfigError(f"class indices must be in [0, {probs.shape[1]})")
        (h, w), (size_h, size_w) = a0.shape[-2:], x.shape[-2:]
        stride = _network_stride(size_h, h)
        if _network_stride(size_w, w) != stride:
            raise ConfigError(f"the feature map {h} x {w} of a {size_h} x {size_w} input has no single stride")
        s = _choose_stitch(stitch, stride, max(h, w))
        maps = _stitched(features, head, x, classes, s, stride, a0, max_batch)
    finally:
        for m, mode in modes:
            m.training = mode
    b, kk, mh, mw = maps.shape
    flat = maps.reshape(b, kk, -1)
    top = flat.amax(dim=2, keepdim=True)
    maps = (flat / top.clamp_min(1e-12)).reshape(b, kk, mh, mw)
    idx = flat.argmax(dim=2)
    fine = stride / s
    peaks = torch.stack([(idx % mw).float() + 0.5, (idx // mw).float() + 0.5], dim=-1) * fine
    peaks[(top[..., 0] <= 0)] = float("nan")  # no positive evidence anywhere: no peak
    return CamResult(maps, classes, probs.gather(1, classes), peaks, float(fine), (int(size_h), int(size_w)), s)


def _cams(features, head, x: torch.Tensor, classes: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
    """relu(sum_k alpha_k A_k) [B, K, h, w] for each column of ``classes`` (the gradient stops at A: the trunk runs
    without a graph)."""
    if a is None:
        with torch.no_grad():
            a = features(x)
    with torch.enable_grad():
        a = a.detach().float().requires_grad_(True)
        logits = head(a)
        out = []
        for r in range(classes.shape[1]):
            (g,) = torch.autograd.grad(logits.gather(1, classes[:, r:r + 1]).sum(), a,
                                       retain_graph=r + 1 < classes.shape[1])
            alpha = g.mean(dim=(2, 3), keepdim=True)
            out.append(torch.relu((alpha * a).sum(dim=1)))
    return torch.stack(out, dim=1).detach()


def _stitched(features, head, x: torch.Tensor, classes: torch.Tensor, s: int, stride: int, a0: torch.Tensor,
              max_batch: int | None) -> torch.Tensor:
    b = x.shape[0]
    chunk = max(1, (max_batch or b * s * s) // (s * s))
    if b > chunk:
        return torch.cat([_stitched(features, head, x[i:i + chunk], classes[i:i + chunk], s, stride,
                                    a0[i:i + chunk], max_batch) for i in range(0, b, chunk)], dim=0)
    if s == 1:
        return _cams(features, head, x, classes, a0)
    offs = _offsets(stride, s)
    pad = max(abs(o) for o in offs)
    size_h, size_w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    crops = [padded[:, :, pad + dy:pad + dy + size_h, pad + dx:pad + dx + size_w] for dy in offs for dx in offs]
    cams = _cams(features, head, torch.cat(crops, dim=0), classes.repeat(s * s, 1))  # [s*s*B, ...], shift-major
    k, h, w = cams.shape[1:]
    cams = cams.reshape(s, s, b, k, h, w)  # [dy, dx, B, K, h, w]
    # cell (i, j) of copy (dy, dx) is centred at (stride i + dy-th fine offset, ...): fine index i*s + dy
    return cams.permute(2, 3, 4, 0, 5, 1).reshape(b, k, h * s, w * s)


def peak_in_boxes(peak_xy: tuple[float, float], boxes: list[list[float]]) -> bool:
    """Whether a CAM peak (x, y) lies inside one of ``boxes`` ([x0, y0, x1, y1], same pixel frame)."""
    x, y = peak_xy
    return any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)
