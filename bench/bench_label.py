"""End-to-end `label` throughput against (a) a naive reference and (b) the bare encoder, in one run.

(a) The naive reference is written the way research code usually is: PIL per view, ToTensor + Normalize per view,
    one encoder forward per view, Python loops for softmax and min-max (same view geometry as the pipeline). Its
    outputs are checked against the store, so the speedup compares equal work.
(b) The bare encoder runs on pre-decoded, pre-normalized view tensors at the same batch size: the upper bound the
    pipeline (decode, tiling, aggregation, store writes) should approach.

    python bench/bench_label.py --images 96 --clip shapes-clip
    python bench/bench_label.py --images 512 --clip ViT-B-32 --clip-weights openai --device cuda   # GPU machine

Rows go to bench/results/label.csv with device, versions and commit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.clip.loader import load_clip  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.store.label_store import LabelStore  # noqa: E402
from cdul_fast.views.decode import load_rgb  # noqa: E402
from cdul_fast.views.geometry import ViewSpec, normalize_views  # noqa: E402
from cdul_fast.views.resample import pil_views  # noqa: E402

CLASSES = [f"class{i}" for i in range(20)]


def make_images(root: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields, a few rectangles, mild noise; quality 90): file sizes and decode cost
    close to Flickr photos of the same size, unlike pure noise, which no camera produces."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    w = side * 4 // 3
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 255, (max(2, side // 32), max(2, w // 32), 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((w, side), Image.Resampling.BICUBIC)).astype(np.int16)
        for _ in range(3):
            y, x = rng.integers(0, side // 2), rng.integers(0, w // 2)
            arr[y:y + side // 4, x:x + w // 4] = rng.integers(0, 255, 3)
        arr += rng.integers(-12, 13, arr.shape, dtype=np.int16)
        p = root / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def naive_label(clip, paths: list[Path], grid: int, zeta: float, lam: float) -> np.ndarray:
    """Per image and per view: PIL resize of the region, ToTensor + Normalize, one encoder forward; Python loops.

    The view geometry is the pipeline's (``views.view_boxes`` + ``views.resize_crop``, open_clip's resize rule), so
    the outputs must agree; everything else is done one item at a time, the way research code usually is. On CUDA
    it runs under the same bf16 autocast as the pipeline, so the ratio measures structure, not precision.
    """
    from PIL import Image as PILImage
    from torchvision.transforms import functional as TF

    from cdul_fast.views.geometry import resize_crop, view_boxes

    spec = ViewSpec.from_preprocess_cfg(clip.preprocess_cfg, grid)
    text = clip.encode_text(CLASSES).float().cpu()
    scale = clip.logit_scale
    cuda = clip.device.type == "cuda"
    out = np.zeros((len(paths), len(CLASSES)), dtype=np.float32)
    for r, path in enumerate(paths):
        img = PILImage.open(path).convert("RGB")
        probs = []
        for box in view_boxes(img.width, img.height, grid):
            view = resize_crop(img, box, spec.image_size, PILImage.Resampling.BICUBIC)
            x = TF.normalize(TF.to_tensor(view), spec.mean, spec.std).unsqueeze(0).to(clip.device)
            with torch.no_grad(), torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=cuda):
                f = clip.model.encode_image(x).float().cpu()[0]
            f = f / f.norm()
            logits = [scale * float(f @ text[c]) for c in range(len(CLASSES))]
            m = max(logits)
            e = [float(np.exp(v - m)) for v in logits]
            probs.append([v / sum(e) for v in e])
        for c in range(len(CLASSES)):
            g = probs[0][c]
            local = [p[c] for p in probs[1:]]
            a = max(local) if max(local) >= zeta else min(local)
            out[r, c] = 0.5 * (g + a + lam * abs(g - a))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_encoder(clip, paths: list[Path], grid: int, batch: int) -> float:
    """Seconds to encode pre-decoded, normalized views (already on the device) at ``batch`` images per forward."""
    spec = ViewSpec.from_preprocess_cfg(clip.preprocess_cfg, grid)
    views = torch.from_numpy(np.stack([pil_views(load_rgb(p), spec) for p in paths]))
    x = normalize_views(views, spec.mean, spec.std).to(clip.device)
    per = spec.num_views
    cuda = clip.device.type == "cuda"

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=cuda):
            for i in range(0, n, batch):
                clip.encode_image(x[i * per:min(i + batch, n) * per])

    run(min(batch, len(paths)))  # warm-up: cuDNN algorithm choice, allocator
    _sync(clip.device)
    t0 = time.perf_counter()
    run(len(paths))
    _sync(clip.device)
    return time.perf_counter() - t0


def decode_only(decoder: str, paths: list[Path], spec: ViewSpec, device: torch.device, batch: int) -> float:
    """Seconds for decode + tiling alone (views delivered on the label device, no encoder): the decode budget."""
    from cdul_fast.views.registry import make_view_source
    from cdul_fast.views.source import plan_blocks

    source = make_view_source(decoder, paths, spec, device, batch)
    blocks = plan_blocks(np.arange(len(paths)), len(paths), batch)
    t0 = time.perf_counter()
    for b in source.batches(blocks):
        b.views.to(device, non_blocking=True)
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--naive-images", type=int, default=24, help="images for the (slow) naive reference")
    ap.add_argument("--side", type=int, default=288, help="image height in pixels (width is 4/3 of it)")
    ap.add_argument("--clip", default="shapes-clip", help="CLIP name (e.g. RN50x64) or shipped model")
    ap.add_argument("--clip-weights", default=None, help="weights tag/file; 'random' times an architecture offline")
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decoders", default="auto", help="comma-separated decoders to time (auto,pil,tensor,dali)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "label.csv"))
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    clip = load_clip(args.clip, args.clip_weights, device=device, precision="fp32")
    spec = ViewSpec.from_preprocess_cfg(clip.preprocess_cfg, args.grid)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "imgs", args.images, args.side)
        t_bare = bare_encoder(clip, paths, args.grid, args.batch_size)
        k = min(args.naive_images, len(paths))
        clip.encode_image(torch.zeros((1, 3, spec.image_size, spec.image_size), device=device))  # warm-up
        t0 = time.perf_counter()
        naive = naive_label(clip, paths[:k], args.grid, 0.3, 1.0)
        t_naive = (time.perf_counter() - t0) * len(paths) / k
        for decoder in args.decoders.split(","):
            store = Path(tmp) / f"{decoder}.cdul"
            cfg = LabelConfig(out=str(store), dataset="folder", root=str(Path(tmp) / "imgs"),
                              dataset_options={"classes": ",".join(CLASSES)}, clip=args.clip,
                              clip_weights=args.clip_weights, grid=args.grid, zeta=0.3, lam=1.0,
                              batch_size=args.batch_size, decoder=decoder, device=str(device), progress=False)
            run_label(cfg, log=lambda s: None, clip=clip)  # warm-up (first-call costs, page cache)
            cfg.overwrite = True
            t0 = time.perf_counter()
            run_label(cfg, log=lambda s: None, clip=clip)
            t_pipe = time.perf_counter() - t0
            t_dec = decode_only(decoder, paths, spec, device, args.batch_size)
            with LabelStore.open(store) as st:
                used = st.meta["decoder"]
                diff = float(np.abs(np.asarray(st.array("final"))[:k] - naive).max())
            n = len(paths)
            rows.append({**environment(), "clip": args.clip, "image_px": f"{args.side * 4 // 3}x{args.side}",
                         "views_px": spec.image_size, "images": n, "grid": args.grid, "batch": args.batch_size,
                         "decoder": used, "pipeline_img_s": round(n / t_pipe, 2),
                         "bare_encoder_img_s": round(n / t_bare, 2), "naive_img_s": round(n / t_naive, 2),
                         "decode_only_img_s": round(n / t_dec, 2),
                         "serial_bound_img_s": round(n / (t_dec + t_bare), 2),
                         "pipeline_vs_bare": round(t_bare / t_pipe, 3),
                         "pipeline_vs_serial_bound": round((t_dec + t_bare) / t_pipe, 3),
                         "pipeline_vs_naive": round(t_naive / t_pipe, 2), "max_abs_diff_vs_naive": f"{diff:.2e}"})
    write_rows(Path(args.csv), rows)
    print(f"device: {rows[0]['device']}  clip: {args.clip} ({spec.image_size}px views)  images: {len(paths)} "
          f"of {rows[0]['image_px']}  views/image: {spec.num_views}  batch: {args.batch_size}")
    print(f"bare encoder  {rows[0]['bare_encoder_img_s']:9.2f} img/s   (pre-decoded views on the device)")
    print(f"naive         {rows[0]['naive_img_s']:9.2f} img/s   (PIL per view, one forward per view)")
    for r in rows:
        print(f"pipeline [{r['decoder']:>11}] {r['pipeline_img_s']:9.2f} img/s   = {r['pipeline_vs_bare']:.2f} x bare "
              f"encoder, {r['pipeline_vs_naive']:.1f}x naive; max |pipeline - naive| = {r['max_abs_diff_vs_naive']}")
        print(f"    decode+tiling alone {r['decode_only_img_s']:.1f} img/s; if decode and encoder cannot overlap (same "
              f"cores) the limit is 1/(1/decode + 1/encoder) = {r['serial_bound_img_s']:.1f} img/s: pipeline = "
              f"{r['pipeline_vs_serial_bound']:.2f} x that")


if __name__ == "__main__":
    main()
