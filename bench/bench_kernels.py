"""Benchmark the fused Triton kernels against the torch eager reference path of ``cdul_fast.ops.dispatch``.

Reports the median time, the speedup over torch, the achieved bandwidth (bytes the op must move, read + written,
divided by time; the same byte count for both implementations, so torch's extra traffic shows as lower GB/s) and, on
a GPU of known peak, the fraction of peak memory bandwidth. Rows are appended to a CSV with device, versions and
commit. Without CUDA only the torch path is timed: the Triton interpreter is a correctness tool, not a fast path.

    /work/venv/bin/python bench/bench_kernels.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, peak_bandwidth, print_table, time_ms  # noqa: E402

from cdul_fast.ops import dispatch as ops  # noqa: E402

ALL_OUTPUTS = ("global", "aggregate", "cdul", "avg", "max")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _aggregate_cases(quick: bool) -> list[tuple[int, int, int, str, tuple[str, ...]]]:
    """(B, V, C, dtype, outputs): fp16 is what the cuBLAS GEMM hands over; fp32 and all outputs as variants."""
    if quick:
        return [(256, 10, C, "fp16", ("cdul",)) for C in (20, 81)]
    cases = []
    for C in (20, 80, 81, 1000):
        cases += [(4096, 10, C, "fp16", ("cdul",)), (4096, 10, C, "fp32", ("cdul",))]
        cases.append((4096, 10, C, "fp16", ALL_OUTPUTS))
    return cases


def _latent_cases(quick: bool) -> list[tuple[int, int, str, bool]]:
    """(M, C, pred dtype, write labels): NUS-WIDE-like 150k x 81 and COCO-like 120k x 80."""
    if quick:
        return [(8192, 81, "fp32", True)]
    return [(M, C, p, lab) for M, C in ((150_000, 81), (120_000, 80)) for p, lab in (("fp32", False), ("fp16", True))]


def _row(env: dict, op: str, impl: str, shape: str, dtype: str, outputs: str, ms: float, nbytes: int,
         base_ms: float | None, peak: float | None, note: str = "") -> dict[str, object]:
    bw = nbytes / (ms * 1e-3)
    return {
        **env, "op": op, "impl": impl, "shape": shape, "dtype": dtype, "outputs": outputs,
        "time_ms": f"{ms:.4f}", "speedup_vs_torch": f"{base_ms / ms:.2f}" if base_ms else "",
        "gb_per_s": f"{bw / 1e9:.1f}", "frac_peak_bw": f"{bw / peak:.3f}" if peak else "", "note": note,
    }


def _bench_pair(torch_fn: Callable[[], object], kernel_fn: Callable[[], object] | None, quick: bool
                ) -> tuple[float, float | None]:
    t_torch = time_ms(torch_fn, quick)
    return t_torch, (time_ms(kernel_fn, quick) if kernel_fn is not None else None)


def run(quick: bool, csv_path: Path) -> list[dict[str, object]]:
    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    use_kernel = cuda and ops.resolve_backend("cuda", "auto") == "triton" and not interp
    device = "cuda" if cuda else "cpu"
    env = environment()
    peak = peak_bandwidth(env["device"]) if cuda else None
    note = "" if use_kernel else "torch path only: no CUDA (the Triton interpreter is not a performance path)"
    if cuda and not use_kernel:
        note = "torch path only: Triton unavailable or TRITON_INTERPRET set"
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    if note:
        print(f"NOTE: {note}")
    if cuda and peak is None:
        print("NOTE: peak bandwidth of this GPU is unknown; frac_peak_bw left blank")
    rows: list[dict[str, object]] = []
    gen = torch.Generator(device=device).manual_seed(0)

    for B, V, C, dt, outs in _aggregate_cases(quick):
        dtype = DTYPES[dt]
        cos = (0.2 + 0.03 * torch.randn(B, V, C, device=device, generator=gen)).to(dtype)
        nbytes = cos.numel() * cos.element_size() + len(outs) * B * C * 4
        t_torch, t_kernel = _bench_pair(
            lambda cos=cos, outs=outs: ops.aggregate_scores(cos, 100.0, 0.05, 0.5, outs, backend="torch"),
            (lambda cos=cos, outs=outs: ops.aggregate_scores(cos, 100.0, 0.05, 0.5, outs, backend="triton"))
            if use_kernel else None,
            quick,
        )
        shape, oname = f"B={B} V={V} C={C}", "+".join(outs) if outs != ALL_OUTPUTS else "all"
        rows.append(_row(env, "aggregate", "torch", shape, dt, oname, t_torch, nbytes, None, peak, note))
        if t_kernel is not None:
            rows.append(_row(env, "aggregate", "triton", shape, dt, oname, t_kernel, nbytes, t_torch, peak))
        del cos

    for M, C, pdt, labels in _latent_cases(quick):
        latent = torch.randn(M, C, device=device, generator=gen)
        pred = torch.rand(M, C, device=device, generator=gen).to(DTYPES[pdt])
        lab = torch.empty_like(latent) if labels else None
        nbytes = M * C * (4 + pred.element_size() + 4 + (4 if labels else 0))
        t_torch, t_kernel = _bench_pair(
            lambda latent=latent, pred=pred, lab=lab: ops.latent_update_inplace(
                latent, pred, 1.0, 0.25, -0.01, 0.1, labels_out=lab, backend="torch"),
            (lambda latent=latent, pred=pred, lab=lab: ops.latent_update_inplace(
                latent, pred, 1.0, 0.25, -0.01, 0.1, labels_out=lab, backend="triton")) if use_kernel else None,
            quick,
        )
        shape, oname = f"M={M} C={C}", "latent+labels" if labels else "latent"
        rows.append(_row(env, "latent_update", "torch", shape, pdt, oname, t_torch, nbytes, None, peak, note))
        if t_kernel is not None:
            rows.append(_row(env, "latent_update", "triton", shape, pdt, oname, t_kernel, nbytes, t_torch, peak))
        del latent, pred, lab

    cols = ("op", "impl", "shape", "dtype", "outputs", "time_ms", "speedup_vs_torch", "gb_per_s", "frac_peak_bw")
    print_table(rows, cols, csv_path)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, short timing: a smoke run")
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels.csv",
                    help="CSV to append rows to (default: bench/results/kernels.csv)")
    args = ap.parse_args(argv)
    run(args.quick, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
