"""Helpers shared by the benchmarks: where a number was measured (device, versions, commit) and a CSV row writer,
so that results from different machines and commits can be put side by side."""

from __future__ import annotations

import csv
import datetime as _dt
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Peak DRAM bandwidth in bytes/s, matched against torch.cuda.get_device_name (first match wins: H200 before H100,
# PCIe before the SXM default).
_PEAK_BW: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4.8e12),
    (("H100", "PCIE"), 2.0e12),
    (("H100",), 3.35e12),
    (("A100", "80GB"), 2.0e12),
)


def device_name() -> str:
    """The CUDA device's name, or the CPU's model name (from /proc/cpuinfo where readable)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def peak_bandwidth(name: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of a known GPU, else None (fraction of peak is then left blank)."""
    upper = name.upper()
    for keys, bw in _PEAK_BW:
        if all(k in upper for k in keys):
            return bw
    return None


def git_commit() -> str:
    """Short commit of the benchmarked tree, with "+dirty" when it has uncommitted changes; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Columns identifying where and on what a row was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def time_ms(fn: Callable[[], object], quick: bool = False) -> float:
    """Median time of one call in ms: triton.testing.do_bench on CUDA (L2 flushed between runs), else
    torch.utils.benchmark's blocked autorange (CPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100,
                                             return_mode="median"))
    import torch.utils.benchmark as tb

    fn()  # warm-up (allocator, lazy init)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.05 if quick else 1.0)
    return m.median * 1e3


def write_rows(path: Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """Append rows to a CSV (header written when the file is new); returns the path."""
    rows = list(rows)
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has other columns ({header}); pass another CSV path")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def print_table(rows: list[Mapping[str, object]], cols: tuple[str, ...], csv_path: Path) -> None:
    """The rows as an aligned text table (the columns named), then append them to ``csv_path``."""
    widths = [max(len(col), *(len(str(r[col])) for r in rows)) for col in cols]
    print("  ".join(col.ljust(w) for col, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[col]).ljust(w) for col, w in zip(cols, widths)))
    print(f"wrote {len(rows)} rows to {write_rows(csv_path, rows)}")
