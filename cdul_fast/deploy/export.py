"""`cdul-fast export`: the trained classifier as ONNX (dynamic batch), checked with onnx.checker and against torch.

The graph takes float32 RGB in [0, 1], shape [N, 3, S, S] (the whole image resized to S x S, as in training), and
returns per-class probabilities [N, C]: normalization and the sigmoid are inside, so a deployment only resizes.
Class names, input size and normalization are stored as ONNX metadata for `cdul-fast predict`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ..fsutil import atomic_write
from ..train.checkpoint import load_checkpoint, load_state_dict_file
from ..train.classifier import build_classifier

INPUT, OUTPUT = "images", "scores"


class Deployable(nn.Module):
    """normalize -> classifier -> sigmoid, so the exported graph is self-contained."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model((images - self.mean) / self.std))


@dataclass
class TrainedModel:
    module: Deployable
    info: dict


def load_trained(path: str | Path) -> TrainedModel:
    """A run folder (model.json + model.safetensors), a model.safetensors beside its model.json, or checkpoint.pt."""
    p = Path(path)
    run = p if p.is_dir() else p.parent
    info_path = run / "model.json"
    if not info_path.is_file():
        raise WeightsError(f"{info_path} not found: pass a run folder written by `cdul-fast train`")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        arch, classes, size = info["arch"], info["class_names"], int(info["image_size"])
        norm = [[float(v) for v in info[k]] for k in ("mean", "std")]
        if not (16 <= size <= 8192) or any(len(v) != 3 for v in norm) or not all(
                math.isfinite(v) for v in norm[0] + norm[1]) or min(norm[1]) <= 0:
            raise ValueError("image_size must be in [16, 8192], mean and std 3 finite numbers (std > 0)")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("class_names must be a non-empty list of names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{info_path} is not a valid model description: {exc}") from exc
    if p.is_file() and p.suffix == ".pt":
        state = load_checkpoint(p).get("model")
        if not isinstance(state, dict):
            raise WeightsError(f"{p} holds no model state")
    else:
        state = load_state_dict_file(p if p.is_file() else run / "model.safetensors")
    model = build_classifier(arch, len(classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {p} do not fit {arch} with {len(classes)} classes: "
                           f"{str(exc).splitlines()[0]}") from exc
    info["image_size"] = size
    return TrainedModel(Deployable(model, info["mean"], info["std"]).eval(), info)


def _export_graph(module: nn.Module, example: torch.Tensor, out: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        torch.onnx.export(module, (example,), str(out), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes={"images": {0: batch}}, opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)
    except TypeError:  # older torch without the dynamo exporter arguments
        torch.onnx.export(module, (example,), str(out), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset)


def _add_metadata(path: Path, info: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    meta = {"cdul_fast.class_names": json.dumps(info["class_names"]), "cdul_fast.image_size": str(info["image_size"]),
            "cdul_fast.mean": json.dumps(info["mean"]), "cdul_fast.std": json.dumps(info["std"]),
            "cdul_fast.arch": info["arch"], "cdul_fast.input": "float32 RGB in [0,1], NCHW, whole image resized"}
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def check_against_torch(module: nn.Module, path: Path, size: int, batches: tuple[int, ...] = (1, 3),
                        seed: int = 0) -> float:
    """Largest |ONNX Runtime - torch| over random inputs of several batch sizes (CPU provider)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batches:
        x = torch.rand(b, 3, size, size, generator=g)
        with torch.no_grad():
            ref = module(x).numpy()
        got = sess.run([OUTPUT], {INPUT: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ConfigError(f"exported model returns {got.shape} for batch {b}, torch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 18, atol: float = 1e-4) -> dict:
    """Export, attach metadata, run the checker and compare with torch; returns a small report."""
    trained = load_trained(checkpoint)
    size = trained.info["image_size"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checked: dict[str, float] = {}

    def write(tmp: Path) -> None:  # export, metadata, checks on the temporary file; renamed only when all pass
        _export_graph(trained.module, torch.rand(2, 3, size, size), tmp, opset)
        _add_metadata(tmp, trained.info)
        checked["diff"] = check_against_torch(trained.module, tmp, size)
        if checked["diff"] > atol:
            raise ConfigError(f"ONNX Runtime output differs from torch by {checked['diff']:.2e} (> {atol:.0e}); "
                              "not written")

    atomic_write(out, write)
    return {"out": str(out), "max_abs_diff": checked["diff"], "image_size": size,
            "classes": len(trained.info["class_names"])}
