"""The C++ extension ``cdul_fast.store._store``: its fused CPU latent update against the torch twin
(``cdul_fast.ops.reference.latent_update_``), input validation, the dispatch wiring, and the version check that turns a
stale build into the fallback. Tests that need the extension skip cleanly when it is not built."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cdul_fast import _backend
from cdul_fast._backend import store_ext
from cdul_fast.ops import dispatch as ops
from cdul_fast.ops import reference

EXT = store_ext()
needs_ext = pytest.mark.skipif(EXT is None, reason="extension not built (pip install -e .)")

C1, SIGMA = 1.0, 0.25
C2 = reference.psi_c2_auto(C1, SIGMA)
LR = 0.5
# avx2=False forces the baseline loop; where the CPU has no AVX2 + FMA both ids run that same loop.
ISAS = [pytest.param(True, id="avx2"), pytest.param(False, id="baseline")]


def _inputs(M: int, C: int, pred_dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents over the whole useful range and predictions with the edge values 0, 1 and 1e-9 (clamped by eps)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(0.0, 4.0, (M, C)).astype(np.float32)
    pred = rng.random((M, C), dtype=np.float32)
    flat_l, flat_p = latent.reshape(-1), pred.reshape(-1)
    flat_p[:3] = [0.0, 1.0, 1e-9][: flat_p.size]
    flat_l[-3:] = [90.0, -90.0, 0.0][-flat_l.size:]  # past the clamp of the C++ exp, and the centre of psi
    return latent, pred.astype(pred_dtype)


def _twin(latent: np.ndarray, pred: np.ndarray, use_psi: bool, labels: bool, eps: float = 1e-6
          ) -> tuple[np.ndarray, np.ndarray | None]:
    lat = torch.from_numpy(latent.copy())
    lab = torch.empty_like(lat) if labels else None
    reference.latent_update_(lat, torch.from_numpy(pred), C1, SIGMA, C2, LR, use_psi, eps, lab)
    return lat.numpy(), (lab.numpy() if lab is not None else None)


def _close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)


# ------------------------------------------------------------------------------------------- parity with torch


@needs_ext
@pytest.mark.parametrize("avx2", ISAS)
@pytest.mark.parametrize("use_psi", [True, False], ids=["psi", "nopsi"])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("pred_dtype", [np.float32, np.float16], ids=["pred32", "pred16"])
@pytest.mark.parametrize("shape", [(1, 1), (37, 81), (1000, 81), (5, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_latent_update_matches_the_torch_twin(shape, pred_dtype, labels, use_psi, avx2):
    latent, pred = _inputs(*shape, pred_dtype)
    want_lat, want_lab = _twin(latent, pred, use_psi, labels)
    results = []
    # 1000 x 81 = 81000 elements: 2, 3 and 5 parts of unequal length (16K-element grain), 0 = all hardware threads
    for threads in (1, 2, 3, 5, 7, 0):
        lat = latent.copy()
        lab = np.full(shape, -1.0, np.float32) if labels else None
        EXT.latent_update(lat, pred, C1, SIGMA, C2, LR, use_psi, 1e-6, lab, threads, avx2)
        _close(lat, want_lat, rtol=1e-6, atol=1e-5)
        if labels:
            _close(lab, want_lab, rtol=0, atol=1e-6)
        results.append((lat, lab))
    for lat, lab in results[1:]:  # elementwise work: the split never changes a bit
        np.testing.assert_array_equal(lat, results[0][0])
        if labels:
            np.testing.assert_array_equal(lab, results[0][1])


@needs_ext
@pytest.mark.parametrize("avx2", ISAS)
def test_every_fp16_probability_is_converted_exactly(avx2):
    """All 15359 positive halves below 1 (subnormals included) as pred: latent 0, lr 1, no psi gives logit(pred), so
    a half converted even one half-ulp off would move the result far past the tolerance."""
    pred = np.arange(1, 0x3C00, dtype=np.uint16).view(np.float16)
    eps = 2.0**-25  # below the smallest half, so no value is clamped (and 1 - eps rounds to 1 in float32)
    got = np.zeros(pred.shape, np.float32)
    EXT.latent_update(got, pred, C1, SIGMA, C2, 1.0, False, eps, None, 2, avx2)
    want = torch.zeros(pred.shape)
    reference.latent_update_(want, torch.from_numpy(pred), C1, SIGMA, C2, 1.0, False, eps)
    _close(got, want.numpy(), rtol=1e-6, atol=1e-5)
    p64 = pred.astype(np.float64)
    np.testing.assert_allclose(got, np.log(p64 / (1 - p64)), rtol=1e-6, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("avx2", ISAS)
@pytest.mark.parametrize("pred_dtype", [np.float32, np.float16], ids=["pred32", "pred16"])
def test_nan_and_infinite_predictions_behave_like_torch(pred_dtype, avx2):
    pred = np.array([[np.nan, np.inf, -np.inf, -1.0, 2.0, 0.5]], pred_dtype)
    for use_psi in (True, False):
        lat = np.full(pred.shape, 0.3, np.float32)
        lab = np.empty_like(lat)
        EXT.latent_update(lat, pred, C1, SIGMA, C2, LR, use_psi, 1e-6, lab, 1, avx2)
        want_lat, want_lab = _twin(np.full(pred.shape, 0.3, np.float32), pred, use_psi, True)
        assert np.isnan(lat[0, 0]) and np.isnan(lab[0, 0])
        _close(lat, want_lat, rtol=1e-6, atol=1e-5)
        _close(lab, want_lab, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- memmap and dispatch


@needs_ext
@pytest.mark.parametrize("pred_dtype", [np.float32, np.float16], ids=["pred32", "pred16"])
def test_dispatch_runs_the_extension_in_place_on_a_memmap(tmp_path: Path, monkeypatch, pred_dtype):
    M, C = 1000, 81
    latent, pred = _inputs(M, C, pred_dtype, seed=1)
    lat_mm = np.memmap(tmp_path / "latent.f32", np.float32, "w+", shape=(M, C))
    lat_mm[:] = latent
    np.memmap(tmp_path / "pred.bin", pred_dtype, "w+", shape=(M, C))[:] = pred
    pred_ro = np.memmap(tmp_path / "pred.bin", pred_dtype, "r", shape=(M, C))
    lab_mm = np.memmap(tmp_path / "labels.f32", np.float32, "w+", shape=(M, C))

    calls = []
    real = EXT.latent_update
    monkeypatch.setattr(EXT, "latent_update", lambda lat, *a: calls.append(lat) or real(lat, *a))
    monkeypatch.setattr(reference, "latent_update_", lambda *a: pytest.fail("the torch twin ran"))
    ops.latent_update_stream(lat_mm, pred_ro, C1, SIGMA, C2, LR, True, device="cpu", chunk_rows=128,
                             labels_out_np=lab_mm)
    assert len(calls) == 1 and calls[0] is lat_mm  # one call on the memmap itself: no chunk copies
    lat_mm.flush()
    lab_mm.flush()
    monkeypatch.undo()
    want_lat, want_lab = _twin(latent, np.array(pred_ro), True, True)
    _close(np.fromfile(tmp_path / "latent.f32", np.float32).reshape(M, C), want_lat, rtol=1e-6, atol=1e-5)
    _close(np.fromfile(tmp_path / "labels.f32", np.float32).reshape(M, C), want_lab, rtol=0, atol=1e-6)


@needs_ext
def test_dispatch_keeps_the_torch_twin_when_asked(monkeypatch):
    latent, pred = _inputs(37, 81, np.float32)
    monkeypatch.setattr(EXT, "latent_update", lambda *a: pytest.fail("the extension ran for backend='torch'"))
    lat = latent.copy()
    ops.latent_update_stream(lat, pred, C1, SIGMA, C2, LR, True, backend="torch")
    np.testing.assert_array_equal(lat, _twin(latent, pred, True, False)[0])  # the same torch code: bit for bit


# -------------------------------------------------------------------------------------------------- bad inputs


def _good() -> dict:
    return {"latent": np.zeros((4, 8), np.float32), "pred": np.full((4, 8), 0.5, np.float32),
            "labels_out": np.zeros((4, 8), np.float32)}


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@needs_ext
@pytest.mark.parametrize("name,value,match", [
    ("latent", np.zeros((4, 8), np.float64), "latent must be float32, got buffer format 'd'"),
    ("latent", _readonly(np.zeros((4, 8), np.float32)), "latent must be writeable"),
    ("latent", np.zeros((8, 4), np.float32).T, "latent must be C-contiguous"),
    ("latent", np.zeros(64, np.float32)[::2], "latent must be C-contiguous"),  # 1-D strides are checked too
    ("pred", np.zeros((4, 9), np.float32), r"pred shape \(4, 9\) != latent shape \(4, 8\)"),
    ("pred", np.zeros((4, 8), np.int32), "pred must be float32 or float16"),
    ("pred", np.zeros((4, 8), ">f4"), "pred must be float32 or float16"),
    ("pred", np.zeros((4, 16), np.float16)[:, ::2], "pred must be C-contiguous"),
    ("labels_out", np.zeros((4, 8), np.float16), "labels_out must be float32"),
    ("labels_out", _readonly(np.zeros((4, 8), np.float32)), "labels_out must be writeable"),
    ("labels_out", np.zeros((32,), np.float32), r"labels_out shape \(32,\) != latent shape \(4, 8\)"),
])
def test_bad_buffers_raise_one_line_value_errors(name, value, match):
    args = _good() | {name: value}
    if name == "latent" and value.shape != (4, 8):
        args["pred"] = args["labels_out"] = np.full(value.shape, 0.5, np.float32)
    before = args["latent"].copy()
    with pytest.raises(ValueError, match=match) as info:
        EXT.latent_update(args["latent"], args["pred"], C1, SIGMA, C2, LR, True, 1e-6, args["labels_out"], 1)
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(args["latent"], before)  # checked before anything is written


# --------------------------------------------------------------------------------------------- version / probe


@pytest.fixture
def fresh_probe(monkeypatch):
    """store_ext() probed anew in the test, and again by whatever runs after it (the probe is cached)."""
    monkeypatch.delenv("CDUL_FAST_QUIET_FALLBACK", raising=False)
    store_ext.cache_clear()
    yield
    store_ext.cache_clear()


def _probe_twice() -> tuple[object, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = store_ext(), store_ext()
    assert first is second
    return first, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@needs_ext
def test_the_built_extension_has_the_expected_version():
    assert EXT.ABI_VERSION == _backend.STORE_EXT_ABI
    assert not hasattr(EXT, "crc32")  # checksums are zlib's, in Python, for both backends
    assert isinstance(EXT.HAS_AVX2_FMA, bool)


@needs_ext
def test_a_stale_extension_falls_back_with_one_warning(monkeypatch, fresh_probe):
    monkeypatch.setattr(_backend, "STORE_EXT_ABI", EXT.ABI_VERSION + 1)
    found, caught = _probe_twice()
    assert found is None and len(caught) == 1
    msg = str(caught[0].message)
    assert EXT.__file__ in msg and "stale" in msg and "pip install -e ." in msg
    assert f"ABI version {EXT.ABI_VERSION}" in msg and "slower checksums" not in msg
    latent, pred = _inputs(37, 81, np.float32)
    lat = latent.copy()
    ops.latent_update_stream(lat, pred, C1, SIGMA, C2, LR, True)  # auto: the torch twin now, bit for bit
    np.testing.assert_array_equal(lat, _twin(latent, pred, True, False)[0])


def test_a_missing_extension_falls_back_with_one_warning(monkeypatch, fresh_probe):
    def no_module(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_backend, "importlib", SimpleNamespace(import_module=no_module))
    found, caught = _probe_twice()
    assert found is None and len(caught) == 1
    msg = str(caught[0].message)
    assert "not available" in msg and "numpy.memmap fallback" in msg and "pip install -e ." in msg
