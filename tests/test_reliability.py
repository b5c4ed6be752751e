"""Messy inputs end to end: every image is labelled or skipped with a reason; bad arguments give one-line errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdul_fast._backend import has_dali
from cdul_fast.cli import main
from cdul_fast.store.label_store import LabelStore

TINY = str(Path(__file__).parent / "data" / "tiny_clip.json")
BAD = {"truncated.jpg", "empty.jpg", "text.jpg"}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    (root / "ok.jpg").write_bytes(_jpeg(rgb))
    (root / "truncated.jpg").write_bytes(_jpeg(rgb)[:300])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)))
    rgba.save(root / "alpha.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (50, 40))).astype(np.uint16)).save(root / "sixteen.png")
    rgb.convert("L").save(root / "gray.jpg")
    (root / "cmyk.jpg").write_bytes(_jpeg(rgb.convert("CMYK")))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rgb.save(root / "exif.jpg", exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)).save(root / "tiny.png")
    Image.new("RGB", (10000, 10000), (120, 30, 200)).save(root / "huge.png", compress_level=1)
    return root


@pytest.mark.parametrize("decoder", ["pil", "tensor", pytest.param("dali", marks=pytest.mark.skipif(
    not has_dali(), reason="DALI not installed"))])
def test_every_image_is_labelled_or_skipped_with_a_reason(tmp_path, messy, decoder, capsys):
    out = tmp_path / "m.cdul"
    argv = ["label", "--out", str(out), "--dataset", "folder", "--root", str(messy), "--classes", "a,b,c",
            "--clip", TINY, "--clip-weights", "random", "--batch-size", "4", "--decoder", decoder, "--workers", "0",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    names = sorted(p.name for p in messy.iterdir())
    with LabelStore.open(out) as st:
        done = np.asarray(st.done)
        final = np.asarray(st.array("final"))
    assert done.size == len(names) and set(done.tolist()) <= {1, 2}
    skipped = {names[i] for i in np.flatnonzero(done == 2)}
    assert skipped == BAD
    ok = done == 1
    assert np.all(np.isfinite(final[ok])) and np.allclose(final[ok].sum(1) >= 0.99, True)
    report = (tmp_path / "m.cdul.skipped.tsv").read_text().splitlines()
    assert len(report) == 1 + len(BAD) and all("cannot decode" in line for line in report[1:])
    assert "3 skipped" in capsys.readouterr().out


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback
    return lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--dataset", "voc2007", "--root", "{tmp}"], "VOC"),
    (["--classes", ""], "class"),
    (["--classes", "a,a"], "duplicate"),
    (["--zeta", "2"], "--zeta"),
    (["--lam", "-1"], "--lam"),
    (["--grid", "0"], "--grid"),
    (["--clip", "ViT-B-32", "--clip-weights", "laion2b_s34b_b79k"], "--clip-weights"),
])
def test_bad_arguments_give_one_line(tmp_path, messy, capsys, extra, needle, monkeypatch):
    import cdul_fast.clip.loader as cl

    monkeypatch.setattr(cl, "_hub_reachable", lambda timeout=3.0: False)  # offline, fast
    base = ["label", "--out", str(tmp_path / "x.cdul"), "--dataset", "folder", "--root", str(messy), "--classes",
            "a,b", "--clip", TINY, "--clip-weights", "random", "--device", "cpu", "--no-progress"]
    argv = base + [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(argv) == 2
    assert needle.lower() in _err(capsys).lower()


@pytest.mark.parametrize("missing, code, needle", [
    ("onnxscript", 2, "needs the Python package 'onnxscript'"),   # an environment without a dependency: one line
    ("cdul_fast.gone", 1, "internal error"),                      # one of our own modules: a packaging bug
])
def test_a_missing_module_is_one_line(tmp_path, capsys, monkeypatch, missing, code, needle):
    import cdul_fast.deploy.export as export

    def export_onnx(*args, **kwargs):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(export, "export_onnx", export_onnx)
    monkeypatch.delenv("CDUL_FAST_DEBUG", raising=False)
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == code
    err = _err(capsys)
    assert needle in err and missing in err and "Traceback" not in err


def test_demo_quick_settings_reduce_the_world_and_keep_the_rest():
    from cdul_fast.shapes.demo import demo_settings

    full, quick = demo_settings(False), demo_settings(True)
    assert "quick" not in full and "quick" not in quick
    assert quick["train_images"] < full["train_images"] and quick["test_images"] <= full["test_images"]
    assert 0 < quick["train"]["warmup"] < quick["train"]["epochs"] < full["train"]["epochs"]  # updates still happen
    for key in set(full["train"]) - {"epochs", "warmup"}:  # merged, not replaced
        assert quick["train"][key] == full["train"][key], key
    assert quick["label"] == full["label"]
