"""The report's pictures as PNG/JPEG bytes (matplotlib for plots, PIL for image tiles), ready to inline."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

THUMB = 192  # displayed side of gallery and CAM tiles (pixels)
SMALL = 144  # tiles of the CAMs over epochs (a row per image)


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(history: list[dict]) -> bytes:
    """Loss and mAP per epoch: pseudo labels (train) and the classifier (test), as in the run's log."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    history = [h for h in history if h.get("epoch") is not None]
    pts = [(h["epoch"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    if pts:
        a.plot(*zip(*pts), marker="o", color="#444")
    a.set(xlabel="epoch", ylabel="train loss (KL)", title="loss")
    for key, name, colour in (("pseudo_map", "pseudo labels (train)", "#d95f02"),
                              ("test_map", "classifier (test)", "#1b9e77")):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            b.plot(*zip(*pts), marker="o", label=name, color=colour)
    b.set(xlabel="epoch", ylabel="mAP (%)", title="mAP per epoch")
    if b.get_legend_handles_labels()[0]:
        b.legend()
    fig.tight_layout()
    return _figure_png(fig)


def histograms_png(global_scores: np.ndarray, local_scores: np.ndarray, class_names: Sequence[str],
                   local_name: str) -> bytes:
    """Per-class distributions of CLIP's scores on the whole image (global) and over its snippets (the paper's
    Fig. 4): images per score bin, log scale, one panel per class."""
    plt = _plt()
    n = len(class_names)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), squeeze=False)
    bins = np.linspace(0.0, 1.0, 21)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.axis("off")
            continue
        ax.hist(global_scores[:, i], bins=bins, histtype="stepfilled", alpha=0.45, color="#7570b3", label="global")
        ax.hist(local_scores[:, i], bins=bins, histtype="step", linewidth=1.6, color="#d95f02", label=local_name)
        ax.set_yscale("log")
        ax.set_title(class_names[i], fontsize=9, parse_math=False)  # a '$' in a class name is text
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.supxlabel("score", fontsize=9)
    fig.supylabel("images", fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def thumbnail(img: Image.Image, side: int = THUMB) -> Image.Image:
    """The image scaled so its longer side is ``side`` (aspect kept)."""
    w, h = img.size
    scale = side / max(w, h)
    return img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                     Image.Resampling.BILINEAR)


def jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _jet(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] through matplotlib's jet colormap."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3] * 255.0).astype(np.uint8)


def cam_overlay(img: Image.Image, cam: np.ndarray, peak_xy: tuple[float, float] | None = None,
                alpha: float = 0.5, side: int = THUMB) -> Image.Image:
    """A CAM (float [S, S] in [0, 1] over the whole image resized to S x S) blended over the image's thumbnail; the
    map is stretched back to the image's aspect, which is exactly the input's geometry. The peak gets a cross."""
    from PIL import ImageDraw

    base = thumbnail(img, side)
    w, h = base.size
    heat = Image.fromarray((np.clip(cam, 0.0, 1.0) * 255.0).astype(np.uint8)).resize((w, h),
                                                                                       Image.Resampling.BILINEAR)
    colour = Image.fromarray(_jet(np.asarray(heat, dtype=np.float32) / 255.0))
    out = Image.blend(base, colour, alpha)
    if peak_xy is not None and all(math.isfinite(v) for v in peak_xy):  # NaN: the map has no positive cell
        s = cam.shape[0]
        x, y = peak_xy[0] * w / s, peak_xy[1] * h / s
        d = ImageDraw.Draw(out)
        for width, fill in ((4, "black"), (2, "white")):
            d.line([(x - 7, y), (x + 7, y)], fill=fill, width=width)
            d.line([(x, y - 7), (x, y + 7)], fill=fill, width=width)
    return out
