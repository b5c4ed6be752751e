"""Projection: labelling NUS-WIDE (about 150K training images, 10 views each) with a CLIP on one GPU.

Two sources, both printed: (1) measured — when bench/results/label.csv holds a GPU row of this CLIP (from
bench/gpu_suite.sh), the pipeline's own images/s scaled to the collection; (2) arithmetic — the encoder's FLOPs per
view (counted by torch's FlopCounterMode on a meta-device copy of the open_clip model: no weights, no memory) over a
stated range of achieved bf16 throughput. The second is a bound, not a measurement, and is labelled so.

    python bench/project_nus.py --clip RN50x64 --images 150000 --peak-tflops 798
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

# bf16 dense matrix-product rate measured on this workplace's H100 (8192^3, random data; device KINDS.md, 2026-11-13)
H100_MEASURED_GEMM_TFLOPS = 798.0


def flops_per_view(clip: str) -> tuple[float, int]:
    """(FLOPs of one image-tower forward, input size) from a meta-device model: exact count, nothing allocated."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    logging.disable(logging.WARNING)  # open_clip warns that a model without weights is random: that is the point
    try:
        with torch.device("meta"):
            model = open_clip.create_model(clip, pretrained=None, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    with FlopCounterMode(display=False) as fc:
        model.visual(torch.empty(1, 3, size, size, device="meta"))
    return float(fc.get_total_flops()), size


def measured_rows(csv_path: Path, clip: str) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("clip") == clip and not r.get("device", "").startswith("cpu")]


def _hms(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="RN50x64")
    ap.add_argument("--images", type=int, default=150_000)
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--classes", type=int, default=81)
    ap.add_argument("--peak-tflops", type=float, default=H100_MEASURED_GEMM_TFLOPS,
                    help="bf16 GEMM rate of the GPU (default: measured on this workplace's H100)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "label.csv"))
    args = ap.parse_args()
    views = 1 + args.grid * args.grid
    flops, size = flops_per_view(args.clip)
    total = flops * views * args.images
    store_mb = args.images * args.classes * 4 / 1e6
    print(f"{args.clip}: {flops / 1e9:.1f} GFLOP per {size}px view (FlopCounterMode), {views} views per image, "
          f"{args.images} images -> {total / 1e18:.3f} EFLOP; label store 'final' array {store_mb:.1f} MB")
    print(f"measured on: {environment()['device']} (FLOP count needs no GPU)")
    print(f"\narithmetic bound at a {args.peak_tflops:.0f} TFLOP/s bf16 GEMM rate (NOT a measurement):")
    for eff in (1.0, 0.6, 0.4):
        sec = total / (args.peak_tflops * 1e12 * eff)
        print(f"  encoder at {eff:4.0%} of it: {_hms(sec):>14}  ({args.images / sec:7.1f} images/s)")
    rows = measured_rows(Path(args.csv), args.clip)
    if not rows:
        print(f"\nno GPU row of {args.clip} in {args.csv} yet: bash bench/gpu_suite.sh measures it")
        return
    print("\nfrom measured throughput (bench_label on the GPU, NUS-WIDE-sized JPEGs):")
    for r in rows:
        bare, pipe = float(r["bare_encoder_img_s"]), float(r["pipeline_img_s"])
        achieved = flops * views * bare / 1e12
        print(f"  {r['device']} [{r['decoder']}], commit {r['commit']}: pipeline {pipe:.1f} img/s -> "
              f"{_hms(args.images / pipe)}; bare encoder {bare:.1f} img/s -> {_hms(args.images / bare)} "
              f"(encoder achieves {achieved:.0f} TFLOP/s = {achieved / args.peak_tflops:.0%} of the GEMM rate)")


if __name__ == "__main__":
    main()
