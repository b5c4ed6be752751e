"""Dataset adapters reading the official layouts; ``load_dataset(name, root, split)`` is the single entry point."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DatasetError
from .base import IGNORE, NEGATIVE, POSITIVE, MultiLabelSet

Loader = Callable[..., MultiLabelSet]

_REGISTRY: dict[str, tuple[str, str]] = {
    # name: (module, function) -- imported lazily so a broken optional adapter never breaks the package
    "voc2007": (".voc", "load_voc2007"),
    "voc2012": (".voc", "load_voc2012"),
    "coco": (".coco", "load_coco"),
    "nus": (".nus", "load_nus"),
    "folder": (".folder", "load_folder"),
    "shapes": ("..shapes.world", "load_shapes"),
    "shapes20": ("..shapes.world20", "load_shapes20"),
}

DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    # name: (split used for labelling/training, split used for testing) as in the paper (section 4.1)
    "voc2007": ("trainval", "test"),
    "voc2012": ("train", "val"),
    "coco": ("train", "val"),
    "nus": ("train", "test"),
    "folder": ("all", "all"),
    "shapes": ("train", "test"),
    "shapes20": ("train", "test"),
}
GENERATED = ("shapes", "shapes20")  # procedural worlds: generated on first use, no --root needed


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def load_dataset(name: str, root: str | Path | None, split: str | None = None, **options: object) -> MultiLabelSet:
    """Read dataset ``name`` at ``root`` (its official layout) for ``split`` (default: the training split)."""
    import importlib

    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    module_name, func_name = _REGISTRY[name]
    loader: Loader = getattr(importlib.import_module(module_name, __name__), func_name)
    if split is None:
        split = DEFAULT_SPLITS[name][0]
    if root is None and name not in GENERATED:
        raise DatasetError(f"dataset {name!r} needs --root (the folder holding its official layout)")
    return loader(Path(root) if root is not None else None, split, **options)


__all__ = [
    "IGNORE",
    "NEGATIVE",
    "POSITIVE",
    "DEFAULT_SPLITS",
    "GENERATED",
    "MultiLabelSet",
    "list_datasets",
    "load_dataset",
]
