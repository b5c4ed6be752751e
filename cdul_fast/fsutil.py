"""Crash-safe file writes shared by every stage: write a temporary sibling, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError


def fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable (best effort: some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, torchrun stopping a job) raised as KeyboardInterrupt while the block runs, so stores are
    closed and temporary files removed as on Ctrl-C; the previous handler comes back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_yaml_atomic(data: dict, path: str | Path) -> None:
    """Plain-data YAML (round-tripped through JSON so tuples and numpy scalars become lists and numbers)."""
    import yaml

    write_text_atomic(path, yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=True))


def save_json_atomic(data: dict, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def file_stats(paths: Sequence[str | Path]) -> np.ndarray:
    """int64 [n, 2]: (size, mtime in ns) of each file, (-1, -1) where it is missing or unreadable.

    The fingerprint a label store keeps per row: an image edited in place, replaced, or another file with the same
    name changes it. Content hashes would read every byte again; stat reads only the inode (measured in
    bench/RESULTS.md)."""
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            continue
        out[i, 0], out[i, 1] = st.st_size, st.st_mtime_ns
    return out


def read_user_text(path: str | Path, what: str) -> str:
    """A UTF-8 file the user named (templates, synonyms, thresholds): missing or unreadable is one line; a byte-order
    mark (spreadsheet exports) is dropped."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {p}: {getattr(exc, 'strerror', None) or exc}") from None
