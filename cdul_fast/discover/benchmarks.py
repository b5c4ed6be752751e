"""The paper's image benchmarks in their official layouts, for users who have them: CIFAR-10 (``cifar-10-batches-py``)
and CIFAR-100 (``cifar-100-python``) with the field's 5/5 and 80/20 splits (the first classes labelled, the official
test batch held out), and a folder of class sub-folders with a class-split file.

The CIFAR files are Python pickles. Unpickling runs code named by the file, so a restricted unpickler admits only
what those files hold (numpy's array reconstruction, dicts, lists, bytes, numbers) and refuses anything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import ConfigError
from .data import DiscoverData

# name -> (folder, train files, test files, meta file, label key, names key, standard known count)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                b"labels", b"label_names", 5),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 80),
}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
            ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (expected the official python version of the dataset)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, OverflowError, MemoryError) as exc:
        raise ConfigError(f"{path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(path: Path, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    x, y = d.get("data"), d.get(label_key.decode())
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ConfigError(f"{path}: 'data' must be a uint8 array [N, 3072] (32 x 32 RGB), got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    y = np.asarray(y if y is not None else [], dtype=np.int64)
    if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() >= classes)):
        raise ConfigError(f"{path}: {label_key.decode()!r} must hold {x.shape[0]} labels in 0..{classes - 1}")
    return x.reshape(-1, 3, 32, 32), y


def cifar(root: str | Path, variant: str = "cifar10", known: int | None = None) -> DiscoverData:
    """CIFAR-10/100 from ``root`` (the ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent): classes
    0..known-1 labelled (default 5 of 10, 80 of 100), the official test set held out."""
    folder, train, test, meta, label_key, names_key, default_known = CIFAR[variant]
    base = Path(root)
    if (base / folder).is_dir():
        base = base / folder
    if not base.is_dir():
        raise ConfigError(f"--root {root}: not a folder (expected {folder}/ or its parent)")
    names = _unpickle(base / meta).get(names_key.decode())
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{base / meta}: no {names_key.decode()!r} list of class names")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    known = default_known if known is None else known
    if not 1 <= known < len(names):
        raise ConfigError(f"{variant}: --known must be in 1..{len(names) - 1}, got {known}")
    tr = [_batch(base / f, label_key, len(names)) for f in train]
    te = [_batch(base / f, label_key, len(names)) for f in test]
    x_tr, y_tr = np.concatenate([b[0] for b in tr]), np.concatenate([b[1] for b in tr])
    x_te, y_te = np.concatenate([b[0] for b in te]), np.concatenate([b[1] for b in te])
    return DiscoverData(variant, torch.from_numpy(x_tr).float().div_(255), y_tr, y_tr < known,
                        torch.from_numpy(x_te).float().div_(255), y_te, tuple(range(known)),
                        tuple(range(known, len(names))), names, flip=True, encoder="resnet18")


def read_class_split(path: str | Path) -> tuple[list[str], list[str]]:
    """A class-split file: YAML ``{known: [names], novel: [names]}`` (folder names under the image root)."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--class-split {path}: cannot read it ({exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) and doc[k] for k in ("known", "novel")):
        raise ConfigError(f"--class-split {path}: expected YAML with non-empty lists 'known:' and 'novel:'")
    known, novel = [str(c) for c in doc["known"]], [str(c) for c in doc["novel"]]
    both = sorted(set(known) & set(novel))
    if both or len(set(known)) != len(known) or len(set(novel)) != len(novel):
        raise ConfigError(f"--class-split {path}: a class is listed twice{f' ({both[0]})' if both else ''}")
    return known, novel


def image_folder(root: str | Path, split_file: str | Path, size: int = 32, test_fraction: float = 0.2,
                 split_seed: int = 0) -> DiscoverData:
    """``root/<class>/<image>`` with a class-split file naming the known and the novel classes (other folders are
    ignored); images resized to ``size`` px RGB; a stratified ``test_fraction`` held out."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from ..datasets.folder import IMAGE_EXTENSIONS
    from ..views.decode import load_rgb

    known, novel = read_class_split(split_file)
    base = Path(root)
    names = tuple(known + novel)
    paths, labels = [], []
    for c, name in enumerate(names):
        folder = base / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        if len(files) < 2:
            raise ConfigError(f"{folder}: a class of the split needs a folder with at least 2 images")
        paths += files
        labels += [c] * len(files)
    y = np.asarray(labels, dtype=np.int64)
    x = np.stack([np.asarray(load_rgb(p).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
                  for p in paths]).transpose(0, 3, 1, 2)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                                      random_state=split_seed)
    xt = torch.from_numpy(x).float().div_(255)
    return DiscoverData(base.name or "folder", xt[idx_tr], y[idx_tr], y[idx_tr] < len(known), xt[idx_te], y[idx_te],
                        tuple(range(len(known))), tuple(range(len(known), len(names))), names, flip=True,
                        encoder="resnet18")
