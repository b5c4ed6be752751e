"""`cdul-fast tags`: per-image tags for people (CSV, JSON, parquet) from a label store's soft scores.

A score matrix answers "how much does each class fit each image"; a person wants "which tags does this photo get".
Three ways to cut, all without ground truth:

- ``fixed``: one threshold for every class (default 0.5);
- ``otsu``: a threshold per class from that class's own score distribution: Otsu's method on a 256-bin histogram
  over [0, 1] picks the cut that maximizes the between-group variance w0 w1 (mu0 - mu1)^2 of the scores below and
  above it, i.e. the valley between "absent" and "present" when the scores are bimodal. A class whose scores all
  fall in one bin has no cut and gets no tags;
- ``top-k``: the k best classes of every image;
- a thresholds file (``class,threshold`` CSV, the one every run writes beside its output), for thresholds edited by
  hand.

``min_score`` is a floor in every mode (a top-k tag below it is dropped).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets import MultiLabelSet
from ..errors import ConfigError, DependencyError
from ..evaluate import labelled_rows
from ..fsutil import read_user_text, write_text_atomic
from ..store.label_store import LabelStore

MODES: tuple[str, ...] = ("fixed", "otsu", "top-k", "file")
FORMATS: tuple[str, ...] = (".csv", ".json", ".parquet")
BINS = 256


def otsu_threshold(scores: np.ndarray, bins: int = BINS) -> float:
    """Otsu's cut of scores in [0, 1] (module docstring); ``inf`` when no cut separates them."""
    hist = np.histogram(np.clip(scores, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    total = hist.sum()
    if total == 0:
        return math.inf
    centers = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)[:-1]  # scores in bins < k, for cuts k = 1 .. bins - 1
    m0 = np.cumsum(hist * centers)[:-1]
    w1 = total - w0
    m1 = (hist * centers).sum() - m0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return math.inf
    between = np.where(valid, w0 * w1 * (m0 / np.maximum(w0, 1) - m1 / np.maximum(w1, 1)) ** 2, -1.0)
    return float((int(np.argmax(between)) + 1) / bins)


def read_thresholds(path: str | Path, class_names: tuple[str, ...]) -> np.ndarray:
    """Per-class thresholds from a ``class,threshold`` CSV (header optional); every class exactly once."""
    p = Path(path)
    text = read_user_text(p, "thresholds")
    col = {c: i for i, c in enumerate(class_names)}
    out = np.full(len(class_names), np.nan)
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or (n == 1 and row[0].strip() == "class"):
            continue
        if len(row) < 2:
            raise ConfigError(f"{p}:{n}: expected 'class,threshold', got {','.join(row)!r}")
        name, value = row[0].strip(), row[1].strip()
        if name not in col:
            raise ConfigError(f"{p}:{n}: {name!r} is not one of the store's {len(class_names)} classes")
        try:
            thr = float(value)
        except ValueError:
            raise ConfigError(f"{p}:{n}: threshold {value!r} is not a number") from None
        if not 0.0 <= thr <= 1.0 and thr != math.inf:
            raise ConfigError(f"{p}:{n}: threshold {value} must lie in [0, 1] (or inf for never)")
        if not np.isnan(out[col[name]]):
            raise ConfigError(f"{p}:{n}: {name!r} is listed twice")
        out[col[name]] = thr
    missing = [c for c in class_names if np.isnan(out[col[c]])]
    if missing:
        raise ConfigError(f"{p} has no threshold for {len(missing)} classes: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")
    return out


def choose_thresholds(scores: np.ndarray, mode: str, value: float | None = None) -> np.ndarray | None:
    """Per-class thresholds [C] for ``fixed`` and ``otsu``; None for ``top-k`` (ranks, not thresholds)."""
    if mode == "fixed":
        return np.full(scores.shape[1], 0.5 if value is None else float(value))
    if mode == "otsu":
        return np.array([otsu_threshold(scores[:, c]) for c in range(scores.shape[1])])
    if mode == "top-k":
        return None
    raise ConfigError(f"tag mode must be one of fixed, otsu, top-k (or a thresholds file), got {mode!r}")


def select_tags(scores: np.ndarray, thresholds: np.ndarray | None, top_k: int | None = None,
                min_score: float = 0.0) -> list[list[tuple[int, float]]]:
    """Per row, (class, score) pairs sorted by score (descending, then class order): scores reaching the class's
    threshold, or the ``top_k`` best; never below ``min_score``."""
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    keep = scores >= min_score
    if thresholds is not None:
        keep &= scores >= np.asarray(thresholds)[None, :]
    out = []
    for r in range(scores.shape[0]):
        ranked = [int(c) for c in order[r] if keep[r, c]]
        if top_k is not None:
            ranked = [int(c) for c in order[r, :top_k] if keep[r, c]]
        out.append([(c, float(scores[r, c])) for c in ranked])
    return out


@dataclass
class TagsResult:
    out: Path
    thresholds_file: Path
    images: int
    tags: int
    notes: list[str]


def _table(paths: list[str], class_names: tuple[str, ...], tags: list[list[tuple[int, float]]]):
    return [(p, [class_names[c] for c, _ in t], [round(s, 4) for _, s in t]) for p, t in zip(paths, tags)]


def write_tags(out: Path, paths: list[str], class_names: tuple[str, ...], tags: list[list[tuple[int, float]]],
               header: dict) -> None:
    """The tags in the format of ``out``'s suffix (checked before anything is computed, see ``check_format``)."""
    rows = _table(paths, class_names, tags)
    suffix = out.suffix.lower()
    if suffix == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "tags", "scores"])
        for p, names, scores in rows:
            w.writerow([p, ";".join(names), ";".join(f"{s:.4f}" for s in scores)])
        write_text_atomic(out, buf.getvalue())
    elif suffix == ".json":
        doc = {**header, "images": [{"path": p, "tags": [{"name": n, "score": s} for n, s in zip(names, scores)]}
                                    for p, names, scores in rows]}
        write_text_atomic(out, json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    else:
        pa, pq = _pyarrow()
        table = pa.table({"path": pa.array([p for p, _, _ in rows], pa.string()),
                          "tags": pa.array([n for _, n, _ in rows], pa.list_(pa.string())),
                          "scores": pa.array([s for _, _, s in rows], pa.list_(pa.float32()))},
                         metadata={"cdul_fast": json.dumps(header)})
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DependencyError("parquet output needs pyarrow: pip install pyarrow (or write .csv / .json)") from None
    return pa, pq


def check_format(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out must end in {', '.join(FORMATS)} (the format), got {out.name!r}")
    if out.suffix.lower() == ".parquet":
        _pyarrow()
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a file")


def write_thresholds(path: Path, class_names: tuple[str, ...], thresholds: np.ndarray | None,
                     tags: list[list[tuple[int, float]]]) -> None:
    """``class,threshold,tagged_images``: the cut of every class, ready to edit and pass back with --thresholds."""
    counts = np.zeros(len(class_names), dtype=np.int64)
    for t in tags:
        for c, _ in t:
            counts[c] += 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "threshold", "tagged_images"])
    for c, name in enumerate(class_names):
        thr = "" if thresholds is None else ("inf" if math.isinf(thresholds[c]) else f"{thresholds[c]:.6g}")
        w.writerow([name, thr, int(counts[c])])
    write_text_atomic(path, buf.getvalue())


def run_tags(store_path: str | Path, ds: MultiLabelSet, out: str | Path, array: str = "final", mode: str = "fixed",
             threshold: float | None = None, top_k: int | None = None, thresholds_file: str | None = None,
             min_score: float = 0.0, allow_incomplete: bool = False) -> TagsResult:
    """Tags of every labelled image of the store (which must belong to ``ds``: rows, ids, file stats) written to
    ``out``. The tags are the store's classes, which may differ from the dataset's (a rescore with another
    vocabulary, or the groups `discover --labels` found)."""
    out = Path(out)
    check_format(out)
    with LabelStore.open(store_path, mode="r") as store:
        rows, notes = labelled_rows(store, ds, allow_incomplete)
        scores = np.array(store.array(array))[rows]
        class_names = store.class_names
    if top_k is not None and not 1 <= top_k <= len(class_names):
        raise ConfigError(f"--top-k must be in [1, {len(class_names)}] (the store's classes), got {top_k}")
    thresholds = read_thresholds(thresholds_file, class_names) if mode == "file" else \
        choose_thresholds(scores, mode, threshold)
    if mode == "otsu":
        flat = [class_names[c] for c in range(len(class_names)) if math.isinf(thresholds[c])]
        if flat:
            notes.append(f"otsu found no cut for {len(flat)} classes whose scores are all alike (no tags): "
                         f"{', '.join(flat[:5])}")
    tags = select_tags(scores, thresholds, top_k if mode == "top-k" else None, min_score)
    header = {"store": str(store_path), "array": array, "mode": mode, "min_score": min_score,
              "classes": list(class_names), "top_k": top_k if mode == "top-k" else None,
              "thresholds": None if thresholds is None else
              {c: (None if math.isinf(t) else float(t)) for c, t in zip(class_names, thresholds)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tags(out, [str(ds.paths[r]) for r in rows], class_names, tags, header)
    thr_path = out.with_name(out.name + ".thresholds.csv")
    write_thresholds(thr_path, class_names, thresholds, tags)
    return TagsResult(out=out, thresholds_file=thr_path, images=int(rows.size), tags=sum(len(t) for t in tags),
                      notes=notes)
