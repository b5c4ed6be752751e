"""1 process against 2 under torchrun (gloo, CPU), in one run: `label` (sharded parts + merge) and `train` (DDP).

Three settings of the same job on the same images, each in fresh processes, so the ratios are measured together:
1 process on 1 core (the per-process baseline: pinned with sched_setaffinity, 1 thread), 2 processes on 1 core each
(torchrun, rank r pinned to core r; OMP_NUM_THREADS=1 as torchrun sets it), and 1 process on every core (2 threads,
unpinned: what one process gets from this machine). Pinning matters: an unpinned process with 1 compute thread still
decodes on the other core in its worker threads, which hides the scaling. Wall time includes process start, the
torch import, loading the encoder and, for 2 processes, the rendezvous and the merge: what a user waits for. The
label store of 2 processes must equal that of 1 process with the same thread count byte for byte.

    python bench/bench_distributed.py --images 1200 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table  # noqa: E402

SETTINGS = (("1 proc, 1 core", 0, "1"), ("1 proc, all cores", 0, "all"), ("2 procs, 1 core each", 2, "1"))

_ENTRY = """
import os, sys
if os.environ["BENCH_PIN"] == "1" and hasattr(os, "sched_setaffinity"):  # rank r on core r
    os.sched_setaffinity(0, {int(os.environ.get("LOCAL_RANK", "0")) % os.cpu_count()})
from cdul_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(nproc: int, cores: str, args: list[str], entry_file: Path) -> tuple[float, str]:
    threads = str(os.cpu_count() or 1) if cores == "all" else cores
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE",
           "BENCH_PIN": "0" if cores == "all" else "1"}
    entry = [str(entry_file), *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]
           if nproc else [sys.executable, *entry])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200, help="shapes-world images to label and train on")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs (shapesnet, 64 px)")
    ap.add_argument("--batch-size", type=int, default=32, help="label and (global) train batch")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run for the test suite)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "distributed.csv"))
    args = ap.parse_args()
    n, epochs = (64, 1) if args.quick else (args.images, args.epochs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "entry.py"
        entry.write_text(_ENTRY)
        root = Path(tmp) / "shapes"
        subprocess.run([sys.executable, "-c", "from cdul_fast.datasets import load_dataset\n"
                        f"load_dataset('shapes', {str(root)!r}, 'train', n={n})"], check=True)
        stores = []
        for name, nproc, cores in SETTINGS:
            out = Path(tmp) / f"l{len(stores)}.cdul"
            seconds, stdout = _run(nproc, cores, [
                "label", "--dataset", "shapes", "--root", str(root), "--dataset-opt", f"n={n}", "--out", str(out),
                "--batch-size", str(args.batch_size), "--device", "cpu", "--no-progress"], entry)
            stores.append(out)
            rate = re.search(r"([\d.]+) img/s", stdout)
            rows.append({**environment(), "stage": "label", "setting": name, "images": n, "wall_s": round(seconds, 2),
                         "img_s_wall": round(n / seconds, 1), "img_s_loop": float(rate.group(1)) if rate else ""})
        same = stores[2].read_bytes() == stores[0].read_bytes()  # same per-process settings: must be identical
        same_threads = stores[1].read_bytes() == stores[0].read_bytes()  # another thread count: may round apart
        for name, nproc, cores, extra in (*[(*st, []) for st in SETTINGS],
                                          ("2 procs, 1 core each, --no-sync-bn", 2, "1", ["--no-sync-bn"])):
            out = Path(tmp) / f"t{nproc}{cores}{len(extra)}"
            seconds, _ = _run(nproc, cores, [
                "train", "--labels", str(stores[0]), "--root", str(root), "--dataset-opt", f"n={n}", "--out", str(out),
                "--test-split", "none", "--arch", "shapesnet", "--image-size", "64", "--epochs", str(epochs),
                "--warmup", "0", "--batch-size", str(args.batch_size), "--lr", "1e-3", "--device", "cpu",
                "--no-progress", *extra], entry)
            log = (out / "log.csv").read_text().splitlines()[2:]
            per_epoch = sum(float(line.rsplit(",", 1)[1]) for line in log) / max(len(log), 1)
            rows.append({**environment(), "stage": "train", "setting": name, "images": n, "wall_s": round(seconds, 2),
                         "img_s_wall": round(n * epochs / seconds, 1), "img_s_loop": round(n / per_epoch, 1)})
    print_table(rows, ("stage", "setting", "images", "wall_s", "img_s_wall", "img_s_loop"), Path(args.csv))
    for stage in ("label", "train"):
        r = {row["setting"]: row for row in rows if row["stage"] == stage}
        base, whole, procs = (r[s[0]] for s in SETTINGS)
        loop = (f", in the loop x{procs['img_s_loop'] / base['img_s_loop']:.2f}"
                if base["img_s_loop"] and procs["img_s_loop"] else "")
        print(f"{stage}: 2 processes (1 core each) vs 1 process on 1 core: wall x{base['wall_s'] / procs['wall_s']:.2f}"
              f"{loop}; vs 1 process on all cores: wall x{whole['wall_s'] / procs['wall_s']:.2f}")
    plain = next(row for row in rows if row["setting"].endswith("--no-sync-bn"))
    base = next(row for row in rows if row["stage"] == "train" and row["setting"] == SETTINGS[0][0])
    print(f"train with per-rank BatchNorm (--no-sync-bn): in the loop x{plain['img_s_loop'] / base['img_s_loop']:.2f}"
          " vs 1 process on 1 core (global BatchNorm costs 2 all-reduces per BatchNorm layer and step)")
    print(f"label store of 2 processes byte-identical to 1 process (1 thread each): {same}; 1 process with "
          f"{os.cpu_count()} threads against 1 thread: {same_threads}")
    if not same:
        raise SystemExit("the label stores of 1 and 2 processes differ")


if __name__ == "__main__":
    main()
