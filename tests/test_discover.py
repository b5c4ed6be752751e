"""Novel category discovery (Jia et al., ICCV 2021): the math of eq. 1-10 against direct transcriptions, the
metrics against brute force, and a reduced digits run against k-means."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import yaml

from cdul_fast.discover.baselines import kmeans_scores, variant
from cdul_fast.discover.data import augment, digits
from cdul_fast.discover.losses import consistency_mse, nce_losses, ramp_up
from cdul_fast.discover.metrics import cluster_accuracy, cluster_scores
from cdul_fast.discover.select import pseudo_split, select_mu
from cdul_fast.discover.trainer import DiscoverConfig, pair_labels, run_discover
from cdul_fast.errors import ConfigError
from cdul_fast.ops import reference as ref


def test_wta_codes_follow_the_definition_and_only_the_order(torch_seed):
    z = torch.randn(7, 12)
    perms = ref.wta_permutations(12, 20, seed=3)
    codes = ref.wta_codes(z, perms, k=4)
    for i, h in itertools.product(range(7), range(20)):
        window = [float(z[i, perms[h, j]]) for j in range(4)]  # the first k entries of rho_h(z_i)
        assert int(codes[i, h]) == int(np.argmax(window))
    assert torch.equal(codes, ref.wta_codes(torch.exp(2 * z) + 3, perms, k=4))  # a monotone map changes nothing
    assert torch.equal(perms, ref.wta_permutations(12, 20, seed=3)) and sorted(perms[5].tolist()) == list(range(12))


def test_wta_pair_labels_count_agreements():
    codes = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [3, 3, 3, 3]])
    assert ref.wta_pair_labels(codes, 3).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert ref.wta_pair_labels(codes, 4).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_pairwise_bce_is_eq_7_8_and_differentiable():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    s = (torch.rand(5, 5, generator=g) > 0.5).double()
    want = 0.0
    for i, j in itertools.product(range(5), range(5)):
        d = float(p[i].detach() @ p[j].detach())
        want -= float(s[i, j]) * math.log(d) + (1 - float(s[i, j])) * math.log(1 - d)
    assert float(ref.pairwise_bce(p, s)) == pytest.approx(want / 25, rel=1e-5)
    assert torch.autograd.gradcheck(lambda q: ref.pairwise_bce(torch.softmax(q, 1), s, eps=1e-12).double(),
                                    (torch.randn(5, 3, dtype=torch.float64, requires_grad=True),))
    codes = torch.randint(0, 4, (5, 16), generator=g)
    assert float(ref.wta_pairwise_bce(p, codes, 8)) == float(ref.pairwise_bce(p, ref.wta_pair_labels(codes, 8)))


def _nce_loops(z: torch.Tensor, y: list[int], tau: float) -> tuple[float, float]:
    """Eq. 1-3 written out with loops over i, n and q."""
    n2 = z.shape[0]
    n = n2 // 2
    ys = y + y
    li = lc = 0.0
    for i in range(n2):
        denom = sum(math.exp(float(z[i] @ z[m]) / tau) for m in range(n2) if m != i)
        partner = (i + n) % n2
        li += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / denom)
        q = [m for m in range(n2) if m != i and ys[i] >= 0 and ys[m] == ys[i]]
        if q:
            lc += -sum(math.log(math.exp(float(z[i] @ z[m]) / tau) / denom) for m in q) / len(q)
    return li / n2, lc / n2


def test_nce_i_and_nce_c_are_eq_1_to_3(torch_seed):
    z = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1)
    y = [0, 1, 0, -1]
    nce_i, nce_c = nce_losses(z, torch.tensor(y), tau=0.5)
    want_i, want_c = _nce_loops(z, y, 0.5)
    assert float(nce_i) == pytest.approx(want_i, rel=1e-6) and float(nce_c) == pytest.approx(want_c, rel=1e-6)
    assert float(nce_losses(z, torch.full((4,), -1), 0.5)[1]) == 0.0  # unlabelled only: Q(i) is empty


def test_ramp_up_and_consistency():
    assert ramp_up(0, 10, 1.0) == pytest.approx(math.exp(-5)) and ramp_up(10, 10, 0.5) == 0.5
    assert ramp_up(5, 10, 1.0) == pytest.approx(math.exp(-1.25))
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert float(consistency_mse(p, p.flip(1))) == pytest.approx((0.36 * 2 + 0.0) / 2)


def test_cluster_accuracy_is_the_best_one_to_one_map():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    pred = rng.integers(0, 4, 60)
    brute = max(np.mean(y == np.array(perm)[pred]) for perm in itertools.permutations(range(4)))
    assert cluster_accuracy(y, pred) == pytest.approx(brute)
    assert cluster_accuracy(y, (y + 2) % 4) == 1.0  # renamed clusters
    s = cluster_scores(y, (y + 1) % 4)
    assert (s.acc, s.nmi, s.ari) == pytest.approx((1.0, 1.0, 1.0))


def test_pair_alternatives_agree_on_identical_items(torch_seed):
    z = torch.rand(6, 32)
    z[3] = z[0]
    for method in ("wta", "rankstats", "cosine"):
        cfg = DiscoverConfig(pairs=method, feat_dim=32, wta_mu_fraction=0.47)
        s = pair_labels(z, cfg, ref.wta_permutations(32, 32))
        assert s[0, 3] == 1 and s[3, 0] == 1 and torch.equal(s, s.t()) and bool((s.diagonal() == 1).all())


def test_digits_split_and_views():
    d = digits()
    assert set(d.y_train[d.labelled]) == {0, 1, 2, 3, 4} and set(d.y_train[~d.labelled]) == {5, 6, 7, 8, 9}
    assert tuple(d.x_train.shape[1:]) == (1, 8, 8) and len(d.y_test) == math.ceil(0.2 * 1797)
    g = torch.Generator().manual_seed(0)
    v1, v2 = augment(d.x_train[:16], g), augment(d.x_train[:16], g)
    assert v1.shape == (16, 1, 8, 8) and 0 <= float(v1.min()) and float(v1.max()) <= 1 and not torch.equal(v1, v2)


def test_a_reduced_digits_run_beats_k_means_on_supervised_features():
    d = digits()
    cfg = DiscoverConfig(epochs=25, seed=0, wta_mu_fraction=0.5)  # a fixed mu: "auto" is tested on its own
    full = run_discover(d, cfg)
    sup = run_discover(d, variant(cfg, "supervised only"))
    km = kmeans_scores(sup.model, d, "cpu")
    assert full.test_known_acc > 0.95
    assert full.train_novel.acc > km.acc + 0.1, (full.train_novel, km)
    assert full.test_novel.acc > 0.7


def test_cli_writes_results_clusters_and_contact_sheets(tmp_path, capsys):
    import json

    from PIL import Image

    from cdul_fast.cli import main

    out = tmp_path / "disc"
    assert main(["discover", "--out", str(out), "--epochs", "2", "--batch-size", "128", "--no-progress",
                 "--mu-candidates", "0.5,0.6", "--select-epochs", "1", "--select-folds", "2"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    d = digits()
    assert res["novel"] == [5, 6, 7, 8, 9] and sum(res["cluster_sizes"]) == int((~d.labelled).sum())
    assert f"ACC {100 * res['unlabelled_train']['acc']:.1f} %" in printed
    lines = (out / "clusters.csv").read_text().strip().splitlines()
    assert lines[0] == "index,true_class,cluster,confidence" and len(lines) == 1 + int((~d.labelled).sum())
    sheets = sorted((out / "clusters").glob("cluster_*.png"))
    assert len(sheets) == 5 and all(Image.open(p).size[0] == 8 * 40 for p in sheets)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["wta_mu_fraction"] in (0.5, 0.6)
    assert saved["wta_mu_fraction"] == res["wta_mu_fraction"] and set(res["mu_selection"]) == {"0.5", "0.6"}
    best = max(res["mu_selection"].values())
    assert res["mu_selection"][f"{saved['wta_mu_fraction']:g}"] == best


def test_pseudo_split_uses_known_classes_only_and_folds_rotate():
    d = digits()
    a, b = pseudo_split(d, 0, 2), pseudo_split(d, 1, 2)
    for s in (a, b):
        assert set(s.y_train) == set(s.y_test) == set(d.known)  # no novel-class image seen
        assert len(s.novel) == 3 and len(s.known) == 2 and set(s.known) | set(s.novel) == set(d.known)
        assert set(s.y_train[s.labelled]) == set(s.known) and set(s.y_train[~s.labelled]) == set(s.novel)
    assert a.novel != b.novel
    shown = dataclasses.replace(d, modality="embedding", x_train=d.x_train.flatten(1), x_test=d.x_test.flatten(1),
                                encoder="mlp")
    e = pseudo_split(shown)
    assert (e.modality, e.encoder, e.x_train.ndim) == ("embedding", "mlp", 2)  # the split keeps how items are viewed
    with pytest.raises(ConfigError, match="at least 4 known"):
        pseudo_split(digits(known=3))


def test_select_mu_averages_folds_and_prefers_the_smaller_mu_on_ties():
    from types import SimpleNamespace

    seen = []

    def fake_run(split, cfg):  # fold 0 favours mu 0.7, fold 1 mu 0.4; 0.5 is best on average
        seen.append((split.novel, cfg.wta_mu_fraction, cfg.epochs))
        fold = 0 if split.novel == seen[0][0] else 1
        acc = {0.4: (0.5, 0.9), 0.5: (0.8, 0.8), 0.6: (0.8, 0.8), 0.7: (0.95, 0.3)}[cfg.wta_mu_fraction][fold]
        return SimpleNamespace(train_novel=SimpleNamespace(acc=acc))

    cfg = DiscoverConfig(select_epochs=7, select_folds=2)
    best, scores = select_mu(digits(), cfg, fake_run)
    assert best == 0.5 and scores == pytest.approx({0.4: 0.7, 0.5: 0.8, 0.6: 0.8, 0.7: 0.625})
    assert len(seen) == 8 and {e for _, _, e in seen} == {7}


@pytest.mark.parametrize("argv,message", [(["--dataset", "cifar"], "unknown discover dataset"),
                                          (["--known", "0"], "--known must be"),
                                          (["--pairs", "wta", "--wta-mu-fraction", "0"], "--wta-mu-fraction"),
                                          (["--wta-mu-fraction", "often"], "--wta-mu-fraction"),
                                          (["--mu-candidates", "0.5,1.5"], "--mu-candidates"),
                                          (["--feat-dim", "0"], "--feat-dim"),
                                          (["--ramp-lambda", "2"], "--ramp-lambda"), (["--wta-k", "500"], "--wta-k")])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    from cdul_fast.cli import main

    assert main(["discover", "--out", str(tmp_path / "x"), "--epochs", "1", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def _fake_cifar(root, variant: str, per_class: int = 3):
    import pickle

    from cdul_fast.discover.benchmarks import CIFAR

    folder, train, test, meta, label_key, names_key, _ = CIFAR[variant]
    base = root / folder
    base.mkdir(parents=True)
    classes = 10 if variant == "cifar10" else 100
    rng = np.random.default_rng(0)
    for name in (*train, *test):
        y = np.repeat(np.arange(classes), per_class)
        x = (y[:, None] * 2 + rng.integers(0, 2, (len(y), 3072))).astype(np.uint8)  # class-coded pixel values
        (base / name).write_bytes(pickle.dumps({b"data": x, label_key: y.tolist(), b"batch_label": b"x"}, protocol=2))
    (base / meta).write_bytes(pickle.dumps({names_key: [f"c{i}".encode() for i in range(classes)]}, protocol=2))
    return base


@pytest.mark.parametrize("variant,known", [("cifar10", 5), ("cifar100", 80)])
def test_cifar_adapters_read_the_official_python_layout(tmp_path, variant, known):
    from cdul_fast.discover.benchmarks import CIFAR, cifar

    _fake_cifar(tmp_path, variant)
    d = cifar(tmp_path, variant)  # the parent folder
    classes = 10 if variant == "cifar10" else 100
    assert d.known == tuple(range(known)) and d.novel == tuple(range(known, classes))
    per_file = 3 * classes
    assert tuple(d.x_train.shape) == (per_file * len(CIFAR[variant][1]), 3, 32, 32)
    assert len(d.y_test) == per_file and set(d.y_train[d.labelled]) == set(range(known))
    # pixels decode in the file's channel-major order: class c's pixels are 2c or 2c + 1
    c = int(d.y_train[0])
    assert set(np.unique(np.round(d.x_train[0].numpy() * 255))) <= {2 * c, 2 * c + 1}
    assert d.flip and d.encoder == "resnet18" and d.class_names[1] == "c1"


def test_cifar_adapter_refuses_pickled_code_and_bad_batches(tmp_path):
    import os
    import pickle

    from cdul_fast.discover.benchmarks import cifar

    base = _fake_cifar(tmp_path, "cifar10", per_class=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (base / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ConfigError, match="refusing to load"):
        cifar(base)
    assert not (tmp_path / "pwned").exists()
    (base / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 7), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ConfigError, match=r"uint8 array \[N, 3072\]"):
        cifar(base)
    (base / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="not a CIFAR python batch"):
        cifar(base)


def test_image_folder_with_a_class_split_file(tmp_path):
    from PIL import Image

    from cdul_fast.discover.benchmarks import image_folder

    for i, name in enumerate(["cat", "dog", "fox", "owl", "extra"]):
        (tmp_path / "img" / name).mkdir(parents=True)
        for j in range(5):
            Image.new("RGB", (20, 12), (40 * i, 10 * j, 0)).save(tmp_path / "img" / name / f"{j}.png")
    split = tmp_path / "split.yaml"
    split.write_text("known: [cat, dog]\nnovel: [fox, owl]\n")
    d = image_folder(tmp_path / "img", split, size=16, test_fraction=0.2)
    assert d.class_names == ("cat", "dog", "fox", "owl") and d.known == (0, 1) and d.novel == (2, 3)
    assert tuple(d.x_train.shape[1:]) == (3, 16, 16) and len(d.y_train) + len(d.y_test) == 20  # "extra" ignored
    assert set(d.y_train[d.labelled]) == {0, 1} and set(d.y_train[~d.labelled]) == {2, 3}
    split.write_text("known: [cat]\nnovel: [cat, owl]\n")
    with pytest.raises(ConfigError, match="listed twice"):
        image_folder(tmp_path / "img", split)
    split.write_text("known: [cat]\nnovel: [wolf]\n")
    with pytest.raises(ConfigError, match="wolf"):
        image_folder(tmp_path / "img", split)


def test_resnet18_encoder_and_rgb_views(torch_seed):
    from cdul_fast.discover.data import augment
    from cdul_fast.discover.model import make_encoder

    enc = make_encoder("auto", "image", (3, 32, 32), 64, auto="resnet18")
    assert type(enc).__name__ == "ResNet18" and enc(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    v = augment(x, g, flip=True)
    assert v.shape == x.shape and 0 <= float(v.min()) and float(v.max()) <= 1
    with pytest.raises(ConfigError, match="does not fit"):
        make_encoder("mlp", "image", (3, 32, 32), 64)


def _store_world(tmp_path, with_embeddings: bool = True):
    """A folder of 4 classes x 12 images with ground truth, and a label store that names only 'a' and 'b': their
    images score confidently, 'c' and 'd' poorly; embeddings are 4 separated clusters (not what CLIP would give,
    but what lets the plumbing be checked exactly)."""
    from PIL import Image

    from cdul_fast.datasets import load_dataset
    from cdul_fast.fsutil import file_stats
    from cdul_fast.store.label_store import LabelStore

    root = tmp_path / "photos"
    root.mkdir(parents=True)
    lines = ["path,labels"]
    for i in range(48):
        cls = "abcd"[i % 4]
        Image.new("RGB", (10, 10), (60 * (i % 4), 0, 0)).save(root / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{cls}")
    (root / "truth.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset("folder", root, "all", labels=str(root / "truth.csv"))
    y = np.asarray(ds.labels).argmax(1)  # class index per image, in ds.class_names order (a, b, c, d)
    rng = np.random.default_rng(0)
    centers = np.eye(16)[:4] * 3
    emb = (centers[y] + 0.3 * rng.standard_normal((48, 16))).astype(np.float32)
    scores = np.where(y[:, None] == np.arange(2)[None], 0.9, 0.1).astype(np.float32)
    tensors = {"embeddings": ("float32", (1, 16))} if with_embeddings else None
    path = tmp_path / "named.cdul"
    with LabelStore.create(path, ["a", "b"], 48, ["final"], meta={"dataset": "folder", "split": "all",
                           "ids_sha256": ds.ids_digest()}, file_stats=file_stats(ds.paths), tensors=tensors) as st:
        st.write(0, {"final": scores, **({"embeddings": emb[:, None]} if with_embeddings else {})})
    return ds, path, y


def test_store_discovery_groups_the_unnamed_images_and_writes_a_bound_store(tmp_path):
    from cdul_fast.discover.run import run_store
    from cdul_fast.store.label_store import DONE, SKIPPED, LabelStore

    ds, path, y = _store_world(tmp_path)
    cfg = DiscoverConfig(labels=str(path), epochs=15, batch_size=32, wta_mu_fraction=0.5, feat_dim=32,
                         confident=0.5, poor=0.3, max_novel=5)
    res = run_store(cfg, ds, tmp_path / "out", log=lambda s: None)
    assert res["novel_groups"] == 2 and res["k_silhouette"] is not None  # K estimated: the two unnamed classes
    assert res["candidates"] == 24 and res["labelled"] == 24 and res["known_classes"] == ["a", "b"]
    gt = res["ground_truth"]
    assert gt["classes"] == ["c", "d"] and gt["scored_images"] == 24 and gt["groups"]["acc"] == 1.0
    with LabelStore.open(tmp_path / "out" / "groups.cdul", mode="r", expect_classes=["novel_00", "novel_01"]) as st:
        done, probs = np.asarray(st.done), np.asarray(st.array("final"))
        assert st.meta["ids_sha256"] == ds.ids_digest()
    assert set(np.flatnonzero(done == DONE)) == set(np.flatnonzero(y >= 2))
    assert bool((done[y < 2] == SKIPPED).all()) and np.allclose(probs[y >= 2].sum(1), 1, atol=1e-5)
    groups = probs[y >= 2].argmax(1)  # one group per unnamed class
    assert len(set(groups[y[y >= 2] == 2])) == 1 and len(set(groups[y[y >= 2] == 3])) == 1
    assert set(groups[y[y >= 2] == 2]) != set(groups[y[y >= 2] == 3])
    lines = (tmp_path / "out" / "clusters.csv").read_text().splitlines()
    assert lines[0] == "path,cluster,confidence,best_known_score" and len(lines) == 25
    assert sorted(p.name for p in (tmp_path / "out" / "clusters").iterdir()) == ["novel_00.png", "novel_01.png"]
    from cdul_fast.deploy.tags import run_tags

    tags = run_tags(tmp_path / "out" / "groups.cdul", ds, tmp_path / "groups.csv", mode="top-k", top_k=1)
    rows = (tmp_path / "groups.csv").read_text().splitlines()
    assert tags.images == 24 and len(rows) == 25 and all(r.split(",")[1].startswith("novel_0") for r in rows[1:])


def test_store_discovery_errors(tmp_path):
    from cdul_fast.discover.from_store import store_split

    ds, path, _ = _store_world(tmp_path)
    with pytest.raises(ConfigError, match="lower --confident"):
        store_split(path, ds, confident=0.95, poor=0.3, novel=2, max_novel=5)
    with pytest.raises(ConfigError, match="raise --poor"):
        store_split(path, ds, confident=0.5, poor=0.05, novel=2, max_novel=5)
    with pytest.raises(ConfigError, match="--novel must be"):
        store_split(path, ds, confident=0.5, poor=0.3, novel=30, max_novel=5)
    ds2, path2, _ = _store_world(tmp_path / "x", with_embeddings=False)
    with pytest.raises(ConfigError, match="--save-embeddings"):
        store_split(path2, ds2, confident=0.5, poor=0.3, novel=2, max_novel=5)


def test_cli_runs_cifar(tmp_path, capsys):
    import json

    from cdul_fast.cli import main

    _fake_cifar(tmp_path, "cifar10", per_class=4)
    out = tmp_path / "c10"
    assert main(["discover", "--dataset", "cifar10", "--root", str(tmp_path), "--out", str(out), "--epochs", "1",
                 "--batch-size", "100", "--wta-mu-fraction", "0.5", "--encoder", "small", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "cifar10" and res["novel"] == [5, 6, 7, 8, 9] and sum(res["cluster_sizes"]) == 100
    assert yaml.safe_load((out / "config.yaml").read_text())["encoder"] == "small"
    assert len(list((out / "clusters").glob("*.png"))) == 5
    assert main(["discover", "--labels", str(tmp_path / "x.cdul"), "--known", "3", "--out", str(out)]) == 2
    assert "--known does not apply" in capsys.readouterr().err
