"""Data for discovery: known classes with labels, novel classes without, as tensors in memory.

The embedded default is scikit-learn's bundled handwritten digits (8 x 8, 1797 images): classes 0-4 labelled,
5-9 novel, mirroring CIFAR-10's 5/5 split; a stratified hold-out split gives a test set of unseen images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass
class DiscoverData:
    """Train images split into labelled (known classes) and unlabelled (novel classes), plus a held-out test set.

    ``x_*`` float32 [N, C, H, W] in [0, 1] (images) or [N, K] (embeddings); ``y_*`` int64 ground truth (the novel
    ground truth is only used to evaluate; -1 where nobody knows it); ``labelled`` bool [N_train]; ``known``/``novel``
    the class ids; names for display. ``modality`` picks the views (augment) and the encoder key; ``flip`` allows
    mirrored views (natural photos, not digits); ``encoder`` is what ``--encoder auto`` means for this data."""

    name: str
    x_train: torch.Tensor
    y_train: np.ndarray
    labelled: np.ndarray
    x_test: torch.Tensor
    y_test: np.ndarray
    known: tuple[int, ...]
    novel: tuple[int, ...]
    class_names: tuple[str, ...]
    modality: str = "image"
    flip: bool = False
    encoder: str = "small"

    @property
    def has_truth(self) -> bool:
        """Whether the novel items' classes are known (to score the clusters)."""
        return bool(len(self.y_train)) and bool((self.y_train[~self.labelled] >= 0).all())

    @property
    def unlabelled(self) -> np.ndarray:
        return ~self.labelled

    def known_index(self, y: np.ndarray) -> np.ndarray:
        """Ground-truth labels as known-head targets (0..C^l-1), -1 for novel classes."""
        lut = np.full(max(len(self.class_names), int(y.max()) + 1), -1, dtype=np.int64)
        lut[list(self.known)] = np.arange(len(self.known))
        return lut[y]


def digits(known: int = 5, test_fraction: float = 0.2, split_seed: int = 0) -> DiscoverData:
    """scikit-learn's digits: classes 0..known-1 labelled, the rest novel; a stratified held-out test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 1 <= known <= 9:
        raise ConfigError(f"digits: known classes must be 1..9, got {known}")
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                                      random_state=split_seed)
    return DiscoverData("digits", torch.from_numpy(x[idx_tr]), y[idx_tr], y[idx_tr] < known,
                        torch.from_numpy(x[idx_te]), y[idx_te], tuple(range(known)), tuple(range(known, 10)),
                        tuple(str(i) for i in range(10)))


def shapes_novel(root=None, n: int = 1200, size: int = 32, known: int = 6, test_fraction: float = 0.2,
                 split_seed: int = 0) -> DiscoverData:
    """The shapes world's single-object split (one large glyph per image, 12 classes): the first ``known`` glyph
    classes labelled, the others novel; images resized to ``size`` px RGB."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from ..datasets import load_dataset
    from ..views.decode import load_rgb

    ds = load_dataset("shapes", root, "captions", n=n)
    if not 1 <= known < ds.num_classes:
        raise ConfigError(f"shapes: known classes must be 1..{ds.num_classes - 1}, got {known}")
    y = ds.labels.argmax(axis=1).astype(np.int64)
    x = np.stack([np.asarray(load_rgb(p).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
                  for p in ds.paths]).transpose(0, 3, 1, 2) / 255.0
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                                      random_state=split_seed)
    return DiscoverData("shapes", torch.from_numpy(x[idx_tr]), y[idx_tr], y[idx_tr] < known,
                        torch.from_numpy(x[idx_te]), y[idx_te], tuple(range(known)),
                        tuple(range(known, ds.num_classes)), tuple(ds.class_names))


def views(data: DiscoverData, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of a batch, as the data's modality allows."""
    if data.modality == "embedding":
        return augment_embedding(x, g)
    return augment(x, g, flip=data.flip)


def augment_embedding(x: torch.Tensor, g: torch.Generator, drop: float = 0.2, noise: float = 0.05) -> torch.Tensor:
    """A view of a unit embedding: feature dropout and Gaussian noise, renormalized (an image's embedding has no
    geometry left to warp)."""
    keep = (torch.rand(x.shape, generator=g) >= drop).to(x.device, x.dtype) / (1.0 - drop)
    out = x * keep + noise * torch.randn(x.shape, generator=g).to(x.device, x.dtype) / max(1, x.shape[1]) ** 0.5
    return F.normalize(out, dim=1)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0, flip: bool = False) -> torch.Tensor:
    """A random view: small rotation, scale and shift (one affine warp per image), a mirror when ``flip``,
    brightness jitter (per channel for colour images) and noise — SimCLR's recipe cut down to what small images
    support."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=g) * (hi - lo) + lo

    angle = u(-0.26, 0.26) * strength  # +-15 degrees
    scale = 1.0 + u(-0.12, 0.12) * strength
    tx, ty = u(-0.2, 0.2) * strength, u(-0.2, 0.2) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    mirror = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1), torch.stack([sin * mirror, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    c = x.shape[1]
    gain = u(0.7, 1.3).view(b, 1)
    if c > 1:  # colour: a little per-channel jitter on top (grey images draw nothing more)
        gain = gain * (1.0 + (torch.rand(b, c, generator=g) - 0.5) * 0.2)
    out = out * gain.to(x.device, x.dtype).view(b, c, 1, 1)
    out = out + 0.05 * strength * torch.randn(x.shape, generator=g).to(x.device)
    return out.clamp_(0.0, 1.0)
