"""The label store: one memory-mapped file holding soft pseudo-label matrices, a per-row done map and checksums.

The byte layout is defined here once (``_Header``) and documented in docs/store_format.md. Two backends map it:
the pybind11 extension ``cdul_fast.store._store`` (flock + mmap, msync/fsync without the GIL) and a pure-Python
fallback (``mmap`` + ``fcntl.flock``) that reads and writes the identical format. Both checksum with ``zlib.crc32``
over the mapped bytes (``_crc32``): the same library code a C++ call would reach, measured at the same speed, so
there is one CRC implementation. Arrays are zero-copy numpy views of the mapping.

Crash safety: opening for writing marks the header WRITING before anything else is touched; ``close`` recomputes
the checksums and marks it CLEAN. A file left WRITING by a crash opens fine (``clean`` is False) and is resumed by
its done map; a CLEAN file whose bytes changed fails its checksums on open.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._backend import store_ext
from ..errors import StoreError, StoreLockedError
from ..fsutil import fsync_dir

MAGIC = b"CDULSTOR"
VERSION = 3  # the newest format written; a file says the lowest version whose additions it uses (1, 2 or 3)
READABLE_VERSIONS = (1, 2, 3)
PAGE = 4096
STATE_WRITING, STATE_CLEAN = 1, 2
DTYPE_FLOAT32 = 1  # [rows, classes] float32: the label arrays
DTYPE_FILE_STAT = 2  # [rows, 2] int64: (size, mtime_ns) of each row's image when it was labelled (version 2)
FILE_STAT = "file_stat"  # the name of the one DTYPE_FILE_STAT array
DTYPE_TENSOR_F16, DTYPE_TENSOR_F32 = 3, 4  # [rows, *shape] float16 / float32 tensors, shape in the shape table (v3)
TENSOR_DTYPES = {"float16": DTYPE_TENSOR_F16, "float32": DTYPE_TENSOR_F32}
_NUMPY_DTYPE = {DTYPE_TENSOR_F16: np.dtype("<f2"), DTYPE_TENSOR_F32: np.dtype("<f4")}
MAX_TENSOR_DIMS = 3
MAX_ARRAYS = 32
NAME_BYTES = 32
PENDING, DONE, SKIPPED = 0, 1, 2

# magic, version, header_crc, state, n_arrays, rows, classes, reserved, meta_offset, meta_capacity, meta_nbytes,
# done_offset, done_nbytes, done_crc, reserved, file_bytes
_FIXED = struct.Struct("<8sIIIIQIIQQQQQIIQ")
_ENTRY = struct.Struct("<32sIIQQ")  # name, dtype, crc, offset, nbytes
_SHAPE = struct.Struct("<4I")  # ndim, dims (zero padded): a tensor's shape after the rows axis (version 3)
_TABLE_OFFSET = 128
_SHAPE_OFFSET = _TABLE_OFFSET + MAX_ARRAYS * _ENTRY.size  # 1920
_CRC_FIELD = slice(12, 16)
assert _FIXED.size <= _TABLE_OFFSET and _SHAPE_OFFSET + MAX_ARRAYS * _SHAPE.size <= PAGE


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def _meta_bytes(class_names: Sequence[str], meta: Mapping) -> bytes:
    """Canonical JSON (sorted keys, no spaces) so equal metadata always gives equal bytes."""
    try:
        text = json.dumps({"class_names": list(class_names), "meta": dict(meta)}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"label store metadata must be plain JSON (str keys, numbers, strings, lists): {exc}") from exc
    return text.encode("utf-8")


def _locked_msg(path: Path) -> str:
    return (f"{path} is locked by another process (a label, train or eval run is using it); wait for it to finish "
            "or stop it")


def _flock(fd: int, exclusive: bool, path: Path) -> None:
    """Non-blocking advisory lock: exclusive for writers, shared for readers."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreLockedError(_locked_msg(path)) from None


def check_unlocked(path: str | Path) -> None:
    """Raise StoreLockedError when another process holds ``path`` open as a store (nothing happens otherwise, and
    nothing when it does not exist): for replacing or removing a store without taking it from a running job."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _flock(fd, True, path)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class _Array:
    name: str
    offset: int
    nbytes: int
    crc: int = 0
    dtype: int = DTYPE_FLOAT32
    shape: tuple[int, ...] = ()  # tensors only: the dims after rows

    @property
    def is_tensor(self) -> bool:
        return self.dtype in _NUMPY_DTYPE


def _version(arrays: Sequence[_Array]) -> int:
    """The lowest version whose additions the arrays use, so files without them stay byte-identical to before."""
    if any(a.is_tensor for a in arrays):
        return 3
    return 2 if any(a.dtype == DTYPE_FILE_STAT for a in arrays) else 1


@dataclass
class _Header:
    """The first page of a store; ``pack``/``unpack`` are the single definition of its bytes."""

    state: int
    rows: int
    classes: int
    meta_offset: int
    meta_capacity: int
    meta_nbytes: int
    done_offset: int
    done_nbytes: int
    done_crc: int
    file_bytes: int
    arrays: list[_Array] = field(default_factory=list)

    def pack(self) -> bytearray:
        page = bytearray(PAGE)
        version = _version(self.arrays)
        _FIXED.pack_into(page, 0, MAGIC, version, 0, self.state, len(self.arrays), self.rows, self.classes, 0,
                         self.meta_offset, self.meta_capacity, self.meta_nbytes, self.done_offset, self.done_nbytes,
                         self.done_crc, 0, self.file_bytes)
        for i, a in enumerate(self.arrays):
            _ENTRY.pack_into(page, _TABLE_OFFSET + i * _ENTRY.size, a.name.encode("utf-8"), a.dtype, a.crc, a.offset,
                             a.nbytes)
            if a.is_tensor:
                dims = (*a.shape, 0, 0, 0)[:MAX_TENSOR_DIMS]
                _SHAPE.pack_into(page, _SHAPE_OFFSET + i * _SHAPE.size, len(a.shape), *dims)
        return page

    @classmethod
    def unpack(cls, page: bytes, path: Path) -> tuple[_Header, int]:
        (magic, version, crc, state, n_arrays, rows, classes, _, meta_offset, meta_capacity, meta_nbytes, done_offset,
         done_nbytes, done_crc, _, file_bytes) = _FIXED.unpack_from(page, 0)
        if magic != MAGIC:
            raise StoreError(f"{path} is not a cdul-fast label store (bad magic)")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{path} has store format version {version}; this cdul-fast reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade cdul-fast or relabel)")
        if n_arrays > MAX_ARRAYS or state not in (STATE_WRITING, STATE_CLEAN):
            raise StoreError(f"{path} header is corrupted (arrays {n_arrays}, state {state})")
        arrays = []
        for i in range(n_arrays):
            name, dtype, acrc, off, nbytes = _ENTRY.unpack_from(page, _TABLE_OFFSET + i * _ENTRY.size)
            shape: tuple[int, ...] = ()
            if version >= 3 and dtype in _NUMPY_DTYPE:
                ndim, *dims = _SHAPE.unpack_from(page, _SHAPE_OFFSET + i * _SHAPE.size)
                if not 1 <= ndim <= MAX_TENSOR_DIMS or any(d < 1 for d in dims[:ndim]):
                    raise StoreError(f"{path} header is corrupted (tensor shape of array {i})")
                shape = tuple(dims[:ndim])
            elif dtype in _NUMPY_DTYPE:
                raise StoreError(f"{path} header is corrupted (a version {version} file with a tensor array)")
            arrays.append(_Array(name.rstrip(b"\0").decode("utf-8", "replace"), off, nbytes, acrc, dtype, shape))
        return cls(state, rows, classes, meta_offset, meta_capacity, meta_nbytes, done_offset, done_nbytes, done_crc,
                   file_bytes, arrays), crc


def _tensor_nbytes(rows: int, dtype: int, shape: tuple[int, ...]) -> int:
    return rows * int(np.prod(shape, dtype=np.int64)) * _NUMPY_DTYPE[dtype].itemsize


def _layout(rows: int, classes: int, names: Sequence[str], meta_len: int, file_stats: bool = False,
            tensors: Mapping[str, tuple[int, tuple[int, ...]]] | None = None) -> _Header:
    meta_capacity = _round_up(max(64 * 1024, 4 * meta_len))
    done_offset = PAGE + meta_capacity
    done_nbytes = rows
    pos = done_offset + _round_up(max(done_nbytes, 1))
    arrays = []
    nbytes = rows * classes * 4
    for name in names:
        arrays.append(_Array(name, pos, nbytes))
        pos += _round_up(max(nbytes, 1))
    if file_stats:
        arrays.append(_Array(FILE_STAT, pos, rows * 16, dtype=DTYPE_FILE_STAT))
        pos += _round_up(max(rows * 16, 1))
    for name, (dtype, shape) in (tensors or {}).items():
        nbytes = _tensor_nbytes(rows, dtype, shape)
        arrays.append(_Array(name, pos, nbytes, dtype=dtype, shape=shape))
        pos += _round_up(max(nbytes, 1))
    return _Header(STATE_WRITING, rows, classes, PAGE, meta_capacity, meta_len, done_offset, done_nbytes, 0, pos,
                   arrays)


def _crc32(buf, offset: int, length: int) -> int:
    """CRC-32 of ``length`` mapped bytes from ``offset``, zero-copy (zlib releases the GIL on large buffers)."""
    return zlib.crc32(memoryview(buf)[offset:offset + length])


def _check_names(names: Sequence[str], tensors: Sequence[str] = ()) -> None:
    if not names:
        raise StoreError("a label store needs at least one array")
    if len(names) + len(tensors) > MAX_ARRAYS - 1:
        raise StoreError(f"a label store holds at most {MAX_ARRAYS - 1} label arrays and tensors, got "
                         f"{len(names) + len(tensors)}")
    names = [*names, *tensors]
    if FILE_STAT in names:
        raise StoreError(f"the array name {FILE_STAT!r} is reserved for the images' file stats")
    if len(set(names)) != len(names):
        raise StoreError(f"array and tensor names must be unique: {list(names)}")
    for n in names:
        if not n or len(n.encode("utf-8")) >= NAME_BYTES:
            raise StoreError(f"array name {n!r} must be 1..{NAME_BYTES - 1} bytes")


# -------------------------------------------------------------------------------------------------------- backends


class _PyMapping:
    """Fallback backend: mmap + fcntl.flock."""

    name = "numpy"

    def __init__(self, path: Path, writable: bool) -> None:
        try:
            self._fh = open(path, "r+b" if writable else "rb")  # noqa: SIM115 - lives as long as the mapping
        except OSError as exc:
            raise StoreError(f"cannot open label store {path}: {exc.strerror}") from exc
        try:
            _flock(self._fh.fileno(), writable, path)
            self.size = os.fstat(self._fh.fileno()).st_size
            self.writable = writable
            self._mm = None
            if self.size:
                self._mm = mmap.mmap(self._fh.fileno(), self.size,
                                     access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        except BaseException:
            self._fh.close()
            raise

    def buffer(self):
        return self._mm if self._mm is not None else b""

    def flush(self, offset: int, length: int) -> None:
        if self._mm is not None and self.writable and length:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._mm.flush(start, min(self.size - start, length + offset - start))

    def fsync(self) -> None:
        if self.writable:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        import fcntl

        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:  # numpy views are still alive: they keep the mapping until they go
            pass
        finally:
            self._fh.close()  # the mmap holds its own descriptor


class _ExtMapping:
    """Extension backend: the C++ MappedFile (flock + mmap; msync and fsync without the GIL)."""

    name = "ext"

    def __init__(self, path: Path, writable: bool, ext) -> None:
        try:
            self._mf = ext.MappedFile(str(path), writable, True)
        except ext.LockedError:
            raise StoreLockedError(_locked_msg(path)) from None
        except RuntimeError as exc:  # "cannot open <path>: <reason>" and the like
            raise StoreError(f"label store: {exc}") from exc
        self.size, self.writable = self._mf.size, writable

    def buffer(self):
        return memoryview(self._mf) if self.size else b""

    def flush(self, offset: int, length: int) -> None:
        self._mf.flush(offset, length)

    def fsync(self) -> None:
        self._mf.fsync()

    def close(self) -> None:
        self._mf.unlock()  # the mapping itself goes when the last numpy view does
        self._mf = None


def _pick_backend(backend: str):
    if backend not in ("auto", "ext", "numpy"):
        raise StoreError(f"store backend must be auto, ext or numpy, got {backend!r}")
    ext = store_ext() if backend in ("auto", "ext") else None
    if backend == "ext" and ext is None:
        raise StoreError("store backend 'ext' asked for but cdul_fast._store is not built (pip install -e .)")
    return ext


# ------------------------------------------------------------------------------------------------------------ store


class LabelStore:
    """A label store file opened for reading (``r``) or writing (``r+``); see the module docstring."""

    def __init__(self, path: Path, mode: str, mapping, header: _Header, class_names: tuple[str, ...],
                 meta: dict) -> None:
        self.path, self.mode, self._map, self._h = path, mode, mapping, header
        self.class_names, self.meta = class_names, meta
        self.backend = mapping.name
        self.clean = header.state == STATE_CLEAN
        buf = mapping.buffer()
        self.done = np.frombuffer(buf, dtype=np.uint8, count=header.rows, offset=header.done_offset)
        self._arrays = {a.name: np.frombuffer(buf, dtype=np.float32, count=header.rows * header.classes,
                                              offset=a.offset).reshape(header.rows, header.classes)
                        for a in header.arrays if a.dtype == DTYPE_FLOAT32}
        self._stats = next((np.frombuffer(buf, dtype="<i8", count=header.rows * 2, offset=a.offset)
                            .reshape(header.rows, 2) for a in header.arrays if a.dtype == DTYPE_FILE_STAT), None)
        self._tensors = {a.name: np.frombuffer(buf, dtype=_NUMPY_DTYPE[a.dtype], count=a.nbytes // _NUMPY_DTYPE[
            a.dtype].itemsize, offset=a.offset).reshape(header.rows, *a.shape) for a in header.arrays if a.is_tensor}
        self._closed = False

    # -- constructors
    @classmethod
    def create(cls, path: str | Path, class_names: Sequence[str], rows: int, arrays: Sequence[str],
               meta: Mapping | None = None, overwrite: bool = False, backend: str = "auto",
               file_stats: np.ndarray | None = None,
               tensors: Mapping[str, tuple[str, Sequence[int]]] | None = None) -> LabelStore:
        """A new zero-filled store (state WRITING on disk), opened for writing; see "Crash safety" in the format doc.

        ``file_stats`` (int64 [rows, 2], ``fsutil.file_stats``) records which file each row was labelled from, so a
        store is refused for edited or other images with the same names (``changed_rows``). ``tensors`` maps names
        to (``"float16"`` or ``"float32"``, shape after rows), e.g. the view embeddings ``{"embeddings": ("float16",
        (10, 1024))}``: per-row data that is not a [rows, classes] label matrix (version 3)."""
        path = Path(path)
        names = list(arrays)
        specs = _tensor_specs(tensors or {})
        _check_names(names, list(specs))
        class_names = tuple(str(c) for c in class_names)
        if not class_names or len(set(class_names)) != len(class_names):
            raise StoreError("a label store needs a non-empty list of unique class names (at least one class)")
        if isinstance(rows, bool) or int(rows) != rows or int(rows) < 0:
            raise StoreError(f"rows must be an integer >= 0, got {rows!r}")
        _pick_backend(backend)
        if file_stats is not None:
            file_stats = np.asarray(file_stats)
            if file_stats.shape != (int(rows), 2) or file_stats.dtype.kind not in "iu":
                raise StoreError(f"file_stats must be integer [{rows}, 2], got {file_stats.dtype} {file_stats.shape}")
        blob = _meta_bytes(class_names, meta or {})
        h = _layout(int(rows), len(class_names), names, len(blob), file_stats is not None, specs)
        _create_file(path, h, blob, overwrite)
        store = cls.open(path, mode="r+", backend=backend, verify=False)
        if file_stats is not None:
            store._stats[:] = file_stats
        return store

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", expect_classes: Sequence[str] | None = None,
             backend: str = "auto", verify: bool = True) -> LabelStore:
        """Open and validate (magic, version, size, header checksum; array checksums of a clean store)."""
        path = Path(path)
        if mode not in ("r", "r+"):
            raise StoreError(f"store mode must be 'r' or 'r+', got {mode!r}")
        if not path.is_file():
            raise StoreError(f"label store {path} not found")
        ext = _pick_backend(backend)
        mapping = _ExtMapping(path, mode == "r+", ext) if ext is not None else _PyMapping(path, mode == "r+")
        try:
            store = cls._validate(path, mode, mapping, verify)
            if mode == "r+":
                _reserve_existing(path)  # a sparse file (older stores, copies) would die with SIGBUS on a full disk
        except BaseException:
            mapping.close()
            raise
        if expect_classes is not None and tuple(expect_classes) != store.class_names:
            exp, got = tuple(expect_classes), store.class_names
            store.close()
            raise StoreError(f"{path} has {len(got)} classes that differ from the expected {len(exp)}: "
                             f"{_class_diff(got, exp)}")
        if mode == "r+":
            store._set_state(STATE_WRITING)
        return store

    @classmethod
    def _validate(cls, path: Path, mode: str, mapping, verify: bool) -> LabelStore:
        buf = mapping.buffer()
        if mapping.size < PAGE:
            if mapping.size >= 8 and bytes(buf[:8]) != MAGIC:
                raise StoreError(f"{path} is not a cdul-fast label store (bad magic)")
            raise StoreError(f"{path} is truncated ({mapping.size} bytes, smaller than the header)")
        page = bytes(buf[:PAGE])
        h, crc = _Header.unpack(page, path)
        if mapping.size != h.file_bytes:
            kind = "truncated" if mapping.size < h.file_bytes else "longer than its header says"
            raise StoreError(f"{path} is {kind} ({mapping.size} bytes, expected {h.file_bytes}); the file is damaged")
        if not (h.meta_offset == PAGE and h.meta_offset + h.meta_capacity <= h.done_offset
                and h.meta_nbytes <= h.meta_capacity):
            raise StoreError(f"{path} header is corrupted (meta region)")
        region = bytes(buf[h.meta_offset:h.meta_offset + h.meta_capacity])
        zeroed = bytearray(page)
        zeroed[_CRC_FIELD] = b"\0\0\0\0"
        if zlib.crc32(region, zlib.crc32(zeroed)) != crc:
            raise StoreError(f"{path} header is corrupted (header/metadata checksum mismatch); the file cannot be "
                             "trusted: delete it and relabel")
        _check_layout(h, path)
        try:
            doc = json.loads(region[:h.meta_nbytes].decode("utf-8"))
            class_names, meta = tuple(doc["class_names"]), dict(doc["meta"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path} metadata is unreadable: {exc}") from exc
        if len(class_names) != h.classes:
            raise StoreError(f"{path} header says {h.classes} classes but lists {len(class_names)} names")
        if verify and h.state == STATE_CLEAN:
            hint = "delete it and relabel (or open with verify=False to inspect it)"
            if _crc32(buf, h.done_offset, h.done_nbytes) != h.done_crc:
                raise StoreError(f"{path} is corrupted: done map checksum mismatch; {hint}")
            for a in h.arrays:
                if _crc32(buf, a.offset, a.nbytes) != a.crc:
                    raise StoreError(f"{path} is corrupted: array '{a.name}' checksum mismatch; {hint}")
        return cls(path, mode, mapping, h, class_names, meta)

    # -- properties
    @property
    def rows(self) -> int:
        return self._h.rows

    @property
    def classes(self) -> int:
        return self._h.classes

    @property
    def array_names(self) -> tuple[str, ...]:
        """The label arrays (float32 [rows, classes]); the file-stat array is not one of them."""
        return tuple(a.name for a in self._h.arrays if a.dtype == DTYPE_FLOAT32)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors (float16/float32 [rows, *shape]), e.g. ``embeddings``; none in version 1 and 2 stores."""
        return tuple(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        """[rows, *shape] zero-copy view of a tensor (writable when opened r+)."""
        try:
            return self._tensors[name]
        except KeyError:
            has = ", ".join(self._tensors) or "none"
            raise StoreError(f"{self.path} has no tensor {name!r} (it has {has})") from None

    @property
    def file_stats(self) -> np.ndarray | None:
        """int64 [rows, 2] (size, mtime_ns) of each row's image when it was labelled; None in version 1 stores."""
        return self._stats

    @property
    def is_complete(self) -> bool:
        return not bool((self.done == PENDING).any())

    def array(self, name: str) -> np.ndarray:
        """float32 [rows, classes] zero-copy view (writable when opened r+)."""
        try:
            return self._arrays[name]
        except KeyError:
            raise StoreError(f"{self.path} has no array {name!r} (it has {', '.join(self.array_names)})") from None

    def check_images(self, ids_sha256: str, what: str) -> None:
        """Refuse a store labelled from another image list (same length and classes are not enough)."""
        recorded = self.meta.get("ids_sha256")
        if recorded is not None and recorded != ids_sha256:
            raise StoreError(f"{self.path} was labelled from other images than {what} (the image lists differ): "
                             "label this dataset, or pass the dataset, split and options it was labelled with")

    def changed_rows(self, stats_now: np.ndarray) -> np.ndarray | None:
        """Rows whose image differs (size or mtime) from the one labelled; None when the store has no file stats."""
        if self._stats is None:
            return None
        return np.flatnonzero((self._stats != np.asarray(stats_now)).any(axis=1)).astype(np.int64)

    def check_files(self, stats_now: np.ndarray, ids: Sequence[str], what: str) -> None:
        """Refuse a store whose labelled images were edited, replaced or removed since (same names are not enough)."""
        changed = self.changed_rows(stats_now)
        if changed is None:
            return
        changed = changed[self.done[changed] == DONE]
        if changed.size:
            n = int((self.done == DONE).sum())
            raise StoreError(f"{changed.size} of the {n} images labelled in {self.path} differ from the files of "
                             f"{what} now (size or modification time; first: {ids[int(changed[0])]!r}): they were "
                             "edited, replaced or removed since labelling, or these are other files with the same "
                             "names; relabel them with the same label command and --resume (it relabels only "
                             "what changed)")

    def set_file_stats(self, rows: np.ndarray, stats: np.ndarray) -> None:
        """Record the current file stats of ``rows`` (a resumed label run, for the images it relabels)."""
        self._need_write()
        if self._stats is None:
            raise StoreError(f"{self.path} is a version 1 store without file stats")
        self._stats[np.asarray(rows, dtype=np.int64)] = np.asarray(stats)

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self.done == PENDING).astype(np.int64)

    # -- writing
    def _need_write(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode 'r+' to write")

    def write(self, start: int, values: Mapping[str, np.ndarray]) -> None:
        """Rows [start, start + n) of the named arrays, then done = 1 for them (data first, so a crash between the
        two leaves the rows pending, never marked done without data)."""
        self._need_write()
        checked = self._check_values(values)
        n = next(iter(checked.values())).shape[0]
        if isinstance(start, bool) or int(start) != start or start < 0 or start + n > self.rows:
            raise StoreError(f"write: rows [{start}, {start + n}) outside [0, {self.rows}) of {self.path}")
        start = int(start)
        for name, arr in checked.items():
            self._target(name)[start:start + n] = arr
        self.done[start:start + n] = DONE

    def clear_rows(self, rows: np.ndarray) -> None:
        """Zero ``rows`` of every label array and tensor (a row that is labelled again, or skipped)."""
        self._need_write()
        rows = np.asarray(rows, dtype=np.int64)
        for target in (*self._arrays.values(), *self._tensors.values()):
            target[rows] = 0

    def _target(self, name: str) -> np.ndarray:
        if name in self._tensors:
            return self._tensors[name]
        return self.array(name)  # StoreError for unknown names

    def _check_values(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All names known, each [n, classes] (label arrays) or [n, *shape] (tensors) with one n, real numbers:
        validated before any byte is written."""
        if not values:
            raise StoreError("write needs at least one array")
        out: dict[str, np.ndarray] = {}
        for name, v in values.items():
            target = self._target(name)
            arr = np.asarray(v)
            if arr.dtype.kind not in "biuf":
                raise StoreError(f"write: array {name!r} must hold real numbers, got dtype {arr.dtype}")
            want = (self.classes,) if name in self._arrays else target.shape[1:]
            if arr.ndim != 1 + len(want) or arr.shape[1:] != want:
                raise StoreError(f"write: array {name!r} must be [n, {', '.join(map(str, want))}], got {arr.shape}")
            out[name] = arr.astype(target.dtype, copy=False)
        if len({a.shape[0] for a in out.values()}) != 1:
            raise StoreError(f"write: all arrays must have the same number of rows, got "
                             f"{ {k: a.shape[0] for k, a in out.items()} }")
        return out

    def update_meta(self, meta: Mapping) -> None:
        """Replace the metadata dict (must fit the region reserved at creation)."""
        self._need_write()
        blob = _meta_bytes(self.class_names, meta)
        if len(blob) > self._h.meta_capacity:
            raise StoreError(f"metadata of {len(blob)} bytes does not fit the {self._h.meta_capacity} reserved in "
                             f"{self.path}")
        buf = self._map.buffer()
        h = self._h
        buf[h.meta_offset:h.meta_offset + h.meta_capacity] = blob + bytes(h.meta_capacity - len(blob))
        h.meta_nbytes = len(blob)
        self.meta = json.loads(blob)["meta"]
        self._write_header()

    def flush(self) -> None:
        """msync the whole mapping: rows written so far survive a power cut, not only a process crash."""
        if self.mode == "r+" and not self._closed:
            with _io_errors(self.path, "flush"):
                self._map.flush(0, self._h.file_bytes)

    def close(self) -> None:
        """Writers: fresh checksums, state CLEAN, msync + fsync. Idempotent."""
        if self._closed:
            return
        try:
            if self.mode == "r+":
                with _io_errors(self.path, "close"):
                    self._seal()
        finally:
            self._closed = True
            self._map.close()

    def _seal(self) -> None:
        """Fresh CRCs, data on disk, then the header says CLEAN (so CLEAN never points at unsynced data)."""
        h = self._h
        buf = self._map.buffer()
        h.done_crc = _crc32(buf, h.done_offset, h.done_nbytes)
        for a in h.arrays:
            a.crc = _crc32(buf, a.offset, a.nbytes)
        self._map.flush(PAGE, h.file_bytes - PAGE)
        self._set_state(STATE_CLEAN)
        self._map.fsync()

    def _set_state(self, state: int) -> None:
        self._h.state = state
        self.clean = state == STATE_CLEAN
        self._write_header()

    def _write_header(self) -> None:
        h = self._h
        buf = self._map.buffer()
        buf[:PAGE] = _sealed(h, bytes(buf[h.meta_offset:h.meta_offset + h.meta_capacity]))
        self._map.flush(0, h.meta_offset + h.meta_capacity)

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "clean" if self.clean else "writing"
        tensors = f", tensors={list(self.tensor_names)}" if self._tensors else ""
        return (f"LabelStore({str(self.path)!r}, rows={self.rows}, classes={self.classes}, "
                f"arrays={list(self.array_names)}{tensors}, {state}, backend={self.backend})")


def _sealed(h: _Header, meta_region: bytes) -> bytes:
    """The header page with its checksum: CRC-32 of the page (CRC field zeroed) followed by the whole meta region,
    padding included, so any change to the class names, metadata or their padding is caught."""
    page = h.pack()
    struct.pack_into("<I", page, _CRC_FIELD.start, zlib.crc32(meta_region, zlib.crc32(page)))
    return bytes(page)


@contextlib.contextmanager
def _io_errors(path: Path, what: str) -> Iterator[None]:
    """msync/fsync failures (disk full, I/O error) from either backend as one StoreError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise StoreError(f"{what} of label store {path} failed: {exc}; check free disk space, then resume") from exc


def _create_file(path: Path, h: _Header, meta_blob: bytes, overwrite: bool) -> None:
    """Write a zero-filled store in place. Without overwrite, O_EXCL refuses an existing file atomically; with it, the
    old file is locked before it is truncated, so a store in use by another process is never clobbered. The header
    goes last: a crash mid-create leaves a file that fails with "bad magic", never a valid-looking one."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise StoreError(f"{path} already exists (pass overwrite to replace it, or open it to resume)") from None
    except OSError as exc:
        raise StoreError(f"cannot create label store {path}: {exc.strerror}") from exc
    try:
        _flock(fd, True, path)  # a store in use by another process is refused here, before anything is changed
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        _reserve(fd, h.file_bytes, path)
        os.ftruncate(fd, h.file_bytes)
        os.pwrite(fd, meta_blob, h.meta_offset)
        region = meta_blob + bytes(h.meta_capacity - len(meta_blob))
        os.pwrite(fd, _sealed(h, region), 0)
        os.fsync(fd)
    except (OSError, StoreError) as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"cannot create label store {path}: {exc}") from exc
    finally:
        os.close(fd)  # drops the lock; open() takes it again
    fsync_dir(path.parent)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def _no_space(path: Path, needed: int) -> StoreError:
    free = _free_bytes(path.parent)
    return StoreError(f"not enough disk space for label store {path}: it needs {_size(needed)} more, "
                      f"{_size(max(free, 0)) if free >= 0 else 'an unknown amount'} free there; free some space or "
                      "write it elsewhere")


def _reserve(fd: int, nbytes: int, path: Path) -> None:
    """Allocate the file's blocks before it is mapped: a write through a mapping into a hole on a full disk is a
    SIGBUS, which no error handler sees. Filesystems without fallocate get a free-space check instead."""
    if nbytes <= 0:
        return
    have = os.fstat(fd).st_blocks * 512
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _no_space(path, max(nbytes - have, 0)) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise StoreError(f"cannot reserve {_size(nbytes)} for label store {path}: {exc.strerror}") from exc
        free = _free_bytes(path.parent)
        if 0 <= free < nbytes - have:
            raise _no_space(path, nbytes - have) from None


def _reserve_existing(path: Path) -> None:
    """``_reserve`` for a store about to be opened for writing (a no-op when its blocks are allocated already)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return  # the backend's own open reports it
    try:
        st = os.fstat(fd)
        if st.st_blocks * 512 < st.st_size:
            _reserve(fd, st.st_size, path)
    finally:
        os.close(fd)


def _tensor_specs(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{name: (dtype code, shape)} from {name: ("float16" | "float32", shape)}, with one-line errors."""
    out = {}
    for name, spec in tensors.items():
        try:
            dtype, shape = spec
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise StoreError(f"tensor {name!r}: expected (dtype, shape), got {spec!r}") from None
        if dtype not in TENSOR_DTYPES:
            raise StoreError(f"tensor {name!r}: dtype must be one of {', '.join(TENSOR_DTYPES)}, got {dtype!r}")
        if not 1 <= len(shape) <= MAX_TENSOR_DIMS or any(d < 1 or d >= 1 << 32 for d in shape):
            raise StoreError(f"tensor {name!r}: shape after rows must be 1..{MAX_TENSOR_DIMS} dims >= 1, got {shape}")
        out[str(name)] = (TENSOR_DTYPES[dtype], shape)
    return out


def _check_layout(h: _Header, path: Path) -> None:
    """Every region inside the file, page aligned, sized for rows x classes (label arrays) or its shape (tensors)."""
    ok = h.done_offset % PAGE == 0 and h.done_nbytes == h.rows and h.done_offset + h.done_nbytes <= h.file_bytes
    stat_arrays = [a for a in h.arrays if a.dtype == DTYPE_FILE_STAT]
    ok = ok and len(stat_arrays) <= 1 and all(a.name == FILE_STAT for a in stat_arrays)
    ok = ok and len({a.name for a in h.arrays}) == len(h.arrays)
    for a in h.arrays:
        if a.is_tensor:
            nbytes = _tensor_nbytes(h.rows, a.dtype, a.shape)
        else:
            width = {DTYPE_FLOAT32: h.classes * 4, DTYPE_FILE_STAT: 16}.get(a.dtype)
            nbytes = None if width is None else h.rows * width
        ok = ok and nbytes is not None and a.offset % PAGE == 0 and a.nbytes == nbytes
        ok = ok and (a.dtype == DTYPE_FILE_STAT) == (a.name == FILE_STAT)
        ok = ok and a.offset >= h.done_offset + h.done_nbytes and a.offset + a.nbytes <= h.file_bytes
    spans = sorted((a.offset, a.offset + a.nbytes) for a in h.arrays)
    ok = ok and all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    if not ok or h.classes < 1:
        raise StoreError(f"{path} header is corrupted (array layout)")


def _class_diff(got: tuple[str, ...], exp: tuple[str, ...]) -> str:
    missing = [c for c in exp if c not in got]
    extra = [c for c in got if c not in exp]
    if not missing and not extra:
        return "same names in a different order"
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"extra {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return "; ".join(parts)
