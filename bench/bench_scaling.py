"""How `label` time and memory grow with the number of images: time must grow linearly, memory must stay flat.

Each size runs `cdul-fast label` in a fresh process on the shapes world (shipped CLIP) and records wall time and the
child's peak RSS, so nothing is shared between sizes.

    python bench/bench_scaling.py --sizes 250 500 1000 2000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402


def run_one(root: Path, n: int, out: Path) -> tuple[float, float, float]:
    """(seconds, peak RSS in MiB, peak CUDA memory allocated in MiB, 0 without CUDA) of one labelling process."""
    code = ("import resource, sys, torch\nfrom cdul_fast.cli import main\nrc = main(sys.argv[1:])\n"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "print('PEAK_GPU', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)\n"
            "sys.exit(rc)\n")
    argv = ["label", "--dataset", "shapes", "--root", str(root), "--dataset-opt", f"n={n}", "--out", str(out),
            "--overwrite", "--no-progress"]
    # generate the images first so the timing covers labelling only
    subprocess.run([sys.executable, "-c", "import sys\nfrom cdul_fast.datasets import load_dataset\n"
                    f"load_dataset('shapes', {str(root)!r}, 'train', n={n})"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    found = {line.split()[0]: int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_")}
    return seconds, found["PEAK_KB"] / 1024.0, found["PEAK_GPU"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "scaling.csv"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            seconds, peak, gpu = run_one(Path(tmp) / f"shapes{n}", n, Path(tmp) / f"l{n}.cdul")
            rows.append({**environment(), "images": n, "seconds": round(seconds, 2), "img_s": round(n / seconds, 1),
                         "peak_rss_mib": round(peak, 1), "peak_cuda_mib": round(gpu, 1)})
            print(f"{n:>6} images  {seconds:7.1f}s  {n / seconds:7.1f} img/s  peak RSS {peak:7.1f} MiB  "
                  f"peak CUDA memory {gpu:7.1f} MiB", flush=True)
    write_rows(Path(args.csv), rows)
    first, last = rows[0], rows[-1]
    gpu = (f", peak CUDA memory x{last['peak_cuda_mib'] / first['peak_cuda_mib']:.2f}"
           if first["peak_cuda_mib"] else "")
    print(f"\n{last['images'] / first['images']:.0f}x images: time x{last['seconds'] / first['seconds']:.2f}, "
          f"peak memory x{last['peak_rss_mib'] / first['peak_rss_mib']:.2f}{gpu}")


if __name__ == "__main__":
    main()
