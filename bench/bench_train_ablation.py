"""Training ablations and baselines (paper Table 1, Table 2 and 4.3, in a shapes world) over several seeds.

Labels the train and test splits once with the world's shipped CLIP (cdul, 3x3 grid, the demo's settings), then
trains the same classifier with every variant for every seed (the training seed: head initialisation, data order,
flips; the images are the same): CDUL (KL + psi-weighted latent updates, Y_p from an eval pass), no label updates,
Y_p from the training pass, updates without psi, hard targets, a larger initial-latent clamp, and the baselines AN,
LS, EPR and ROLE. Prints mean ± std per variant, the paired difference of cdul and each ablation over the same seeds
with a 95 % t confidence interval, and the per-class test AP of each variant (mean over seeds; the paper's Table 2).

    python bench/bench_train_ablation.py --seeds 5                       # shapes20, 2000 train images, 8 epochs
    python bench/bench_train_ablation.py --seeds 5 --dataset shapes      # the 12-class world
    python bench/bench_train_ablation.py --seeds 2 --train-images 300 --epochs 3 --only cdul "no label"  # smoke

Appends one row per (variant, seed) to bench/results/train_ablation.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.clip.loader import ASSETS  # noqa: E402
from cdul_fast.config import package_defaults  # noqa: E402
from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.evaluate import average_precision, evaluate_store  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.shapes.clip_training import SHIPPED  # noqa: E402
from cdul_fast.train.trainer import TrainConfig, Trainer  # noqa: E402

REFERENCE = "cdul"
VARIANTS: dict[str, dict] = {
    "cdul": {},
    "no label updates": {"update_labels": False},
    "Y_p from the training pass": {"pred_source": "train"},
    "updates without psi": {"psi": False},
    "hard targets + updates": {"targets": "hard"},
    "initial clamp 1e-2": {"init_eps": 1e-2},
    "AN: BCE on hard labels": {"method": "an"},
    "LS: label smoothing": {"method": "ls"},
    "EPR": {"method": "epr"},
    "ROLE": {"method": "role"},
}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b over paired seeds and the half-width of its 95 % t interval (nan with one seed)."""
    from scipy.stats import t

    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    sd = statistics.stdev(d)
    return m, float(t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d)), sd


def _fmt(m: float, s: float) -> str:
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def label_split(world: str, root: Path, split: str, n: int, out: Path, label_cfg: dict):
    ds = load_dataset(world, root, split, n=n)
    run_label(LabelConfig(out=str(out), dataset=world, root=str(root), split=split, dataset_options={"n": n},
                          progress=False, overwrite=True, **label_cfg), log=lambda s: None, dataset=ds)
    rep = evaluate_store(out, ds, ["final"])[0]["final"]
    return ds, rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="shapes20", choices=sorted(SHIPPED), help="the world (default shapes20)")
    ap.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 (default 5)")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo's (warm-up scaled if fewer)")
    ap.add_argument("--zeta", type=float, default=None, help="labelling zeta (default: the shipped CLIP's)")
    ap.add_argument("--root", default=None, help="world folder (default: a temporary one)")
    ap.add_argument("--only", nargs="*", default=None, help="variant names (substring match); cdul always runs")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "train_ablation.csv"))
    args = ap.parse_args(argv)
    demo = package_defaults("demo")
    info = json.loads((ASSETS / SHIPPED[args.dataset] / "train_info.json").read_text(encoding="utf-8"))
    label_cfg = {**demo["label"], "clip": SHIPPED[args.dataset],
                 "zeta": info["zeta"] if args.zeta is None else args.zeta}
    tc = dict(demo["train"], pretrained=SHIPPED[args.dataset])
    if args.epochs:
        tc["epochs"] = args.epochs
        tc["warmup"] = min(tc["warmup"], max(0, args.epochs - 1))
    variants = {k: v for k, v in VARIANTS.items()
                if k == REFERENCE or not args.only or any(o in k for o in args.only)}
    env = environment()
    print(f"device {env['device']}, commit {env['commit']}; {args.dataset}, {args.train_images} train / "
          f"{args.test_images} test images, {tc['epochs']} epochs (warm-up {tc['warmup']}), seeds 0..{args.seeds - 1}",
          flush=True)
    results: dict[str, list[dict]] = {k: [] for k in variants}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or Path(tmp) / args.dataset)
        train_ds, train_rep = label_split(args.dataset, root, "train", args.train_images, Path(tmp) / "train.cdul",
                                          label_cfg)
        test_ds, test_rep = label_split(args.dataset, root, "test", args.test_images, Path(tmp) / "test.cdul",
                                        label_cfg)
        print(f"CLIP pseudo labels (cdul, zeta {label_cfg['zeta']}): train {train_rep.map * 100:.2f}, test "
              f"{test_rep.map * 100:.2f} mAP", flush=True)
        for seed in range(args.seeds):
            for name, over in variants.items():
                t0 = time.perf_counter()
                cfg = TrainConfig(labels=str(Path(tmp) / "train.cdul"), out=str(Path(tmp) / "run"),
                                  dataset=args.dataset, root=str(root), split="train", test_split="test",
                                  dataset_options={"n": args.train_images},
                                  test_dataset_options={"n": args.test_images}, overwrite=True, progress=False,
                                  **{**tc, **over, "seed": seed})
                trainer = Trainer(cfg, log=lambda s: None)
                last = trainer.run().last
                ap_cls = average_precision(trainer.predict(trainer.test_imgs, len(test_ds)), test_ds.labels) * 100
                r = {"variant": name, "seed": seed, "pseudo_final_train": last.get("pseudo_map"),
                     "classifier_test": last.get("test_map"), "ap": ap_cls,
                     "seconds": round(time.perf_counter() - t0, 1)}
                results[name].append(r)
                rows.append({**env, "dataset": args.dataset, "variant": name, "seed": seed,
                             "train_images": args.train_images, "epochs": tc["epochs"],
                             "pseudo_init_train": round(train_rep.map * 100, 2),
                             "pseudo_final_train": r["pseudo_final_train"], "pseudo_test": round(test_rep.map * 100, 2),
                             "classifier_test": r["classifier_test"], "seconds": r["seconds"]})
                print(f"seed {seed} {name:<28} pseudo labels (train) {r['pseudo_final_train']:6.2f}  classifier "
                      f"(test) {r['classifier_test']:6.2f}  {r['seconds']:.0f}s", flush=True)
    write_rows(Path(args.csv), rows)
    report(results, train_rep.map * 100, test_rep.map * 100, test_ds.class_names, args)
    return 0


def report(results: dict[str, list[dict]], init_train: float, clip_test: float, classes, args) -> None:
    n = len(results[REFERENCE])
    print(f"\n{args.dataset}: {args.train_images} train / {args.test_images} test images, {n} seeds, mean ± std\n")
    print("| variant | pseudo-label mAP, train (start → end) | classifier mAP, test | cdul − variant, 95 % CI |")
    print("| --- | --- | --- | --- |")
    ref = [r["classifier_test"] for r in results[REFERENCE]]
    for name, rs in results.items():
        pm, ps = mean_std([r["pseudo_final_train"] for r in rs])
        cm, cs = mean_std([r["classifier_test"] for r in rs])
        diff = ""
        if name != REFERENCE:
            d, hw, _ = paired_ci(ref, [r["classifier_test"] for r in rs])
            diff = f"{d:+.2f} [{d - hw:+.2f}, {d + hw:+.2f}]" if not math.isnan(hw) else f"{d:+.2f}"
        print(f"| {name} | {init_train:.2f} → {_fmt(pm, ps)} | {_fmt(cm, cs)} | {diff} |")
    print(f"\nreference: the CLIP pseudo labels of the test split, {clip_test:.2f} mAP")
    print("\nPer-class AP (%) of the classifier on the test split, mean over seeds (the paper's Table 2):\n")
    print("| variant | " + " | ".join(classes) + " | mAP |")
    print("| --- " * (len(classes) + 2) + "|")
    for name, rs in results.items():
        ap = np.nanmean(np.stack([r["ap"] for r in rs]), axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in ap) + f" | {np.nanmean(ap):.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
