"""Encode once, score many: `rescore` vs labelling again, store size, re-scoring throughput and memory at scale.

1. One change of classes (8 of the 12 shapes classes plus 2 new names) made twice on CPU with the shipped CLIP:
   `label` from scratch with the new list (the `folder` dataset over the same image files, `--classes`) vs `rescore`
   of a store labelled once with --save-embeddings. Both run end to end in this process, CLIP loading included; the
   rescore's own compute (output store + block loop, RescoreResult.seconds) is also reported without the model
   load. Rounds are interleaved (label, label --save-embeddings, label new list, rescore), median of --repeat.
2. Bytes per image of a store with `final` only, with fp16 and with fp32 embeddings: measured (file size / images)
   for the shapes CLIP, computed with the store's own layout function for RN50x64 (K = 1024, V = 10) on NUS-WIDE.
3. `run_rescore` end to end on a synthetic store of unit fp16 embeddings, 10 views x K = 1024, C = 81, at --rows and
   --rows / 10 rows. The text side is a random-weights CLIP JSON config of embed_dim K (the store's metadata names it,
   as `label` would have written it), so nothing is bypassed. rows/s and peak anonymous memory (RssAnon sampled every
   10 ms); the mapped embeddings are file-backed page cache (RssFile), not the process's own memory. Each size runs
   twice: with the file's pages dropped from the page cache first (cold: read from disk) and again (warm).
4. The GPU projection for RN50x64 (arithmetic with stated assumptions, not a measurement).

    python bench/bench_rescore.py            # ~5 minutes on 2 CPU cores, 3.1 GB of temporary disk at most
    python bench/bench_rescore.py --quick    # smoke run (< 60 s)
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table  # noqa: E402

from cdul_fast.clip.loader import DEFAULT_TEMPLATE, load_clip  # noqa: E402
from cdul_fast.clip.prompts import encode_classes, make_prompts, prompts_from_meta  # noqa: E402
from cdul_fast.datasets import MultiLabelSet, load_dataset  # noqa: E402
from cdul_fast.label.job import store_meta  # noqa: E402
from cdul_fast.label.pipeline import LabelConfig, run_label  # noqa: E402
from cdul_fast.label.rescore import RescoreConfig, load_text_encoder, run_rescore  # noqa: E402
from cdul_fast.label.scoring import EMBEDDINGS  # noqa: E402
from cdul_fast.store import label_store as ls  # noqa: E402
from cdul_fast.store.label_store import LabelStore  # noqa: E402

NEW_CLASSES = ("circle", "square", "triangle", "star", "heart", "ring", "arrow", "diamond", "moon", "spiral")
NUS_TRAIN_IMAGES = 161_789
NUS_CLASSES = 81
RN50X64_DIM, VIEWS = 1024, 10
ENCODER_TFLOP_PER_IMAGE = 5.29  # RN50x64, 10 views of 448 px: 529.1 GFLOP per view (bench/RESULTS.md)
H100_BF16_TFLOPS = 798.0  # measured 8192^3 bf16 GEMM on this workplace's H100 (bench/RESULTS.md)
H100_FP32_TFLOPS = 67.0  # H100 SXM non-tensor fp32 peak (the rescore's cosine and aggregation run in fp32)
ENCODER_EFFICIENCY = 0.6
DISK_BW = 2e9  # bytes/s: one NVMe SSD, sequential read
PCIE_BW = 25e9  # bytes/s: host-to-device copies over PCIe 4/5 x16, achieved
TARGET_RATIO = 100.0
QUIET = {"log": lambda s: None}
CSV_FIELDS = ("part", "metric", "value", "unit", "note")


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _proc_status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (RssAnon, RssFile, ...); 0 where absent (not Linux)."""
    out = dict.fromkeys(keys, 0)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k = line.split(":", 1)[0]
            if k in out:
                out[k] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class PeakMemory:
    """Peak RssAnon (the process's own allocations) and RssFile (mapped file pages) while the block runs, sampled
    every 10 ms by a thread (torch and zlib release the GIL in the long calls, so it keeps sampling)."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _trim()
        now = _proc_status("RssAnon", "RssFile")
        self.base_anon, self.base_file = now["RssAnon"], now["RssFile"]
        self.peak_anon, self.peak_file = self.base_anon, self.base_file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        now = _proc_status("RssAnon", "RssFile")
        self.peak_anon = max(self.peak_anon, now["RssAnon"])
        self.peak_file = max(self.peak_file, now["RssFile"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _trim() -> None:
    """Give freed heap back to the OS (glibc), so a baseline RssAnon is not inflated by earlier, freed work."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _drop_cache(path: Path) -> bool:
    """Evict one file's pages from the page cache (flushed first); only this file, nothing system-wide."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def store_bytes(rows: int, classes: int, emb: tuple[str, tuple[int, ...]] | None, meta_len: int = 2048) -> int:
    """The file size `label` creates: the store's own layout (header page, >= 64 KiB metadata region, done map,
    `final`, file stats, embeddings; each region page-aligned)."""
    tensors = {EMBEDDINGS: (ls.TENSOR_DTYPES[emb[0]], emb[1])} if emb else None
    return int(ls._layout(rows, classes, ["final"], meta_len, True, tensors).file_bytes)


# ------------------------------------------------------------------------------------------- 1. change of classes


def classes_part(tmp: Path, n: int, repeat: int) -> dict:
    root = tmp / "shapes"
    t0 = time.perf_counter()
    load_dataset("shapes", root, "train", n=n)  # generate the world once, untimed below
    gen_s = time.perf_counter() - t0
    shapes = dict(dataset="shapes", root=str(root), split="train", dataset_options={"n": n}, device="cpu",
                  progress=False, overwrite=True)
    folder = dict(shapes, dataset="folder", dataset_options={"classes": ",".join(NEW_CLASSES)})
    plain, emb, emb32 = tmp / "final_only.cdul", tmp / "emb_fp16.cdul", tmp / "emb_fp32.cdul"
    new, out = tmp / "label_new.cdul", tmp / "rescored.cdul"
    t: dict[str, list[float]] = {k: [] for k in ("plain", "emb", "new", "new_loop", "rescore", "rescore_compute",
                                                "load", "text")}

    def timed(fn) -> tuple[float, object]:
        t0 = time.perf_counter()
        res = fn()
        return time.perf_counter() - t0, res

    run_label(LabelConfig(out=str(plain), **shapes), **QUIET)  # warm-up, untimed: lazy imports, page cache
    for _ in range(repeat):  # interleaved rounds: machine noise spreads over every variant alike
        t["plain"].append(timed(lambda: run_label(LabelConfig(out=str(plain), **shapes), **QUIET))[0])
        t["emb"].append(timed(lambda: run_label(LabelConfig(out=str(emb), **shapes, save_embeddings=True),
                                                **QUIET))[0])
        s, res = timed(lambda: run_label(LabelConfig(out=str(new), **folder), **QUIET))
        t["new"].append(s)
        t["new_loop"].append(res.seconds)
        s, res = timed(lambda: run_rescore(RescoreConfig(source=str(emb), out=str(out), classes=",".join(NEW_CLASSES),
                                                         device="cpu", overwrite=True, progress=False), **QUIET))
        t["rescore"].append(s)
        t["rescore_compute"].append(res.seconds)
    t_emb32 = timed(lambda: run_label(LabelConfig(out=str(emb32), **shapes, save_embeddings=True,
                                                  embedding_dtype="fp32"), **QUIET))[0]
    with LabelStore.open(emb) as st:  # the fixed part of a rescore, piece by piece
        meta, (views, dim) = dict(st.meta), st.tensor(EMBEDDINGS).shape[1:]
        meta_len = len(ls._meta_bytes(st.class_names, st.meta))
    for _ in range(repeat):
        s, clip = timed(lambda: load_text_encoder(meta, torch.device("cpu")))
        t["load"].append(s)
        t["text"].append(timed(lambda c=clip: encode_classes(c, NEW_CLASSES, prompts_from_meta(meta)))[0])
    out32 = tmp / "rescored_fp32.cdul"
    run_rescore(RescoreConfig(source=str(emb32), out=str(out32), classes=",".join(NEW_CLASSES), device="cpu",
                              overwrite=True, progress=False), **QUIET)
    with LabelStore.open(new) as a, LabelStore.open(out) as b, LabelStore.open(out32) as c:
        assert a.class_names == b.class_names == NEW_CLASSES and a.rows == b.rows == n
        diff16 = float(np.abs(a.array("final") - b.array("final")).max())
        diff32 = float(np.abs(a.array("final") - c.array("final")).max())
    return {"n": n, "gen_s": gen_s, "views": int(views), "dim": int(dim), "meta_len": meta_len,
            "med": {k: _median(v) for k, v in t.items()}, "emb32_s": t_emb32, "diff16": diff16, "diff32": diff32,
            "size": {"final": plain.stat().st_size, "fp16": emb.stat().st_size, "fp32": emb32.stat().st_size}}


def crossover(n: int, label_e2e: float, label_loop: float, rescore_e2e: float, rescore_compute: float) -> float | None:
    """Images from which label / rescore >= TARGET_RATIO, under a linear model (fixed + per-image cost) fitted to
    this run's split of each time into its fixed part and its loop."""
    a_l, b_l = label_e2e - label_loop, label_loop / n
    a_r, b_r = rescore_e2e - rescore_compute, rescore_compute / n
    if b_l <= TARGET_RATIO * b_r:
        return None
    return max(0.0, (TARGET_RATIO * a_r - a_l) / (b_l - TARGET_RATIO * b_r))


# ------------------------------------------------------------------------------------- 3. rescore at scale, synthetic


def random_clip_config(tmp: Path, dim: int) -> Path:
    """A CLIP JSON config with embed_dim ``dim``: a small random text tower projecting to ``dim`` (the vision tower
    is a token one; rescore drops it on load)."""
    path = tmp / f"random_clip_{dim}.json"
    path.write_text(json.dumps({
        "embed_dim": dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))
    return path


def synthetic_store(tmp: Path, rows: int, dim: int, classes: tuple[str, ...], clip_json: Path) -> Path:
    """A complete store as `label --save-embeddings` writes it (meta from `store_meta`) with random unit vectors."""
    path = tmp / f"synthetic_{rows}.cdul"
    clip = load_clip(str(clip_json), "random", text_only=True)
    ds = MultiLabelSet(name="synthetic", split="train", root=tmp, class_names=classes,
                       paths=tuple(Path(f"img{i:07d}.jpg") for i in range(rows)),
                       ids=tuple(f"img{i:07d}.jpg" for i in range(rows)))
    cfg = LabelConfig(out=str(path), clip=str(clip_json), clip_weights="random", save_embeddings=True)
    meta = store_meta(cfg, ds, clip, "pil", "fp32", make_prompts(classes, DEFAULT_TEMPLATE),
                      embeddings=(VIEWS, dim))
    gen = torch.Generator().manual_seed(0)
    chunk = 4096
    with LabelStore.create(path, classes, rows, ["final"], meta=meta, overwrite=True,
                           tensors={EMBEDDINGS: ("float16", (VIEWS, dim))}) as st:
        zeros = np.zeros((chunk, len(classes)), np.float32)
        for r0 in range(0, rows, chunk):
            k = min(chunk, rows - r0)
            e = F.normalize(torch.randn(k, VIEWS, dim, generator=gen), dim=-1).half().numpy()
            st.write(r0, {"final": zeros[:k], EMBEDDINGS: e})
    return path


def synthetic_part(tmp: Path, rows: int, dim: int, classes: int, block_rows: int) -> list[dict]:
    names = tuple(f"tag{i:02d}" for i in range(classes))
    clip_json = random_clip_config(tmp, dim)
    results = []
    for r in (max(1, rows // 10), rows):
        t0 = time.perf_counter()
        src = synthetic_store(tmp, r, dim, names, clip_json)
        make_s = time.perf_counter() - t0
        file_bytes = src.stat().st_size
        out = tmp / "synthetic_out.cdul"
        try:
            for cache in ("cold", "warm"):
                dropped = _drop_cache(src) if cache == "cold" else False
                with PeakMemory() as mem:
                    t0 = time.perf_counter()
                    res = run_rescore(RescoreConfig(source=str(src), out=str(out), device="cpu", overwrite=True,
                                                    block_rows=block_rows, progress=False), **QUIET)
                    e2e = time.perf_counter() - t0
                assert res.rescored_now == r
                results.append({"rows": r, "cache": cache if cache == "warm" or dropped else "as written",
                                "e2e_s": e2e, "compute_s": res.seconds, "rows_per_s": res.rows_per_second,
                                "base_anon": mem.base_anon, "peak_anon": mem.peak_anon, "base_file": mem.base_file,
                                "peak_file": mem.peak_file, "file_bytes": file_bytes, "make_s": make_s})
        finally:
            src.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
    return results


# ----------------------------------------------------------------------------------------------------------- report


def _row(part: str, metric: str, value, unit: str = "", note: str = "") -> dict:
    return {"part": part, "metric": metric, "value": value, "unit": unit, "note": note}


def _csv_path(path: Path, explicit: bool) -> Path:
    """The CSV to append to; the default one is replaced by a sibling when an older version left other columns."""
    if not explicit and path.is_file() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header[-len(CSV_FIELDS):] != list(CSV_FIELDS):
            alt = path.with_name(path.stem + "_v2" + path.suffix)
            print(f"note: {path} has another version's columns; appending to {alt} instead")
            return alt
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="shapes train images (default 1000)")
    ap.add_argument("--rows", type=int, default=150_000,
                    help="rows of the large synthetic store; --rows / 10 also runs (0: skip part 3)")
    ap.add_argument("--dim", type=int, default=RN50X64_DIM, help="embedding width K of the synthetic store")
    ap.add_argument("--classes", type=int, default=NUS_CLASSES, help="classes C of the synthetic rescore")
    ap.add_argument("--block-rows", type=int, default=2048, help="rescore --block-rows of part 3 (default 2048)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds of part 1 (median; default 3)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run (< 60 s)")
    ap.add_argument("--out", "--csv", dest="out", type=Path, default=None,
                    help="CSV to append rows to (default: bench/results/rescore.csv)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.rows, args.repeat, args.block_rows = 40, 3000, 1, 256
    csv_path = _csv_path(args.out or Path(__file__).resolve().parent / "results" / "rescore.csv", args.out is not None)
    env = environment()
    load0 = os.getloadavg()
    print(f"device {env['device']}, commit {env['commit']}, torch {env['torch']}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, load average {load0[0]:.2f}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-rescore-") as tmp_name:
        tmp = Path(tmp_name)
        s = classes_part(tmp, args.images, max(1, args.repeat))
        syn = synthetic_part(tmp, args.rows, args.dim, args.classes, args.block_rows) if args.rows > 0 else []
    rows = report(s, syn, args)
    print()
    print_table([{**env, **r} for r in rows], CSV_FIELDS[:4], csv_path)
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    return 0


def report(s: dict, syn: list[dict], args) -> list[dict]:
    m, n, rows = s["med"], s["n"], []
    k = f"median of {max(1, args.repeat)}"
    ratio_e2e, ratio_compute = m["new"] / m["rescore"], m["new"] / m["rescore_compute"]
    fixed = m["rescore"] - m["rescore_compute"]
    print(f"\n1. change of classes: {len(NEW_CLASSES)} classes ({', '.join(NEW_CLASSES)}; 8 of the 12 shapes classes "
          f"+ 2 new) on {n} shapes train images (world generated once, {s['gen_s']:.1f} s, untimed), shipped CLIP "
          f"(shapes-clip, {s['views']} views, K = {s['dim']}), CPU, {k}, in-process, end to end incl. CLIP load:")
    print(f"   label from scratch, folder dataset + --classes   {m['new']:8.3f} s  (of which its image loop "
          f"{m['new_loop']:.3f} s)")
    print(f"   rescore of the --save-embeddings store, e2e      {m['rescore']:8.3f} s  -> {ratio_e2e:7.1f}x "
          f"(target >= {TARGET_RATIO:.0f}x: {'met' if ratio_e2e >= TARGET_RATIO else 'NOT met'})")
    print(f"   rescore compute alone (output store + blocks)    {m['rescore_compute']:8.4f} s  -> {ratio_compute:7.1f}x"
          "  (excludes opening/verifying the source, CLIP text load, text encoding)")
    print(f"   rescore's fixed part {fixed:.3f} s: load_text_encoder {m['load']:.3f} s (open_clip's BPE tokenizer and "
          f"model build), encode {len(NEW_CLASSES)} prompts {m['text']:.4f} s, rest (source open + verify, yaml) "
          f"{max(0.0, fixed - m['load'] - m['text']):.3f} s")
    cross = crossover(n, m["new"], m["new_loop"], m["rescore"], m["rescore_compute"])
    if cross is not None:
        print(f"   linear model (fixed + per-image cost of each, from this run): the e2e ratio reaches "
              f"{TARGET_RATIO:.0f}x from ~{cross:,.0f} images (an estimate, not a measurement)")
    save_ratio = m["emb"] / m["plain"]
    print(f"   cost of --save-embeddings: label {m['emb']:.3f} s vs {m['plain']:.3f} s without -> {save_ratio:.3f}x "
          f"(fp32 embeddings, 1 run: {s['emb32_s']:.3f} s)")
    print(f"   agreement with label from scratch: max |final diff| {s['diff16']:.2e} (rescore of fp16 embeddings), "
          f"{s['diff32']:.2e} (fp32)")
    rows += [_row("classes", "label_new_list_s", f"{m['new']:.3f}", "s", f"{n} images, e2e, {k}"),
             _row("classes", "label_new_list_loop_s", f"{m['new_loop']:.3f}", "s", "image loop only"),
             _row("classes", "rescore_e2e_s", f"{m['rescore']:.3f}", "s", "e2e incl. CLIP text load"),
             _row("classes", "rescore_compute_s", f"{m['rescore_compute']:.4f}", "s", "output store + block loop"),
             _row("classes", "rescore_load_text_encoder_s", f"{m['load']:.3f}", "s"),
             _row("classes", "ratio_e2e", f"{ratio_e2e:.1f}", "x", f"target >= {TARGET_RATIO:.0f}"),
             _row("classes", "ratio_compute", f"{ratio_compute:.1f}", "x", "label e2e / rescore compute"),
             _row("classes", "crossover_images", f"{cross:.0f}" if cross is not None else "", "images",
                  "linear-model estimate of ratio_e2e >= 100"),
             _row("classes", "label_s", f"{m['plain']:.3f}", "s", "shapes, no embeddings"),
             _row("classes", "label_save_embeddings_s", f"{m['emb']:.3f}", "s", "shapes, fp16 embeddings"),
             _row("classes", "save_embeddings_ratio", f"{save_ratio:.3f}", "x", "with / without"),
             _row("classes", "max_abs_diff_fp16", f"{s['diff16']:.2e}", "", "rescore vs label from scratch"),
             _row("classes", "max_abs_diff_fp32", f"{s['diff32']:.2e}", "", "rescore vs label from scratch")]

    sz, V, K = s["size"], s["views"], s["dim"]
    per = {key: v / n for key, v in sz.items()}
    print("\n2. store bytes per image (file size / images; the header page and the >= 64 KiB metadata region are "
          "spread over the rows):")
    print(f"   measured, shapes ({n} images, 12 classes, V = {V}, K = {K}): final only {per['final']:,.0f}, "
          f"+ fp16 embeddings {per['fp16']:,.0f}, + fp32 embeddings {per['fp32']:,.0f}; the embeddings add "
          f"{(sz['fp16'] - sz['final']) / n:,.0f} / {(sz['fp32'] - sz['final']) / n:,.0f} B = V x K x 2 / 4 "
          f"({V * K * 2:,} / {V * K * 4:,}) plus page rounding")
    nus = {key: store_bytes(NUS_TRAIN_IMAGES, NUS_CLASSES, emb, s["meta_len"]) for key, emb in
           {"final": None, "fp16": ("float16", (VIEWS, RN50X64_DIM)),
            "fp32": ("float32", (VIEWS, RN50X64_DIM))}.items()}
    print(f"   computed (the store's layout), RN50x64 (V = {VIEWS}, K = {RN50X64_DIM}) on NUS-WIDE train "
          f"({NUS_TRAIN_IMAGES:,} images, {NUS_CLASSES} classes): " + ", ".join(
              f"{lab} {nus[key] / NUS_TRAIN_IMAGES:,.0f} B/image ({nus[key] / 1e9:.2f} GB)"
              for key, lab in (("final", "final only"), ("fp16", "+ fp16 embeddings"),
                               ("fp32", "+ fp32 embeddings"))))
    for key in ("final", "fp16", "fp32"):
        rows.append(_row("size", f"shapes_{key}_bytes_per_image", f"{per[key]:.0f}", "B", f"measured, {n} images"))
    for key in ("final", "fp16", "fp32"):
        rows.append(_row("size", f"nus_rn50x64_{key}_bytes_per_image", f"{nus[key] / NUS_TRAIN_IMAGES:.0f}", "B",
                         f"computed, {nus[key] / 1e9:.2f} GB total"))

    if syn:
        print(f"\n3. run_rescore end to end on synthetic unit fp16 embeddings, {VIEWS} views x K = {args.dim}, "
              f"C = {args.classes}, --block-rows {args.block_rows}, CPU; text side: a random-weights CLIP JSON config "
              f"with embed_dim {args.dim} named in the store's metadata (option (a): nothing bypassed); cold = the "
              "source's pages dropped from the page cache first (posix_fadvise on that file only):")
        for r in syn:
            print(f"   {r['rows']:>7,} rows ({r['file_bytes'] / 1e9:.2f} GB, made in {r['make_s']:.0f} s), "
                  f"{r['cache']:>5} cache: e2e {r['e2e_s']:6.2f} s ({r['rows'] / r['e2e_s']:7,.0f} rows/s), "
                  f"compute {r['compute_s']:6.2f} s ({r['rows_per_s']:7,.0f} rows/s); RssAnon peak "
                  f"{r['peak_anon'] / 2**20:5.0f} MiB (+{(r['peak_anon'] - r['base_anon']) / 2**20:.0f} over "
                  f"{r['base_anon'] / 2**20:.0f}), RssFile peak {r['peak_file'] / 2**20:5.0f} MiB "
                  f"(+{(r['peak_file'] - r['base_file']) / 2**20:.0f})")
            rows += [_row("synthetic", f"rows_per_s_{r['cache']}", f"{r['rows_per_s']:.0f}", "rows/s",
                          f"{r['rows']} rows, compute"),
                     _row("synthetic", f"e2e_s_{r['cache']}", f"{r['e2e_s']:.2f}", "s", f"{r['rows']} rows"),
                     _row("synthetic", f"peak_anon_mib_{r['cache']}", f"{r['peak_anon'] / 2**20:.0f}", "MiB",
                          f"{r['rows']} rows, +{(r['peak_anon'] - r['base_anon']) / 2**20:.0f} over the baseline")]
        warm = [r for r in syn if r["cache"] == "warm"]
        if len(warm) == 2:
            small, big = warm
            ws_small, ws_big = ((r["peak_anon"] - r["base_anon"]) / 2**20 for r in (small, big))
            flat = abs(ws_big - ws_small) <= max(32.0, 0.15 * ws_small)
            print(f"   {big['rows'] / small['rows']:.0f}x the rows: peak RssAnon {small['peak_anon'] / 2**20:.0f} -> "
                  f"{big['peak_anon'] / 2**20:.0f} MiB, working set over the baseline {ws_small:.0f} -> {ws_big:.0f} "
                  f"MiB: {'flat in rows' if flat else 'NOT flat in rows'} (a block of {args.block_rows} rows is read "
                  "and upcast to fp32 at a time). RssFile grows with rows because it counts the pages of the "
                  "memory-mapped stores the process has touched (the source's checksum pass and the block reads): "
                  "page cache, clean file pages the kernel drops under pressure and reads again, not memory the "
                  "process allocated.")
            rows.append(_row("synthetic", "working_set_mib_small_vs_large", f"{ws_small:.0f} -> {ws_big:.0f}", "MiB",
                             f"{small['rows']} vs {big['rows']} rows, warm"))

    print(f"\n4. GPU projection, RN50x64 (arithmetic, not a measurement). Assumptions: encoder "
          f"{ENCODER_TFLOP_PER_IMAGE} TFLOP per image (10 views x 529.1 GFLOP at 448 px, bench/RESULTS.md) at "
          f"{ENCODER_EFFICIENCY:.0%} of the H100's measured {H100_BF16_TFLOPS:.0f} bf16 TFLOP/s; rescore reads the "
          f"fp16 embeddings from one NVMe SSD at {DISK_BW / 1e9:.0f} GB/s, copies them to the GPU at "
          f"{PCIE_BW / 1e9:.0f} GB/s (overlapped) and computes in fp32 at {H100_FP32_TFLOPS:.0f} TFLOP/s peak:")
    enc_s = ENCODER_TFLOP_PER_IMAGE * 1e12 / (ENCODER_EFFICIENCY * H100_BF16_TFLOPS * 1e12)
    C = NUS_CLASSES
    cos_flop = VIEWS * RN50X64_DIM * C * 2
    agg_flop = VIEWS * C * 12  # softmax (max, sub, exp, sum, div), min-max, combine: ~12 operations per element
    read_bytes = VIEWS * RN50X64_DIM * 2
    write_bytes = C * 4 + 1
    t_read, t_pcie = read_bytes / DISK_BW, read_bytes / PCIE_BW
    t_flop = (cos_flop + agg_flop) / (H100_FP32_TFLOPS * 1e12)
    t_res = max(t_read, t_pcie, t_flop)
    bound = {t_read: "disk read", t_pcie: "PCIe copy", t_flop: "arithmetic"}[t_res]
    print(f"   encoder avoided: {enc_s * 1e3:.2f} ms per image; rescore: {read_bytes:,} B read ({t_read * 1e6:.2f} us "
          f"at {DISK_BW / 1e9:.0f} GB/s), {write_bytes} B written, {(cos_flop + agg_flop) / 1e6:.2f} MFLOP "
          f"(cosine {cos_flop / 1e6:.2f} + aggregation ~{agg_flop / 1e3:.0f}k: {t_flop * 1e9:.0f} ns), PCIe "
          f"{t_pcie * 1e6:.2f} us -> bound by the "
          f"{bound}, {t_res * 1e6:.2f} us per image")
    print(f"   ratio ~{enc_s / t_res:,.0f}x per image (the JPEG decode and tiling a relabel also needs come on top); "
          f"NUS-WIDE train ({NUS_TRAIN_IMAGES:,} images): rescore ~{NUS_TRAIN_IMAGES * t_res:.1f} s vs encoder "
          f"~{NUS_TRAIN_IMAGES * enc_s / 60:.1f} min; fixed costs not included (loading the RN50x64 checkpoint "
          "for its text tower once, as part 1 loads shapes-clip's)")
    if syn:
        best = max(r["rows_per_s"] for r in syn)
        print(f"   for scale: this CPU re-scores K = {args.dim}, C = {args.classes} at {best:,.0f} rows/s (part 3): "
              f"NUS-WIDE in ~{NUS_TRAIN_IMAGES / best:.0f} s on 2 cores, {enc_s * best:,.0f}x less than the "
              "projected GPU encoder time")
    rows += [_row("projection", "encoder_ms_per_image", f"{enc_s * 1e3:.2f}", "ms",
                  f"{ENCODER_TFLOP_PER_IMAGE} TFLOP at {ENCODER_EFFICIENCY:.0%} of {H100_BF16_TFLOPS:.0f} TFLOP/s"),
             _row("projection", "rescore_us_per_image", f"{t_res * 1e6:.2f}", "us",
                  f"{read_bytes} B at {DISK_BW / 1e9:.0f} GB/s"),
             _row("projection", "ratio", f"{enc_s / t_res:.0f}", "x", "encoder time avoided / rescore time")]
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
