"""Discovery among the images a labelling run did not name (`cdul-fast discover --labels`), on the shapes world.

The single-object images of the shapes world are labelled with the shipped CLIP (`label --save-embeddings`), then
re-scored with only the first half of the class names (`rescore --classes ... --lam 0`: whole-image scores). The
images scoring a named class >= --confident are the labelled set; those scoring every named class < --poor are
grouped. The groups are scored on the candidates whose true class is unnamed (Hungarian ACC, NMI, ARI), next to
k-means with the same K on the same CLIP embeddings; mean ± std over seeds.

    python bench/bench_discover_store.py --seeds 5
    python bench/bench_discover_store.py --quick          # 1 seed, 300 images, 3 epochs

Appends one row per (variant, seed) to bench/results/discover_store.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.cli import main as cli  # noqa: E402
from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.discover.run import run_store  # noqa: E402
from cdul_fast.discover.trainer import DiscoverConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--images", type=int, default=2400, help="single-object images made and labelled")
    ap.add_argument("--named", type=int, default=6, help="class names kept in the re-scored store (the first ones)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--confident", type=float, default=0.95)
    ap.add_argument("--poor", type=float, default=0.8)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "results" / "discover_store")
    ap.add_argument("--quick", action="store_true", help="1 seed, 300 images, 3 epochs, mu fixed")
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "discover_store.csv")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.images, args.epochs = 1, 300, 3
    work = args.work / f"n{args.images}"
    world, full, named = work / "world", work / "labels.cdul", work / f"named{args.named}.cdul"
    if not full.is_file():
        assert cli(["label", "--dataset", "shapes", "--root", str(world), "--split", "captions", "--dataset-opt",
                    f"n={args.images}", "--save-embeddings", "--out", str(full), "--no-progress",
                    "--overwrite"]) == 0
    ds = load_dataset("shapes", world, "captions", n=args.images)
    names = ",".join(ds.class_names[:args.named])
    if not named.is_file():
        assert cli(["rescore", "--labels", str(full), "--classes", names, "--lam", "0", "--out", str(named),
                    "--no-progress", "--overwrite"]) == 0
    env = environment()
    rows = []
    variants = {"groups (K = unnamed count)": 12 - args.named, "groups (K estimated)": None}
    for name, k in variants.items():
        for seed in range(args.seeds):
            cfg = DiscoverConfig(labels=str(named), confident=args.confident, poor=args.poor, novel=k,
                                 epochs=args.epochs, seed=seed)
            if args.quick:
                cfg.wta_mu_fraction = 0.5
            with tempfile.TemporaryDirectory() as tmp:
                res = run_store(cfg, ds, Path(tmp), log=lambda s: None)
            gt = res["ground_truth"]
            row = {**env, "variant": name, "seed": seed, "images": args.images, "named": args.named,
                   "epochs": args.epochs, "K": res["novel_groups"], "candidates": res["candidates"],
                   "labelled": res["labelled"], "scored": gt["scored_images"], "mu_fraction": res["wta_mu_fraction"],
                   "seconds": res["seconds"], **{k: round(gt["groups"][k], 4) for k in ("acc", "nmi", "ari")},
                   **{f"kmeans_{k}": round(gt["kmeans_on_clip_embeddings"][k], 4) for k in ("acc", "nmi")}}
            rows.append(row)
            print(f"{name:<28} seed {seed}: K {row['K']}, ACC {row['acc']:.3f} (k-means {row['kmeans_acc']:.3f}) on "
                  f"{row['scored']} unnamed images of {row['candidates']} candidates, mu {row['mu_fraction']}, "
                  f"{row['seconds']:.0f}s", flush=True)

    def ms(vals: list[float]) -> str:
        vals = [100 * v for v in vals]
        return f"{statistics.mean(vals):6.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:4.1f}"

    print(f"\nshapes world, {args.named} of 12 classes named, {args.images} images, {args.seeds} seeds (mean ± std, %)")
    print(f"{'variant':<28} {'K':>5} {'ACC':>14} {'NMI':>14} {'ARI':>14} {'k-means ACC':>14} {'k-means NMI':>14}")
    for name in variants:
        sel = [r for r in rows if r["variant"] == name]
        ks = sorted({r["K"] for r in sel})
        print(f"{name:<28} {'/'.join(map(str, ks)):>5} {ms([r['acc'] for r in sel]):>14} "
              f"{ms([r['nmi'] for r in sel]):>14} {ms([r['ari'] for r in sel]):>14} "
              f"{ms([r['kmeans_acc'] for r in sel]):>14} {ms([r['kmeans_nmi'] for r in sel]):>14}")
    print(f"wrote {len(rows)} rows to {write_rows(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
