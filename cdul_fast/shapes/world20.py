"""`shapes20`: a 20-class world with the statistics that make CDUL's global-local aggregation matter.

The 12-class ``shapes`` world draws 2-4 small objects of unrelated classes per image. Real multi-label photos differ
in three ways that the paper's aggregator is built around, and this world adds them:

* mixed object sizes: 30 % of the images have one large object (42-68 % of the side) that the whole-image view
  shows well and the grid cuts into fragments; the other objects are small (10-20 %), nearly invisible to the
  whole-image view once it is resized to CLIP's input, whole in a snippet;
* class co-occurrence: five contexts of four classes each; an object is drawn from its image's context with
  probability 0.75, so some classes appear together far more often than chance (as person + bicycle do in VOC);
* distractors: 1-3 irregular blobs per image in the same colours as the objects, which are no class but give a
  snippet something object-like to score.

Splits as in ``shapes``: ``captions`` (one object, 25-85 % of the side, on a background with distractors; for the
shipped ``shapes20-clip``), ``train`` and ``test`` (2-5 objects of distinct classes, ground truth and one record per
object in the manifest). A pure function of (split, seed, options), generated on first use like ``shapes``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..datasets.base import NEGATIVE, POSITIVE, MultiLabelSet
from .world import CLASSES, COLOURS, World, _background, _paste, load_world

GENERATOR_VERSION = 1
CLASSES20: tuple[str, ...] = CLASSES + ("pentagon", "chevron", "bolt", "trapezoid", "tee", "drop", "flower",
                                        "semicircle")
# Five contexts of four classes (indices into CLASSES20): the co-occurrence structure of the train and test splits.
CONTEXTS: tuple[tuple[int, ...], ...] = ((0, 6, 12, 18), (1, 9, 15, 19), (2, 10, 13, 17), (3, 7, 14, 16),
                                         (4, 5, 8, 11))
P_CONTEXT = 0.75  # probability that an object comes from its image's context
P_LARGE = 0.3  # probability that an image has one large object
LARGE = (0.42, 0.68)  # side of the large object, fraction of the image side
SMALL = (0.10, 0.20)  # side of the other objects
SINGLE = (0.25, 0.85)  # side of the one object of a captions image
DEFAULTS = {"captions": {"n": 2000, "size": 64}, "train": {"n": 1000, "size": 128}, "test": {"n": 500, "size": 128}}


def _distractors(img: Image.Image, rng: np.random.Generator, size: int, k: int) -> None:
    """``k`` irregular 7-gons (no class) in the objects' palette: object-like things a snippet may score."""
    d = ImageDraw.Draw(img)
    for _ in range(k):
        r = size * rng.uniform(0.05, 0.15)
        cx, cy = rng.uniform(r, size - r, size=2)
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=7))
        radii = rng.uniform(0.35, 1.0, size=7) * r
        colour = np.clip(np.array(COLOURS[str(rng.choice(list(COLOURS)))]) + rng.normal(0, 12, 3), 0, 255)
        d.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)],
                  fill=tuple(int(v) for v in colour))


def _scene_background(rng: np.random.Generator, size: int) -> Image.Image:
    img = _background(rng, size)
    _distractors(img, rng, size, int(rng.integers(1, 4)))
    return img


def render_single20(rng: np.random.Generator, size: int, cls: int) -> tuple[Image.Image, str]:
    """One object (25-85 % of the side) among distractors: what CLIP is trained on, at the scales a snippet shows."""
    img = _scene_background(rng, size)
    side = max(8, int(size * rng.uniform(*SINGLE)))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    colour = _paste(img, rng, CLASSES20[cls], side, x, y)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6))), colour


def _classes(rng: np.random.Generator, k: int) -> list[int]:
    """``k`` distinct classes: each from the image's context with probability P_CONTEXT, else from all classes."""
    context = CONTEXTS[int(rng.integers(len(CONTEXTS)))]
    chosen: list[int] = []
    for _ in range(k):
        pool = [c for c in (context if rng.random() < P_CONTEXT else range(len(CLASSES20))) if c not in chosen]
        if not pool:
            pool = [c for c in range(len(CLASSES20)) if c not in chosen]
        chosen.append(int(rng.choice(pool)))
    return chosen


def render_scene(rng: np.random.Generator, size: int, k: int) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """``k`` objects of distinct classes, the first one large with probability P_LARGE, among distractors.

    Small objects avoid each other; they may overlap (and partly hide) the large one, which is drawn first. Returns
    the image, its int8 label row and one record per object (class, colour, box [x0, y0, x1, y1], large).
    """
    img = _scene_background(rng, size)
    classes = _classes(rng, k)
    large = bool(rng.random() < P_LARGE)
    placed: list[tuple[float, float, float]] = []
    objects: list[dict] = []
    for i, cls in enumerate(classes):
        big = large and i == 0
        for _attempt in range(30):
            side = max(6, int(size * rng.uniform(*(LARGE if big else SMALL))))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            cx, cy, r = x + side / 2, y + side / 2, side / 2
            if big or all(math.hypot(cx - px, cy - py) > 0.9 * (r + pr) for px, py, pr in placed):
                break
        if not big:
            placed.append((cx, cy, r))
        colour = _paste(img, rng, CLASSES20[cls], side, x, y)
        objects.append({"class": CLASSES20[cls], "colour": colour, "box": [x, y, x + side, y + side], "large": big})
    labels = np.full(len(CLASSES20), NEGATIVE, dtype=np.int8)
    labels[classes] = POSITIVE
    return img, labels, objects


SHAPES20 = World("shapes20", CLASSES20, GENERATOR_VERSION, DEFAULTS, "2-5", render_single20, render_scene)


def load_shapes20(root, split: str, **options: object) -> MultiLabelSet:
    """The 20-class world (``--dataset shapes20``) under ``root`` (default ~/.cache/cdul-fast/shapes20)."""
    return load_world(SHAPES20, root, split, **options)
