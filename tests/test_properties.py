"""Property-based tests (hypothesis) of the aggregation and the latent update, on both backends."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdul_fast.ops import dispatch as ops
from cdul_fast.ops import reference

BACKENDS = ["torch", "triton"]

shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 24))  # B, snippets N, C
seeds = st.integers(0, 2**31 - 1)
unit = st.floats(0.0, 1.0, allow_nan=False)
scales = st.floats(1.0, 100.0, allow_nan=False)


def _cos(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    b, n, c = shape
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1 + n, c, generator=g) * 2 - 1


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds, zeta=unit, lam=unit, scale=scales)
def test_aggregation_in_unit_interval_and_permutation_invariant(backend, shape, seed, zeta, lam, scale):
    cos = _cos(shape, seed)
    outs = ("global", "aggregate", "cdul", "avg", "max")
    res = ops.aggregate_scores(cos, scale, zeta, lam, outs, backend=backend)
    for k in outs:
        assert torch.all(res[k] >= 0) and torch.all(res[k] <= 1 + 1e-6), k
    perm = torch.randperm(cos.shape[-1], generator=torch.Generator().manual_seed(seed + 1))
    permuted = ops.aggregate_scores(cos[..., perm], scale, zeta, lam, outs, backend=backend)
    for k in outs:
        torch.testing.assert_close(permuted[k], res[k][..., perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds, zeta=unit, scale=scales)
def test_lambda_zero_and_one_are_average_and_max(backend, shape, seed, zeta, scale):
    cos = _cos(shape, seed)
    r0 = ops.aggregate_scores(cos, scale, zeta, 0.0, ("global", "aggregate", "cdul"), backend=backend)
    r1 = ops.aggregate_scores(cos, scale, zeta, 1.0, ("cdul",), backend=backend)
    g, a = r0["global"], r0["aggregate"]
    torch.testing.assert_close(r0["cdul"], (g + a) / 2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r1["cdul"], torch.maximum(g, a), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 30), seed=seeds, sigma=st.floats(0.1, 1.0),
       c1=st.floats(0.01, 1.0), lr=st.floats(0.01, 1.0), use_psi=st.booleans())
def test_latent_update_properties(backend, rows, cols, seed, sigma, c1, lr, use_psi):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, cols, generator=g) * 4
    pred = torch.rand(rows, cols, generator=g)
    c2 = reference.psi_c2_auto(c1, sigma)
    out = latent.clone()
    labels = torch.empty_like(latent)
    ops.latent_update_inplace(out, pred, c1, sigma, c2, lr, use_psi, labels_out=labels, backend=backend)
    assert torch.all(torch.isfinite(out))
    assert torch.all(labels >= 0) and torch.all(labels <= 1)
    torch.testing.assert_close(labels, torch.sigmoid(out), atol=1e-6, rtol=1e-6)
    expected = reference.latent_update_(latent.clone(), pred, c1, sigma, c2, lr, use_psi)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # column permutation commutes with the element-wise update
    perm = torch.randperm(cols, generator=g)
    out_p = latent[:, perm].clone()
    ops.latent_update_inplace(out_p, pred[:, perm].contiguous(), c1, sigma, c2, lr, use_psi, backend=backend)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-6, rtol=1e-6)
    # a step moves each latent toward the prediction's logit, never past it by more than the step allows
    if use_psi and lr <= 1.0 and c1 / (sigma * 2.5066282746) + c2 <= 1.0:
        target = torch.logit(pred.clamp(1e-6, 1 - 1e-6))
        assert torch.all((out - target).abs() <= (latent - target).abs() + 1e-4)
