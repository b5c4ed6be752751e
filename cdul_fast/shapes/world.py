"""`shapes`: a procedurally generated multi-object world, the embedded default for demos and quality tests.

Twelve glyph classes drawn with a random colour, size, position and small rotation on textured, cluttered
backgrounds. Splits: ``captions`` (one large object per image, for training the shipped tiny CLIP), ``train`` and
``test`` (2-4 small objects of distinct classes per image, with ground truth). Everything is a pure function of
(split, seed, options): files are generated on first use under ``root/<split>/`` with a ``manifest.json``, written to
a temporary folder and renamed, so a crash never leaves a half split that looks complete.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..datasets.base import NEGATIVE, POSITIVE, MultiLabelSet
from ..errors import DatasetError

GENERATOR_VERSION = 1
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "arrow", "crescent",
                            "hexagon", "diamond", "bowtie")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 180, 60), "blue": (45, 80, 220), "yellow": (235, 210, 40),
    "orange": (240, 130, 30), "purple": (140, 60, 190), "pink": (240, 120, 190), "cyan": (40, 200, 210),
    "white": (245, 245, 245),
}
SPLITS = ("captions", "train", "test")
_SPLIT_SEED = {"captions": 11, "train": 23, "test": 37}
DEFAULTS = {"captions": {"n": 2000, "size": 64}, "train": {"n": 1000, "size": 128}, "test": {"n": 500, "size": 128}}


# ----------------------------------------------------------------------------------------------------------- glyphs


def _regular(n: int, phase: float = -math.pi / 2, r: float = 1.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17.0, (y + 2.5) / 17.0))
    return pts


_POLYGONS = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _regular(3, r=1.0),
    "star": _star(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3),
              (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "heart": _heart(),
    "arrow": [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)],
    "hexagon": _regular(6, phase=0.0),
    "diamond": [(0, -1), (0.58, 0), (0, 1), (-0.58, 0)],
    "bowtie": [(-1, -0.75), (0, -0.12), (1, -0.75), (1, 0.75), (0, 0.12), (-1, 0.75)],
    # glyphs of the 20-class world (world20.py); the twelve above are unchanged, so the 12-class world's bytes are too
    "pentagon": _regular(5),
    "chevron": [(-1, -0.75), (0, 0.05), (1, -0.75), (1, -0.05), (0, 0.75), (-1, -0.05)],
    "bolt": [(0.25, -1), (-0.65, 0.12), (-0.05, 0.12), (-0.3, 1), (0.65, -0.18), (0.05, -0.18)],
    "trapezoid": [(-0.45, -0.6), (0.45, -0.6), (1, 0.6), (-1, 0.6)],
    "tee": [(-1, -0.95), (1, -0.95), (1, -0.45), (0.25, -0.45), (0.25, 1), (-0.25, 1), (-0.25, -0.45),
            (-1, -0.45)],
    "drop": [(0, -1)] + [(0.62 * math.cos(a), 0.3 + 0.62 * math.sin(a))
                         for a in (math.pi * (k / 24 - 0.25) for k in range(37))],
}


def glyph_mask(name: str, side: int, angle: float) -> Image.Image:
    """An antialiased L mask (side x side) of glyph ``name`` rotated by ``angle`` degrees."""
    big = side * 4
    m = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(m)
    c, r = big / 2, big / 2 * 0.92
    if name == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif name == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        d.ellipse([c - r * 0.55, c - r * 0.55, c + r * 0.55, c + r * 0.55], fill=0)
    elif name == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        d.ellipse([c - r * 0.55, c - r * 1.05, c + r * 1.25, c + r * 0.75], fill=0)
    elif name == "semicircle":
        d.pieslice([c - r, c - r * 0.6, c + r, c + r * 1.4], 180, 360, fill=255)
    elif name == "flower":
        p = r * 0.36
        for x, y in _regular(5, r=r * 0.62):
            d.ellipse([c + x - p, c + y - p, c + x + p, c + y + p], fill=255)
        d.ellipse([c - p, c - p, c + p, c + p], fill=255)
    else:
        d.polygon([(c + x * r, c + y * r) for x, y in _POLYGONS[name]], fill=255)
    if angle:
        m = m.rotate(angle, resample=Image.Resampling.BICUBIC)
    return m.resize((side, side), Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Muted low-frequency colour field + grain + a few thin clutter lines: texture without glyph-like objects."""
    base = rng.integers(40, 170, size=3)
    coarse = rng.normal(0, 25, size=(4, 4, 3))
    field = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    grain = rng.normal(0, 10, size=(size, size, 3))
    arr = np.clip(base + field + grain, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        pts = rng.uniform(0, size, size=4)
        col = tuple(int(v) for v in np.clip(base + rng.normal(0, 30, 3), 0, 255))
        d.line([(pts[0], pts[1]), (pts[2], pts[3])], fill=col, width=max(1, size // 96))
    return img


def _paste(img: Image.Image, rng: np.random.Generator, name: str, side: int, x: int, y: int) -> str:
    """Draw one glyph in a jittered named colour; returns the colour name (used in training captions)."""
    colour_name = str(rng.choice(list(COLOURS)))
    colour = np.clip(np.array(COLOURS[colour_name]) + rng.normal(0, 12, 3), 0, 255).astype(np.uint8)
    mask = glyph_mask(name, side, float(rng.uniform(-20, 20)))
    solid = Image.new("RGB", (side, side), tuple(int(v) for v in colour))
    img.paste(solid, (x, y), mask)
    return colour_name


def render_single(rng: np.random.Generator, size: int, cls: int) -> tuple[Image.Image, str]:
    """One large object (45-80% of the side): the kind of view a grid snippet shows."""
    img = _background(rng, size)
    side = int(size * rng.uniform(0.45, 0.8))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    colour = _paste(img, rng, CLASSES[cls], side, x, y)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6))), colour


def render_multi(rng: np.random.Generator, size: int, k: int) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """``k`` objects of distinct classes, each 18-30% of the side, placed with little overlap.

    Returns the image, its int8 label row and one record per drawn object (class, colour, box [x0, y0, x1, y1]),
    so the ground truth can be checked against the pixels.
    """
    img = _background(rng, size)
    classes = rng.choice(len(CLASSES), size=k, replace=False)
    placed: list[tuple[float, float, float]] = []
    objects: list[dict] = []
    for cls in classes:
        for _attempt in range(30):
            side = int(size * rng.uniform(0.18, 0.30))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            cx, cy, r = x + side / 2, y + side / 2, side / 2
            if all(math.hypot(cx - px, cy - py) > 0.9 * (r + pr) for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        colour = _paste(img, rng, CLASSES[cls], side, x, y)
        objects.append({"class": CLASSES[cls], "colour": colour, "box": [x, y, x + side, y + side]})
    labels = np.full(len(CLASSES), NEGATIVE, dtype=np.int8)
    labels[classes] = POSITIVE
    return img, labels, objects


def jpeg_roundtrip(img: Image.Image, quality: int = 90) -> Image.Image:
    """The image as the dataset files store it (JPEG q90), so CLIP trains on the same compression artefacts."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# ------------------------------------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class World:
    """A procedural world: its classes, generator version and renderers. The split machinery below (options,
    generation into a temporary folder, manifest checks) is shared by every world."""

    name: str
    classes: tuple[str, ...]
    version: int
    defaults: dict
    objects: str
    render_single: Callable[[np.random.Generator, int, int], tuple[Image.Image, str]]
    render_multi: Callable[[np.random.Generator, int, int], tuple[Image.Image, np.ndarray, list[dict]]]


SHAPES12 = World("shapes", CLASSES, GENERATOR_VERSION, DEFAULTS, "2-4", render_single, render_multi)


def _options(split: str, options: dict, world: World) -> dict:
    """Validated, canonical options (ints, objects as "lo-hi"): options may arrive as strings from the CLI."""
    w = world.name
    if split not in SPLITS:
        raise DatasetError(f"{w}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    opts = dict(world.defaults[split], seed=0, objects=world.objects)
    unknown = sorted(set(options) - set(opts))
    if unknown:
        raise DatasetError(f"{w}: unknown option(s) {', '.join(unknown)}; valid: n, size, seed, objects")
    opts.update(options)
    try:
        opts["n"], opts["size"], opts["seed"] = int(opts["n"]), int(opts["size"]), int(opts["seed"])
        lo, hi = (int(v) for v in str(opts["objects"]).split("-")) if "-" in str(opts["objects"]) else \
            (int(opts["objects"]),) * 2
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{w}: bad option value ({exc}); n, size, seed are integers, objects is like 2-4") \
            from exc
    if opts["n"] < 1 or opts["size"] < 32:
        raise DatasetError(f"{w}: n must be >= 1 and size >= 32 (got n={opts['n']}, size={opts['size']})")
    if not 1 <= lo <= hi <= len(world.classes):
        raise DatasetError(f"{w}: objects must be like 2-4 within 1..{len(world.classes)}, got {opts['objects']}")
    opts["objects"] = f"{lo}-{hi}"
    return opts


def _generate(split: str, opts: dict, target: Path, world: World) -> dict:
    """Write the split's JPEGs and manifest into ``target`` (a fresh folder)."""
    rng = np.random.default_rng([opts["seed"], _SPLIT_SEED[split], world.version])
    lo, hi = (int(v) for v in opts["objects"].split("-"))
    n_cls = len(world.classes)
    ids, labels, captions, objects = [], [], [], []
    for i in range(opts["n"]):
        name = f"{split}_{i:06d}.jpg"
        if split == "captions":
            cls = i % n_cls
            img, colour = world.render_single(rng, opts["size"], cls)
            row = np.full(n_cls, NEGATIVE, dtype=np.int8)
            row[cls] = POSITIVE
            captions.append(f"{colour} {world.classes[cls]}")
        else:
            img, row, objs = world.render_multi(rng, opts["size"], int(rng.integers(lo, hi + 1)))
            objects.append(objs)
        img.save(target / name, format="JPEG", quality=90)
        ids.append(name)
        labels.append(row.tolist())
    manifest = {"generator": world.version, "split": split, "options": opts, "class_names": list(world.classes),
                "ids": ids, "labels": labels}
    if captions:
        manifest["captions"] = captions
    if objects:
        manifest["objects"] = objects
    (target / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


def default_root(name: str) -> Path:
    """``$CDUL_FAST_CACHE/<world>`` or ``~/.cache/cdul-fast/<world>``: a world needs no --root."""
    base = os.environ.get("CDUL_FAST_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cdul-fast") / name


def _current_manifest(man_path: Path, opts: dict, world: World) -> dict | None:
    """The manifest at ``man_path`` if it was made by this generator with ``opts``; None means regenerate."""
    if not man_path.is_file():
        return None
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (man.get("generator") == world.version and man.get("options") == opts
          and man.get("class_names") == list(world.classes))
    return man if ok else None


def ensure_split(root: Path, split: str, opts: dict, world: World) -> dict:
    """The split's manifest, generating the split first when it is missing or was made with other options.

    Generation happens in a hidden temporary folder that is renamed into place only when complete (its manifest is
    written last), so an interrupted run leaves either the previous split or none, never a partial one.
    """
    folder = root / split
    man = _current_manifest(folder / "manifest.json", opts, world)
    if man is not None:
        return man
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{split}.tmp{os.getpid()}"
    old = root / f".{split}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        man = _generate(split, opts, tmp, world)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)  # put the previous complete split back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return man


def load_world(world: World, root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """The ``split`` of ``world`` under ``root`` (default ~/.cache/cdul-fast/<world>), generated if needed."""
    opts = _options(split, options, world)
    base = Path(root) if root is not None else default_root(world.name)
    man = ensure_split(base, split, opts, world)
    folder = base / split
    return MultiLabelSet(name=world.name, split=split, root=base, class_names=world.classes,
                         paths=tuple(folder / i for i in man["ids"]), ids=tuple(f"{split}/{i}" for i in man["ids"]),
                         labels=np.asarray(man["labels"], dtype=np.int8))


def load_shapes(root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """The 12-class shapes world (``--dataset shapes``)."""
    return load_world(SHAPES12, root, split, **options)
