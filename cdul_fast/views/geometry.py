"""The whole image plus a G x G grid of snippets, each with CLIP's own preprocessing (the CPU/PIL path).

Views leave the decoder as uint8 [V, S, S, 3] (HWC): a quarter of the bytes of float32 on their way to the device,
where ``normalize_views`` turns them into the encoder's input. The resize + center crop reproduces open_clip's
``Resize(S, bicubic) -> CenterCrop(S)`` exactly (same size rounding, same crop offsets), so view 0 equals open_clip's
own preprocessing of the image; snippet ``j`` is that preprocessing applied to grid cell ``j`` (row-major) of the
original image, resampled straight from the original pixels (PIL's ``box=``), never from a downscaled copy.
Decoding files into RGB images is ``views.decode``'s job; cutting the views, ``views.resample.pil_views``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ImageDecodeError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ViewSpec:
    """How to cut and preprocess views: CLIP's input size, normalization and interpolation, and the grid size G."""

    image_size: int
    grid: int = 3
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1 (got {self.grid}); CDUL needs at least one snippet per image")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} not one of {sorted(_RESAMPLE)}")

    @property
    def num_views(self) -> int:
        return 1 + self.grid * self.grid

    @classmethod
    def from_preprocess_cfg(cls, cfg: dict, grid: int) -> ViewSpec:
        """Build from open_clip's ``model.visual.preprocess_cfg`` (size, mean, std, interpolation, resize_mode)."""
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise ValueError(f"non-square CLIP input size {size} is not supported")
            size = size[0]
        mode = cfg.get("resize_mode", "shortest")
        if mode not in ("shortest", None):
            raise ValueError(f"CLIP resize_mode {mode!r} is not supported (only 'shortest')")
        return cls(
            image_size=int(size),
            grid=grid,
            mean=tuple(float(x) for x in cfg.get("mean", OPENAI_MEAN)),
            std=tuple(float(x) for x in cfg.get("std", OPENAI_STD)),
            interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
        )


def grid_boxes(width: int, height: int, grid: int) -> list[tuple[float, float, float, float]]:
    """The G x G cells (left, top, right, bottom) in row-major order, with fractional edges so cells are equal."""
    return [
        (j * width / grid, i * height / grid, (j + 1) * width / grid, (i + 1) * height / grid)
        for i in range(grid)
        for j in range(grid)
    ]


def resized_size(box_w: float, box_h: float, size: int) -> tuple[int, int]:
    """torchvision's Resize(size) rule: the short side becomes ``size``, the long side int(size * long / short)."""
    if box_w <= box_h:
        return size, max(size, int(size * box_h / box_w))
    return max(size, int(size * box_w / box_h)), size


def resize_crop(img: Image.Image, box: tuple[float, float, float, float], size: int, resample: int) -> Image.Image:
    """Resize the region ``box`` of ``img`` so its short side is ``size``, then center-crop ``size`` x ``size``."""
    w, h = resized_size(box[2] - box[0], box[3] - box[1], size)
    out = img.resize((w, h), resample, box=box)
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return out.crop((left, top, left + size, top + size))


def view_boxes(width: int, height: int, grid: int) -> list[tuple[float, float, float, float]]:
    """Source regions of the V views: the whole image, then the grid cells."""
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    return [(0.0, 0.0, float(width), float(height)), *grid_boxes(width, height, grid)]


MAX_RESIZED_PIXELS = 16
"""A view whose resized-before-crop image exceeds this many S x S squares (aspect ratio beyond 16:1) is computed
without that intermediate image: its memory and time would grow with the aspect ratio (a 1 x 5000 image at 448 px:
a 448 x 2240000 intermediate, 4 GB)."""


def oversized(geometry: np.ndarray, size: int) -> np.ndarray:
    """bool [V]: views of ``view_geometry`` whose resized intermediate is over ``MAX_RESIZED_PIXELS``."""
    return geometry[:, 4].astype(np.float64) * geometry[:, 5] > MAX_RESIZED_PIXELS * size * size


def view_geometry(width: int, height: int, spec: ViewSpec, bounded: bool = False) -> np.ndarray:
    """float32 [V, 8] per view: (y0, x0, y1, x1) source box, (h, w) resized size, (top, left) crop offset.

    The one geometry both decoders use, so the DALI path resamples the same regions to the same sizes as PIL. With
    ``bounded``, an ``oversized`` view becomes the equivalent direct resample of the region its crop keeps (source
    box of the crop, size S x S, offset 0): the same region at the same scale, without the giant intermediate.
    """
    size = spec.image_size
    rows = []
    for x0, y0, x1, y1 in view_boxes(width, height, spec.grid):
        w, h = resized_size(x1 - x0, y1 - y0, size)
        rows.append((y0, x0, y1, x1, h, w, int(round((h - size) / 2.0)), int(round((w - size) / 2.0))))
    g = np.asarray(rows, dtype=np.float64)
    if bounded:
        for v in np.flatnonzero(oversized(g, size)):
            y0, x0, y1, x1, h, w, top, left = g[v]
            sy, sx = (y1 - y0) / h, (x1 - x0) / w
            g[v] = (y0 + top * sy, x0 + left * sx, y0 + (top + size) * sy, x0 + (left + size) * sx, size, size, 0, 0)
    return g.astype(np.float32)


def normalize_views(views: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> normalized [N, 3, S, S] in ``dtype``, channels_last (no copy of the HWC layout)."""
    x = views.reshape(-1, *views.shape[-3:]).permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    y = (x.float() * (1.0 / 255.0) - m) / s
    return y.to(dtype).contiguous(memory_format=torch.channels_last)
