"""`cdul-fast tags`: thresholds without ground truth, selection, the three formats, and the store checks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdul_fast.cli import main
from cdul_fast.datasets import load_dataset
from cdul_fast.deploy import tags as T
from cdul_fast.errors import ConfigError, DependencyError, StoreError
from cdul_fast.label.pipeline import LabelConfig, run_label

TINY = str(Path(__file__).parent / "data" / "tiny_clip.json")
CLASSES = ("circle", "square", "triangle")
NAMES = ["plain.png", "a,comma.png", 'quote".png', "new\nline.png", "ünï cødé.png", "semi;colon.png"]


def _brute_otsu(x: np.ndarray, bins: int = 256) -> float:
    """Between-group variance of every cut, computed directly from the binned scores."""
    idx = np.minimum((np.clip(x, 0, 1) * bins).astype(int), bins - 1)
    centers = (idx + 0.5) / bins
    best, cut = -1.0, math.inf
    for k in range(1, bins):
        lo, hi = centers[idx < k], centers[idx >= k]
        if lo.size and hi.size:
            v = lo.size * hi.size * (lo.mean() - hi.mean()) ** 2
            if v > best + 1e-12:
                best, cut = v, k / bins
    return cut


def test_otsu_cuts_between_the_modes_and_matches_brute_force():
    rng = np.random.default_rng(0)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        low = rng.normal(0.1, 0.04, 300).clip(0, 1)
        high = rng.normal(0.75, 0.08, 60).clip(0, 1)
        x = np.concatenate([low, high])
        t = T.otsu_threshold(x)
        assert low.max() < t <= high.min() or abs(t - _brute_otsu(x)) < 1e-9
        assert t == pytest.approx(_brute_otsu(x), abs=1e-9)
        assert 0.2 < t < 0.65
    assert T.otsu_threshold(np.full(50, 0.3)) == math.inf  # no cut: no tags


def test_selection_top_k_min_score_and_order():
    s = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.25], [0.6, 0.6, 0.0]], dtype=np.float32)
    got = T.select_tags(s, np.full(3, 0.4))
    assert [[c for c, _ in t] for t in got] == [[0, 2], [], [0, 1]]  # ties keep class order
    assert got[0][0][1] == pytest.approx(0.9) and got[2][1][1] == pytest.approx(0.6)
    top = T.select_tags(s, None, top_k=2, min_score=0.26)
    assert [[c for c, _ in t] for t in top] == [[0, 2], [1], [0, 1]]
    for t in T.select_tags(np.random.default_rng(1).random((20, 3)), None, top_k=2):
        assert len(t) == 2 and t[0][1] >= t[1][1]
    per_class = T.select_tags(s, np.array([0.95, 0.0, 0.5]))
    assert [[c for c, _ in t] for t in per_class] == [[2, 1], [1], [1]]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name in NAMES:
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / name)
    store = root.parent / "s.cdul"
    run_label(LabelConfig(out=str(store), dataset="folder", root=str(root), dataset_options={"classes": "circle,square,"
                          "triangle"}, clip=TINY, clip_weights="random", batch_size=4, decoder="pil", workers=0,
                          device="cpu", backend="torch", progress=False), log=lambda _: None)
    return root, store


def _ds(root: Path):
    return load_dataset("folder", root, "all", classes=",".join(CLASSES))


def test_csv_round_trips_awkward_file_names(tmp_path, labelled):
    root, store = labelled
    out = tmp_path / "t.csv"
    res = T.run_tags(store, _ds(root), out, mode="top-k", top_k=2)
    rows = list(csv.reader(out.open(newline="", encoding="utf-8")))
    assert rows[0] == ["path", "tags", "scores"] and len(rows) == 1 + len(NAMES) == 1 + res.images
    assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(NAMES)
    for r in rows[1:]:
        tags, scores = r[1].split(";"), [float(v) for v in r[2].split(";")]
        assert len(tags) == 2 and set(tags) <= set(CLASSES) and scores == sorted(scores, reverse=True)


def test_json_and_thresholds_file_round_trip(tmp_path, labelled):
    root, store = labelled
    out = tmp_path / "t.json"
    T.run_tags(store, _ds(root), out, mode="fixed", threshold=0.3)
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["mode"] == "fixed" and doc["thresholds"] == {c: 0.3 for c in CLASSES}
    assert all(t["score"] >= 0.3 for im in doc["images"] for t in im["tags"])
    thr = tmp_path / "t.json.thresholds.csv"
    rows = list(csv.DictReader(thr.open()))
    assert [r["class"] for r in rows] == list(CLASSES)
    assert sum(int(r["tagged_images"]) for r in rows) == sum(len(im["tags"]) for im in doc["images"])
    edited = tmp_path / "edited.csv"
    edited.write_text("class,threshold\ncircle,0\nsquare,inf\ntriangle,1\n")
    T.run_tags(store, _ds(root), tmp_path / "e.json", mode="file", thresholds_file=str(edited))
    images = json.loads((tmp_path / "e.json").read_text())["images"]
    assert all([t["name"] for t in im["tags"]] in (["circle"], ["circle", "triangle"]) for im in images)
    for text, message in [("circle,0.5\n", "no threshold for 2"), ("moon,0.5\n", "not one of"),
                          ("circle,x\n", "not a number"), ("circle,2\n", "must lie in"),
                          ("circle,0.1\ncircle,0.2\n", "twice")]:
        edited.write_text(text)
        with pytest.raises(ConfigError, match=message):
            T.read_thresholds(edited, CLASSES)


def test_parquet_round_trip_or_a_one_line_dependency_error(tmp_path, labelled, monkeypatch):
    root, store = labelled
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        T.run_tags(store, _ds(root), tmp_path / "t.parquet", mode="top-k", top_k=1)
        table = pq.read_table(tmp_path / "t.parquet").to_pylist()
        assert len(table) == len(NAMES) and all(len(r["tags"]) == 1 for r in table)
    monkeypatch.setattr(T, "_pyarrow", lambda: (_ for _ in ()).throw(DependencyError("needs pyarrow")))
    with pytest.raises(DependencyError, match="pyarrow"):
        T.run_tags(store, _ds(root), tmp_path / "u.parquet")
    assert not (tmp_path / "u.parquet").exists()


def test_store_of_other_images_is_refused(tmp_path, labelled):
    root, store = labelled
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (96, 96)).save(other / "x.png")
    with pytest.raises(StoreError, match="rows but"):
        T.run_tags(store, _ds(other), tmp_path / "t.csv")


def test_cli(tmp_path, labelled, capsys):
    root, store = labelled
    out = tmp_path / "t.csv"
    base = ["tags", "--labels", str(store), "--root", str(root), "--classes", ",".join(CLASSES), "-o", str(out)]
    assert main([*base, "--auto", "otsu"]) == 0  # dataset from the store, the rest from the flags
    assert "per-class Otsu thresholds" in capsys.readouterr().out and out.exists()
    assert main(["tags", "--labels", str(store), "-o", str(tmp_path / "y.csv"), "--top-k", "1"]) == 0  # root: .yaml
    assert len(list(csv.reader((tmp_path / "y.csv").open(newline="")))) == 1 + len(NAMES)
    for extra, message in [(["--top-k", "2", "--threshold", "0.5"], "pass one of"), (["--threshold", "nan"], "must"),
                           (["--top-k", "9"], "--top-k must be in"), (["--min-score", "2"], "--min-score"),
                           (["-o", str(tmp_path / "t.txt")], "must end in")]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_thresholds_file_with_a_byte_order_mark(tmp_path):
    f = tmp_path / "thr.csv"
    f.write_bytes("\ufeffclass,threshold\ncircle,0.2\nsquare,0.3\ntriangle,inf\n".encode())
    np.testing.assert_array_equal(T.read_thresholds(f, CLASSES), [0.2, 0.3, math.inf])
