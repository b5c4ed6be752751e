"""Encode once, score many: `rescore` vs labelling again, store size, and re-scoring throughput and memory at scale.

1. The same change of classes (8 of the 12 shapes classes plus 2 new names) done twice on CPU with the shipped CLIP:
   `label` from scratch with the new list vs `rescore` of a store saved with --save-embeddings. Both end to end in
   this process, CLIP loading included; the rescore's block loop is also timed alone. Median of 3.
2. Bytes per image of a store with `final` only, with fp16 and with fp32 embeddings (measured for the shapes CLIP;
   computed for RN50x64 on NUS-WIDE).
3. The rescore block loop (read a block of the mapped embeddings, cosine, fused aggregation, store write) at
   150,000 rows x 10 views x K = 1024 fp16 and C = 81 (synthetic unit vectors, random text embeddings): rows/s and
   peak anonymous memory (RssAnon: the process's own allocations; the mapped file's pages are page cache, which the
   kernel reclaims), also at 15,000 rows to show that memory does not grow with rows.
4. The GPU projection for RN50x64 (arithmetic, stated assumptions).

    python bench/bench_rescore.py              # ~3 minutes on 2 CPU cores, 3.1 GB of temporary disk
    python bench/bench_rescore.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import environment, write_rows  # noqa: E402

from cdul_fast.clip.prompts import encode_classes, prompts_from_meta  # noqa: E402
from cdul_fast.datasets import load_dataset  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, _write_runs, run_label  # noqa: E402
from cdul_fast.label.rescore import (  # noqa: E402
    RescoreConfig,
    block_embeddings,
    embedding_blocks,
    load_text_encoder,
    run_rescore,
)
from cdul_fast.label.scoring import EMBEDDINGS, score_block  # noqa: E402
from cdul_fast.store.label_store import LabelStore  # noqa: E402

NEW_CLASSES = ("circle", "square", "triangle", "star", "heart", "ring", "arrow", "diamond", "moon", "spiral")
ENCODER_TFLOP_PER_IMAGE = 5.29  # RN50x64, 448 px, 10 views (bench/RESULTS.md, FlopCounterMode)
H100_BF16_TFLOPS = 798.0  # measured 8192^3 bf16 GEMM (device notes, bench/RESULTS.md)


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class _PeakAnon:
    """Peak RssAnon while the block runs, sampled every 10 ms."""

    def __enter__(self):
        self.base, self.peak, self._stop = _rss_anon(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon())


def rescore_loop(src: LabelStore, out: LabelStore, text: torch.Tensor, scale: float, block_rows: int) -> None:
    """The block loop of `run_rescore`, without model loading or store creation."""
    rows = np.arange(src.rows)
    arrays = ["final"]
    for block in embedding_blocks(src, rows, block_rows):
        with torch.inference_mode():
            values = score_block(block_embeddings(src, block, torch.device("cpu")), text, scale, 0.3, 1.0, "cdul",
                                 arrays)
        _write_runs(out, block, {k: v.numpy() for k, v in values.items()})


def shapes_part(tmp: Path, n: int, repeat: int) -> dict:
    root = tmp / "world"
    ds = load_dataset("shapes", root, "train", n=n)
    new_ds = dataclasses.replace(ds, class_names=NEW_CLASSES, labels=None)
    base = dict(dataset="shapes", root=str(root), split="train", dataset_options={"n": n}, device="cpu",
                progress=False, overwrite=True)
    quiet = {"log": lambda s: None}
    sizes = {}
    for name, kw in {"final only": {}, "fp16 embeddings": {"save_embeddings": True},
                     "fp32 embeddings": {"save_embeddings": True, "embedding_dtype": "fp32"}}.items():
        out = tmp / f"{name.replace(' ', '_')}.cdul"
        run_label(LabelConfig(out=str(out), **base, **kw), dataset=ds, **quiet)
        sizes[name] = out.stat().st_size / n
    src = tmp / "fp16_embeddings.cdul"
    t_plain = _median(lambda: run_label(LabelConfig(out=str(tmp / "p.cdul"), **base), dataset=ds, **quiet), repeat)
    t_emb = _median(lambda: run_label(LabelConfig(out=str(tmp / "e.cdul"), **base, save_embeddings=True),
                                      dataset=ds, **quiet), repeat)
    t_label_new = _median(lambda: run_label(LabelConfig(out=str(tmp / "n.cdul"), **base), dataset=new_ds, **quiet),
                          repeat)
    t_rescore = _median(lambda: run_rescore(RescoreConfig(source=str(src), out=str(tmp / "r.cdul"),
                                                          classes=list(NEW_CLASSES), device="cpu", overwrite=True,
                                                          progress=False), **quiet), repeat)
    with LabelStore.open(src) as st:
        clip = load_text_encoder(st.meta, torch.device("cpu"))
        text = encode_classes(clip, NEW_CLASSES, prompts_from_meta(st.meta))
        scale = float(st.meta["logit_scale"])

        def loop() -> None:
            with LabelStore.create(tmp / "loop.cdul", NEW_CLASSES, st.rows, ["final"], overwrite=True) as out:
                rescore_loop(st, out, text, scale, 2048)

        t_loop = _median(loop, repeat)
        views, dim = st.tensor(EMBEDDINGS).shape[1:]
    return {"n": n, "views": views, "dim": dim, "sizes": sizes, "label_plain": t_plain, "label_emb": t_emb,
            "label_new": t_label_new, "rescore": t_rescore, "rescore_loop": t_loop}


def synthetic_part(tmp: Path, rows: int, views: int, dim: int, classes: int) -> dict:
    """A store of ``rows`` random unit embeddings, then the rescore block loop over it."""
    path = tmp / f"syn{rows}.cdul"
    gen = torch.Generator().manual_seed(0)
    names = tuple(f"c{i}" for i in range(classes))
    with LabelStore.create(path, names, rows, ["final"], tensors={EMBEDDINGS: ("float16", (views, dim))},
                           overwrite=True) as st:
        for r0 in range(0, rows, 5000):
            r1 = min(rows, r0 + 5000)
            e = F.normalize(torch.randn(r1 - r0, views, dim, generator=gen), dim=-1).half().numpy()
            st.write(r0, {"final": np.zeros((r1 - r0, classes), np.float32), EMBEDDINGS: e})
    text = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    with LabelStore.open(path, verify=False) as src, \
            LabelStore.create(tmp / "synout.cdul", names, rows, ["final"], overwrite=True) as out:
        with _PeakAnon() as mem:
            t0 = time.perf_counter()
            rescore_loop(src, out, text, 100.0, 2048)
            seconds = time.perf_counter() - t0
    file_bytes = path.stat().st_size
    path.unlink()
    (tmp / "synout.cdul").unlink()
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_anon": mem.peak,
            "base_anon": mem.base, "file_bytes": file_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="shapes train images")
    ap.add_argument("--rows", type=int, default=150_000, help="rows of the synthetic store (0: skip that part)")
    ap.add_argument("--dim", type=int, default=1024, help="embedding width K of the synthetic store")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "rescore.csv"))
    args = ap.parse_args()
    if args.quick:
        args.images, args.rows, args.dim, args.repeat = 40, 3000, 256, 1
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s = shapes_part(tmp, args.images, args.repeat)
        syn = [synthetic_part(tmp, r, 10, args.dim, 81) for r in (args.rows // 10, args.rows)] if args.rows else []
    print(f"device {env['device']}, commit {env['commit']}, torch threads {torch.get_num_threads()}\n")
    print(f"1. change of classes on {s['n']} shapes images (shipped CLIP, {s['views']} views, K = {s['dim']}), median "
          f"of {args.repeat}:")
    print(f"   label from scratch with the new list  {s['label_new']:8.2f} s")
    print(f"   rescore, end to end (loads CLIP)       {s['rescore']:8.2f} s   -> {s['label_new'] / s['rescore']:.0f}x")
    print(f"   rescore block loop alone               {s['rescore_loop']:8.3f} s   -> "
          f"{s['label_new'] / s['rescore_loop']:.0f}x")
    print(f"   cost of --save-embeddings: label {s['label_emb']:.2f} s vs {s['label_plain']:.2f} s without "
          f"({s['label_emb'] / s['label_plain']:.3f}x)")
    sz = s["sizes"]
    print("2. store bytes per image (file size / images, the 68 KiB header + metadata included): "
          + ", ".join(f"{k} {v:,.0f}" for k, v in sz.items()) + f"; embeddings add "
          f"{sz['fp16 embeddings'] - sz['final only']:,.0f} (fp16) / {sz['fp32 embeddings'] - sz['final only']:,.0f}"
          f" (fp32) = {s['views']} views x {s['dim']} x 2 / 4 bytes. RN50x64 (K = 1024, 10 views): fp16 "
          f"{10 * 1024 * 2:,}, fp32 {10 * 1024 * 4:,} bytes per image; NUS-WIDE train (161,789 images): fp16 "
          f"{161789 * 20480 / 1e9:.2f} GB, fp32 {161789 * 40960 / 1e9:.2f} GB")
    print(f"3. rescore block loop, synthetic fp16 embeddings x 10 views x K = {args.dim}, 81 classes:" if syn else
          "3. (synthetic part skipped: --rows 0)")
    for r in syn:
        gb, peak, before = r["file_bytes"] / 1e9, r["peak_anon"] / 2**20, r["base_anon"] / 2**20
        print(f"   {r['rows']:>7} rows: {r['rows_per_s']:9,.0f} rows/s ({r['seconds']:.1f} s; {gb:.2f} GB file), "
              f"peak anonymous memory {peak:.0f} MiB (before: {before:.0f} MiB)")
    enc_s = ENCODER_TFLOP_PER_IMAGE / (0.6 * H100_BF16_TFLOPS)
    read_s = 10 * 1024 * 2 / 2e9
    print(f"4. GPU projection, RN50x64: the encoder needs {ENCODER_TFLOP_PER_IMAGE} TFLOP per image, {enc_s * 1e3:.1f} "
          f"ms at 60 % of an H100's {H100_BF16_TFLOPS:.0f} bf16 TFLOP/s; a rescore reads 20 KB per image (fp16), "
          f"{read_s * 1e6:.0f} us at 2 GB/s (NVMe) and computes 1.7 MFLOP: about {enc_s / read_s:,.0f}x, so "
          f"NUS-WIDE's 150K images re-score in ~{150_000 * read_s:.1f} s instead of ~{150_000 * enc_s / 60:.0f} min")
    rows = [{**env, "part": "classes", "images": s["n"], "label_new_s": round(s["label_new"], 3),
             "rescore_s": round(s["rescore"], 3), "rescore_loop_s": round(s["rescore_loop"], 4),
             "ratio": round(s["label_new"] / s["rescore"], 1), "rows_per_s": "", "peak_anon_mib": ""}]
    rows += [{**env, "part": "synthetic", "images": r["rows"], "label_new_s": "", "rescore_s": round(r["seconds"], 3),
              "rescore_loop_s": round(r["seconds"], 3), "ratio": "", "rows_per_s": round(r["rows_per_s"]),
              "peak_anon_mib": round(r["peak_anon"] / 2**20)} for r in syn]
    print(f"wrote {len(rows)} rows to {write_rows(Path(args.csv), rows)}")


if __name__ == "__main__":
    main()
