"""ONNX Runtime vs torch eager inference of the exported classifier, same inputs, same thread count.

    python bench/bench_onnx.py --arch clipres --size 128 --batch 1 32
    python bench/bench_onnx.py --arch resnet50 --size 224 --batch 1 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_rows  # noqa: E402

from cdul_fast.deploy.export import export_onnx, load_trained  # noqa: E402
from cdul_fast.train.checkpoint import save_safetensors_atomic  # noqa: E402
from cdul_fast.train.classifier import build_classifier  # noqa: E402
from cdul_fast.views.square import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _cuda_ms(module: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    """The same module on the GPU (fp32, synchronised per call): the server-side reference for the CPU numbers."""
    import copy

    m, xc = copy.deepcopy(module).cuda(), x.cuda()

    def call() -> None:
        with torch.inference_mode():
            m(xc)
        torch.cuda.synchronize()

    return _median_ms(call, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="clipres")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "onnx.csv"))
    args = ap.parse_args()
    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        model = build_classifier(args.arch, args.classes)
        save_safetensors_atomic(model.state_dict(), run / "model.safetensors", {})
        (run / "model.json").write_text(json.dumps({"arch": args.arch, "class_names": [f"c{i}" for i in
                                                   range(args.classes)], "image_size": args.size,
                                                   "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}))
        export_onnx(run, run / "m.onnx")
        module = load_trained(run).module
        # the provider `cdul-fast predict` uses: CUDA when onnxruntime-gpu is installed, else CPU (never "Azure")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        sess = ort.InferenceSession(str(run / "m.onnx"), providers=providers)
        for b in args.batch:
            x = torch.rand(b, 3, args.size, args.size)
            xn = x.numpy()
            with torch.inference_mode():
                t_torch = _median_ms(lambda x=x: module(x), args.reps)
            t_ort = _median_ms(lambda xn=xn: sess.run(None, {"images": xn}), args.reps)
            t_cuda = _cuda_ms(module, x, args.reps) if torch.cuda.is_available() else None
            rows.append({**environment(), "arch": args.arch, "size": args.size, "batch": b,
                         "provider": sess.get_providers()[0], "torch_ms": round(t_torch, 2),
                         "onnxruntime_ms": round(t_ort, 2), "speedup": round(t_torch / t_ort, 2),
                         "torch_cuda_ms": round(t_cuda, 3) if t_cuda is not None else ""})
            cuda = f"  (torch on CUDA {t_cuda:.3f} ms)" if t_cuda is not None else ""
            print(f"{args.arch} {args.size}px batch {b:>3}: torch {t_torch:8.2f} ms  onnxruntime "
                  f"[{sess.get_providers()[0]}] {t_ort:8.2f} ms  ({t_torch / t_ort:.2f}x){cuda}", flush=True)
    write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
