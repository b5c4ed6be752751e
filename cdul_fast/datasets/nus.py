"""NUS-WIDE (81 concepts) from the official Concepts81.txt, ImageList/ and Groundtruth/TrainTestLabels/ files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ._common import (
    as_bool,
    check_split,
    describe_dir,
    existing_files,
    find_subroot,
    missing_note,
    read_lines,
    require_root,
    take_options,
    validate_class_names,
)
from .base import NEGATIVE, POSITIVE, MultiLabelSet

NUS_SPLITS: tuple[str, ...] = ("train", "test")
_LIST_FILE = {"train": "TrainImagelist.txt", "test": "TestImagelist.txt"}
_TAG = {"train": "Train", "test": "Test"}
_IMAGE_DIRS: tuple[str, ...] = ("Flickr", "images")
_DEFAULTS: dict[str, object] = {"images_dir": None, "drop_unlabeled": False}
_DS = "nus"


def load_nus(root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """Rows follow the official image list; listed images absent on disk are dropped with a note."""
    opts = take_options(_DS, options, _DEFAULTS)
    drop_unlabeled = as_bool(_DS, "drop_unlabeled", opts["drop_unlabeled"])
    check_split(_DS, split, NUS_SPLITS)
    base = require_root(_DS, root)
    nus_root = find_subroot(base, ("", "NUS-WIDE", "nus-wide", "NUS_WIDE", "nuswide"), "Concepts81.txt")
    if nus_root is None:
        raise DatasetError(
            f"{_DS}: {base} is not a NUS-WIDE root: expected Concepts81.txt, ImageList/, Groundtruth/ and the "
            f"Flickr/ image folder; found: {describe_dir(base)}"
        )
    concepts_file = nus_root / "Concepts81.txt"
    concepts = validate_class_names(_DS, read_lines(_DS, concepts_file, "concept list"), str(concepts_file))
    notes: list[str] = []
    if len(concepts) != 81:
        notes.append(f"{concepts_file.name} lists {len(concepts)} concepts, not the usual 81")
    ids = _read_image_list(nus_root / "ImageList" / _LIST_FILE[split])
    if len(set(ids)) != len(ids):
        notes.append(f"{_LIST_FILE[split]} lists {len(ids) - len(set(ids))} duplicate entries (kept)")
    labels = _read_labels(nus_root, concepts, split, len(ids), notes)

    image_dir = _image_dir(nus_root, opts["images_dir"], notes)
    paths = [image_dir / i for i in ids]
    keep = np.asarray(existing_files(paths), dtype=bool)
    if not keep.any():
        raise DatasetError(
            f"{_DS}: none of the {len(ids)} images in {_LIST_FILE[split]} exist under {image_dir} "
            f"(e.g. {paths[0]}); check images_dir"
        )
    if not keep.all():
        missing = [i for i, k in zip(ids, keep) if not k]
        notes.append(missing_note(len(missing), missing, len(ids)))
    if drop_unlabeled:
        if labels is None:
            raise DatasetError(f"{_DS}: drop_unlabeled=true needs the ground truth in Groundtruth/TrainTestLabels/")
        unlabeled = keep & ~(labels == POSITIVE).any(axis=1)
        if unlabeled.any():
            notes.append(f"dropped {int(unlabeled.sum())} images without any positive concept (drop_unlabeled)")
        keep &= ~unlabeled
    rows = np.flatnonzero(keep)
    return MultiLabelSet(
        name=_DS,
        split=split,
        root=nus_root,
        class_names=concepts,
        paths=tuple(paths[r] for r in rows),
        ids=tuple(ids[r] for r in rows),
        labels=None if labels is None else labels[rows],
        notes=tuple(notes),
    )


def _normalise_entry(path: Path, n: int, line: str) -> str:
    """``actor\\0001_2124494179.jpg`` -> ``actor/0001_2124494179.jpg``; absolute paths are cut after ``Flickr``."""
    parts = line.strip().replace("\\", "/").split("/")
    if not parts or not parts[-1]:
        raise DatasetError(f"{_DS}: {path}:{n}: expected a relative image path, got {line.strip()!r}")
    if parts[0] == "" or parts[0].endswith(":"):
        lowered = [p.lower() for p in parts]
        if "flickr" not in lowered:
            raise DatasetError(f"{_DS}: {path}:{n}: absolute path without a Flickr folder: {line.strip()!r}")
        parts = parts[len(lowered) - lowered[::-1].index("flickr") :]
    if any(p in ("", ".", "..") for p in parts):
        raise DatasetError(f"{_DS}: {path}:{n}: malformed image path {line.strip()!r}")
    return "/".join(parts)


def _read_image_list(path: Path) -> list[str]:
    lines = read_lines(_DS, path, "image list")
    if not lines:
        raise DatasetError(f"{_DS}: image list {path} is empty")
    return [_normalise_entry(path, n, line) for n, line in enumerate(lines, start=1)]


def _read_labels(nus_root: Path, concepts: tuple[str, ...], split: str, n: int, notes: list[str]) -> np.ndarray | None:
    gt_dir = find_subroot(nus_root, ("Groundtruth", "GroundTruth", "groundtruth"), "TrainTestLabels")
    if gt_dir is None:
        notes.append("no ground truth: Groundtruth/TrainTestLabels/ not found")
        return None
    label_dir = gt_dir / "TrainTestLabels"
    labels = np.full((n, len(concepts)), NEGATIVE, dtype=np.int8)
    for j, concept in enumerate(concepts):
        path = label_dir / f"Labels_{concept}_{_TAG[split]}.txt"
        if not path.is_file():
            raise DatasetError(f"{_DS}: missing label file {path} (concept {concept!r} of Concepts81.txt)")
        values = np.array([s.strip() for s in read_lines(_DS, path, "label file")])
        if len(values) != n:
            raise DatasetError(
                f"{_DS}: label file {path} has {len(values)} lines but the image list has {n}"
                + (" (truncated?)" if len(values) < n else "")
            )
        bad = np.flatnonzero((values != "0") & (values != "1"))
        if bad.size:
            first = int(bad[0])
            raise DatasetError(f"{_DS}: {path}:{first + 1}: expected 0 or 1, got {str(values[first])!r}")
        labels[values == "1", j] = POSITIVE
    return labels


def _image_dir(nus_root: Path, images_dir: object, notes: list[str]) -> Path:
    if images_dir is not None:
        folder = nus_root / str(images_dir)
        if not folder.is_dir():
            raise DatasetError(f"{_DS}: image folder {folder} (images_dir) does not exist")
        return folder
    for name in _IMAGE_DIRS:
        if (nus_root / name).is_dir():
            if name != _IMAGE_DIRS[0]:
                notes.append(f"images read from {name}/ ({_IMAGE_DIRS[0]}/ not found)")
            return nus_root / name
    raise DatasetError(
        f"{_DS}: no image folder: expected {nus_root / 'Flickr'} (or images/, or pass images_dir); "
        f"found: {describe_dir(nus_root)}"
    )
