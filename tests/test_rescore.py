"""`label --save-embeddings`, `rescore` and `eval --sweep`: re-scoring stored embeddings equals labelling again."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cdul_fast.cli import main
from cdul_fast.clip import loader as clip_loader
from cdul_fast.clip.loader import ClipModel, load_clip
from cdul_fast.clip.prompts import Prompts, encode_classes, make_prompts, read_synonyms
from cdul_fast.datasets import load_dataset
from cdul_fast.errors import ConfigError, StoreError
from cdul_fast.evaluate import evaluate_store
from cdul_fast.label.pipeline import LabelConfig, run_label
from cdul_fast.label.rescore import RescoreConfig, load_text_encoder, run_rescore
from cdul_fast.label.sweep import parse_sweep, run_sweep
from cdul_fast.store.label_store import SKIPPED, LabelStore

TINY = str(Path(__file__).parent / "data" / "tiny_clip.json")
CLASSES = ("circle", "square", "triangle", "star", "cross", "heart", "ring")
NEW = ("heart", "moon", "circle", "spiral")
SIZE, GRID = 32, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(5)
    lines = ["path," + ",".join(CLASSES)]
    for i in range(13):
        arr = rng.integers(0, 60, size=(GRID * SIZE, GRID * SIZE, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, GRID * SIZE - 8, size=2)
            h, w = rng.integers(4, GRID * SIZE // 2, size=2)
            arr[y:y + h, x:x + w] = rng.integers(60, 256, size=3, dtype=np.uint8)
        Image.fromarray(arr).save(root / f"im{i:02d}.png")
        row = rng.integers(0, 2, size=len(CLASSES))
        row[0] = i % 2
        lines.append(f"im{i:02d}.png," + ",".join(str(int(v)) for v in row))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _cfg(out: Path, root: Path, classes=CLASSES, **kw) -> LabelConfig:
    base = dict(out=str(out), dataset="folder", root=str(root),
                dataset_options={"classes": ",".join(classes), "labels": "labels.csv"} if classes == CLASSES
                else {"classes": ",".join(classes)},
                clip=TINY, clip_weights="random", grid=GRID, zeta=0.3, lam=1.0, batch_size=4, decoder="pil",
                workers=0, device="cpu", backend="torch", progress=False, save=("global", "avg", "max"))
    base.update(kw)
    return LabelConfig(**base)


def _rescore(src: Path, out: Path, **kw) -> None:
    run_rescore(RescoreConfig(source=str(src), out=str(out), device="cpu", backend="torch", progress=False, **kw),
                log=lambda _: None)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, folder) -> dict[str, Path]:
    """Label stores of the folder: with fp32 and fp16 embeddings (identical labels), and without."""
    d = tmp_path_factory.mktemp("stores")
    out = {}
    for name, kw in {"fp32": dict(save_embeddings=True, embedding_dtype="fp32"),
                     "fp16": dict(save_embeddings=True), "plain": {}}.items():
        out[name] = d / f"{name}.cdul"
        run_label(_cfg(out[name], folder, **kw), log=lambda _: None)
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with LabelStore.open(path) as st:
        return {n: np.array(st.array(n)) for n in st.array_names} | {"done": np.array(st.done)}


def test_embeddings_do_not_change_the_labels(stores):
    plain, fp32, fp16 = (_arrays(stores[k]) for k in ("plain", "fp32", "fp16"))
    for name in plain:
        np.testing.assert_array_equal(fp32[name], plain[name])
        np.testing.assert_array_equal(fp16[name], plain[name])
    with LabelStore.open(stores["fp16"]) as st:
        emb = st.tensor("embeddings").astype(np.float32)
        assert emb.shape == (13, 1 + GRID * GRID, 32) and st.meta["embeddings"]["dtype"] == "float16"
        np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=2e-3)


def test_rescore_with_the_label_settings_reproduces_the_store(tmp_path, stores):
    out = tmp_path / "r.cdul"
    _rescore(stores["fp32"], out)
    want, got = _arrays(stores["fp32"]), _arrays(out)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)
    with LabelStore.open(out) as a, LabelStore.open(stores["fp32"]) as b:
        np.testing.assert_array_equal(a.file_stats, b.file_stats)
        assert a.meta["ids_sha256"] == b.meta["ids_sha256"] and a.tensor_names == ()


def test_fp16_embeddings_stay_within_the_stated_bound(tmp_path, stores):
    """Rounding a unit vector to fp16 and renormalizing it moves each cosine by at most 2^-10, so each logit by at
    most d = scale * 2^-10 and each softmax score by a factor within exp(+-2d); min, max, means and the lambda
    combine keep that relative bound. The one exception is min-max's threshold: where a class's best snippet score
    lies within that factor of zeta, rounding may flip it between alpha and beta (docs/rescore.md)."""
    out = tmp_path / "r16.cdul"
    _rescore(stores["fp16"], out)
    want, got = _arrays(stores["fp16"]), _arrays(out)
    with LabelStore.open(stores["fp16"]) as st:
        scale, zeta = st.meta["logit_scale"], st.meta["zeta"]
        emb = torch.from_numpy(st.tensor("embeddings").astype(np.float32)).double()
    d = scale * 2.0 ** -10
    factor = math.exp(2 * d) - 1
    text = load_clip(TINY, "random", device="cpu", precision="fp32", seed=0).encode_text(CLASSES).double()
    alpha = torch.softmax(scale * F.normalize(emb, dim=-1) @ text.T, dim=-1)[:, 1:].amax(1).numpy()
    near_zeta = (alpha >= zeta * math.exp(-4 * d)) & (alpha <= zeta * math.exp(4 * d))
    for name in ("final", "global", "avg", "max"):
        err = np.abs(got[name] - want[name])
        ok = err <= factor * want[name] + 1e-7
        assert (ok | (near_zeta if name == "final" else False)).all(), (name, float((err / want[name]).max()))
        assert err.max() > 0  # fp16 really was used


def test_a_new_class_list_equals_labelling_from_scratch(tmp_path, folder, stores):
    scratch = tmp_path / "scratch.cdul"
    run_label(_cfg(scratch, folder, classes=NEW, save=("aggregate",), zeta=0.1, lam=0.5), log=lambda _: None)
    out = tmp_path / "new.cdul"
    _rescore(stores["fp32"], out, classes=",".join(NEW), save=("aggregate",), zeta=0.1, lam=0.5)
    with LabelStore.open(scratch) as a, LabelStore.open(out) as b:
        assert b.class_names == NEW and b.array_names == a.array_names
        for name in a.array_names:
            np.testing.assert_allclose(b.array(name), a.array(name), rtol=0, atol=1e-6)
        assert b.meta["zeta"] == 0.1 and b.meta["lam"] == 0.5
        ds = load_dataset("folder", folder, "all", classes=",".join(NEW))
        b.check_images(ds.ids_digest(), "folder")  # bound to the same images


def test_rescored_stores_are_accepted_by_eval(tmp_path, folder, stores):
    out = tmp_path / "e.cdul"
    _rescore(stores["fp16"], out, aggregator="max", save=())
    ds = load_dataset("folder", folder, "all", classes=",".join(CLASSES), labels="labels.csv")
    reports, _ = evaluate_store(out, ds)
    direct, _ = evaluate_store(stores["fp16"], ds, ["max"])
    assert abs(reports["final"].map - direct["max"].map) < 0.02


def test_rescore_needs_no_image_and_no_image_encoder(tmp_path, folder, stores, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    label = _cfg(tmp_path / "s.cdul", copy, save_embeddings=True, embedding_dtype="fp32")
    run_label(label, log=lambda _: None)
    for p in copy.glob("*.png"):
        p.unlink()  # nothing left to decode

    def no_images(*a, **k):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_images)
    monkeypatch.setattr(ClipModel, "encode_image", no_images)
    seen = {}
    real = clip_loader.load_clip

    def spy(*a, **k):
        seen.update(k)
        model = real(*a, **k)
        seen["visual"] = model.model.visual
        return model

    monkeypatch.setattr("cdul_fast.label.rescore.load_clip", spy)
    _rescore(tmp_path / "s.cdul", tmp_path / "r.cdul", classes="moon,star")
    assert seen["text_only"] is True and seen["visual"] is None
    assert _arrays(tmp_path / "r.cdul")["final"].shape == (13, 2)


def test_skipped_rows_and_their_reasons_carry_over(tmp_path, folder):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "im03.png").write_bytes(b"not a png")
    src = tmp_path / "s.cdul"
    run_label(_cfg(src, copy, save_embeddings=True), log=lambda _: None)
    _rescore(src, tmp_path / "r.cdul", zeta=0.0)
    with LabelStore.open(tmp_path / "r.cdul") as st:
        assert st.done[3] == SKIPPED and (st.done == SKIPPED).sum() == 1 and not st.array("final")[3].any()
    log = (tmp_path / "r.cdul.skipped.tsv").read_text()
    assert "im03.png" in log


def test_rescore_refusals_are_one_line(tmp_path, stores, capsys):
    cases = [
        (["--labels", str(stores["plain"]), "-o", str(tmp_path / "a.cdul")], "holds no view embeddings"),
        (["--labels", str(stores["fp16"]), "-o", str(stores["fp16"])], "another file than the source"),
        (["--labels", str(stores["fp16"]), "-o", str(tmp_path / "b.cdul"), "--zeta", "nan"], "--zeta must be"),
        (["--labels", str(stores["fp16"]), "-o", str(tmp_path / "c.cdul"), "--clip-weights", "random", "--clip",
          TINY, "--debias", "ccd"], None),  # the same CLIP, passed explicitly: accepted
        (["--labels", str(tmp_path / "none.cdul"), "-o", str(tmp_path / "d.cdul")], "not found"),
        (["--labels", str(stores["fp16"]), "-o", str(tmp_path / "e.cdul"), "--classes", "a,a"], "duplicate"),
    ]
    for args, message in cases:
        rc = main(["rescore", "--device", "cpu", "--no-progress", *args])
        err = capsys.readouterr().err
        if message is None:
            assert rc == 0, err
            continue
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with LabelStore.open(stores["fp16"]) as st:
        meta = dict(st.meta) | {"clip_identity": "0" * 16}  # as if labelled by other weights
    with pytest.raises(StoreError, match="another CLIP"):
        load_text_encoder(meta, torch.device("cpu"))


def test_rescore_resumes_byte_identically(tmp_path, stores, monkeypatch):
    import cdul_fast.label.job as pipeline

    whole, cut = tmp_path / "whole.cdul", tmp_path / "cut.cdul"
    _rescore(stores["fp16"], whole, block_rows=3, classes="moon,star,ring")
    calls = {"n": 0}
    real = pipeline._write_runs

    def stop_after_two(store, rows, values):
        real(store, rows, values)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_runs", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        _rescore(stores["fp16"], cut, block_rows=3, classes="moon,star,ring")
    monkeypatch.setattr(pipeline, "_write_runs", real)
    with pytest.raises(StoreError, match="already exists"):
        _rescore(stores["fp16"], cut, block_rows=3, classes="moon,star,ring")
    with pytest.raises(StoreError, match="other settings"):
        _rescore(stores["fp16"], cut, block_rows=3, classes="moon,star,ring", zeta=0.0, resume=True)
    _rescore(stores["fp16"], cut, block_rows=3, classes="moon,star,ring", resume=True)
    assert cut.read_bytes() == whole.read_bytes()


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory) -> Path:
    """60 images of the shapes world labelled by the shipped CLIP (a random CLIP's softmax is nearly uniform)."""
    d = tmp_path_factory.mktemp("shapes")
    out = d / "s.cdul"
    run_label(LabelConfig(out=str(out), dataset="shapes", root=str(d / "world"), split="train",
                          dataset_options={"n": 60}, save=("global", "avg", "max"), save_embeddings=True,
                          embedding_dtype="fp32", device="cpu", workers=0, progress=False), log=lambda _: None)
    return out


def test_ccd_bias_matches_its_definition(tmp_path, shapes_store):
    """Independent of the implementation: the bias from the stored whole-image scores ('global')."""
    stores = {"fp32": shapes_store}
    src = _arrays(stores["fp32"])
    g = src["global"].astype(np.float64)
    entropy = -(g * np.log(g + 1e-10)).sum(1)
    max_entropy = float(np.median(entropy))  # half the images are confident enough to count
    out = tmp_path / "ccd.cdul"
    _rescore(stores["fp32"], out, debias="ccd", debias_entropy=max_entropy)
    bias = np.ones(g.shape[1])
    for c in range(g.shape[1]):
        top = g[(g.argmax(1) == c) & (entropy <= max_entropy), c]
        if top.size:
            bias[c] = top.mean()
    assert (bias != 1).sum() >= 3  # the check means something
    got = _arrays(out)
    for name in ("final", "global", "avg", "max"):
        np.testing.assert_allclose(got[name], np.clip(src[name] / bias, 0, 1), rtol=1e-5, atol=1e-7)
    with LabelStore.open(out) as st:
        np.testing.assert_allclose(st.meta["debias"]["bias"], bias, rtol=1e-6)


def test_prompt_ensembles_and_synonyms(tmp_path, folder):
    clip = load_clip(TINY, "random", device="cpu", precision="fp32", seed=0)
    one = tmp_path / "one.txt"
    one.write_text("# a comment\n\na photo of the {}\n")
    assert torch.equal(encode_classes(clip, CLASSES, make_prompts(CLASSES, templates_file=one)),
                       clip.encode_text(CLASSES, "a photo of the {}"))
    two = tmp_path / "two.txt"
    two.write_text("a photo of the {}\na drawing of a {}\n")
    syn = tmp_path / "syn.txt"
    syn.write_text("ring: hoop | loop\n")
    p = make_prompts(CLASSES, templates_file=two, synonyms_file=syn)
    got = encode_classes(clip, CLASSES, p)
    for i, c in enumerate(CLASSES):
        names = [c, "hoop", "loop"] if c == "ring" else [c]
        parts = [clip.encode_text([n], t)[0] for t in p.templates for n in names]
        np.testing.assert_allclose(got[i], F.normalize(torch.stack(parts).mean(0), dim=0), atol=1e-6)
    for text, message in [("ring hoop\n", "expected 'name: synonym"), ("moon: luna\n", "not one of"),
                          ("ring: ring\n", "twice"), ("ring: a\nring: b\n", "two lines")]:
        syn.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_synonyms(syn, CLASSES)
    for text, message in [("no placeholder\n", "exactly one"), ("{} and {}\n", "exactly one"), ("\n", "no template")]:
        two.write_text(text)
        with pytest.raises(ConfigError, match=message):
            make_prompts(CLASSES, templates_file=two)
    assert Prompts().meta() == {"template": "a photo of the {}"}  # the paper's setting: metadata as before


def test_label_with_an_ensemble_then_rescore_reproduces_it(tmp_path, folder):
    two = tmp_path / "two.txt"
    two.write_text("a photo of the {}\na drawing of a {}\n")
    syn = tmp_path / "syn.txt"
    syn.write_text("ring: hoop | loop\n")
    src = tmp_path / "s.cdul"
    run_label(_cfg(src, folder, templates=str(two), synonyms=str(syn), save_embeddings=True,
                   embedding_dtype="fp32"), log=lambda _: None)
    out = tmp_path / "r.cdul"
    _rescore(src, out)
    a, b = _arrays(src), _arrays(out)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-6)
    with LabelStore.open(out) as st:
        assert st.meta["templates"] == ["a photo of the {}", "a drawing of a {}"]
        assert st.meta["synonyms"] == {"ring": ["hoop", "loop"]}


def test_sweep_cells_equal_label_runs_at_those_points(tmp_path, folder, stores, capsys):
    ds = load_dataset("folder", folder, "all", classes=",".join(CLASSES), labels="labels.csv")
    res = run_sweep(stores["fp32"], ds, "zeta=0:0.4:0.2,lam=0,1", torch.device("cpu"), backend="torch")
    assert res.zetas == [0.0, 0.2, 0.4] and res.lams == [0.0, 1.0]
    passes = run_sweep(stores["fp32"], ds, "zeta=0:0.4:0.2,lam=0,1", torch.device("cpu"), backend="torch",
                       memory_budget=1)  # one grid point per pass over the embeddings: the same table
    np.testing.assert_array_equal(passes.cdul_map, res.cdul_map)
    assert passes.baselines == res.baselines
    for z, lam in [(0.2, 0.0), (0.4, 1.0)]:
        path = tmp_path / f"l{z}-{lam}.cdul"
        run_label(_cfg(path, folder, zeta=z, lam=lam), log=lambda _: None)
        reports, _ = evaluate_store(path, ds)
        cell = res.cdul_map[res.zetas.index(z), res.lams.index(lam)]
        assert abs(cell - reports["final"].map) < 1e-9, (z, lam, cell, reports["final"].map)
        for agg in ("global", "avg", "max"):
            assert abs(res.baselines[agg] - reports[agg].map) < 1e-9
    prefix = tmp_path / "sw"
    assert main(["eval", "--labels", str(stores["fp16"]), "--dataset", "folder", "--root", str(folder), "--classes",
                 ",".join(CLASSES), "--labels-csv", "labels.csv", "--sweep", "zeta=0:0.4:0.1,lam=0,1",
                 "--sweep-out", str(prefix), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "lam=0" in table and "best: zeta" in table
    rows = list(csv.DictReader((tmp_path / "sw.csv").open()))
    assert len(rows) == 5 * 2 + 3 and {r["aggregator"] for r in rows} == {"cdul", "global", "avg", "max"}
    with Image.open(tmp_path / "sw.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_sweep_specs():
    d = {"zeta": 0.3, "lam": 1.0}
    assert parse_sweep("zeta=0:0.4:0.05,lam=0,1", d) == {"zeta": [round(0.05 * i, 10) for i in range(9)],
                                                           "lam": [0.0, 1.0]}
    assert parse_sweep("lam=0.5", d) == {"zeta": [0.3], "lam": [0.5]}
    for bad, message in [("0,1", "must start with an axis"), ("beta=1", "axes are"), ("zeta=0:1", "start:stop:step"),
                         ("zeta=0:1:0", "step > 0"), ("zeta=2", r"in \[0, 1\]"), ("zeta=x", "not a number"),
                         ("zeta=0,zeta=1", "twice"), ("zeta=0:1:0.0001", "at most")]:
        with pytest.raises(ConfigError, match=message):
            parse_sweep(bad, d)


def test_train_accepts_a_rescored_store(tmp_path, folder, stores):
    from cdul_fast.train.trainer import TrainConfig, run_train

    out = tmp_path / "r.cdul"
    _rescore(stores["fp16"], out, zeta=0.0, lam=0.0)
    cfg = TrainConfig(labels=str(out), out=str(tmp_path / "run"), dataset="folder", root=str(folder), split="all",
                      test_split="none", dataset_options={"classes": ",".join(CLASSES), "labels": "labels.csv"},
                      arch="shapesnet", image_size=32, epochs=2, warmup=1, batch_size=8, workers=0, device="cpu",
                      backend="torch", progress=False)
    res = run_train(cfg, log=lambda _: None)
    with LabelStore.open(tmp_path / "run" / "labels.cdul") as st:
        np.testing.assert_array_equal(st.array("init"), _arrays(out)["final"])  # started from the rescored labels
    assert len(res.history) == 3
