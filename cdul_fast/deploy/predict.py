"""`cdul-fast predict`: per-class scores from an exported ONNX model with ONNX Runtime (CUDA provider when present).

Inputs are a folder of images or a dataset split; outputs a CSV/JSON of scores, and mAP when ground truth exists.
Preprocessing is ``views.square.load_square`` (the one training used), so ONNX and torch see the same pixels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, WeightsError
from ..fsutil import atomic_write, write_text_atomic
from ..views.source import default_workers
from ..views.square import ImageTensors


@dataclass
class OnnxClassifier:
    session: object
    input_name: str
    output_name: str
    class_names: tuple[str, ...]
    image_size: int
    provider: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]


def open_model(path: str | Path, device: str = "auto") -> OnnxClassifier:
    """An ONNX model written by `cdul-fast export`; anything else (wrong input shape, no metadata) is refused."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX model {path} not found")
    available = ort.get_available_providers()
    want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
    if device == "cuda" and not want_cuda:
        raise ConfigError("--device cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise WeightsError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc
    meta = sess.get_modelmeta().custom_metadata_map
    if "cdul_fast.class_names" not in meta:
        raise WeightsError(f"{path} has no cdul_fast metadata: export it with `cdul-fast export`")
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    size = int(meta["cdul_fast.image_size"])
    classes = tuple(json.loads(meta["cdul_fast.class_names"]))
    shape = inputs[0].shape if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or shape[1] != 3 or shape[2] != size or shape[3] != size:
        raise WeightsError(f"{path} takes input {shape}, expected [batch, 3, {size}, {size}]")
    if len(outputs) != 1 or (isinstance(outputs[0].shape[-1], int) and outputs[0].shape[-1] != len(classes)):
        raise WeightsError(f"{path} output {outputs[0].shape} does not match its {len(classes)} classes")
    return OnnxClassifier(sess, inputs[0].name, outputs[0].name, classes, size, sess.get_providers()[0])


def predict_paths(model: OnnxClassifier, paths: list[Path], batch_size: int = 32, progress: bool = False,
                  workers: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Scores [N, C] (rows of undecodable images are NaN) and {row: reason} for those images; images are decoded
    in worker processes, batch by batch, while ONNX Runtime scores the previous batch."""
    images = ImageTensors(paths, model.image_size, workers=default_workers() if workers is None else workers,
                          cache=False, progress=progress, desc="predict")
    scores = np.full((len(paths), len(model.class_names)), np.nan, dtype=np.float32)
    for rows, x in images.batches(np.arange(len(paths)), batch_size):
        scores[rows] = model(x.numpy().astype(np.float32) / 255.0)
    return scores, dict(images.errors)


def write_scores(out: Path, ids: list[str], classes: tuple[str, ...], scores: np.ndarray) -> None:
    """CSV (id, one column per class) or JSON ({id: {class: score}}), chosen by the file suffix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        data = {i: (None if np.isnan(s).any() else {c: round(float(v), 6) for c, v in zip(classes, s)})
                for i, s in zip(ids, scores)}
        write_text_atomic(out, json.dumps(data, indent=1))
        return

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", *classes])
            for i, s in zip(ids, scores):
                w.writerow([i, *("" if np.isnan(v) else f"{v:.6f}" for v in s)])

    atomic_write(out, write_csv)
