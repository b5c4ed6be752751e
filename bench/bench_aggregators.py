"""Pseudo-label quality per aggregator (the paper's Table 3) over several seeds, and why min-max wins or loses.

For each world (``shapes``: 12 classes, 2-4 small objects; ``shapes20``: 20 classes, mixed sizes, co-occurrence,
distractors) and each seed (the seed of the world's train split: other images), the shipped CLIP of that world
scores every view once; every aggregator (global, avg, max, cdul) is then scored for every zeta in the paper's range
0..0.4 and lambda in {0, 1} from the same cosines. Prints mean ± std over the seeds.

Why cdul can trail max: with lambda = 1, cdul = max(global, s_ag) and the paper's max = max(global, alpha) (alpha,
beta: a class's largest and smallest snippet score). They differ only on entries with alpha < zeta, which cdul scores
max(global, beta) (~ global) and max scores max(global, alpha). So cdul beats max exactly when, among those entries,
the whole image separates positives from negatives better than the best snippet does. The diagnosis prints the ROC
AUC of both scores on those entries (pooled over classes), and how many positives fall there.

    python bench/bench_aggregators.py --seeds 5            # ~4 minutes on 2 CPU cores
    python bench/bench_aggregators.py --seeds 2 --images 300 --worlds shapes20   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.clip.loader import load_clip  # noqa: E402
from cdul_fast.config import AGGREGATORS  # noqa: E402
from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.evaluate import evaluate_scores  # noqa: E402
from cdul_fast.ops.reference import cdul_aggregate, view_softmax  # noqa: E402
from cdul_fast.shapes.clip_training import SHIPPED, ZETAS, view_cosines  # noqa: E402

LAMS = (0.0, 1.0)


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < positive.size else float("nan")


def diagnose(cos: torch.Tensor, labels: np.ndarray, logit_scale: float, zeta: float) -> dict:
    """On the entries where cdul and max differ (alpha < zeta): AUC of what each keeps, and the share of positives."""
    s = view_softmax(cos, logit_scale)
    glob, alpha, beta = s[:, 0], s[:, 1:].amax(1), s[:, 1:].amin(1)
    low = (alpha < zeta).numpy() & (labels >= 0)
    pos = labels == 1
    out = {"low_share_pos": float(low[pos].mean()) * 100, "low_share_neg": float(low[labels == 0].mean()) * 100}
    p = pos[low]
    out["auc_max"] = _auc(torch.maximum(glob, alpha).numpy()[low], p)
    out["auc_cdul"] = _auc(torch.maximum(glob, beta).numpy()[low], p)
    return out


def run_world(world: str, seeds: int, images: int, zetas: tuple[float, ...], tmp: Path) -> list[dict]:
    clip = load_clip(SHIPPED[world], None, device="cpu", precision="fp32")
    rows = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        ds = load_dataset(world, tmp / world, "train", n=images, seed=seed)
        cos = view_cosines(clip, ds)
        for zeta in zetas:
            diag = diagnose(cos, ds.labels, clip.logit_scale, zeta)  # depends on zeta only
            for lam in LAMS:
                res = cdul_aggregate(cos, clip.logit_scale, zeta, lam, AGGREGATORS)
                maps = {k: evaluate_scores(v.numpy(), ds).map * 100 for k, v in res.items()}
                rows.append({"world": world, "seed": seed, "images": images, "zeta": zeta, "lam": lam, **maps,
                             **diag})
        print(f"{world} seed {seed}: {len(ds)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def report(rows: list[dict]) -> None:
    for world in dict.fromkeys(r["world"] for r in rows):
        wr = [r for r in rows if r["world"] == world]
        n = len({r["seed"] for r in wr})
        print(f"\n{world}: {wr[0]['images']} train images x {n} seeds (mean ± std), shipped CLIP, 3x3 grid\n")
        print("| ζ | λ | global | avg | max | cdul | cdul − max | cdul − global |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for zeta in dict.fromkeys(r["zeta"] for r in wr):
            for lam in LAMS:
                g = [r for r in wr if r["zeta"] == zeta and r["lam"] == lam]
                cols = [_ms([r[k] for r in g]) for k in AGGREGATORS]
                dm = _ms([r["cdul"] - r["max"] for r in g])
                dg = _ms([r["cdul"] - r["global"] for r in g])
                print(f"| {zeta:g} | {lam:g} | " + " | ".join(cols) + f" | {dm} | {dg} |")
        print("\nWhere cdul (λ = 1) and max differ: entries with every snippet below ζ; ROC AUC (positives vs "
              "negatives, pooled over classes) of max(global, α) (max keeps it) and max(global, β) (cdul)\n")
        print("| ζ | positives there (%) | negatives there (%) | AUC, max's score | AUC, cdul's score |")
        print("| --- | --- | --- | --- | --- |")
        for zeta in dict.fromkeys(r["zeta"] for r in wr):
            g = [r for r in wr if r["zeta"] == zeta and r["lam"] == 1.0]
            if zeta == 0:
                continue
            print(f"| {zeta:g} | {_ms([r['low_share_pos'] for r in g])} | {_ms([r['low_share_neg'] for r in g])} | "
                  f"{_ms([r['auc_max'] for r in g])} | {_ms([r['auc_cdul'] for r in g])} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=["shapes", "shapes20"], choices=sorted(SHIPPED))
    ap.add_argument("--seeds", type=int, default=5, help="world seeds (other train images each; default 5)")
    ap.add_argument("--images", type=int, default=1000, help="train images per seed (default 1000)")
    ap.add_argument("--zeta", type=float, nargs="+", default=list(ZETAS), help="zetas (default the paper's 0..0.4)")
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "aggregators.csv")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.images < 10:
        ap.error("--seeds must be >= 1 and --images >= 10")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    env = environment()
    print(f"device {env['device']}, commit {env['commit']}, torch {env['torch']}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-agg-") as tmp:
        for world in args.worlds:
            rows += run_world(world, args.seeds, args.images, tuple(args.zeta), Path(tmp))
    report(rows)
    write_rows(args.csv, [{**env, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
                          for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
