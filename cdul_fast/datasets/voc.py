"""PASCAL VOC 2007 / 2012 from the official VOCdevkit layout (ImageSets/Main lists, class files or XML annotations)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ._common import (
    as_bool,
    as_choice,
    check_split,
    describe_dir,
    existing_files,
    find_subroot,
    missing_note,
    read_lines,
    require_root,
    take_options,
)
from .base import IGNORE, NEGATIVE, POSITIVE, MultiLabelSet

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 VOC classes in the devkit's (alphabetical) order: column ``j`` of the labels is ``VOC_CLASSES[j]``."""

VOC_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
DIFFICULT_CHOICES: tuple[str, ...] = ("ignore", "positive", "negative")
_DEFAULTS: dict[str, object] = {"difficult": "ignore", "skip_missing": False}
_TEST_HINT = {
    "2007": "the VOC2007 test set ships separately (VOCtest_06-Nov-2007.tar); extract it into the same VOCdevkit",
    "2012": "the VOC2012 test set ships separately (VOC2012test.tar) and has no public ground truth",
}


def load_voc2007(root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """VOC2007: splits train/val/trainval/test (test needs the separate VOCtest tarball)."""
    return _load_voc("2007", root, split, options)


def load_voc2012(root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """VOC2012: splits train/val/trainval (test only if VOC2012test is extracted; it has no ground truth)."""
    return _load_voc("2012", root, split, options)


def _load_voc(year: str, root: Path | None, split: str, options: dict[str, object]) -> MultiLabelSet:
    ds = f"voc{year}"
    opts = take_options(ds, options, _DEFAULTS)
    difficult = as_choice(ds, "difficult", opts["difficult"], DIFFICULT_CHOICES)
    skip_missing = as_bool(ds, "skip_missing", opts["skip_missing"])
    check_split(ds, split, VOC_SPLITS)
    year_dir = _year_dir(ds, year, require_root(ds, root))
    main = year_dir / "ImageSets" / "Main"
    split_file = main / f"{split}.txt"
    if not split_file.is_file():
        hint = f" ({_TEST_HINT[year]})" if split == "test" else ""
        raise DatasetError(f"{ds}: missing split file {split_file}{hint}")
    ids = _read_ids(ds, split_file)
    notes: list[str] = []

    codes = _codes_from_class_files(ds, main, split, ids)
    if codes is not None:
        notes.append(f"ground truth from ImageSets/Main/<class>_{split}.txt")
    elif (year_dir / "Annotations").is_dir():
        codes = _codes_from_xml(ds, year_dir / "Annotations", ids)
        notes.append("ground truth from Annotations/<id>.xml")
    else:
        notes.append(f"no ground truth: neither ImageSets/Main/<class>_{split}.txt nor Annotations/ exist")

    paths = [year_dir / "JPEGImages" / f"{i}.jpg" for i in ids]
    keep = _check_images(ds, year_dir, ids, paths, skip_missing, notes)
    ids = [i for i, k in zip(ids, keep) if k]
    paths = [p for p, k in zip(paths, keep) if k]
    labels = None
    if codes is not None:
        codes = codes[np.asarray(keep, dtype=bool)]
        labels = _map_codes(codes, difficult)
        n_diff = int((codes == 0).sum())
        if n_diff:
            notes.append(f"{n_diff} difficult-only (image, class) pairs mapped to {difficult}")
    return MultiLabelSet(
        name=ds,
        split=split,
        root=year_dir,
        class_names=VOC_CLASSES,
        paths=tuple(paths),
        ids=tuple(ids),
        labels=labels,
        notes=tuple(notes),
    )


def _year_dir(ds: str, year: str, root: Path) -> Path:
    """Accept the VOCdevkit folder, the VOC<year> folder itself, or a folder holding VOCdevkit/."""
    want = f"VOC{year}"
    found = find_subroot(root, ("", want, f"VOCdevkit/{want}"), "ImageSets/Main")
    if found == root and re.fullmatch(r"VOC\d{4}", root.name) and root.name != want:
        raise DatasetError(f"{ds}: root {root} is a {root.name} folder, but {ds} expects {want}")
    if found is None:
        raise DatasetError(
            f"{ds}: {root} is not a VOC{year} root: expected VOCdevkit/ containing {want}/ (or {want}/ itself) "
            f"with ImageSets/Main/ and JPEGImages/; found: {describe_dir(root)}"
        )
    return found


def _read_ids(ds: str, split_file: Path) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(read_lines(ds, split_file, "split file"), start=1):
        parts = line.split()
        if len(parts) != 1:
            raise DatasetError(f"{ds}: {split_file}:{n}: expected one image id per line, got {line.strip()!r}")
        if parts[0] in seen:
            raise DatasetError(f"{ds}: {split_file}:{n}: duplicate image id {parts[0]}")
        seen.add(parts[0])
        ids.append(parts[0])
    if not ids:
        raise DatasetError(f"{ds}: split file {split_file} lists no images")
    return ids


def _codes_from_class_files(ds: str, main: Path, split: str, ids: list[str]) -> np.ndarray | None:
    """Raw devkit codes (1 present, -1 absent, 0 difficult-only) from the per-class lists, or None if absent."""
    files = [main / f"{c}_{split}.txt" for c in VOC_CLASSES]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    if not all(present):
        lacking = [f.name for f, p in zip(files, present) if not p]
        raise DatasetError(f"{ds}: {main} has some class files for split {split!r} but lacks {', '.join(lacking)}")
    row = {i: r for r, i in enumerate(ids)}
    codes = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int8)
    for col, path in enumerate(files):
        filled = np.zeros(len(ids), dtype=bool)
        for n, line in enumerate(read_lines(ds, path, "class file"), start=1):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise DatasetError(f"{ds}: {path}:{n}: expected '<image id> 1|-1|0', got {line.strip()!r}")
            r = row.get(parts[0])
            if r is None:
                raise DatasetError(f"{ds}: {path}:{n}: image {parts[0]} is not in {split}.txt")
            if filled[r]:
                raise DatasetError(f"{ds}: {path}:{n}: duplicate image id {parts[0]}")
            filled[r] = True
            codes[r, col] = int(parts[1])
        if not filled.all():
            first = ids[int(np.flatnonzero(~filled)[0])]
            raise DatasetError(
                f"{ds}: {path} has {int(filled.sum())} entries but {split}.txt lists {len(ids)} "
                f"(first missing: {first}); the file looks truncated"
            )
    return codes


def _codes_from_xml(ds: str, ann_dir: Path, ids: list[str]) -> np.ndarray:
    """Devkit codes from XML: 1 if a non-difficult object of the class exists, 0 if only difficult ones."""
    col = {c: j for j, c in enumerate(VOC_CLASSES)}
    codes = np.full((len(ids), len(VOC_CLASSES)), -1, dtype=np.int8)
    for r, image_id in enumerate(ids):
        path = ann_dir / f"{image_id}.xml"
        for name, is_difficult in _parse_objects(ds, path):
            j = col.get(name)
            if j is None:
                raise DatasetError(f"{ds}: {path}: unknown class {name!r} (expected one of the 20 VOC classes)")
            codes[r, j] = max(codes[r, j], 0 if is_difficult else 1)
    return codes


def _parse_objects(ds: str, path: Path) -> list[tuple[str, bool]]:
    """(name, difficult) of every top-level <object>; <part> names (head, hand, ...) are not objects."""
    if not path.is_file():
        raise DatasetError(f"{ds}: missing annotation {path}")
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DatasetError(f"{ds}: {path}: malformed XML ({exc})") from exc
    out: list[tuple[str, bool]] = []
    for obj in tree.getroot().findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{ds}: {path}: an <object> without a <name>")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise DatasetError(f"{ds}: {path}: <difficult> must be 0 or 1, got {flag!r}")
        out.append((name, flag == "1"))
    return out


def _check_images(
    ds: str, year_dir: Path, ids: list[str], paths: list[Path], skip_missing: bool, notes: list[str]
) -> list[bool]:
    if not (year_dir / "JPEGImages").is_dir():
        raise DatasetError(f"{ds}: missing image folder {year_dir / 'JPEGImages'}")
    keep = existing_files(paths)
    missing = [i for i, k in zip(ids, keep) if not k]
    if not missing:
        return keep
    folder = year_dir / "JPEGImages"
    if len(missing) == len(ids):
        raise DatasetError(f"{ds}: none of the {len(ids)} listed images exist in {folder} (e.g. {missing[0]}.jpg)")
    if not skip_missing:
        examples = ", ".join(m + ".jpg" for m in missing[:3])
        raise DatasetError(
            f"{ds}: {len(missing)} of {len(ids)} images are missing from {folder} (e.g. {examples}); "
            "pass skip_missing=true to drop them"
        )
    notes.append(missing_note(len(missing), [m + ".jpg" for m in missing], len(ids)))
    return keep


def _map_codes(codes: np.ndarray, difficult: str) -> np.ndarray:
    zero = {"ignore": IGNORE, "positive": POSITIVE, "negative": NEGATIVE}[difficult]
    labels = np.where(codes == 1, POSITIVE, np.where(codes == -1, NEGATIVE, zero))
    return labels.astype(np.int8)
