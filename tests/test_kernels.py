"""Triton kernels (aggregation, latent update) against ``cdul_fast.ops.reference``, plus the dispatch in
``cdul_fast.ops.dispatch``.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py),
so batches are small while C and G take their real values. Tests marked ``gpu`` repeat the parity on CUDA tensors.

Low-precision rule (fp16/bf16 scores): the kernel's max abs error against the fp32 reference on the unrounded scores
must be <= 2x the error of torch doing the same math with inputs and ops in that dtype, plus an absolute floor of
1e-6 (LOWP_FLOOR: about 10 fp32 ulps of a probability near 1, so an output where torch's low-precision error happens
to be ~0 does not fail on the kernel's fp32 rounding).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdul_fast._backend import store_ext
from cdul_fast.ops import dispatch as ops
from cdul_fast.ops import kernels, reference

cdul_aggregate, latent_update_ = kernels.cdul_aggregate, kernels.latent_update_
OUTPUTS = ops.OUTPUTS

LOWP_FLOOR = 1e-6
LOGIT_SCALE = 100.0
C1, SIGMA = 1.0, 0.25
C2 = reference.psi_c2_auto(C1, SIGMA)

gpu = pytest.mark.gpu


# ------------------------------------------------------------------------------------------------------- helpers


def _cos(B: int, G: int, C: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """CLIP-like cosines [B, 1 + G*G, C]: ~0.2 background, a few classes ~0.08 higher in some views."""
    gen = torch.Generator().manual_seed(seed)
    V = 1 + G * G
    cos = 0.2 + 0.02 * torch.randn(B, V, C, generator=gen)
    present = torch.rand(B, 1, C, generator=gen) < 3.0 / C
    visible = torch.rand(B, V, 1, generator=gen) < 0.6
    cos = cos + 0.08 * (present & visible)
    return cos.to(device)


def _ref_all(cos: torch.Tensor, logit_scale: float, zeta: float, lam: float) -> dict[str, torch.Tensor]:
    """Every output of the torch twin (the oracle), computed from the same inputs."""
    return reference.cdul_aggregate(cos, logit_scale, zeta, lam, OUTPUTS)


def _ref_latent(latent: torch.Tensor, pred: torch.Tensor, *args) -> torch.Tensor:
    """The torch twin's in-place update applied to a copy (the kernel under test gets the original)."""
    return reference.latent_update_(latent.clone(), pred, *args)


def _mid_zeta(cos: torch.Tensor) -> float:
    """A zeta inside the spread of per-class snippet maxima, so both branches of eq. 6 are taken: the midpoint of
    the widest (relative) gap between sorted maxima in the middle half, so no alpha sits within rounding of it."""
    alpha = reference.view_softmax(cos.float(), LOGIT_SCALE)[:, 1:].amax(dim=1).flatten().sort().values.double()
    n = alpha.numel()
    if n < 2:
        return float(alpha[0]) * 0.5
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    gaps = (alpha[lo + 1 : hi + 1] - alpha[lo:hi]) / alpha[lo + 1 : hi + 1]
    i = lo + int(gaps.argmax())
    return float(0.5 * (alpha[i] + alpha[i + 1]))


def _torch_lowp(cos: torch.Tensor, zeta: float, lam: float) -> dict[str, torch.Tensor]:
    """The reference math with every op in cos.dtype (what torch eager would do without upcasting)."""
    s = torch.softmax(cos * LOGIT_SCALE, dim=-1)
    g, loc = s[:, 0], s[:, 1:]
    alpha, beta = loc.amax(dim=1), loc.amin(dim=1)
    ag = torch.where(alpha >= zeta, alpha, beta)
    return {"global": g, "aggregate": ag, "cdul": 0.5 * (g + ag + lam * (g - ag).abs()), "avg": s.mean(1),
            "max": s.amax(1)}


def _assert_outputs(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names, atol: float = 1e-6) -> None:
    assert list(out) == list(names)
    for n in names:
        assert out[n].dtype == torch.float32 and out[n].is_contiguous(), n
        assert out[n].shape == ref[n].shape, n
        torch.testing.assert_close(out[n].cpu(), ref[n].cpu(), rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _lowp_ratios(cos32: torch.Tensor, dtype: torch.dtype, zeta: float, lam: float) -> dict[str, tuple[float, float]]:
    """Per output: (kernel error, torch-in-dtype error), both max abs against the fp32 reference."""
    ref = _ref_all(cos32, LOGIT_SCALE, zeta, lam)
    low = cos32.to(dtype)
    out = cdul_aggregate(low, LOGIT_SCALE, zeta, lam, OUTPUTS)
    tl = _torch_lowp(low, zeta, lam)
    return {n: ((out[n] - ref[n]).abs().max().item(), (tl[n].float() - ref[n]).abs().max().item()) for n in OUTPUTS}


# -------------------------------------------------------------------------------------------- aggregation kernel

SHAPES = [(C, G, B) for (C, G), B in zip(itertools.product((20, 80, 81, 1000), (2, 3, 4)), itertools.cycle((1, 3, 7)))]


@pytest.mark.parametrize("C,G,B", SHAPES, ids=[f"C{C}-G{G}-B{B}" for C, G, B in SHAPES])
def test_aggregate_parity_fp32(C: int, G: int, B: int) -> None:
    cos = _cos(B, G, C, seed=C + G + B)
    for zeta in (0.0, _mid_zeta(cos), 1.1):
        for lam in (0.0, 0.5, 1.0):
            out = cdul_aggregate(cos, LOGIT_SCALE, zeta, lam, OUTPUTS)
            _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, zeta, lam), OUTPUTS)


def test_aggregate_zeta_takes_both_branches() -> None:
    """Guards the test data: the mid zeta really mixes alpha and beta."""
    cos = _cos(7, 3, 80)
    local = reference.view_softmax(cos, LOGIT_SCALE)[:, 1:]
    take_alpha = local.amax(dim=1) >= _mid_zeta(cos)
    assert take_alpha.any() and not take_alpha.all()


SUBSETS = [s for r in range(1, len(OUTPUTS) + 1) for s in itertools.combinations(OUTPUTS, r)]


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_aggregate_output_subsets(names: tuple[str, ...]) -> None:
    """Every subset: exactly those keys, and several programs of block_b=2 images with a ragged last one."""
    cos = _cos(5, 3, 81, seed=1)
    zeta = _mid_zeta(cos)
    out = cdul_aggregate(cos, LOGIT_SCALE, zeta, 0.5, names, block_b=2)
    _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, zeta, 0.5), names)


@pytest.mark.parametrize("names", [("cdul",), ("global",), ("avg", "max"), OUTPUTS], ids="+".join)
@pytest.mark.parametrize("C,max_block_c", [(1000, 256), (81, 32), (20, 16)])
def test_aggregate_tiled_kernel(C: int, max_block_c: int, names: tuple[str, ...]) -> None:
    """Rows wider than max_block_c take the two-pass online-softmax kernel (ragged last class tile)."""
    cos = _cos(3, 3, C, seed=2)
    zeta = _mid_zeta(cos)
    out = cdul_aggregate(cos, LOGIT_SCALE, zeta, 0.5, names, max_block_c=max_block_c)
    _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, zeta, 0.5), names)


@pytest.mark.parametrize("C", [4096, 9000])
def test_aggregate_wide_rows_default_path(C: int) -> None:
    """C = 4096 fits one tile; C = 9000 > MAX_BLOCK_C takes the tiled kernel without any knob."""
    cos = _cos(1, 2, C, seed=3)
    out = cdul_aggregate(cos, LOGIT_SCALE, 1e-4, 1.0, OUTPUTS)
    _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, 1e-4, 1.0), OUTPUTS)


@pytest.mark.parametrize("block_b", [1, 2, 4, 8])
def test_aggregate_images_per_program(block_b: int) -> None:
    cos = _cos(7, 2, 20, seed=4)
    out = cdul_aggregate(cos, LOGIT_SCALE, 0.05, 0.5, OUTPUTS, block_b=block_b)
    _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, 0.05, 0.5), OUTPUTS)


def test_aggregate_strided_input() -> None:
    """Batch and view strides are arguments: slices of a bigger tensor work without a copy."""
    big = _cos(8, 3, 90, seed=5)
    cos = big[::2, :, 5:85]
    assert not cos.is_contiguous() and cos.stride(-1) == 1
    out = cdul_aggregate(cos, LOGIT_SCALE, 0.05, 0.0, OUTPUTS)
    _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, 0.05, 0.0), OUTPUTS)


def test_aggregate_empty_batch() -> None:
    out = cdul_aggregate(torch.zeros(0, 10, 80), LOGIT_SCALE, 0.1, 0.5, ("cdul", "avg"))
    assert set(out) == {"cdul", "avg"} and out["cdul"].shape == (0, 80)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("C", [20, 80, 81, 1000])
def test_aggregate_low_precision(dtype: torch.dtype, C: int) -> None:
    cos = _cos(7, 3, C, seed=6)
    for zeta in (0.0, _mid_zeta(cos)):
        for n, (err_k, err_t) in _lowp_ratios(cos, dtype, zeta, 0.5).items():
            assert err_k <= 2.0 * err_t + LOWP_FLOOR, f"{n}: kernel {err_k:.3g} vs torch-{dtype} {err_t:.3g}"


def test_aggregate_low_precision_compute_is_fp32() -> None:
    """Against the reference on the same (rounded) inputs the kernel is fp32-exact: only input rounding remains."""
    low = _cos(3, 3, 81, seed=7).to(torch.bfloat16)
    out = cdul_aggregate(low, LOGIT_SCALE, 0.05, 0.5, OUTPUTS)
    _assert_outputs(out, _ref_all(low, LOGIT_SCALE, 0.05, 0.5), OUTPUTS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "cos,kw,match",
    [
        (torch.zeros(10, 80), {}, r"\[B, V, C\]"),
        (torch.zeros(2, 1, 80), {}, "V = 1"),
        (torch.zeros(2, 10, 0), {}, "at least one class"),
        (torch.zeros(2, 10, 80), {"logit_scale": float("nan")}, "logit_scale must be finite"),
        (torch.zeros(2, 10, 80), {"logit_scale": -1.0}, "logit_scale"),
        (torch.zeros(2, 10, 80), {"zeta": float("inf")}, "zeta must be finite"),
        (torch.zeros(2, 10, 80), {"lam": float("nan")}, "lam must be finite"),
        (torch.zeros(2, 10, 80), {"lam": 1.5}, r"lam must be in \[0, 1\]"),
        (torch.zeros(2, 10, 80), {"outputs": ("cdul", "median")}, "outputs must be"),
        (torch.zeros(2, 10, 80), {"outputs": ()}, "outputs must be"),
        (torch.zeros(2, 10, 80, dtype=torch.float64), {}, "float32, float16 or bfloat16"),
    ],
)
def test_aggregate_errors(cos: torch.Tensor, kw: dict, match: str, backend: str) -> None:
    """Validated once, at dispatch, the same for both twins."""
    args = {"logit_scale": LOGIT_SCALE, "zeta": 0.1, "lam": 0.5, **kw}
    with pytest.raises(ValueError, match=match):
        ops.aggregate_scores(cos, **args, backend=backend)


@pytest.mark.parametrize(
    "cos,kw,match",
    [
        (torch.zeros(2, 10, 80, dtype=torch.float64), {}, "float32, float16 or bfloat16"),
        (torch.zeros(2, 80, 10).transpose(1, 2), {}, "contiguous"),
        (torch.zeros(2, 10, 80), {"block_b": 3}, "power of two"),
    ],
)
def test_aggregate_kernel_own_checks(cos: torch.Tensor, kw: dict, match: str) -> None:
    """What only the kernel needs (dtype it can load, unit-stride classes, its tuning knobs) it checks itself."""
    with pytest.raises(ValueError, match=match):
        cdul_aggregate(cos, LOGIT_SCALE, 0.1, 0.5, **kw)


def test_dispatch_makes_strided_classes_contiguous_for_the_kernel() -> None:
    cos = _cos(2, 3, 80).transpose(1, 2).contiguous().transpose(1, 2)  # same values, classes not unit-stride
    out = ops.aggregate_scores(cos, LOGIT_SCALE, 0.05, 0.5, OUTPUTS, backend="triton")
    _assert_outputs(out, _ref_all(cos, LOGIT_SCALE, 0.05, 0.5), OUTPUTS)


# ------------------------------------------------------------------------------------------------ latent kernel


def _latent_inputs(M: int, C: int, pred_dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    latent = 3.0 * torch.randn(M, C, generator=gen)
    pred = torch.rand(M, C, generator=gen)
    edge = torch.tensor([0.0, 1.0, 0.5, 1e-6, 1 - 1e-6, 1e-9])
    flat = pred.view(-1)
    flat[: min(flat.numel(), edge.numel())] = edge[: flat.numel()]  # clamp edges and exact 0 / 1
    return latent.to(device), pred.to(pred_dtype).to(device)


LATENT_SHAPES = [(1, 1, None), (37, 81, None), (37, 81, 256), (64, 80, 256), (333, 20, 1024), (5, 1000, None)]


@pytest.mark.parametrize("M,C,block", LATENT_SHAPES, ids=[f"{M}x{C}-blk{b}" for M, C, b in LATENT_SHAPES])
@pytest.mark.parametrize("use_psi", [True, False], ids=["psi", "nopsi"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_latent_parity(M: int, C: int, block: int | None, use_psi: bool, with_labels: bool) -> None:
    latent, pred = _latent_inputs(M, C, seed=M + C)
    ref = _ref_latent(latent, pred, C1, SIGMA, C2, 0.7, use_psi)
    ptr, before = latent.data_ptr(), latent.clone()
    labels = torch.full_like(latent, -1.0) if with_labels else None
    kw = {"block": block} if block else {}
    ret = latent_update_(latent, pred, C1, SIGMA, C2, 0.7, use_psi, 1e-6, labels, **kw)
    assert ret is latent and latent.data_ptr() == ptr  # in place
    assert not torch.equal(latent, before)
    torch.testing.assert_close(latent, ref, rtol=1e-6, atol=1e-5)
    if with_labels:
        torch.testing.assert_close(labels, torch.sigmoid(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_latent_low_precision_pred(dtype: torch.dtype) -> None:
    """pred is upcast exactly; the reference upcasts the same values, so parity stays fp32-tight."""
    latent, pred = _latent_inputs(50, 81, dtype, seed=8)
    ref = _ref_latent(latent, pred, C1, SIGMA, C2)
    latent_update_(latent, pred, C1, SIGMA, C2, block=512)
    torch.testing.assert_close(latent, ref, rtol=1e-6, atol=1e-5)


def test_latent_strided_pred_and_empty() -> None:
    latent, pred = _latent_inputs(20, 30, seed=9)
    pred_t = pred.t().contiguous().t()  # same values, column-major
    ref = _ref_latent(latent, pred, C1, SIGMA, C2)
    latent_update_(latent, pred_t, C1, SIGMA, C2)
    torch.testing.assert_close(latent, ref, rtol=1e-6, atol=1e-5)
    empty = torch.zeros(0, 81)
    assert latent_update_(empty, empty.clone(), C1, SIGMA, C2) is empty


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "latent,pred,kw,match",
    [
        (torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, 8), {}, "latent must be float32"),
        (torch.zeros(8, 4).t(), torch.zeros(4, 8), {}, "contiguous"),
        (torch.zeros(4, 8), torch.zeros(4, 9), {}, "shape"),
        (torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.int32), {}, "pred must be"),
        (torch.zeros(4, 8), torch.zeros(4, 8), {"sigma": 0.0}, "sigma"),
        (torch.zeros(4, 8), torch.zeros(4, 8), {"lr": float("nan")}, "lr must be finite"),
        (torch.zeros(4, 8), torch.zeros(4, 8), {"c1": float("inf")}, "c1 must be finite"),
        (torch.zeros(4, 8), torch.zeros(4, 8), {"eps": 0.7}, "eps"),
        (torch.zeros(4, 8), torch.zeros(4, 8), {"labels_out": torch.zeros(4, 8, dtype=torch.float16)}, "labels_out"),
    ],
)
def test_latent_errors(latent: torch.Tensor, pred: torch.Tensor, kw: dict, match: str, backend: str) -> None:
    """Validated once, at dispatch, the same for both twins."""
    args = {"c1": C1, "sigma": SIGMA, "c2": C2, **kw}
    with pytest.raises(ValueError, match=match):
        ops.latent_update_inplace(latent, pred, **args, backend=backend)


def test_latent_kernel_own_checks() -> None:
    with pytest.raises(ValueError, match="power of two"):
        latent_update_(torch.zeros(4, 8), torch.zeros(4, 8), C1, SIGMA, C2, block=100)


# ---------------------------------------------------------------------------------------------- streamed update


def _memmaps(tmp_path: Path, M: int, C: int, pred_dtype=np.float32, seed: int = 0):
    latent, pred = _latent_inputs(M, C, seed=seed)
    lat_mm = np.memmap(tmp_path / "latent.f32", dtype=np.float32, mode="w+", shape=(M, C))
    lat_mm[:] = latent.numpy()
    pred_mm = np.memmap(tmp_path / "pred.bin", dtype=pred_dtype, mode="w+", shape=(M, C))
    pred_mm[:] = pred.numpy().astype(pred_dtype)
    pred_mm.flush()
    pred_ro = np.memmap(tmp_path / "pred.bin", dtype=pred_dtype, mode="r", shape=(M, C))
    lab_mm = np.memmap(tmp_path / "labels.f32", dtype=np.float32, mode="w+", shape=(M, C))
    return latent, lat_mm, pred_ro, lab_mm


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("pred_dtype", [np.float32, np.float16], ids=["pred32", "pred16"])
def test_latent_stream_memmap(tmp_path: Path, monkeypatch, backend: str, pred_dtype) -> None:
    M, C, chunk = 1000, 81, 128  # 7 full chunks and a ragged one
    latent, lat_mm, pred_ro, lab_mm = _memmaps(tmp_path, M, C, pred_dtype)
    ref = _ref_latent(latent, torch.from_numpy(np.array(pred_ro)), C1, SIGMA, C2, 0.5, True)

    seen: list[tuple[int, bool, str]] = []
    base, end = lat_mm.ctypes.data, lat_mm.ctypes.data + lat_mm.nbytes
    def spy(real, impl: str):
        def run(lat, pred, *a, **kw):
            ptr = lat.ctypes.data if isinstance(lat, np.ndarray) else lat.data_ptr()
            seen.append((lat.shape[0], base <= ptr < end, impl))
            return real(lat, pred, *a, **kw)
        return run

    ext = store_ext()  # on CPU, "auto" runs the extension's fused loop once on the whole memmap when it is built
    for impl, module, name in (("torch", reference, "latent_update_"), ("triton", kernels, "latent_update_"),
                               ("ext", ext, "latent_update")):  # which implementation ran, on which memory
        if module is not None:
            monkeypatch.setattr(module, name, spy(getattr(module, name), impl))
    ops.latent_update_stream(lat_mm, pred_ro, C1, SIGMA, C2, 0.5, True, device="cpu", chunk_rows=chunk,
                             labels_out_np=lab_mm, backend=backend)
    if backend == "auto" and ext is not None:
        assert seen == [(M, True, "ext")]
    else:
        assert [n for n, _, _ in seen] == [chunk] * 7 + [M - 7 * chunk]
        assert all(view for _, view, _ in seen), "chunks must be zero-copy views of the memmap"
        assert {impl for _, _, impl in seen} == {"triton" if backend == "triton" else "torch"}
    lat_mm.flush()
    back = torch.from_numpy(np.array(np.memmap(tmp_path / "latent.f32", dtype=np.float32, mode="r", shape=(M, C))))
    torch.testing.assert_close(back, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.array(lab_mm)), torch.sigmoid(ref), rtol=0, atol=1e-6)


def test_latent_stream_errors(tmp_path: Path) -> None:
    _, lat_mm, pred_ro, _ = _memmaps(tmp_path, 10, 8)
    ro = np.memmap(tmp_path / "latent.f32", dtype=np.float32, mode="r", shape=(10, 8))
    with pytest.raises(ValueError, match="writeable"):
        ops.latent_update_stream(ro, pred_ro, C1, SIGMA, C2)
    with pytest.raises(ValueError, match="chunk_rows"):
        ops.latent_update_stream(lat_mm, pred_ro, C1, SIGMA, C2, chunk_rows=0)
    with pytest.raises(ValueError, match="float32"):
        ops.latent_update_stream(lat_mm.astype(np.float64), pred_ro, C1, SIGMA, C2)
    with pytest.raises(ValueError, match="pred_np"):
        ops.latent_update_stream(lat_mm, pred_ro[:5], C1, SIGMA, C2)
    with pytest.raises(ValueError, match="labels_out_np"):
        ops.latent_update_stream(lat_mm, pred_ro, C1, SIGMA, C2, labels_out_np=np.zeros((10, 8), np.float16))


# ----------------------------------------------------------------------------------------------------- dispatch


def test_resolve_backend_cpu() -> None:
    assert ops.resolve_backend("cpu", "auto") == "torch"
    assert ops.resolve_backend("cpu", "torch") == "torch"
    assert ops.resolve_backend("cpu", "triton") == "triton"  # interpreter (conftest)
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cpu", "cuda")


def test_forced_triton_without_interpreter_fails_clearly(monkeypatch) -> None:
    monkeypatch.setattr(ops, "triton_interpret", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.aggregate_scores(_cos(1, 2, 20), LOGIT_SCALE, 0.1, 0.5, backend="triton")


def test_torch_backend_equals_reference_bitwise() -> None:
    cos = _cos(4, 3, 81, seed=10)
    ref = _ref_all(cos, LOGIT_SCALE, 0.05, 0.5)
    for names in [OUTPUTS, ("global",), ("max", "cdul")]:
        out = ops.aggregate_scores(cos, LOGIT_SCALE, 0.05, 0.5, names, backend="torch")
        assert list(out) == list(names)
        for n in names:
            assert out[n].is_contiguous() and out[n].dtype == torch.float32 and torch.equal(out[n], ref[n]), n
    latent, pred = _latent_inputs(9, 81)
    ref_l = _ref_latent(latent, pred, C1, SIGMA, C2, 0.3, False)
    labels = torch.empty_like(latent)
    assert ops.latent_update_inplace(latent, pred, C1, SIGMA, C2, 0.3, False, labels_out=labels,
                                     backend="torch") is latent
    assert torch.equal(latent, ref_l) and torch.equal(labels, torch.sigmoid(ref_l))


def _spy(monkeypatch, module, name: str, calls: list[str], tag: str) -> None:
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(tag) or real(*a, **kw))


def test_auto_on_cpu_uses_torch(monkeypatch) -> None:
    calls: list[str] = []

    def boom(*a, **kw):
        raise AssertionError("auto must not run the Triton kernel on CPU tensors")

    monkeypatch.setattr(kernels, "cdul_aggregate", boom)
    monkeypatch.setattr(kernels, "latent_update_", boom)
    _spy(monkeypatch, reference, "cdul_aggregate", calls, "agg")
    _spy(monkeypatch, reference, "latent_update_", calls, "lat")
    cos = _cos(2, 2, 20)
    out = ops.aggregate_scores(cos, LOGIT_SCALE, 0.1, 0.5)
    assert list(out) == ["cdul"] and out["cdul"].device == cos.device
    latent, pred = _latent_inputs(3, 20)
    ops.latent_update_inplace(latent, pred, C1, SIGMA, C2)
    assert calls == ["agg", "lat"]


def test_forced_triton_on_cpu_runs_kernel(monkeypatch) -> None:
    calls: list[str] = []
    cos = _cos(3, 3, 80)[:, :, :70]  # last dim contiguous, strided rows
    ref = _ref_all(cos, LOGIT_SCALE, 0.05, 1.0)
    latent, pred = _latent_inputs(7, 81)
    ref_l = _ref_latent(latent, pred, C1, SIGMA, C2)
    monkeypatch.setattr(reference, "cdul_aggregate", lambda *a, **kw: pytest.fail("torch path taken"))
    monkeypatch.setattr(reference, "latent_update_", lambda *a, **kw: pytest.fail("torch path taken"))
    _spy(monkeypatch, kernels, "cdul_aggregate", calls, "triton")
    out = ops.aggregate_scores(cos, LOGIT_SCALE, 0.05, 1.0, ("cdul", "global"), backend="triton")
    _assert_outputs(out, ref, ("cdul", "global"))
    assert calls == ["triton"]
    ref = ref_l
    ops.latent_update_inplace(latent, pred, C1, SIGMA, C2, backend="triton")
    torch.testing.assert_close(latent, ref, rtol=1e-6, atol=1e-5)


def test_twins_share_one_signature() -> None:
    """gsplat's twin habit: the torch reference has exactly the kernel's parameters (the kernels' extra keyword-only
    tuning knobs aside), so the dispatch only picks a module."""
    import inspect

    for name in ("cdul_aggregate", "latent_update_", "wta_pairwise_bce"):
        k = inspect.signature(getattr(kernels, name)).parameters
        r = inspect.signature(getattr(reference, name)).parameters
        k_pub = [(p.name, p.default) for p in k.values() if p.kind != p.KEYWORD_ONLY]
        assert k_pub == [(p.name, p.default) for p in r.values()], name


def test_ops_validate_before_dispatch() -> None:
    with pytest.raises(ValueError, match="V = 1"):
        ops.aggregate_scores(torch.zeros(2, 1, 5), LOGIT_SCALE, 0.1, 0.5, backend="torch")
    with pytest.raises(ValueError, match="outputs"):
        ops.aggregate_scores(torch.zeros(2, 3, 5), LOGIT_SCALE, 0.1, 0.5, outputs="mean", backend="torch")
    with pytest.raises(ValueError, match="sigma"):
        ops.latent_update_inplace(torch.zeros(2, 3), torch.zeros(2, 3), C1, -1.0, C2, backend="torch")


def test_cosine_scores_cpu() -> None:
    gen = torch.Generator().manual_seed(11)
    feats, text = torch.randn(3, 10, 64, generator=gen), torch.randn(81, 64, generator=gen)
    torch.testing.assert_close(ops.cosine_scores(feats, text), reference.cosine_scores(feats, text))
    with pytest.raises(ValueError, match="feats"):
        ops.cosine_scores(feats, text[:, :32])


# ------------------------------------------------------------------------------------- real compile, no GPU needed

_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # decorate the kernels for the compiler, not the interpreter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cdul_fast.ops.kernels import aggregate as A, latent as L

OUTS = ["glob_ptr", "agg_ptr", "cdul_ptr", "avg_ptr", "max_ptr"]
WANT = ["WANT_GLOBAL", "WANT_AGG", "WANT_CDUL", "WANT_AVG", "WANT_MAX"]

def build(fn, sig, consts, num_warps, aligned):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert k.asm["cubin"], fn.__name__

agg = {"B": "i32", "V": "i32", "C": "i32", "stride_b": "i32", "stride_v": "i32", "logit_scale": "fp32",
       "zeta": "fp32", "lam": "fp32", "inv_v": "fp32"}
for dt, bb, bc, flags in [("fp16", 16, 128, (1, 1, 1, 1, 1)), ("fp16", 1, 1024, (0, 0, 1, 0, 0)),
                          ("bf16", 8, 32, (1, 0, 0, 0, 0)), ("fp32", 1, 8192, (0, 0, 0, 1, 1))]:
    sig = {"cos_ptr": "*" + dt, **{o: "*fp32" for o in OUTS}, **agg}
    consts = {"BLOCK_B": bb, "BLOCK_C": bc, **{w: bool(f) for w, f in zip(WANT, flags)}}
    build(A._cdul_aggregate_kernel, sig, consts, A._num_warps(bb * bc), ["cos_ptr", *OUTS])
sig = {"cos_ptr": "*fp16", **{o: "*fp32" for o in OUTS}, **{k: v for k, v in agg.items() if k != "B"}}
for flags in [(1, 1, 1, 1, 1), (1, 0, 0, 0, 0)]:
    consts = {"TILE": 4096, "V_BLOCK": 16, **{w: bool(f) for w, f in zip(WANT, flags)}}
    build(A._cdul_aggregate_tiled_kernel, sig, consts, 8, [])
for pdt, psi, lab in [("fp16", True, True), ("fp32", False, False), ("bf16", True, False)]:
    sig = {"latent_ptr": "*fp32", "pred_ptr": "*" + pdt, "labels_ptr": "*fp32", "n": "i64", "coef": "fp32",
           "sigma": "fp32", "c2": "fp32", "lr": "fp32", "lo": "fp32", "hi": "fp32"}
    build(L._latent_update_kernel, sig, {"BLOCK": L.BLOCK, "USE_PSI": psi, "WRITE_LABELS": lab}, 8, [])
print("compiled ok")
"""


def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the compiler rejects: compile every kernel variant family to an sm_90 cubin
    (Triton's bundled ptxas; no GPU needed) in a subprocess where TRITON_INTERPRET is unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert res.returncode == 0 and "compiled ok" in res.stdout, res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------- CUDA only


@gpu
@pytest.mark.parametrize("C,G", [(20, 2), (80, 3), (81, 3), (1000, 4)])
def test_cuda_aggregate_parity(C: int, G: int) -> None:
    cos = _cos(257, G, C, seed=12)
    zeta = _mid_zeta(cos)
    ref = _ref_all(cos, LOGIT_SCALE, zeta, 0.5)
    out = ops.aggregate_scores(cos.cuda(), LOGIT_SCALE, zeta, 0.5, OUTPUTS, backend="auto")
    assert all(t.is_cuda for t in out.values())
    _assert_outputs(out, ref, OUTPUTS, atol=2e-6)  # GPU exp/div are a few ulp from CPU's
    for dtype in (torch.float16, torch.bfloat16):
        low = cos.cuda().to(dtype)
        out = ops.aggregate_scores(low, LOGIT_SCALE, zeta, 0.5, OUTPUTS, backend="triton")
        tl = _torch_lowp(low, zeta, 0.5)
        for n in OUTPUTS:
            err_k = (out[n].cpu() - ref[n]).abs().max().item()
            err_t = (tl[n].float().cpu() - ref[n]).abs().max().item()
            assert err_k <= 2.0 * err_t + LOWP_FLOOR, f"{dtype} {n}: {err_k:.3g} vs {err_t:.3g}"


@gpu
def test_cuda_tiled_and_subsets() -> None:
    cos = _cos(33, 3, 9000, seed=13).cuda()
    ref = _ref_all(cos.cpu(), LOGIT_SCALE, 1e-4, 0.5)
    for names in [("cdul",), ("global",), OUTPUTS]:
        _assert_outputs(cdul_aggregate(cos, LOGIT_SCALE, 1e-4, 0.5, names), ref, names, atol=2e-6)


@gpu
def test_cuda_latent_and_stream(tmp_path: Path) -> None:
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    latent, pred = _latent_inputs(20_001 if interpreted else 150_001, 81, torch.float16, seed=14)
    ref = _ref_latent(latent, pred, C1, SIGMA, C2)
    lat_d, labels = latent.cuda(), torch.empty(latent.shape, device="cuda")
    ops.latent_update_inplace(lat_d, pred.cuda(), C1, SIGMA, C2, labels_out=labels)
    torch.testing.assert_close(lat_d.cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(labels.cpu(), torch.sigmoid(ref), rtol=0, atol=2e-6)

    M, C = 10_000, 80
    latent, lat_mm, pred_ro, lab_mm = _memmaps(tmp_path, M, C, np.float16)
    ref = _ref_latent(latent, torch.from_numpy(np.array(pred_ro)), C1, SIGMA, C2)
    ops.latent_update_stream(lat_mm, pred_ro, C1, SIGMA, C2, device="cuda", chunk_rows=999, labels_out_np=lab_mm)
    torch.testing.assert_close(torch.from_numpy(np.array(lat_mm)), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.array(lab_mm)), torch.sigmoid(ref), rtol=0, atol=2e-6)


@gpu
def test_cuda_cosine_scores_half() -> None:
    gen = torch.Generator().manual_seed(15)
    feats, text = torch.randn(64, 10, 512, generator=gen), torch.randn(81, 512, generator=gen)
    got = ops.cosine_scores(feats.cuda().half(), text.cuda().half())
    assert got.dtype == torch.float16 and got.shape == (64, 10, 81)
    torch.testing.assert_close(got.float().cpu(), reference.cosine_scores(feats, text), rtol=0, atol=2e-3)


@gpu
def test_cuda_compiled_in_subprocess() -> None:
    """conftest defaults to the interpreter; rerun the CUDA tests above with a real Triton compile."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("this process already compiles the kernels")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-k", "cuda and not subprocess", __file__]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# ------------------------------------------------------------------------------- discovery: fused WTA pairwise BCE


def _pairwise_inputs(m: int, c: int, h: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Novel-head probabilities [M, C] (some confident, some flat) and WTA codes [M, H] with shared structure, so
    both s_ij = 0 and 1 occur."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(m, c, generator=g) * 3.0, dim=1)
    group = torch.randint(0, 3, (m, 1), generator=g)
    base = torch.randint(0, 4, (3, h), generator=g)
    noise = torch.randint(0, 4, (m, h), generator=g)
    keep = torch.rand(m, h, generator=g) < 0.7
    return probs, torch.where(keep, base[group[:, 0]], noise)


@pytest.mark.parametrize("m,c,h,block", [(1, 2, 8, 16), (17, 5, 64, 16), (70, 10, 128, 32), (33, 20, 32, 16)])
def test_wta_pairwise_bce_kernel_matches_the_reference(m, c, h, block):
    probs, codes = _pairwise_inputs(m, c, h)
    mu = max(1, h // 2)
    a, b = probs.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    got = kernels.wta_pairwise_bce(a, codes, mu, block=block)
    want = reference.wta_pairwise_bce(b, codes, mu)
    got.backward()
    want.backward()
    got, want = got.detach(), want.detach()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (float(got), float(want))
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), float((a.grad - b.grad).abs().max())
    s = reference.wta_pair_labels(codes, mu)
    assert 0 < float(s.mean()) < 1 or m == 1  # both kinds of pairs were exercised


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wta_pairwise_bce_kernel_low_precision(dtype):
    """Loss and gradient from low-precision probabilities: the kernel's error against the fp32 reference on the
    unrounded probabilities is within 2x that of torch doing the math in the low dtype."""
    probs, codes = _pairwise_inputs(40, 8, 64, seed=1)
    mu = 32
    ref32 = probs.clone().requires_grad_(True)
    want = reference.wta_pairwise_bce(ref32, codes, mu)
    want.backward()
    low = probs.to(dtype).requires_grad_(True)
    got = kernels.wta_pairwise_bce(low, codes, mu, block=16)
    got.backward()
    assert low.grad.dtype == dtype
    lp = probs.to(dtype).requires_grad_(True)  # torch in the low dtype, same formula
    sim = (lp @ lp.t()).clamp(1e-3, 1 - 1e-3)
    s = reference.wta_pair_labels(codes, mu).to(dtype)
    torch_low = -(s * sim.log() + (1 - s) * (1 - sim).log()).mean()
    torch_low.backward()
    err_k = abs(float(got.detach()) - float(want.detach()))
    err_t = abs(float(torch_low.detach()) - float(want.detach()))
    assert err_k <= 2 * err_t + LOWP_FLOOR, (err_k, err_t)
    gk = float((low.grad.float() - ref32.grad).abs().max())
    gt = float((lp.grad.float() - ref32.grad).abs().max())
    assert gk <= 2 * gt + LOWP_FLOOR, (gk, gt)


def test_wta_pairwise_bce_dispatch_validates():
    probs, codes = _pairwise_inputs(4, 3, 8)
    with pytest.raises(ValueError, match="mu"):
        ops.wta_pairwise_bce(probs, codes, 9)
    with pytest.raises(ValueError, match="integers"):
        ops.wta_pairwise_bce(probs, codes.float(), 4)
    with pytest.raises(ValueError, match="expected"):
        ops.wta_pairwise_bce(probs[:3], codes, 4)
    assert float(ops.wta_pairwise_bce(probs, codes, 4)) == float(reference.wta_pairwise_bce(probs, codes, 4))


@gpu
@pytest.mark.parametrize("m", [64, 1000])
def test_cuda_wta_pairwise_bce_parity(m: int) -> None:
    probs, codes = _pairwise_inputs(m, 10, 128, seed=3)
    a = probs.cuda().requires_grad_(True)
    b = probs.clone().requires_grad_(True)
    got = ops.wta_pairwise_bce(a, codes.cuda(), 60, backend="auto")
    want = reference.wta_pairwise_bce(b, codes, 60)
    got.backward()
    want.backward()
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-5 * max(1.0, float(want.detach()))
    assert torch.allclose(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-7)
