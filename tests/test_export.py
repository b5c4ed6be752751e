"""ONNX export and ONNX Runtime predict: parity with torch on real images, dynamic batch, metadata, bad models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdul_fast.cli import main
from cdul_fast.deploy.export import export_onnx, load_trained
from cdul_fast.deploy.predict import open_model, predict_paths
from cdul_fast.errors import WeightsError
from cdul_fast.train.checkpoint import save_safetensors_atomic
from cdul_fast.train.classifier import build_classifier
from cdul_fast.views.square import IMAGENET_MEAN, IMAGENET_STD, load_square

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `train` writes it (model.json + model.safetensors) with a randomly initialized shapesnet."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_classifier("shapesnet", len(CLASSES))
    with torch.no_grad():  # non-trivial BN statistics so eval-mode folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_safetensors_atomic(model.state_dict(), run / "model.safetensors", {})
    info = {"arch": "shapesnet", "num_classes": 3, "class_names": list(CLASSES), "image_size": 32,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    (run / "model.json").write_text(json.dumps(info))
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    lines = ["path,a,b,c"]
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(root / f"x{i}.png")
        lines.append(f"x{i}.png,{i % 2},{(i + 1) % 2},{int(i > 3)}")
    (root / "gt.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def onnx_path(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    rep = export_onnx(run_dir, out)
    assert rep["max_abs_diff"] <= 1e-4
    return out


def test_export_checks_and_metadata(onnx_path):
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["cdul_fast.class_names"]) == list(CLASSES)
    assert meta["cdul_fast.image_size"] == "32"
    assert not any(p.name.startswith(".") for p in onnx_path.parent.iterdir())  # no temp files left


def test_onnx_matches_torch_on_real_images_any_batch(run_dir, onnx_path, images):
    trained = load_trained(run_dir)
    paths = sorted(images.glob("*.png"))
    x = torch.from_numpy(np.stack([load_square(p, 32) for p in paths]).astype(np.float32) / 255.0)
    with torch.no_grad():
        expected = trained.module(x).numpy()
    sess = open_model(onnx_path, "cpu")
    for b in (1, 5, 7):
        got = np.concatenate([sess(x[i:i + b].numpy()) for i in range(0, len(paths), b)])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    scores, errors = predict_paths(sess, paths, batch_size=4)
    assert not errors
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


def test_predict_cli_csv_json_and_map(onnx_path, images, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["predict", "--model", str(onnx_path), "--images", str(images), "--out", str(out),
                 "--no-progress"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", *CLASSES] and len(rows) == 8
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
    out_json = tmp_path / "scores.json"
    assert main(["predict", "--model", str(onnx_path), "--images", str(images), "--out", str(out_json),
                 "--no-progress"]) == 0
    data = json.loads(out_json.read_text())
    assert set(data) == {r[0] for r in rows[1:]}
    assert data["x0.png"]["a"] == pytest.approx(float(rows[1][1]), abs=1e-6)
    capsys.readouterr()
    assert main(["predict", "--model", str(onnx_path), "--dataset", "folder", "--root", str(images), "--classes",
                 "a,b,c", "--labels-csv", "gt.csv", "--no-progress"]) == 0
    assert "mAP" in capsys.readouterr().out


def test_wrong_models_are_refused(tmp_path, onnx_path, capsys):
    import onnx.helper as oh

    bad = tmp_path / "bad.onnx"
    inp = oh.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["n", 3, 16, 16])
    out = oh.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["n", 3, 16, 16])
    m = oh.make_model(oh.make_graph([oh.make_node("Identity", ["images"], ["scores"])], "g", [inp], [out]),
                      opset_imports=[oh.make_opsetid("", 18)])
    m.ir_version = onnx.load(str(onnx_path)).ir_version
    m.metadata_props.add(key="cdul_fast.class_names", value='["a","b","c"]')
    m.metadata_props.add(key="cdul_fast.image_size", value="32")
    onnx.save(m, str(bad))
    with pytest.raises(WeightsError, match="expected \\[batch, 3, 32, 32\\]"):
        open_model(bad)
    assert main(["predict", "--model", str(bad), "--images", str(tmp_path)]) == 2
    assert "expected [batch, 3, 32, 32]" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(WeightsError, match="cannot load"):
        open_model(tmp_path / "junk.onnx")


def test_export_refuses_mismatched_weights(run_dir, tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    info = json.loads((run_dir / "model.json").read_text())
    info["class_names"] = ["a", "b"]
    (bad / "model.json").write_text(json.dumps(info))
    (bad / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="do not fit"):
        export_onnx(bad, tmp_path / "m.onnx")


@pytest.mark.parametrize("command", ["export", "predict"])
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(run_dir, onnx_path, images, tmp_path, capsys, monkeypatch,
                                                         command):
    """Issue 14, 4 (export, predict): ENOSPC while writing used to be an internal error and left .tmp files."""
    import errno

    import cdul_fast.deploy.export as export
    import cdul_fast.deploy.predict as predict
    from cdul_fast.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    out = tmp_path / "out"
    out.mkdir()
    if command == "export":
        monkeypatch.setattr(export, "_add_metadata", full)  # the temporary .onnx exists by then
        argv = ["export", "--checkpoint", str(run_dir), "--out", str(out / "m.onnx")]
    else:
        monkeypatch.setattr(predict.csv, "writer", full)  # the temporary .csv is open by then
        argv = ["predict", "--model", str(onnx_path), "--images", str(images), "--out", str(out / "s.csv"),
                "--no-progress"]
    monkeypatch.delenv("CDUL_FAST_DEBUG", raising=False)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "No space left on device" in err[0] and "internal error" not in err[0], err
    assert list(out.iterdir()) == []  # no temporary file, no half-written output
