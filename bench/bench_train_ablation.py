"""Training ablations and baselines on the shapes world (paper Table 1 and 4.3, in this world), one run each.

Labels the train split with the shipped CLIP (cdul, 3x3), labels the test split the same way (the reference the
classifier should beat), then trains the same classifier with: CDUL (KL + psi-weighted latent updates), no label
updates, updates without psi, hard targets, and the baselines AN (BCE), LS (label smoothing) and EPR.

    python bench/bench_train_ablation.py --train-images 3000 --epochs 8

Prints a Markdown table and appends rows to bench/results/train_ablation.csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.config import package_defaults  # noqa: E402
from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.evaluate import evaluate_store  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.train.trainer import TrainConfig, run_train  # noqa: E402

VARIANTS = {
    "cdul (KL + psi-weighted latent updates)": {},
    "no label updates": {"update_labels": False},
    "updates without psi": {"psi": False},
    "hard targets + updates": {"targets": "hard"},
    "AN: BCE on hard labels": {"method": "an"},
    "LS: label smoothing": {"method": "ls"},
    "EPR": {"method": "epr"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--root", default=None, help="shapes folder (default: a temporary one)")
    ap.add_argument("--only", nargs="*", default=None, help="variant names (substring match)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "train_ablation.csv"))
    args = ap.parse_args()
    demo = package_defaults("demo")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or Path(tmp) / "shapes")
        stores = {}
        for split, n in (("train", args.train_images), ("test", args.test_images)):
            ds = load_dataset("shapes", root, split, n=n)
            out = Path(tmp) / f"{split}.cdul"
            run_label(LabelConfig(out=str(out), dataset="shapes", root=str(root), split=split, dataset_options={"n": n},
                                  progress=False, overwrite=True, **demo["label"]), log=lambda s: None, dataset=ds)
            stores[split] = (out, evaluate_store(out, ds, ["final"])[0]["final"].map * 100)
        print(f"pseudo labels (CLIP, cdul): train {stores['train'][1]:.2f}, test {stores['test'][1]:.2f} mAP")
        rows = []
        tc = dict(demo["train"])
        if args.epochs:
            tc["epochs"] = args.epochs
        for name, over in VARIANTS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            t0 = time.perf_counter()
            cfg = TrainConfig(labels=str(stores["train"][0]), out=str(Path(tmp) / "run"), dataset="shapes",
                              root=str(root), split="train", test_split="test",
                              dataset_options={"n": args.train_images}, test_dataset_options={"n": args.test_images},
                              overwrite=True, progress=False, **{**tc, **over})
            last = run_train(cfg, log=lambda s: None).last
            rows.append({**environment(), "variant": name, "train_images": args.train_images,
                         "epochs": tc["epochs"], "pseudo_init_train": round(stores["train"][1], 2),
                         "pseudo_final_train": last.get("pseudo_map"), "pseudo_test": round(stores["test"][1], 2),
                         "classifier_test": last.get("test_map"), "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:<42} pseudo labels (train) {last.get('pseudo_map'):6.2f}  classifier (test) "
                  f"{last.get('test_map'):6.2f}  {rows[-1]['seconds']:.0f}s", flush=True)
    write_rows(Path(args.csv), rows)
    print("\n| variant | pseudo-label mAP, train (start → end) | classifier mAP, test |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['pseudo_init_train']:.2f} → {r['pseudo_final_train']:.2f} | "
              f"{r['classifier_test']:.2f} |")
    print(f"\nreference: CLIP cdul pseudo labels of the test split {stores['test'][1]:.2f} mAP; device "
          f"{rows[0]['device'] if rows else '?'}")


if __name__ == "__main__":
    main()
