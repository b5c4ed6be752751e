"""The one shape every dataset adapter returns: ordered image paths, class names and optional ground truth."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1
"""Ground-truth codes in ``MultiLabelSet.labels`` (int8): IGNORE marks entries left out of AP (e.g. VOC difficult)."""


@dataclass(frozen=True)
class MultiLabelSet:
    """An ordered image collection. Row ``i`` of a label store built from it belongs to ``paths[i]``.

    ``ids`` are stable, root-relative identifiers (used in reports and prediction CSVs); ``labels`` is int8
    [len, C] with POSITIVE/NEGATIVE/IGNORE or None when the collection has no ground truth.
    """

    name: str
    split: str
    root: Path
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    ids: tuple[str, ...]
    labels: np.ndarray | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.class_names:
            raise DatasetError(f"{self.name}: empty class list")
        dupes = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
        if dupes:
            raise DatasetError(f"{self.name}: duplicate class names: {', '.join(dupes)}")
        if len(self.paths) != len(self.ids):
            raise DatasetError(f"{self.name}: {len(self.paths)} paths but {len(self.ids)} ids")
        if self.labels is not None:
            if self.labels.shape != (len(self.paths), len(self.class_names)):
                raise DatasetError(
                    f"{self.name}: ground truth has shape {self.labels.shape}, expected "
                    f"({len(self.paths)}, {len(self.class_names)})"
                )
            if self.labels.dtype != np.int8:
                raise DatasetError(f"{self.name}: ground truth must be int8, got {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ids_digest(self) -> str:
        """sha256 over the image ids in order: a label store records it, and is refused for another image list."""
        h = hashlib.sha256()
        for i in self.ids:
            h.update(i.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()
