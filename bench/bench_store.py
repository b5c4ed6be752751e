"""Benchmark the label store's CPU paths: checksums (zlib.crc32 over the mapping, as ``LabelStore.open`` verifies a
clean store with either backend) and the fused C++ latent update (``cdul_fast.store._store.latent_update``, what
``ops.latent_update_stream`` runs on CPU) against the torch twin on a memory-mapped matrix.

Bandwidth counts the bytes the operation must move: for the CRC the checksummed bytes; for the latent update latent
read + pred read + latent write + labels write, the same count for both implementations (the torch twin's extra
traffic through temporaries shows as lower GB/s). Times are medians of ``--runs`` calls, ratios come from the same
run. Rows are appended to a CSV with device, versions and commit.

    python bench/bench_store.py             # 256 MiB store, 150000 x 81 latent matrix
    python bench/bench_store.py --quick     # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table  # noqa: E402

from cdul_fast._backend import store_ext  # noqa: E402
from cdul_fast.ops import dispatch as ops  # noqa: E402
from cdul_fast.ops.reference import psi_c2_auto  # noqa: E402
from cdul_fast.store.label_store import LabelStore  # noqa: E402

C1, SIGMA, LR = 1.0, 0.25, 0.1
PRED_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def _median_s(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: page faults of a fresh mapping, lazy init
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu() -> str:
    """CPU model and thread count: the device column names the GPU where there is one, these numbers are CPU's."""
    model = "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"


def _row(env: dict, op: str, impl: str, shape: str, dtype: str, threads: int, seconds: float, nbytes: int,
         base_s: float | None, note: str = "") -> dict[str, object]:
    return {**env, "op": op, "impl": impl, "shape": shape, "dtype": dtype, "threads": threads,
            "time_ms": f"{seconds * 1e3:.3f}", "gb_per_s": f"{nbytes / seconds / 1e9:.2f}",
            "speedup": f"{base_s / seconds:.2f}" if base_s else "", "note": note}


def bench_crc(env: dict, folder: Path, mib: int, runs: int) -> list[dict[str, object]]:
    """Open + verify of a clean store holding one ``mib`` MiB array, per backend, against zlib.crc32 of the same
    bytes already in memory (the ceiling: no mapping, no page faults)."""
    classes = 64
    rows = mib * 2**20 // (4 * classes)
    path = folder / "crc.cdul"
    data = np.random.default_rng(0).random((rows, classes), dtype=np.float32)
    with LabelStore.create(path, [f"c{i}" for i in range(classes)], rows, ["final"]) as st:
        st.write(0, {"final": data})
    nbytes = data.nbytes + rows  # the array and the done map
    t_mem = _median_s(lambda: zlib.crc32(data), runs)
    out = [_row(env, "crc32", "zlib, in-memory numpy", f"{mib} MiB", "bytes", 1, t_mem, data.nbytes, None)]
    backends = ["numpy"] + (["ext"] if store_ext() is not None else [])
    for backend in backends:
        t = _median_s(lambda b=backend: LabelStore.open(path, backend=b).close(), runs)
        out.append(_row(env, "crc32", f"open+verify, {backend} backend", f"{mib} MiB", "bytes", 1, t, nbytes, t_mem,
                        "speedup = in-memory time / this (1 = no overhead)"))
    path.unlink()
    return out


def _memmaps(folder: Path, M: int, C: int, pred_dtype) -> tuple[np.memmap, np.memmap, np.memmap]:
    rng = np.random.default_rng(0)
    lat = np.memmap(folder / "latent.f32", np.float32, "w+", shape=(M, C))
    lat[:] = rng.normal(0.0, 2.0, (M, C)).astype(np.float32)
    pred = np.memmap(folder / f"pred.{pred_dtype.__name__}", pred_dtype, "w+", shape=(M, C))
    pred[:] = rng.random((M, C), dtype=np.float32).astype(pred_dtype)
    pred.flush()
    lab = np.memmap(folder / "labels.f32", np.float32, "w+", shape=(M, C))
    return lat, np.memmap(pred.filename, pred_dtype, "r", shape=(M, C)), lab


def bench_latent(env: dict, folder: Path, M: int, C: int, runs: int) -> list[dict[str, object]]:
    """The trainer's call (psi on, labels written) on memory-mapped files, torch twin vs extension."""
    ext = store_ext()
    c2 = psi_c2_auto(C1, SIGMA)
    threads = torch.get_num_threads()
    out = []
    for name, dtype in PRED_DTYPES.items():
        lat, pred, lab = _memmaps(folder, M, C, dtype)
        nbytes = M * C * (4 + np.dtype(dtype).itemsize + 4 + 4)
        shape = f"M={M} C={C}"

        def stream(backend: str, lat=lat, pred=pred, lab=lab) -> None:
            ops.latent_update_stream(lat, pred, C1, SIGMA, c2, LR, True, labels_out_np=lab, backend=backend)

        t_torch = _median_s(lambda: stream("torch"), runs)
        out.append(_row(env, "latent_update", "torch twin (chunks of 65536 rows)", shape, name, threads, t_torch,
                        nbytes, None))
        if ext is None:
            continue
        t_ext = _median_s(lambda: stream("auto"), runs)
        isa = "AVX2+FMA" if ext.HAS_AVX2_FMA else "baseline"
        out.append(_row(env, "latent_update", f"C++ extension ({isa})", shape, name, threads, t_ext, nbytes, t_torch))
        variants = [(1, True, f"C++ extension ({isa}), 1 thread")]
        if ext.HAS_AVX2_FMA:
            variants.append((threads, False, "C++ extension, baseline x86-64 loop (avx2=False)"))
        for n_threads, avx2, label in variants:
            t = _median_s(lambda n=n_threads, a=avx2, lat=lat, pred=pred, lab=lab: ext.latent_update(
                lat, pred, C1, SIGMA, c2, LR, True, 1e-6, lab, n, a), runs)
            out.append(_row(env, "latent_update", label, shape, name, n_threads, t, nbytes, t_torch))
        del lat, pred, lab
    return out


def run(quick: bool, runs: int, csv_path: Path) -> list[dict[str, object]]:
    env = environment() | {"cpu": _cpu()}
    print(f"cpu: {env['cpu']}  torch {env['torch']}  commit {env['commit']}")
    if store_ext() is None:
        print("NOTE: the C++ extension is not built: only the numpy backend and the torch twin are timed")
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        rows = bench_crc(env, Path(tmp), 16 if quick else 256, runs)
        rows += bench_latent(env, Path(tmp), 8192 if quick else 150_000, 81, runs)
    cols = ("op", "impl", "shape", "dtype", "threads", "time_ms", "gb_per_s", "speedup")
    print_table(rows, cols, csv_path)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--runs", type=int, default=9, help="timed calls per row (median; default 9)")
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "store.csv",
                    help="CSV to append rows to (default: bench/results/store.csv)")
    args = ap.parse_args(argv)
    run(args.quick, max(1, args.runs), args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
