"""Prompts beyond the paper's single template, measured on the shapes world against the paper's setting.

Per seed of the world: label its train split once with the shipped CLIP, saving float32 view embeddings; then
`rescore` the same embeddings with each prompt variant (template ensembles, class synonyms, CCD's bias correction)
and evaluate every aggregator. Reported as mean +- std over the seeds:

- class mAP (the paper's metric: AP of each class over images, averaged); a per-class positive rescaling such as CCD's
  bias correction cannot change it except through the clip to [0, 1];
- image mAP (label-ranking average precision: how well each image's own classes are ranked above its absent
  ones), the ranking that a per-class correction can change;
- micro F1 of the tags a fixed threshold of 0.5 gives.

    python bench/bench_prompts.py --seeds 0 1 2 --images 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import environment, write_rows  # noqa: E402

from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.label.rescore import RescoreConfig, run_rescore  # noqa: E402
from cdul_fast.shapes.world import COLOURS  # noqa: E402
from cdul_fast.store.label_store import DONE, LabelStore  # noqa: E402

AGGREGATES = ("cdul", "global", "avg", "max")
GENERIC = ("a photo of the {}", "a drawing of a {}", "a picture of a {}", "a {} shape", "the {}")
SYNONYMS = {"circle": "disc | round shape", "square": "box", "triangle": "pyramid", "star": "asterisk",
            "cross": "plus sign", "heart": "love heart", "ring": "donut | hoop", "arrow": "pointer",
            "crescent": "moon", "hexagon": "six-sided shape", "diamond": "rhombus", "bowtie": "bow tie"}


def variants(folder: Path) -> dict[str, dict]:
    """Name -> rescore options; the files they need are written into ``folder``."""
    colours = folder / "colours.txt"  # the captions the shipped CLIP was trained on: "a photo of the <colour> <class>"
    colours.write_text("a photo of the {}\n" + "".join(f"a photo of the {c} {{}}\n" for c in COLOURS))
    generic = folder / "generic.txt"
    generic.write_text("\n".join(GENERIC) + "\n")
    synonyms = folder / "synonyms.txt"
    synonyms.write_text("".join(f"{k}: {v}\n" for k, v in SYNONYMS.items()))
    return {
        "paper: 'a photo of the {}'": {},
        "ensemble: 10 colour templates": {"templates": str(colours)},
        "ensemble: 5 generic templates": {"templates": str(generic)},
        "synonyms (12 classes)": {"synonyms": str(synonyms)},
        "CCD bias correction": {"debias": "ccd"},
        "colour ensemble + CCD": {"templates": str(colours), "debias": "ccd"},
    }


def metrics(path: Path, labels: np.ndarray) -> dict[str, float]:
    from torchmetrics.functional.classification import multilabel_average_precision as class_ap
    from torchmetrics.functional.classification import multilabel_ranking_average_precision as image_ap

    with LabelStore.open(path) as st:
        rows = np.flatnonzero(st.done == DONE)
        y = torch.as_tensor(labels[rows].astype(np.int64))
        out = {}
        for agg in AGGREGATES:
            s = torch.as_tensor(np.array(st.array("final" if agg == "cdul" else agg))[rows])
            out[f"{agg}_map"] = 100 * float(class_ap(s, y, num_labels=y.shape[1], average="macro", ignore_index=-1))
        s = torch.as_tensor(np.array(st.array("final"))[rows])
        known = y >= 0
        out["cdul_image_map"] = 100 * float(image_ap(s, y.clamp(min=0), num_labels=y.shape[1]))
        tag = (s >= 0.5) & known
        pos = (y == 1) & known
        tp = float((tag & pos).sum())
        out["cdul_f1@0.5"] = 100 * 2 * tp / max(float(tag.sum() + pos.sum()), 1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the shapes world")
    ap.add_argument("--images", type=int, default=1000, help="train images per world")
    ap.add_argument("--quick", action="store_true", help="2 seeds of 40 images (a smoke run)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "prompts.csv"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.images = args.seeds[:2], 40
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = variants(tmp)
        for seed in args.seeds:
            root = tmp / f"world{seed}"
            opts = {"n": args.images, "seed": seed}
            ds = load_dataset("shapes", root, "train", **opts)
            src = tmp / f"s{seed}.cdul"
            run_label(LabelConfig(out=str(src), dataset="shapes", root=str(root), split="train",
                                  dataset_options=opts, save=("global", "avg", "max"), save_embeddings=True,
                                  embedding_dtype="fp32", device="cpu", progress=False), log=lambda s: None,
                      dataset=ds)
            for name, over in names.items():
                out = tmp / f"r{seed}.cdul"
                run_rescore(RescoreConfig(source=str(src), out=str(out), device="cpu", overwrite=True,
                                          progress=False, **over), log=lambda s: None)
                results.setdefault(name, []).append(metrics(out, ds.labels))
            print(f"seed {seed}: {args.images} images", flush=True)
    env = environment()
    rows = []
    for name, runs in results.items():
        row = {**env, "variant": name, "images": args.images, "seeds": " ".join(map(str, args.seeds))}
        for key in runs[0]:
            vals = [r[key] for r in runs]
            row[key] = round(statistics.mean(vals), 2)
            row[key + "_std"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0
        rows.append(row)
    keys = [k for k in rows[0] if k.endswith(("_map", "@0.5"))]
    print(f"\n{len(args.seeds)} seeds x {args.images} train images of the shapes world, shipped CLIP, grid 3, "
          f"zeta 0.3, lambda 1; mean +- std; device {env['device']}, commit {env['commit']}\n")
    print("| variant | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[k]:.2f} ± {r[k + '_std']:.2f}" for k in keys) + " |")
    print(f"wrote {len(rows)} rows to {write_rows(Path(args.csv), rows)}")


if __name__ == "__main__":
    main()
