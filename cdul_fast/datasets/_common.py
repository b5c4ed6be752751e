"""Helpers shared by the adapters, so every layout problem is reported the same way (one clear line)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from ..errors import DatasetError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
"""Suffixes (lower case) that count as images when scanning folders."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def take_options(dataset: str, options: Mapping[str, object], defaults: Mapping[str, object]) -> dict[str, object]:
    """Merge ``options`` over ``defaults``; an unknown key is an error naming the valid ones.

    ``None`` values mean "use the default", so a CLI can forward unset flags untouched.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "(none)"
        raise DatasetError(f"{dataset}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    merged = dict(defaults)
    merged.update({k: v for k, v in options.items() if v is not None})
    return merged


def as_bool(dataset: str, key: str, value: object) -> bool:
    """Accept real booleans and the usual spellings a CLI hands over as strings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(f"{dataset}: option {key} must be true or false, got {value!r}")


def as_choice(dataset: str, key: str, value: object, choices: Sequence[str]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise DatasetError(f"{dataset}: option {key} must be one of {', '.join(choices)}; got {value!r}")
    return text


def check_split(dataset: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise DatasetError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(valid)}")


def validate_class_names(dataset: str, names: Iterable[str], source: str) -> tuple[str, ...]:
    """Strip names and reject empty or duplicate ones: a silent duplicate would shift every later column."""
    out = tuple(str(n).strip() for n in names)
    if not out:
        raise DatasetError(f"{dataset}: no class names in {source}")
    for i, name in enumerate(out):
        if not name:
            raise DatasetError(f"{dataset}: empty class name (position {i + 1}) in {source}")
    dupes = sorted(n for n, k in Counter(out).items() if k > 1)
    if dupes:
        raise DatasetError(f"{dataset}: duplicate class name(s) {', '.join(dupes)} in {source}")
    return out


def describe_dir(path: Path, limit: int = 8) -> str:
    """A short listing of ``path`` for 'found: ...' parts of error messages."""
    if not path.exists():
        return "nothing (the path does not exist)"
    if not path.is_dir():
        return "a file, not a folder"
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        return f"an unreadable folder ({exc.strerror})"
    if not names:
        return "an empty folder"
    extra = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + extra


def require_root(dataset: str, root: Path | None) -> Path:
    if root is None:
        raise DatasetError(f"{dataset}: no root given (the folder holding the dataset's official layout)")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{dataset}: root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{dataset}: root {root} is a file, expected a folder")
    return root.resolve()


def find_subroot(root: Path, relatives: Sequence[str], marker: str) -> Path | None:
    """First of ``root/<relative>`` (in order) that contains ``marker``; ``None`` when none does."""
    for rel in relatives:
        cand = root / rel if rel else root
        if (cand / marker).exists():
            return cand
    return None


def read_lines(dataset: str, path: Path, what: str) -> list[str]:
    """Lines of a text file without line endings (CRLF and a UTF-8 BOM handled); trailing blank lines dropped."""
    if not path.is_file():
        raise DatasetError(f"{dataset}: missing {what}: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{dataset}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot read {path}: {exc.strerror}") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def existing_files(paths: Sequence[Path]) -> list[bool]:
    """Whether each path is an existing file, listing every parent folder once (far cheaper than a stat per file)."""
    listing: dict[Path, set[str] | None] = {}
    out: list[bool] = []
    for p in paths:
        parent = p.parent
        if parent not in listing:
            try:
                with os.scandir(parent) as it:
                    listing[parent] = {e.name for e in it if e.is_file()}
            except OSError:
                listing[parent] = None
        names = listing[parent]
        out.append(names is not None and p.name in names)
    return out


def missing_note(count: int, examples: Sequence[str], total: int, limit: int = 3) -> str:
    shown = ", ".join(examples[:limit]) + (", ..." if count > limit else "")
    return f"skipped {count} of {total} listed images missing on disk (e.g. {shown})"


def scan_images(folder: Path) -> list[str]:
    """Root-relative POSIX paths of all images under ``folder`` (recursive, hidden entries skipped), sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = PurePosixPath(Path(dirpath).relative_to(folder).as_posix())
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                found.append(str(rel_dir / name) if str(rel_dir) != "." else name)
    found.sort()
    return found
