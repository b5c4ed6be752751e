"""Class activation maps held to the shapes boxes, over several seeds: does the CAM of a detected class peak inside
that object's box, for a classifier trained on the ground truth and for one trained on CDUL's pseudo labels (the
demo's recipe), with and without shift-and-stitch, and what stitching costs.

Labels the train split once with the shipped CLIP (the demo's settings); for every seed trains clipres (the shipped
CLIP's trunk + linear head, 128 px: a 4 x 4 map of 32 px cells) on (a) the ground truth and (b) the cdul pseudo
labels with latent updates; for stitch 1, 2 and 4 counts the detected (image, class) pairs of the test split whose
CAM peak lies in a box of that class, and times grad_cam (top-3 classes) per image. Prints mean ± std over seeds and
the time ratio against stitch 1 measured in the same run.

    python bench/bench_cam.py --seeds 3                 # 1000 train / 200 test images, 5 epochs
    python bench/bench_cam.py --quick                   # smoke: 1 seed, 120 images, 1 epoch

Appends one row per (labels, seed, stitch) to bench/results/cam.csv.
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

from cdul_fast.config import package_defaults  # noqa: E402
from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.deploy.export import load_trained  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.report.cam import grad_cam  # noqa: E402
from cdul_fast.shapes.localisation import cam_localisation  # noqa: E402
from cdul_fast.store.label_store import LabelStore  # noqa: E402
from cdul_fast.train.trainer import TrainConfig, run_train  # noqa: E402
from cdul_fast.views.square import load_square, normalize  # noqa: E402

STITCHES = (1, 2, 4)


def _gt_store(ds, path: Path) -> Path:
    st = LabelStore.create(path, class_names=ds.class_names, rows=len(ds), arrays=["final"],
                           meta={"dataset": ds.name, "split": ds.split, "ids_sha256": ds.ids_digest()}, overwrite=True)
    st.write(0, {"final": (ds.labels > 0).astype(np.float32)})
    st.close()
    return path


def _ms_per_image(model, info, ds, stitch: int, n: int = 32) -> float:
    x = normalize(torch.from_numpy(np.stack([load_square(p, int(info["image_size"])) for p in ds.paths[:n]])),
                  info["mean"], info["std"])
    grad_cam(model, x[:2], top_k=3, stitch=stitch)  # warm-up
    t0 = time.perf_counter()
    grad_cam(model, x, top_k=3, stitch=stitch)
    return (time.perf_counter() - t0) * 1e3 / len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="training seeds (default: 3)")
    ap.add_argument("--dataset", default="shapes", help="shapes (12 classes) or shapes20")
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 seed, 120 train / 40 test images, 1 epoch (smoke)")
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "cam.csv")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.train_images, args.test_images, args.epochs = 1, 120, 40, 1
    torch.set_num_threads(max(1, torch.get_num_threads()))
    demo = package_defaults("demo")
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = load_dataset(args.dataset, tmp / "world", "train", n=args.train_images)
        test = load_dataset(args.dataset, tmp / "world", "test", n=args.test_images)
        pseudo = tmp / "pseudo.cdul"
        run_label(LabelConfig(out=str(pseudo), dataset=args.dataset, root=str(tmp / "world"), split="train",
                              dataset_options={"n": args.train_images}, overwrite=True, progress=False,
                              **demo["label"]), log=lambda s: None, dataset=train)
        sources = {"ground truth": _gt_store(train, tmp / "gt.cdul"), "cdul pseudo labels": pseudo}
        for name, store in sources.items():
            for seed in range(args.seeds):
                tc = dict(demo["train"], epochs=args.epochs, warmup=min(demo["train"]["warmup"], args.epochs - 1),
                          seed=seed, keep_epochs=False)
                if name == "ground truth":
                    tc.update(update_labels=False, warmup=args.epochs)
                out = tmp / f"run_{len(rows)}"
                res = run_train(TrainConfig(labels=str(store), out=str(out), dataset=args.dataset,
                                            root=str(tmp / "world"), split="train", test_split="test",
                                            dataset_options={"n": args.train_images},
                                            test_dataset_options={"n": args.test_images}, overwrite=True,
                                            progress=False, **tc), log=lambda s: None)
                trained = load_trained(out)
                model, info = trained.module.model, trained.info
                for stitch in STITCHES:
                    loc = cam_localisation(model, info, test, stitch=stitch)
                    rows.append({**env, "dataset": args.dataset, "labels": name, "seed": seed, "stitch": stitch,
                                 "test_map": res.last.get("test_map"), "objects": loc.objects,
                                 "detected": loc.detected, "in_box": round(loc.rate, 4),
                                 "chance": round(loc.chance(), 4),
                                 "ms_per_image": round(_ms_per_image(model, info, test, stitch), 2)})
                    r = rows[-1]
                    print(f"{name:<20} seed {seed} stitch {stitch}: peak in box {r['in_box']:.3f} of "
                          f"{r['detected']}/{r['objects']} detected (chance {r['chance']:.3f}), test mAP "
                          f"{r['test_map']:.2f}, {r['ms_per_image']:.1f} ms/img", flush=True)
    print(f"\n{args.dataset}: {args.train_images} train / {args.test_images} test images, {args.epochs} epochs, "
          f"{args.seeds} seeds (mean ± std)")
    print(f"{'labels':<20} {'stitch':>6} {'peak in box':>14} {'detected':>10} {'chance':>8} {'ms/img':>8} "
          f"{'x stitch 1':>10}")
    for name in sources:
        base = statistics.mean(r["ms_per_image"] for r in rows if r["labels"] == name and r["stitch"] == 1)
        for stitch in STITCHES:
            sel = [r for r in rows if r["labels"] == name and r["stitch"] == stitch]
            rate = [100 * r["in_box"] for r in sel]
            sd = statistics.stdev(rate) if len(rate) > 1 else 0.0
            ms = statistics.mean(r["ms_per_image"] for r in sel)
            print(f"{name:<20} {stitch:>6} {statistics.mean(rate):>8.1f} ± {sd:4.1f} "
                  f"{statistics.mean(r['detected'] for r in sel):>10.0f} "
                  f"{100 * statistics.mean(r['chance'] for r in sel):>7.1f}% {ms:>8.1f} {ms / base:>10.2f}")
    maps = {n: [r["test_map"] for r in rows if r["labels"] == n and r["stitch"] == 1] for n in sources}
    print("test mAP: " + "; ".join(f"{n} {statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"
                                   for n, v in maps.items()))
    print(f"wrote {len(rows)} rows to {write_rows(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
