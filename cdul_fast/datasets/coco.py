"""MS-COCO (2014 or 2017) from ``annotations/instances_<split>.json`` and the ``<split>/`` image folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ._common import (
    as_bool,
    describe_dir,
    existing_files,
    find_subroot,
    missing_note,
    require_root,
    take_options,
    validate_class_names,
)
from .base import NEGATIVE, POSITIVE, MultiLabelSet

SPLIT_ALIASES: dict[str, tuple[str, str]] = {"train": ("train2014", "train2017"), "val": ("val2014", "val2017")}
"""Short split names: the 2014 file (the paper's protocol) is preferred, the 2017 one is the fallback."""

_DEFAULTS: dict[str, object] = {"keep_unannotated": False, "skip_missing": False}
_DS = "coco"


def load_coco(root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """Every category with at least one instance (crowd included) is POSITIVE; rows are ordered by image id."""
    opts = take_options(_DS, options, _DEFAULTS)
    keep_unannotated = as_bool(_DS, "keep_unannotated", opts["keep_unannotated"])
    skip_missing = as_bool(_DS, "skip_missing", opts["skip_missing"])
    base = require_root(_DS, root)
    coco_root = find_subroot(base, ("", "coco", "COCO", "mscoco"), "annotations")
    if coco_root is None:
        raise DatasetError(
            f"{_DS}: {base} is not a COCO root: expected annotations/instances_<split>.json and the image "
            f"folders (train2014/, val2014/, ...); found: {describe_dir(base)}"
        )
    notes: list[str] = []
    split_name = _resolve_split(coco_root, split, notes)
    ann_file = coco_root / "annotations" / f"instances_{split_name}.json"
    data = _load_json(ann_file)
    class_names, col_of_cat = _categories(data, ann_file)
    files = _images(data, ann_file)
    positives = _positives(data, ann_file, files, col_of_cat)

    image_ids = sorted(files) if keep_unannotated else sorted(positives)
    dropped = len(files) - len(image_ids)
    if dropped:
        notes.append(f"dropped {dropped} image(s) without annotations (keep_unannotated=true keeps them)")
    if not image_ids:
        raise DatasetError(f"{_DS}: {ann_file} describes no usable images")
    image_dir = _image_dir(coco_root, split_name)
    paths = [image_dir / files[i] for i in image_ids]
    keep = existing_files(paths)
    missing = [files[i] for i, k in zip(image_ids, keep) if not k]
    if missing:
        if len(missing) == len(paths) or not skip_missing:
            extra = "" if len(missing) == len(paths) else "; pass skip_missing=true to drop them"
            raise DatasetError(
                f"{_DS}: {len(missing)} of {len(paths)} images are missing from {image_dir} "
                f"(e.g. {', '.join(missing[:3])}){extra}"
            )
        notes.append(missing_note(len(missing), missing, len(paths)))
        image_ids = [i for i, k in zip(image_ids, keep) if k]
        paths = [p for p, k in zip(paths, keep) if k]

    labels = np.full((len(image_ids), len(class_names)), NEGATIVE, dtype=np.int8)
    for r, image_id in enumerate(image_ids):
        cols = list(positives.get(image_id, ()))
        labels[r, cols] = POSITIVE
    return MultiLabelSet(
        name=_DS,
        split=split,
        root=coco_root,
        class_names=class_names,
        paths=tuple(paths),
        ids=tuple(Path(files[i]).stem for i in image_ids),
        labels=labels,
        notes=tuple(notes),
    )


def _resolve_split(coco_root: Path, split: str, notes: list[str]) -> str:
    ann_dir = coco_root / "annotations"
    available = sorted(p.name[len("instances_") : -len(".json")] for p in ann_dir.glob("instances_*.json"))
    if split in SPLIT_ALIASES:
        preferred, fallback = SPLIT_ALIASES[split]
        if preferred in available:
            return preferred
        if fallback in available:
            notes.append(f"split {split!r} read as {fallback} ({preferred} annotations not found)")
            return fallback
        raise DatasetError(
            f"{_DS}: missing annotation file {ann_dir / f'instances_{preferred}.json'} "
            f"(found instance files for: {', '.join(available) or 'none'})"
        )
    if split in available:
        return split
    if re.fullmatch(r"[a-z]+20\d\d", split):
        raise DatasetError(
            f"{_DS}: missing annotation file {ann_dir / f'instances_{split}.json'} "
            f"(found instance files for: {', '.join(available) or 'none'})"
        )
    valid = ", ".join(["train", "val", *available])
    raise DatasetError(f"{_DS}: unknown split {split!r}; valid splits: {valid}")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{_DS}: {path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except OSError as exc:
        raise DatasetError(f"{_DS}: cannot read {path}: {exc.strerror}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{_DS}: {path}: expected a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{_DS}: {path}: missing the {key!r} list (is this an instances_*.json file?)")
    return data


def _field(path: Path, section: str, index: int, entry: Any, key: str, kind: type) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(f"{_DS}: {path}: {section}[{index}] lacks a valid {key!r} ({kind.__name__})")
    return value


def _categories(data: dict[str, Any], path: Path) -> tuple[tuple[str, ...], dict[int, int]]:
    """Class names ordered by category id (ids have gaps: 1..90 for 80 classes) and id -> column."""
    cats: dict[int, str] = {}
    for i, entry in enumerate(data["categories"]):
        cid = _field(path, "categories", i, entry, "id", int)
        if cid in cats:
            raise DatasetError(f"{_DS}: {path}: duplicate category id {cid}")
        cats[cid] = _field(path, "categories", i, entry, "name", str)
    order = sorted(cats)
    names = validate_class_names(_DS, (cats[c] for c in order), f"{path} categories")
    return names, {cid: j for j, cid in enumerate(order)}


def _images(data: dict[str, Any], path: Path) -> dict[int, str]:
    files: dict[int, str] = {}
    for i, entry in enumerate(data["images"]):
        iid = _field(path, "images", i, entry, "id", int)
        if iid in files:
            raise DatasetError(f"{_DS}: {path}: duplicate image id {iid}")
        files[iid] = _field(path, "images", i, entry, "file_name", str)
    return files


def _positives(
    data: dict[str, Any], path: Path, files: dict[int, str], col_of_cat: dict[int, int]
) -> dict[int, set[int]]:
    """image id -> label columns present. Crowd regions count: the category is visible in the image."""
    pos: dict[int, set[int]] = {}
    for i, entry in enumerate(data["annotations"]):
        iid = _field(path, "annotations", i, entry, "image_id", int)
        cid = _field(path, "annotations", i, entry, "category_id", int)
        if iid not in files:
            raise DatasetError(f"{_DS}: {path}: annotations[{i}] refers to unknown image id {iid}")
        col = col_of_cat.get(cid)
        if col is None:
            raise DatasetError(f"{_DS}: {path}: annotations[{i}] refers to unknown category id {cid}")
        pos.setdefault(iid, set()).add(col)
    return pos


def _image_dir(coco_root: Path, split_name: str) -> Path:
    for cand in (coco_root / split_name, coco_root / "images" / split_name):
        if cand.is_dir():
            return cand
    raise DatasetError(
        f"{_DS}: missing image folder {coco_root / split_name} (also tried images/{split_name}); "
        f"found: {describe_dir(coco_root)}"
    )
