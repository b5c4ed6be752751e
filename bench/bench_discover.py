"""Novel category discovery on scikit-learn's digits (classes 0-4 labelled, 5-9 novel) over several seeds: the
paper's Table 1 (k-means on supervised and on learned features vs the full model), Table 3 (ablations: -MSE, -BCE,
-NCE-I, -NCE-C, -CL) and Table 7 (WTA vs ranking statistics vs cosine pairs), on the same data and loop.

Hungarian ACC (and NMI, ARI) of the novel head on the unlabelled training images (transductive, the headline) and on
held-out novel images; mean ± std over seeds. mu is chosen per seed as the paper's section 4.4 does (on known classes
pretending to be novel, ``cdul_fast/discover/select.py``), once with the full model, and every variant of that seed
uses it; ``--mu`` fixes it instead.

    python bench/bench_discover.py --seeds 5                  # 100 epochs per run
    python bench/bench_discover.py --quick                    # smoke: 1 seed, 3 epochs, two variants

Appends one row per (variant, seed) to bench/results/discover.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.discover.baselines import kmeans_scores, variant  # noqa: E402
from cdul_fast.discover.data import digits, shapes_novel  # noqa: E402
from cdul_fast.discover.select import select_mu  # noqa: E402
from cdul_fast.discover.trainer import DiscoverConfig, run_discover  # noqa: E402

VARIANTS = ("full", "-MSE", "-BCE", "-NCE-I", "-NCE-C", "-CL", "pairs: rankstats", "pairs: cosine",
            "supervised only")


def _config(name: str, base: DiscoverConfig) -> DiscoverConfig:
    if name.startswith("pairs: "):
        return dataclasses.replace(base, pairs=name.split(": ", 1)[1])
    return variant(base, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default: DiscoverConfig's)")
    ap.add_argument("--only", default=None,
                    help="variants to run, comma-separated, e.g. --only='full,-BCE,pairs: cosine' (default: all)")
    ap.add_argument("--dataset", choices=("digits", "shapes"), default="digits",
                    help="digits (0-4 known, 5-9 novel) or the shapes world's single-object split (6 known / 6 novel)")
    ap.add_argument("--shapes-root", type=Path, default=Path("bench/results/shapes_world"),
                    help="--dataset shapes: where the world is made (once) and read")
    ap.add_argument("--images", type=int, default=2400, help="--dataset shapes: images made (80 %% train)")
    ap.add_argument("--mu", type=float, default=None, help="a fixed mu / H for every run (default: chosen per seed)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, full and supervised only")
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "discover.csv")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = DiscoverConfig()
    if args.epochs:
        base = dataclasses.replace(base, epochs=args.epochs)
    names = [v.strip() for v in args.only.split(",")] if args.only else list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.seeds, names = 1, ["full", "supervised only"]
        base = dataclasses.replace(base, epochs=3, select_epochs=2, select_folds=1, mu_candidates=(0.5, 0.6))
    data = digits() if args.dataset == "digits" else shapes_novel(args.shapes_root, n=args.images)
    env = environment()
    mus = {}
    for seed in range(args.seeds):
        if args.mu is not None:
            mus[seed] = args.mu
            continue
        mus[seed], scores = select_mu(data, dataclasses.replace(base, seed=seed), run_discover)
        print(f"seed {seed}: mu / H = {mus[seed]:.2f} (pretend-novel ACC: "
              f"{', '.join(f'{m:g}: {100 * a:.1f}' for m, a in scores.items())})", flush=True)
    rows = []
    for name in names:
        for seed in range(args.seeds):
            res = run_discover(data, dataclasses.replace(_config(name, base), seed=seed, wta_mu_fraction=mus[seed]))
            km = kmeans_scores(res.model, data, "cpu", seed=seed)
            row = {**env, "dataset": data.name, "variant": name, "seed": seed, "epochs": base.epochs,
                   "mu_fraction": mus[seed], "seconds": round(res.seconds, 1),
                   "head_acc": round(res.train_novel.acc, 4), "head_nmi": round(res.train_novel.nmi, 4),
                   "head_ari": round(res.train_novel.ari, 4), "test_acc": round(res.test_novel.acc, 4),
                   "kmeans_acc": round(km.acc, 4), "known_acc": round(res.test_known_acc, 4)}
            rows.append(row)
            print(f"{name:<18} seed {seed}: novel head ACC {row['head_acc']:.3f} (test {row['test_acc']:.3f}), "
                  f"k-means on its features {row['kmeans_acc']:.3f}, known {row['known_acc']:.3f}, "
                  f"{row['seconds']:.0f}s", flush=True)
    print(f"\n{data.name} {len(data.known)}/{len(data.novel)}, {base.epochs} epochs, {args.seeds} seeds "
          "(mean ± std, %)")
    print(f"{'variant':<18} {'novel head ACC':>16} {'NMI':>12} {'ARI':>12} {'held-out ACC':>16} "
          f"{'k-means ACC':>16}")

    def ms(vals: list[float]) -> str:
        vals = [100 * v for v in vals]
        return f"{statistics.mean(vals):6.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:4.1f}"

    for name in names:
        sel = [r for r in rows if r["variant"] == name]
        print(f"{name:<18} {ms([r['head_acc'] for r in sel]):>16} {ms([r['head_nmi'] for r in sel]):>12} "
              f"{ms([r['head_ari'] for r in sel]):>12} {ms([r['test_acc'] for r in sel]):>16} "
              f"{ms([r['kmeans_acc'] for r in sel]):>16}")
    print(f"wrote {len(rows)} rows to {write_rows(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
