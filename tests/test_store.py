"""Label store: format, zero-copy views, both backends byte-identical, crash safety, corruption and lock errors."""

from __future__ import annotations

import base64
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from cdul_fast._backend import store_ext
from cdul_fast.errors import StoreError
from cdul_fast.store.label_store import PAGE, LabelStore

BACKENDS = [pytest.param("numpy"), pytest.param("ext", marks=pytest.mark.skipif(store_ext() is None,
                                                                                   reason="extension not built"))]
CLASSES = ("cat", "dog", "bird", "car", "tree")


def _data(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"final": rng.random((rows, len(CLASSES)), dtype=np.float32),
            "global": rng.random((rows, len(CLASSES)), dtype=np.float32)}


def _make(path: Path, backend: str, rows: int = 37, order=None, meta=None) -> None:
    data = _data(rows)
    st = LabelStore.create(path, CLASSES, rows, ["final", "global"], meta=meta or {"k": 1}, backend=backend)
    for start in order if order is not None else range(0, rows, 8):
        end = min(rows, start + 8)
        st.write(start, {k: v[start:end] for k, v in data.items()})
    st.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_and_zero_copy(tmp_path, backend):
    path = tmp_path / "s.cdul"
    _make(path, backend, meta={"dataset": "voc2007", "grid": 3})
    with LabelStore.open(path, backend=backend, expect_classes=CLASSES) as st:
        assert st.backend == backend and st.clean and st.is_complete
        assert st.class_names == CLASSES and st.meta == {"dataset": "voc2007", "grid": 3}
        assert st.array_names == ("final", "global") and st.rows == 37 and st.classes == 5
        np.testing.assert_array_equal(st.array("final"), _data(37)["final"])
        assert not st.array("final").flags.writeable  # read-only mapping
    with LabelStore.open(path, mode="r+", backend=backend) as st:
        view = st.array("global")
        view[3, 2] = 42.0  # writes through the mapping, no copy
        assert st.array("global")[3, 2] == 42.0
    with LabelStore.open(path, backend=backend) as st:
        assert st.array("global")[3, 2] == 42.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_arrays_readable_with_plain_numpy_memmap(tmp_path, backend):
    """The documented layout: fixed header fields, then page-aligned float32 arrays at the table's offsets."""
    path = tmp_path / "s.cdul"
    _make(path, backend)
    raw = path.read_bytes()
    assert raw[:8] == b"CDULSTOR" and struct.unpack_from("<I", raw, 8)[0] == 1
    n_arrays, rows, classes = struct.unpack_from("<IQI", raw, 20)
    assert (n_arrays, rows, classes) == (2, 37, 5)
    done_offset, done_nbytes = struct.unpack_from("<QQ", raw, 64)
    assert done_offset % PAGE == 0
    assert np.all(np.memmap(path, np.uint8, "r", done_offset, (done_nbytes,)) == 1)
    for i, name in enumerate(("final", "global")):
        ename, dtype, crc, offset, nbytes = struct.unpack_from("<32sIIQQ", raw, 128 + 56 * i)
        assert ename.rstrip(b"\0").decode() == name and dtype == 1 and offset % PAGE == 0
        arr = np.memmap(path, np.float32, "r", offset, (rows, classes))
        np.testing.assert_array_equal(arr, _data(37)[name])
        assert zlib.crc32(raw[offset:offset + nbytes]) == crc


def test_backends_write_identical_bytes_and_read_each_other(tmp_path):
    if store_ext() is None:
        pytest.skip("extension not built")
    a, b = tmp_path / "a.cdul", tmp_path / "b.cdul"
    _make(a, "numpy")
    _make(b, "ext")
    assert a.read_bytes() == b.read_bytes()
    with LabelStore.open(a, backend="ext") as st:
        np.testing.assert_array_equal(st.array("final"), _data(37)["final"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_order_and_interruption_do_not_change_the_bytes(tmp_path, backend):
    ref, shuffled, torn = tmp_path / "ref.cdul", tmp_path / "shuf.cdul", tmp_path / "torn.cdul"
    _make(ref, backend)
    _make(shuffled, backend, order=[32, 8, 24, 0, 16])
    data = _data(37)
    st = LabelStore.create(torn, CLASSES, 37, ["final", "global"], meta={"k": 1}, backend=backend)
    st.write(0, {k: v[0:8] for k, v in data.items()})
    st.flush()
    del st  # abandoned without close: the file stays WRITING (the process could have died here)
    with LabelStore.open(torn, mode="r+", backend=backend) as st:
        assert not st.clean and list(st.pending_rows()[:3]) == [8, 9, 10]
        for start in range(8, 37, 8):
            st.write(start, {k: v[start:start + 8] for k, v in data.items()})
    assert ref.read_bytes() == shuffled.read_bytes() == torn.read_bytes()


_WRITER = """
import os, signal, sys
import numpy as np
from cdul_fast.store.label_store import LabelStore
path, backend, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
rng = np.random.default_rng(0)
data = rng.random((64, 5), dtype=np.float32)
st = (LabelStore.open(path, mode="r+", backend=backend) if resume else
      LabelStore.create(path, ["cat", "dog", "bird", "car", "tree"], 64, ["final"], meta={"k": 1}, backend=backend))
for start in st.pending_rows()[::4]:
    st.write(int(start), {"final": data[start:start + 4]})
    if not resume and start == 20:
        os.kill(os.getpid(), signal.SIGKILL)
st.close()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_then_resume_is_byte_identical(tmp_path, backend):
    whole, killed = tmp_path / "whole.cdul", tmp_path / "killed.cdul"
    run = [sys.executable, "-c", _WRITER]
    subprocess.run([*run, str(whole), backend, "0"], check=False)  # killed at row 20 too...
    subprocess.run([*run, str(whole), backend, "1"], check=True)   # ...so finish it: reference built the same way
    proc = subprocess.run([*run, str(killed), backend, "0"])
    assert proc.returncode == -signal.SIGKILL
    with LabelStore.open(killed, backend=backend) as st:
        assert not st.clean and 0 < int((np.asarray(st.done) == 1).sum()) < 64
    subprocess.run([*run, str(killed), backend, "1"], check=True)
    direct = tmp_path / "direct.cdul"
    data = np.random.default_rng(0).random((64, 5), dtype=np.float32)
    with LabelStore.create(direct, CLASSES, 64, ["final"], meta={"k": 1}, backend=backend) as st:
        st.write(0, {"final": data})
    assert killed.read_bytes() == whole.read_bytes() == direct.read_bytes()


# ------------------------------------------------------------------------------------------------------ corruption


def _corrupt(path: Path, offset: int, value: bytes | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] = (raw[offset] ^ 0xFF) if value is None else value[0]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,message", [
    ("magic", "not a cdul-fast label store"),
    ("version", "format version"),
    ("header", "header is corrupted"),
    ("meta", "header is corrupted"),
    ("meta-padding", "header is corrupted"),
    ("done", "done map checksum mismatch"),
    ("array", "array 'global' checksum mismatch"),
    ("truncate", "truncated"),
    ("append", "longer than its header says"),
    ("tiny", "truncated"),
    ("empty", "truncated"),
])
def test_damage_is_detected_with_a_clear_error(tmp_path, backend, case, message):
    path = tmp_path / "s.cdul"
    _make(path, backend)
    raw = path.read_bytes()
    if case == "magic":
        _corrupt(path, 0)
    elif case == "version":
        path.write_bytes(raw[:8] + struct.pack("<I", 7) + raw[12:])
    elif case == "header":
        _corrupt(path, 24)  # rows
    elif case == "meta":
        _corrupt(path, PAGE + 3)
    elif case == "meta-padding":  # past the JSON, inside the reserved region: still covered by the header CRC
        meta_nbytes = struct.unpack_from("<Q", raw, 56)[0]
        _corrupt(path, PAGE + meta_nbytes + 10)
    elif case == "done":
        done_offset = struct.unpack_from("<Q", raw, 64)[0]
        _corrupt(path, done_offset + 5)
    elif case == "array":
        offset = struct.unpack_from("<32sIIQQ", raw, 128 + 56)[3]
        _corrupt(path, offset + 100)
    elif case == "truncate":
        path.write_bytes(raw[:-PAGE])
    elif case == "append":
        path.write_bytes(raw + b"\0")
    elif case == "tiny":
        path.write_bytes(raw[:100])
    elif case == "empty":
        path.write_bytes(b"")
    with pytest.raises(StoreError, match=message) as info:
        LabelStore.open(path, backend=backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_mismatch_exists_and_mode_errors(tmp_path, backend):
    path = tmp_path / "s.cdul"
    _make(path, backend)
    with pytest.raises(StoreError, match="missing horse; extra car"):
        LabelStore.open(path, expect_classes=("cat", "dog", "bird", "horse", "tree"), backend=backend)
    with pytest.raises(StoreError, match="different order"):
        LabelStore.open(path, expect_classes=tuple(reversed(CLASSES)), backend=backend)
    with pytest.raises(StoreError, match="already exists"):
        LabelStore.create(path, CLASSES, 3, ["final"], backend=backend)
    with LabelStore.open(path, backend=backend) as st:
        with pytest.raises(StoreError, match="read-only"):
            st.write(0, {"final": np.zeros((1, 5))})
        with pytest.raises(StoreError, match="no array 'nope'"):
            st.array("nope")
    with pytest.raises(StoreError, match="not found"):
        LabelStore.open(tmp_path / "missing.cdul", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_writer_is_refused(tmp_path, backend):
    path = tmp_path / "s.cdul"
    _make(path, backend)
    with LabelStore.open(path, mode="r+", backend=backend):
        with pytest.raises(StoreError, match="locked by another process"):
            LabelStore.open(path, mode="r+", backend=backend)
        code = ("import sys\nfrom cdul_fast.store.label_store import LabelStore\n"
                "from cdul_fast.errors import StoreError\n"
                f"try:\n    LabelStore.open({str(path)!r}, mode='r+', backend={backend!r})\n"
                "except StoreError as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 3 and "locked" in proc.stdout
    with LabelStore.open(path, mode="r+", backend=backend):  # released on close
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_validation_meta_update_and_empty_store(tmp_path, backend):
    path = tmp_path / "s.cdul"
    st = LabelStore.create(path, CLASSES, 4, ["final", "global"], backend=backend)
    with pytest.raises(StoreError, match=r"must be \[n, 5\]"):
        st.write(0, {"final": np.zeros((2, 4))})
    with pytest.raises(StoreError, match="same number of rows"):
        st.write(0, {"final": np.zeros((2, 5)), "global": np.zeros((3, 5))})
    with pytest.raises(StoreError, match="outside"):
        st.write(3, {"final": np.zeros((2, 5))})
    st.update_meta({"note": "x" * 1000})
    with pytest.raises(StoreError, match="does not fit"):
        st.update_meta({"note": "x" * (1 << 20)})
    assert st.pending_rows().tolist() == [0, 1, 2, 3] and not st.is_complete
    st.write(0, {"final": np.ones((4, 5))})
    assert st.is_complete
    st.close()
    st.close()  # idempotent
    with LabelStore.open(path, backend=backend) as st:
        assert st.meta == {"note": "x" * 1000} and float(np.asarray(st.array("global")).sum()) == 0.0
    empty = tmp_path / "e.cdul"
    LabelStore.create(empty, CLASSES, 0, ["final"], backend=backend).close()
    with LabelStore.open(empty, backend=backend) as st:
        assert st.rows == 0 and st.array("final").shape == (0, 5) and st.is_complete
    for bad in ([], ["a", "a"], ["x" * 40]):
        with pytest.raises(StoreError):
            LabelStore.create(tmp_path / "bad.cdul", CLASSES, 1, bad, backend=backend)
    assert not (tmp_path / "bad.cdul").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


# A 7 x 3 store written by commit 2e98d3b's extension backend, whose CRC-32 was a hand-written slicing-by-8 loop:
# rows 0-5 of "final" = arange(18) / 32, of "global" = 1 - that, row 6 skipped; zlib-compressed, base64.
_OLD_STORE = (
    "eNrt2L1Km1EcwOETHeroKHQJZ+rgIHWxAU2gDh0ES2uh0BZ9Y6INxCgmoK0IAW+gl9BLqHMXh04dSi/BO2gvof98CS7iqPZ54HfO+z2c7bzPV9+"
    "svd5Yf1VKKX3+8/58KuZBj9LI9HhOs5OD0nBcvbo+Op88f9ldOxse1ErpNnZanaJ9w/3BVx7P/fiVyqPvbYyv77b36ze9OHj64OfR97Rw/T0AAA"
    "D4H53k7XbR7W52ir1mN1fe5e2il+dzY383xnrrsJE/zOe9Zq/IlZN8dNjq9ZqdzfqnXMlPm8+WGov1fHpqFQEAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAO6/0tCUhQAAAICHbzmlfnQRpZWUylEt2or60Zfoa/Qtuoh+R5fR3yhVU5qp"
    "WkIAAAC4y/qxdz+ODqKP0Vb0NnoZvYhq0VK0ED2JytFcNDvZ91fH/wEAAACAO+ofrG89OQ=="
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_written_before_the_zlib_checksums_still_verifies(tmp_path, backend):
    """Both backends checksum with zlib.crc32 now; format v1 is unchanged, so an older store opens, verifies and is
    sealed again to the very same bytes."""
    raw = zlib.decompress(base64.b64decode(_OLD_STORE))
    path = tmp_path / "old.cdul"
    path.write_bytes(raw)
    header_crc, done_offset, done_nbytes, done_crc = (struct.unpack_from("<I", raw, 12)[0],
                                                      *struct.unpack_from("<QQI", raw, 64))
    zeroed = bytearray(raw[:PAGE])
    zeroed[12:16] = bytes(4)
    meta_capacity = struct.unpack_from("<Q", raw, 48)[0]
    assert zlib.crc32(raw[PAGE:PAGE + meta_capacity], zlib.crc32(zeroed)) == header_crc
    assert zlib.crc32(raw[done_offset:done_offset + done_nbytes]) == done_crc
    for i in range(2):
        _, _, crc, offset, nbytes = struct.unpack_from("<32sIIQQ", raw, 128 + 56 * i)
        assert zlib.crc32(raw[offset:offset + nbytes]) == crc
    vals = np.arange(18, dtype=np.float32).reshape(6, 3) / 32
    with LabelStore.open(path, backend=backend, expect_classes=("cat", "dog", "bird")) as st:
        assert st.clean and st.meta == {"written_by": "2e98d3b"} and st.done.tolist() == [1] * 6 + [2]
        np.testing.assert_array_equal(st.array("final")[:6], vals)
        np.testing.assert_array_equal(st.array("global")[:6], 1 - vals)
    LabelStore.open(path, mode="r+", backend=backend).close()  # fresh CRCs, state CLEAN again
    assert path.read_bytes() == raw


def _state_on_disk(path: Path) -> int:
    return struct.unpack_from("<I", path.read_bytes(), 16)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_state_verify_and_header_check(tmp_path, backend):
    """r+ marks WRITING on disk at once; a WRITING store skips data CRCs but never the header CRC."""
    path = tmp_path / "s.cdul"
    _make(path, backend)
    assert _state_on_disk(path) == 2
    st = LabelStore.open(path, mode="r+", backend=backend)
    assert _state_on_disk(path) == 1 and not st.clean
    st.array("final")[0, 0] = 7.0
    st.flush()
    del st  # "crash": left WRITING with data that no longer matches the old CRCs
    with LabelStore.open(path, backend=backend) as st:
        assert not st.clean and st.array("final")[0, 0] == 7.0
    _corrupt(path, 24)
    with pytest.raises(StoreError, match="header is corrupted"):
        LabelStore.open(path, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_false_opens_a_damaged_clean_store(tmp_path, backend):
    path = tmp_path / "s.cdul"
    _make(path, backend)
    offset = struct.unpack_from("<32sIIQQ", path.read_bytes(), 128)[3]
    _corrupt(path, offset)
    with pytest.raises(StoreError, match="array 'final' checksum mismatch; delete it"):
        LabelStore.open(path, backend=backend)
    with LabelStore.open(path, backend=backend, verify=False) as st:
        assert st.clean and st.rows == 37


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_replaces_but_never_a_store_in_use(tmp_path, backend):
    path = tmp_path / "s.cdul"
    _make(path, backend)
    with LabelStore.open(path, mode="r+", backend=backend):
        with pytest.raises(StoreError, match="locked by another process"):
            LabelStore.create(path, CLASSES, 3, ["final"], overwrite=True, backend=backend)
    with LabelStore.open(path, backend=backend) as st:  # untouched by the refused overwrite
        assert st.rows == 37
    with LabelStore.create(path, ("a", "b"), 3, ["x"], meta={"v": 2}, overwrite=True, backend=backend) as st:
        assert _state_on_disk(path) == 1 and st.pending_rows().tolist() == [0, 1, 2]
    with LabelStore.open(path, backend=backend, expect_classes=("a", "b")) as st:
        assert st.meta == {"v": 2} and st.array_names == ("x",) and st.clean
    fresh = tmp_path / "fresh.cdul"
    LabelStore.create(fresh, ("a", "b"), 3, ["x"], meta={"v": 2}, backend=backend).close()
    assert fresh.read_bytes() == path.read_bytes()  # an overwritten store is the same as a fresh one


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_validation(tmp_path, backend):
    path = tmp_path / "s.cdul"
    for kwargs, message in [({"rows": -1}, "rows must be"), ({"rows": 2.5}, "rows must be"),
                            ({"class_names": []}, "at least one class"), ({"class_names": ["a", "a"]}, "unique"),
                            ({"meta": {"f": object()}}, "plain JSON"), ({"meta": {"n": float("nan")}}, "plain JSON"),
                            ({"arrays": ["a" * 32]}, "1..31 bytes"), ({"arrays": [f"a{i}" for i in range(33)]},
                                                                      "at most 31 label arrays")]:
        args = {"class_names": CLASSES, "rows": 4, "arrays": ["final"], **kwargs}
        with pytest.raises(StoreError, match=message):
            LabelStore.create(path, backend=backend, **args)
        assert not path.exists()
    with pytest.raises(StoreError, match="mode must be"):
        LabelStore.open(path, mode="w", backend=backend)
    with pytest.raises(StoreError, match="backend must be"):
        LabelStore.create(path, CLASSES, 4, ["final"], backend="cuda")
    with LabelStore.create(path, CLASSES, 4, ["final", "global"], backend=backend) as st:
        with pytest.raises(StoreError, match="real numbers"):
            st.write(0, {"final": np.full((1, 5), "x")})
        with pytest.raises(StoreError, match="real numbers"):
            st.write(0, {"final": np.zeros((1, 5), np.complex64)})
        with pytest.raises(StoreError, match="no array 'nope'"):  # checked before anything is written
            st.write(0, {"final": np.ones((1, 5)), "nope": np.ones((1, 5))})
        assert float(st.array("final").sum()) == 0.0 and st.pending_rows().size == 4
        st.write(1, {"final": np.arange(10, dtype=np.float64).reshape(2, 5), "global": np.ones((2, 5), np.int32)})
        assert st.array("final").dtype == np.float32 and st.array("final")[2, 4] == 9.0
        assert st.pending_rows().tolist() == [0, 3]
        st.done[0] = 2  # skipped rows count as finished, stay zero
        assert st.pending_rows().tolist() == [3] and not st.is_complete
    with pytest.raises(StoreError, match="read-only"):
        with LabelStore.open(path, backend=backend) as st:
            st.update_meta({})


def test_auto_falls_back_to_numpy_without_the_extension(tmp_path, monkeypatch):
    import cdul_fast.store.label_store as store_mod

    monkeypatch.setattr(store_mod, "store_ext", lambda: None)
    path = tmp_path / "s.cdul"
    _make(path, "auto")
    with LabelStore.open(path) as st:
        assert st.backend == "numpy" and st.is_complete
    with pytest.raises(StoreError, match="'ext' asked for but cdul_fast._store is not built"):
        LabelStore.open(path, backend="ext")


# ------------------------------------------------------------------------------------------- version 3: tensors


def _make_tensors(path: Path, backend: str, rows: int = 23, dtype: str = "float16") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    data = {"final": rng.random((rows, len(CLASSES)), dtype=np.float32),
            "embeddings": rng.standard_normal((rows, 10, 6)).astype(np.float32)}
    st = LabelStore.create(path, CLASSES, rows, ["final"], meta={"k": 1}, backend=backend,
                           file_stats=np.arange(rows * 2).reshape(rows, 2),
                           tensors={"embeddings": (dtype, (10, 6))})
    for start in range(0, rows, 5):
        st.write(start, {k: v[start:start + 5] for k, v in data.items()})
    st.close()
    return data


def _entry(raw: bytes, i: int) -> tuple:
    return struct.unpack_from("<32sIIQQ", raw, 128 + 56 * i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tensors_round_trip_in_their_dtype_and_shape_readable_with_plain_numpy(tmp_path, backend, dtype):
    path = tmp_path / "s.cdul"
    data = _make_tensors(path, backend, dtype=dtype)
    raw = path.read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == 3
    with LabelStore.open(path, backend=backend) as st:
        emb = st.tensor("embeddings")
        assert st.tensor_names == ("embeddings",) and st.array_names == ("final",)
        assert emb.dtype == np.dtype(dtype) and emb.shape == (23, 10, 6)
        np.testing.assert_array_equal(emb, data["embeddings"].astype(dtype))
        np.testing.assert_array_equal(st.array("final"), data["final"])
    name, code, _, offset, nbytes = _entry(raw, 2)  # final, file_stat, embeddings
    assert name.rstrip(b"\0") == b"embeddings" and nbytes == 23 * 10 * 6 * np.dtype(dtype).itemsize
    assert struct.unpack_from("<4I", raw, 1920 + 16 * 2) == (2, 10, 6, 0)  # the shape table
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(23, 10, 6))
    np.testing.assert_array_equal(mm, data["embeddings"].astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stores_without_tensors_keep_their_older_version(tmp_path, backend):
    a, b = tmp_path / "a.cdul", tmp_path / "b.cdul"
    _make(a, backend)
    LabelStore.create(b, CLASSES, 3, ["final"], file_stats=np.zeros((3, 2), int), backend=backend).close()
    assert struct.unpack_from("<I", a.read_bytes(), 8)[0] == 1
    assert struct.unpack_from("<I", b.read_bytes(), 8)[0] == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,message", [
    ("data", "array 'embeddings' checksum mismatch"),
    ("shape", "header is corrupted"),
    ("ndim", "header is corrupted"),
    ("version", "header is corrupted"),
])
def test_damaged_tensors_are_detected(tmp_path, backend, case, message):
    path = tmp_path / "s.cdul"
    _make_tensors(path, backend)
    raw = bytearray(path.read_bytes())
    offset = _entry(bytes(raw), 2)[3]
    if case == "data":
        raw[offset + 77] ^= 0x10
    elif case == "shape":  # a consistent-looking shape that does not fit nbytes (header CRC recomputed: a forgery)
        struct.pack_into("<4I", raw, 1920 + 32, 2, 10, 7, 0)
    elif case == "ndim":
        struct.pack_into("<4I", raw, 1920 + 32, 0, 0, 0, 0)
    elif case == "version":  # a version 2 file cannot hold tensors
        struct.pack_into("<I", raw, 8, 2)
    if case != "data":  # re-seal the header so only the layout check can catch it
        meta_capacity = struct.unpack_from("<Q", raw, 48)[0]
        page = bytearray(raw[:PAGE])
        page[12:16] = b"\0\0\0\0"
        crc = zlib.crc32(bytes(raw[PAGE:PAGE + meta_capacity]), zlib.crc32(bytes(page)))
        struct.pack_into("<I", raw, 12, crc)
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=message):
        LabelStore.open(path, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_writes_are_validated_and_rows_cleared(tmp_path, backend):
    path = tmp_path / "s.cdul"
    _make_tensors(path, backend)
    with LabelStore.open(path, "r+", backend=backend) as st:
        with pytest.raises(StoreError, match=r"must be \[n, 10, 6\]"):
            st.write(0, {"final": np.zeros((1, 5)), "embeddings": np.zeros((1, 10, 5))})
        with pytest.raises(StoreError, match="no tensor 'emb'"):
            st.tensor("emb")
        st.clear_rows(np.array([1, 4]))
        assert not st.tensor("embeddings")[[1, 4]].any() and not st.array("final")[[1, 4]].any()
        assert st.tensor("embeddings")[0].any()
    for bad, message in [({"x": ("float64", (3,))}, "dtype must be one of"), ({"x": ("float16", ())}, "1..3 dims"),
                         ({"x": ("float16", (2, 0))}, "1..3 dims"), ({"final": ("float16", (2,))}, "unique")]:
        with pytest.raises(StoreError, match=message):
            LabelStore.create(tmp_path / "t.cdul", CLASSES, 2, ["final"], tensors=bad, backend=backend)
