"""The benchmark scripts still run: each imports and parses its flags, and those with a --quick mode run it end to
end on tiny sizes (a moved module once broke bench_kernels at its first timed call, unnoticed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_the_scripts_are_found():
    assert {"bench_kernels.py", "bench_label.py", "bench_store.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_script_runs(script: Path, tmp_path: Path):
    quick = '"--quick"' in script.read_text(encoding="utf-8")
    args = ["--quick", "--csv", str(tmp_path / "rows.csv")] if quick else ["--help"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if quick:  # it timed something and wrote its rows
        assert (tmp_path / "rows.csv").stat().st_size > 0 and "wrote" in proc.stdout
    else:
        assert "usage:" in proc.stdout
