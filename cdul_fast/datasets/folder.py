"""Any folder of images, with class names from ``classes`` and optional ground truth from a ``labels`` CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ._common import (
    IMAGE_EXTENSIONS,
    is_image_name,
    read_lines,
    require_root,
    scan_images,
    take_options,
    validate_class_names,
)
from .base import IGNORE, NEGATIVE, POSITIVE, MultiLabelSet

_DEFAULTS: dict[str, object] = {"classes": None, "labels": None}
_DS = "folder"
_CODES = {"1": POSITIVE, "0": NEGATIVE, "-1": IGNORE}


def load_folder(root: Path | None, split: str, **options: object) -> MultiLabelSet:
    """Split ``all`` scans the whole root; any other split names a subfolder of root (e.g. ``train``)."""
    opts = take_options(_DS, options, _DEFAULTS)
    base = require_root(_DS, root)
    scan_dir = _split_dir(base, split)
    prefix = "" if scan_dir == base else scan_dir.relative_to(base).as_posix() + "/"
    ids = [prefix + rel for rel in scan_images(scan_dir)]
    if not ids:
        exts = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise DatasetError(f"{_DS}: no images ({exts}) under {scan_dir}")
    classes = None if opts["classes"] is None else parse_classes(opts["classes"])
    if classes is None and opts["labels"] is None:
        raise DatasetError(
            f"{_DS}: class names are needed: pass --classes 'cat,dog,...' (or a .txt file with one class per line), "
            "or --labels with a CSV whose header or rows name the classes"
        )
    notes: list[str] = []
    labels = None
    if opts["labels"] is not None:
        csv_path = _locate(base, opts["labels"])
        classes, table = read_label_csv(csv_path, base, classes)
        labels = np.full((len(ids), len(classes)), IGNORE, dtype=np.int8)
        absent: list[str] = []
        for r, image_id in enumerate(ids):
            row = table.get(image_id)
            if row is None:
                absent.append(image_id)
            else:
                labels[r] = row
        if absent:
            shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
            notes.append(
                f"{len(absent)} image(s) have no row in {csv_path.name}; their labels are IGNORE (e.g. {shown})"
            )
    assert classes is not None
    return MultiLabelSet(
        name=_DS,
        split=split,
        root=base,
        class_names=classes,
        paths=tuple(base / i for i in ids),
        ids=tuple(ids),
        labels=labels,
        notes=tuple(notes),
    )


def _split_dir(base: Path, split: str) -> Path:
    if split == "all":
        return base
    cand = (base / split).resolve()
    parts = Path(split).parts
    if split and cand.is_dir() and cand.is_relative_to(base) and not any(p.startswith(".") for p in parts):
        return cand
    subs = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise DatasetError(f"{_DS}: unknown split {split!r}; valid splits: {', '.join(['all', *subs])}")


def _locate(base: Path, value: object) -> Path:
    """A path as given (relative to the working directory), else relative to the dataset root."""
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path
    if not path.is_file():
        raise DatasetError(f"{_DS}: labels file {value} not found")
    return path


def parse_classes(value: object) -> tuple[str, ...]:
    """Class names from a list, a comma-separated string, or a file (one per line, blank lines skipped) named
    explicitly: ``@path``, a Path, or a single ``*.txt`` name. A plain string is never looked up on disk, so
    ``--classes cat`` is the class "cat" even where a file of that name exists, and an 80-class list is no path.
    Names containing commas need the file form."""
    if isinstance(value, (list, tuple)):
        return validate_class_names(_DS, [str(v) for v in value], "classes")
    text = str(value)
    if isinstance(value, Path) or text.startswith("@") or ("," not in text and text.lower().endswith(".txt")):
        path = Path(text[1:] if text.startswith("@") else text).expanduser()
        names = [ln for ln in read_lines(_DS, path, "classes file") if ln.strip()]
        return validate_class_names(_DS, names, str(path))
    if isinstance(value, str):
        return validate_class_names(_DS, value.split(","), "classes")
    raise DatasetError(f"{_DS}: option classes must be a list, a comma-separated string or a .txt path")


def read_label_csv(
    path: Path, base: Path, classes: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """Parse either CSV form into (class names, root-relative path -> int8 label row)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{_DS}: cannot read labels CSV {path}: {exc}") from exc
    rows = [(n, row) for n, row in rows if any(c.strip() for c in row)]
    if not rows:
        raise DatasetError(f"{_DS}: labels CSV {path} is empty")
    header = [c.strip() for c in rows[0][1]]
    if len(header) < 2 or header[0].lower() != "path":
        raise DatasetError(
            f"{_DS}: {path}:{rows[0][0]}: header must be 'path,<class1>,<class2>,...' or 'path,labels', "
            f"got {','.join(header)!r}"
        )
    body = rows[1:]
    if len(header) == 2 and header[1].lower() == "labels":
        classes, table = _names_form(path, body, classes)
    else:
        classes, table = _matrix_form(path, body, header, classes)
    _check_files(path, base, table)
    return tuple(classes), table


def _names_form(
    path: Path, body: list[tuple[int, list[str]]], classes: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """``path,labels`` rows with ``;``-separated positive class names; unnamed classes are NEGATIVE."""
    parsed: list[tuple[int, str, set[str]]] = []
    for n, row in body:
        if len(row) > 2:
            raise DatasetError(f"{_DS}: {path}:{n}: expected 'path,name1;name2;...', got {len(row)} columns")
        names = {s.strip() for s in (row[1] if len(row) == 2 else "").split(";")} - {""}
        parsed.append((n, _rel_path(path, n, row[0]), names))
    if classes is None:
        union: set[str] = set().union(*(names for _, _, names in parsed))
        classes = validate_class_names(_DS, sorted(union), f"{path} (labels column)")
    col = {c: j for j, c in enumerate(classes)}
    table: dict[str, np.ndarray] = {}
    for n, rel, names in parsed:
        unknown = sorted(names - set(col))
        if unknown:
            raise DatasetError(f"{_DS}: {path}:{n}: unknown class(es) {', '.join(unknown)} (not in --classes)")
        row_labels = np.full(len(classes), NEGATIVE, dtype=np.int8)
        row_labels[[col[c] for c in names]] = POSITIVE
        _add_row(path, n, table, rel, row_labels)
    return tuple(classes), table


def _matrix_form(
    path: Path, body: list[tuple[int, list[str]]], header: list[str], classes: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """``path,<class1>,...`` rows of 1/0/-1; columns are reordered to ``classes`` when it is given."""
    header_classes = validate_class_names(_DS, header[1:], f"{path} header")
    if classes is None:
        classes = header_classes
    elif set(classes) != set(header_classes):
        missing = sorted(set(classes) - set(header_classes))
        extra = sorted(set(header_classes) - set(classes))
        raise DatasetError(
            f"{_DS}: class list mismatch between --classes and the header of {path} "
            f"(missing from CSV: {', '.join(missing) or '-'}; not in --classes: {', '.join(extra) or '-'})"
        )
    order = [header_classes.index(c) for c in classes]
    table: dict[str, np.ndarray] = {}
    for n, row in body:
        if len(row) != len(header):
            raise DatasetError(f"{_DS}: {path}:{n}: expected {len(header)} columns, got {len(row)}")
        values = np.empty(len(header) - 1, dtype=np.int8)
        for j, cell in enumerate(row[1:]):
            code = _CODES.get(cell.strip())
            if code is None:
                raise DatasetError(f"{_DS}: {path}:{n}: column {header[j + 1]!r} must be 1, 0 or -1, got {cell!r}")
            values[j] = code
        _add_row(path, n, table, _rel_path(path, n, row[0]), values[order])
    return tuple(classes), table


def _rel_path(path: Path, n: int, text: str) -> str:
    rel = text.strip().replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise DatasetError(f"{_DS}: {path}:{n}: image path must be relative to the dataset root, got {text!r}")
    return rel


def _add_row(path: Path, n: int, table: dict[str, np.ndarray], rel: str, row: np.ndarray) -> None:
    if rel in table:
        raise DatasetError(f"{_DS}: {path}:{n}: duplicate row for {rel}")
    table[rel] = row


def _check_files(path: Path, base: Path, table: dict[str, np.ndarray]) -> None:
    for rel in table:
        if not (base / rel).is_file():
            raise DatasetError(f"{_DS}: {path} names {rel}, which is not a file under {base}")
        if not is_image_name(rel):
            raise DatasetError(f"{_DS}: {path} names {rel}, which does not have an image extension")
