"""mAP (macro over classes) and per-class AP against ground truth, with torchmetrics as the AP implementation."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import IGNORE, POSITIVE, MultiLabelSet
from .errors import ConfigError, StoreError
from .fsutil import file_stats
from .store.label_store import DONE, PENDING, LabelStore


def mean_ap(ap: np.ndarray) -> float:
    """The mean of the defined per-class APs (classes with a positive); NaN when none is defined."""
    defined = np.asarray(ap)[~np.isnan(ap)]
    return float(defined.mean()) if defined.size else float("nan")


@dataclass
class APReport:
    """Per-class AP (NaN where a class has no positive in the evaluated rows) and their mean over defined classes."""

    class_names: tuple[str, ...]
    ap: np.ndarray
    positives: np.ndarray
    images: int

    @property
    def map(self) -> float:
        return mean_ap(self.ap)

    def to_dict(self) -> dict:
        return {
            "mAP": _num(self.map),
            "images": self.images,
            "classes": {c: {"ap": _num(a), "positives": int(p)}
                        for c, a, p in zip(self.class_names, self.ap, self.positives)},
        }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x) * 100.0, 4)


def average_precision(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """AP per class of ``scores`` [N, C] vs int labels (1 / 0 / -1 = ignored); NaN for classes without positives."""
    from torchmetrics.functional.classification import multilabel_average_precision

    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if s.shape != y.shape or s.dim() != 2:
        raise ValueError(f"scores {tuple(s.shape)} and labels {tuple(y.shape)} must both be [N, C]")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about classes without positives; we report NaN
        ap = multilabel_average_precision(s, y, num_labels=s.shape[1], average=None, ignore_index=IGNORE)
    ap = ap.double().numpy()
    ap[(y == POSITIVE).sum(0).numpy() == 0] = np.nan
    return ap


def evaluate_scores(scores: np.ndarray, ds: MultiLabelSet, rows: np.ndarray | None = None) -> APReport:
    """AP of ``scores`` (rows aligned with ``ds``) on ``rows`` (default all) against the dataset's ground truth."""
    if ds.labels is None:
        raise ConfigError(f"dataset {ds.name}/{ds.split} has no ground truth to evaluate against")
    idx = np.arange(len(ds)) if rows is None else np.asarray(rows)
    labels = ds.labels[idx]
    return APReport(
        class_names=ds.class_names,
        ap=average_precision(np.asarray(scores)[idx] if rows is not None else scores, labels),
        positives=(labels == POSITIVE).sum(0),
        images=int(idx.size),
    )


def labelled_rows(store: LabelStore, ds: MultiLabelSet, allow_incomplete: bool = False) -> tuple[np.ndarray, list[str]]:
    """The rows of ``store`` that hold labels, after checking that it belongs to ``ds`` (rows, ids digest, file
    stats), plus notes for the user; an incomplete store is refused unless ``allow_incomplete``."""
    path, notes = store.path, []
    if store.rows != len(ds):
        raise StoreError(f"{path} has {store.rows} rows but {ds.name}/{ds.split} has {len(ds)} images: "
                         "was it labelled from another dataset or split?")
    store.check_images(ds.ids_digest(), f"{ds.name}/{ds.split}")
    store.check_files(file_stats(ds.paths), ds.ids, f"{ds.name}/{ds.split}")
    if store.file_stats is None:
        notes.append("a version 1 store records no file stats: images edited since labelling are not detected")
    meta_ds = (store.meta.get("dataset"), store.meta.get("split"))
    if meta_ds != (None, None) and meta_ds != (ds.name, ds.split):
        notes.append(f"store was labelled from {meta_ds[0]}/{meta_ds[1]}, evaluating against {ds.name}/{ds.split}")
    done = np.asarray(store.done)
    pending = int((done == PENDING).sum())
    if pending and not allow_incomplete:
        raise StoreError(f"{path} is incomplete ({pending} of {store.rows} rows not labelled yet): finish it with "
                         "`cdul-fast label ... --resume`")
    rows = np.flatnonzero(done == DONE)
    if rows.size < store.rows:
        notes.append(f"{store.rows - rows.size} rows without labels (skipped or pending) left out")
    return rows, notes


def evaluate_store(path: str | Path, ds: MultiLabelSet, arrays: list[str] | None = None,
                   allow_incomplete: bool = False) -> tuple[dict[str, APReport], list[str]]:
    """AP reports for the store's arrays (default: all) plus notes; the store must belong to ``ds``."""

    with LabelStore.open(path, mode="r", expect_classes=ds.class_names) as store:
        rows, notes = labelled_rows(store, ds, allow_incomplete)
        names = list(store.array_names) if arrays is None else arrays
        unknown = [a for a in names if a not in store.array_names]
        if unknown:
            raise ConfigError(f"{path} has no array {', '.join(unknown)}; it has {', '.join(store.array_names)}")
        reports = {a: evaluate_scores(np.asarray(store.array(a)), ds, rows) for a in names}
    return reports, notes


def format_table(reports: dict[str, APReport], per_class: bool = True) -> str:
    """A text table: one row per class (AP %) and a final mAP row, one column per evaluated array."""
    names = list(reports)
    first = reports[names[0]]
    width = max(12, *(len(c) for c in first.class_names)) if per_class else 12
    head = f"{'class':<{width}} " + " ".join(f"{n:>10}" for n in names)
    lines = [head, "-" * len(head)]

    def cell(x: float) -> str:
        return f"{x * 100:10.2f}" if not math.isnan(x) else f"{'n/a':>10}"

    if per_class:
        for i, c in enumerate(first.class_names):
            lines.append(f"{c:<{width}} " + " ".join(cell(reports[n].ap[i]) for n in names))
        lines.append("-" * len(head))
    lines.append(f"{'mAP':<{width}} " + " ".join(cell(reports[n].map) for n in names))
    return "\n".join(lines)


def reports_json(reports: dict[str, APReport], notes: list[str] | None = None) -> str:
    return json.dumps({"arrays": {k: r.to_dict() for k, r in reports.items()}, "notes": notes or []}, indent=2)
