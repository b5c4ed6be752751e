"""How good are the tags of each `cdul-fast tags` mode? Per-image F1 against the shapes world's ground truth.

Per seed of the world: label the train split with the shipped CLIP (the defaults: cdul, G = 3, zeta 0.3, lambda 1),
then cut the scores with each mode — fixed 0.5, per-class Otsu, top-2, top-3 — and score the tags against the ground
truth: micro F1 (over all image-class pairs) and macro F1 (mean over classes). Mean +- std over the seeds.

    python bench/bench_tags.py --seeds 0 1 2 --images 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import environment, write_rows  # noqa: E402

from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.deploy.tags import choose_thresholds, select_tags  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.store.label_store import DONE, LabelStore  # noqa: E402

MODES = {"fixed 0.5": ("fixed", None), "otsu": ("otsu", None), "top-2": ("top-k", 2), "top-3": ("top-k", 3)}


def f1s(tags: list[list[tuple[int, float]]], labels: np.ndarray) -> tuple[float, float, float]:
    pred = np.zeros(labels.shape, dtype=bool)
    for r, t in enumerate(tags):
        pred[r, [c for c, _ in t]] = True
    known, pos = labels >= 0, labels == 1
    tp, fp, fn = (pred & pos & known).sum(0), (pred & ~pos & known).sum(0), (~pred & pos & known).sum(0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    per_class = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return 100 * float(micro), 100 * float(per_class.mean()), float(pred.sum(1).mean())


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="2 seeds of 40 images (a smoke run)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "tags.csv"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.images = args.seeds[:2], 40
    res: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root, out = Path(tmp) / f"w{seed}", Path(tmp) / f"s{seed}.cdul"
            opts = {"n": args.images, "seed": seed}
            ds = load_dataset("shapes", root, "train", **opts)
            run_label(LabelConfig(out=str(out), dataset="shapes", root=str(root), split="train", dataset_options=opts,
                                  device="cpu", progress=False), log=lambda s: None, dataset=ds)
            with LabelStore.open(out) as st:
                rows = np.flatnonzero(st.done == DONE)
                scores = np.array(st.array("final"))[rows]
            for name, (mode, k) in MODES.items():
                tags = select_tags(scores, choose_thresholds(scores, mode), top_k=k)
                res[name].append(f1s(tags, ds.labels[rows]))
    env = environment()
    rows_out = []
    print(f"{len(args.seeds)} seeds x {args.images} shapes train images (2-4 objects each), shipped CLIP, cdul labels; "
          f"mean +- std; {env['device']}, commit {env['commit']}\n")
    truth = "(ground truth: 2-4 objects per image)"
    print(f"| mode | micro F1 | macro F1 | tags per image {truth} |")
    print("| --- | --- | --- | --- |")
    for name, vals in res.items():
        micro, macro, per_image = ([v[i] for v in vals] for i in range(3))
        print(f"| {name} | {statistics.mean(micro):.2f} ± {sd(micro):.2f} | {statistics.mean(macro):.2f} ± "
              f"{sd(macro):.2f} | {statistics.mean(per_image):.2f} |")
        rows_out.append({**env, "mode": name, "images": args.images, "seeds": " ".join(map(str, args.seeds)),
                         "micro_f1": round(statistics.mean(micro), 2), "micro_f1_std": round(sd(micro), 2),
                         "macro_f1": round(statistics.mean(macro), 2), "macro_f1_std": round(sd(macro), 2),
                         "tags_per_image": round(statistics.mean(per_image), 2)})
    print(f"wrote {len(rows_out)} rows to {write_rows(Path(args.csv), rows_out)}")


if __name__ == "__main__":
    main()
