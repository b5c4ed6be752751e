"""The shapes world and the shipped tiny CLIP: determinism, ground truth, atomic generation, and the paper's effect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cdul_fast.datasets import load_dataset
from cdul_fast.datasets.shapes import CLASSES, render_multi
from cdul_fast.errors import DatasetError

ASSET = Path(__file__).resolve().parents[1] / "cdul_fast" / "assets" / "shapes-clip"


def test_generation_is_deterministic_and_splits_differ(tmp_path):
    a = load_dataset("shapes", tmp_path / "a", "train", n=12, size=64)
    b = load_dataset("shapes", tmp_path / "b", "train", n=12, size=64)
    assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]
    np.testing.assert_array_equal(a.labels, b.labels)
    t = load_dataset("shapes", tmp_path / "a", "test", n=12, size=64)
    assert a.paths[0].read_bytes() != t.paths[0].read_bytes()
    s = load_dataset("shapes", tmp_path / "c", "train", n=12, size=64, seed=1)
    assert a.paths[0].read_bytes() != s.paths[0].read_bytes()


def test_ground_truth_counts_and_class_coverage(tmp_path):
    ds = load_dataset("shapes", tmp_path, "train", n=120, size=64)
    assert ds.class_names == CLASSES and len(CLASSES) >= 12
    per_image = (ds.labels == 1).sum(1)
    assert per_image.min() >= 2 and per_image.max() <= 4
    assert np.all((ds.labels == 1).sum(0) > 0)  # every class appears
    man = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert man["labels"] == ds.labels.tolist() and ds.ids[0] == "train/" + man["ids"][0]
    cap = load_dataset("shapes", tmp_path, "captions", n=24)
    assert np.all((cap.labels == 1).sum(1) == 1)


def test_drawn_objects_match_labels():
    """Each labelled object adds coloured pixels: an image with k objects differs from its background in k blobs."""
    rng = np.random.default_rng(5)
    img, labels = render_multi(rng, 128, 3)
    assert int((labels == 1).sum()) == 3
    arr = np.asarray(img)
    assert arr.shape == (128, 128, 3) and arr.std() > 10


def test_regenerates_on_option_change_and_never_leaves_partial_splits(tmp_path, monkeypatch):
    load_dataset("shapes", tmp_path, "test", n=5, size=64)
    files = sorted(p.name for p in (tmp_path / "test").iterdir())
    assert len(files) == 6  # 5 images + manifest
    load_dataset("shapes", tmp_path, "test", n=7, size=64)
    assert len(list((tmp_path / "test").iterdir())) == 8
    import cdul_fast.datasets.shapes as shapes

    def boom(*a, **k):
        raise RuntimeError("crash during generation")

    monkeypatch.setattr(shapes, "render_multi", boom)
    with pytest.raises(RuntimeError):
        load_dataset("shapes", tmp_path, "test", n=9, size=64)
    monkeypatch.undo()
    man = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert man["options"]["n"] == 7 and len(list((tmp_path / "test").iterdir())) == 8  # old split intact


@pytest.mark.parametrize("opts,msg", [({"n": 0}, "n must be"), ({"colour": 1}, "unknown option"),
                                      ({"objects": "5-2"}, "objects must be"), ({"n": "many"}, "bad option")])
def test_option_errors(tmp_path, opts, msg):
    with pytest.raises(DatasetError, match=msg):
        load_dataset("shapes", tmp_path, "train", **opts)
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("shapes", tmp_path, "val")


def test_string_options_from_the_cli_are_coerced(tmp_path):
    ds = load_dataset("shapes", tmp_path, "train", n="6", size="64", objects="1-2")
    assert len(ds) == 6 and (ds.labels == 1).sum(1).max() <= 2


# ----------------------------------------------------------------------------------------------- the shipped CLIP


def test_shipped_clip_loads_and_matches_its_record():
    from cdul_fast.clip_loader import load_clip

    info = json.loads((ASSET / "train_info.json").read_text())
    weights = ASSET / "open_clip_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == info["sha256"]
    assert weights.stat().st_size < 8 * 1024 * 1024
    clip = load_clip("shapes-clip", None, device="cpu", precision="fp32")
    assert clip.preprocess_cfg["size"] in (64, [64, 64], (64, 64)) and 1.0 < clip.logit_scale <= 100.0


def test_zero_shot_accuracy_of_the_shipped_clip():
    from cdul_fast.clip_loader import load_clip
    from cdul_fast.shapes_clip import make_pool, zero_shot_top1

    clip = load_clip("shapes-clip", None, device="cpu", precision="fp32")
    imgs, cls, _ = make_pool(240, 1)
    assert zero_shot_top1(clip.model, clip.tokenizer, imgs, cls) >= 85.0


def test_quality_cdul_beats_global_on_multi_object_images(tmp_path):
    """The paper's effect (Table 3) in this world: min-max over a 3x3 grid recovers the small objects CLIP misses."""
    from cdul_fast.evaluate import evaluate_store
    from cdul_fast.label import LabelConfig, run_label

    ds = load_dataset("shapes", tmp_path / "w", "test", n=150)
    out = tmp_path / "q.cdul"
    run_label(LabelConfig(out=str(out), dataset="shapes", root=str(tmp_path / "w"), split="test",
                          dataset_options={"n": 150}, clip="shapes-clip", save=("global", "cdul"), progress=False,
                          device="cpu", workers=0), log=lambda s: None, dataset=ds)
    reports, _ = evaluate_store(out, ds, ["global", "cdul"])
    g, c = reports["global"].map * 100, reports["cdul"].map * 100
    assert c >= g + MARGIN, (g, c)


MARGIN = 15.0  # measured +29.5 (30.8 -> 60.2) on 300 test images; see docs/shapes.md


def test_clip_training_is_seeded():
    """Two short seeded runs of the training script give identical weights (the full run is reproduced the same way)."""
    import torch

    from cdul_fast import shapes_clip

    def short_run() -> dict:
        torch.manual_seed(123)
        model, tok = shapes_clip.build_model(0)
        imgs, cls, col = shapes_clip.make_pool(16, 0)
        texts, pos = shapes_clip.captions()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        match = torch.zeros(16, len(texts)).scatter_(1, torch.from_numpy(pos[cls, col]), 1.0)
        for _ in range(2):
            img = torch.nn.functional.normalize(model.encode_image(shapes_clip._normalize(imgs)), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
            loss = shapes_clip.contrastive_loss(img, txt, model.logit_scale.exp(), match)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    a, b = short_run(), short_run()
    assert all(torch.equal(a[k], b[k]) for k in a)
