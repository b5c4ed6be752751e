"""Training stage: losses, latent update on the run store, ablations, resume after SIGKILL, checkpoint safety."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdul_fast.errors import ConfigError, StoreError, WeightsError
from cdul_fast.ops import reference as ref
from cdul_fast.store.label_store import LabelStore
from cdul_fast.train.checkpoint import load_checkpoint, load_state_dict_file, save_atomic
from cdul_fast.train.classifier import build_classifier
from cdul_fast.train.losses import bce_loss, epr_loss, kl_loss, role_losses, smoothed_bce_loss
from cdul_fast.train.trainer import TrainConfig, Trainer, run_train

CLASSES = ("red", "green", "blue", "white")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}


def _make_world(root: Path, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Images with 1-3 coloured squares on grey; ground truth = which colours appear (and its CSV rows)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    gt = np.zeros((n, len(CLASSES)), dtype=np.int8)
    lines = []
    for i in range(n):
        arr = np.full((32, 32, 3), 110, dtype=np.uint8) + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8)
        for c in rng.choice(len(CLASSES), size=rng.integers(1, 4), replace=False):
            y, x = rng.integers(0, 22, size=2)
            arr[y:y + 10, x:x + 10] = COLOURS[CLASSES[c]]
            gt[i, c] = 1
        Image.fromarray(arr).save(root / f"im{i:03d}.png")
        lines.append(f"{root.name}/im{i:03d}.png," + ",".join(str(int(v)) for v in gt[i]))
    return gt, lines


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train/test folders with ground truth, and a label store of noisy soft pseudo labels for train."""
    base = tmp_path_factory.mktemp("world")
    gt, train_lines = _make_world(base / "train", 96, 0)
    _, test_lines = _make_world(base / "test", 24, 1)
    (base / "labels.csv").write_text("\n".join(["path," + ",".join(CLASSES), *train_lines, *test_lines]) + "\n")
    rng = np.random.default_rng(2)
    noisy = np.clip(0.55 * gt + rng.uniform(0.0, 0.45, gt.shape), 0, 1).astype(np.float32)
    noisy[gt == 1] *= rng.uniform(0.4, 1.0, int(gt.sum())).astype(np.float32)  # some positives look weak
    store = base / "pseudo.cdul"
    st = LabelStore.create(store, class_names=CLASSES, rows=len(gt), arrays=["final"],
                           meta={"dataset": "folder", "split": "train"})
    st.write(0, {"final": noisy})
    st.close()
    return {"base": base, "store": store, "gt": gt, "noisy": noisy}


def _cfg(world: dict, out: Path, **kw) -> TrainConfig:
    opts = {"classes": ",".join(CLASSES), "labels": "labels.csv"}
    base = dict(labels=str(world["store"]), out=str(out), dataset="folder", root=str(world["base"]), split="train",
                test_split="test", dataset_options=opts, arch="shapesnet", image_size=32, epochs=3, warmup=1,
                batch_size=16, lr=2e-3, workers=0, device="cpu", backend="torch", progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------------------ losses


def test_kl_loss_is_zero_at_the_targets_and_matches_the_bernoulli_kl():
    y = torch.rand(6, 5) * 0.98 + 0.01
    assert float(kl_loss(torch.log(y / (1 - y)), y)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(6, 5)
    p = torch.sigmoid(logits)
    kl = (y * torch.log(y / p) + (1 - y) * torch.log((1 - y) / (1 - p))).mean()
    assert float(kl_loss(logits, y)) == pytest.approx(float(kl), rel=1e-5)


def test_baseline_losses():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    hard = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(bce_loss(logits, hard)) < 0.02
    assert float(smoothed_bce_loss(logits, hard, 0.2)) > float(bce_loss(logits, hard))  # smoothing penalizes certainty
    # EPR: no loss from negatives, only the expected-count penalty
    flat = torch.zeros(2, 2)
    assert float(epr_loss(flat, torch.zeros(2, 2), expected_positives=1.0, weight=1.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(epr_loss(flat, torch.zeros(2, 2), expected_positives=2.0, weight=1.0)) == pytest.approx(0.25)
    # Cole et al.: the batch mean of the expected counts is held to k (one image with 2, one with 0: mean 1, no
    # penalty), not each image (which would give ((2-1)^2 + (0-1)^2) / 2 / C^2 = 0.25)
    split = torch.tensor([[20.0, 20.0], [-20.0, -20.0]])
    assert float(epr_loss(split, torch.zeros(2, 2), expected_positives=1.0, weight=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_role_losses_reach_only_their_own_learner_and_match_cole_et_al():
    """loss_f must not move the estimates nor loss_y the network (stop-gradients); observed positives are fixed."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g).requires_grad_(True)
    theta = torch.randn(6, 5, generator=g).requires_grad_(True)
    observed = torch.rand(6, 5, generator=g) > 0.7
    loss_f, loss_y = role_losses(logits, theta, observed, expected_positives=2.0, weight=1.0)
    assert torch.autograd.grad(loss_f, theta, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(loss_y, logits, retain_graph=True, allow_unused=True)[0] is None
    g_theta = torch.autograd.grad(loss_y, theta, retain_graph=True)[0]
    assert observed.any() and torch.all(g_theta[observed] == 0) and torch.all(g_theta[~observed] != 0)
    assert torch.all(torch.autograd.grad(loss_f, logits)[0] != 0)
    # the two halves of Cole et al.'s joint loss, written out (their losses.loss_role, observed estimates at 1)
    p, q = torch.sigmoid(logits.detach()), torch.sigmoid(theta.detach())
    est, obs = torch.where(observed, 1.0, q), observed.float()
    want_f = 0.5 * ((-(est * p.log() + (1 - est) * (1 - p).log())).mean() + (-p.log() * obs).mean()
                    + (p.sum(1).mean() - 2.0) ** 2 / 25)
    want_y = 0.5 * ((-(p * q.log() + (1 - p) * (1 - q).log()) * (1 - obs)).mean() + (est.sum(1).mean() - 2.0) ** 2 / 25)
    assert float(loss_f.detach()) == pytest.approx(float(want_f), rel=1e-5)
    assert float(loss_y.detach()) == pytest.approx(float(want_y), rel=1e-5)


# ------------------------------------------------------------------------------------------------------- latent step


def test_latent_update_on_the_run_store_matches_reference(world, tmp_path):
    tr = Trainer(_cfg(world, tmp_path / "run"), log=lambda s: None)
    latent0 = np.array(tr.store.array("latent"))
    pred = np.random.default_rng(0).uniform(0.01, 0.99, latent0.shape).astype(np.float32)
    tr.store.array("pred")[:] = pred
    tr._update_latent()
    cfg = tr.cfg
    expected = ref.latent_update_(torch.from_numpy(latent0.copy()), torch.from_numpy(pred), cfg.c1, cfg.sigma,
                                  cfg.psi_c2, cfg.label_lr)
    np.testing.assert_allclose(tr.store.array("latent"), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(tr.store.array("labels"), torch.sigmoid(expected).numpy(), atol=1e-6)
    tr.store.close()


def test_training_updates_labels_only_after_warmup_and_ablation_keeps_them(world, tmp_path):
    res = run_train(_cfg(world, tmp_path / "a", epochs=3, warmup=2), log=lambda s: None)
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert all(h["test_map"] is not None for h in res.history[1:])
    with LabelStore.open(tmp_path / "a" / "labels.cdul") as st:
        init, labels = np.asarray(st.array("init")), np.asarray(st.array("labels"))
        assert not np.allclose(init, labels, atol=1e-4)  # epoch 3 updated them
    # history: pseudo-label mAP unchanged through the warm-up epochs, then moved
    assert res.history[0]["pseudo_map"] == res.history[1]["pseudo_map"] == res.history[2]["pseudo_map"]
    assert res.history[3]["pseudo_map"] != res.history[2]["pseudo_map"]
    off = run_train(_cfg(world, tmp_path / "b", epochs=2, warmup=0, update_labels=False), log=lambda s: None)
    assert off.history[-1]["pseudo_map"] == off.history[0]["pseudo_map"]
    for name in ("checkpoint.pt", "model.safetensors", "model.json", "log.csv", "config.yaml", "curves.png"):
        assert (tmp_path / "a" / name).is_file(), name


def test_pred_source_eval_fixes_the_predictions_of_the_trained_network(world, tmp_path, monkeypatch):
    """pred_source=eval: after the epoch's training, pred holds the eval-mode outputs (no flips) of the network as
    trained, and the latent update uses them; train keeps the sigmoids of the training pass."""
    from cdul_fast.datasets import load_dataset
    from cdul_fast.views.square import IMAGENET_MEAN, IMAGENET_STD, ImageTensors, normalize

    fixed: list[int] = []
    orig = Trainer._fix_predictions

    def spy(self, epoch):
        fixed.append(epoch)
        return orig(self, epoch)

    monkeypatch.setattr(Trainer, "_fix_predictions", spy)
    cfg = _cfg(world, tmp_path / "eval", epochs=2, warmup=1, pred_source="eval")
    run_train(cfg, log=lambda s: None)
    assert fixed == [2]  # only when a latent update follows
    run_train(_cfg(world, tmp_path / "train", epochs=2, warmup=1, pred_source="train"), log=lambda s: None)
    assert fixed == [2]
    model = build_classifier("shapesnet", len(CLASSES))
    model.load_state_dict(load_state_dict_file(tmp_path / "eval" / "model.safetensors"))
    ds = load_dataset("folder", world["base"], "train", classes=",".join(CLASSES), labels="labels.csv")
    _, images = next(ImageTensors(ds.paths, 32).batches(np.arange(len(ds)), len(ds)))
    with torch.inference_mode():
        fresh = torch.sigmoid(model.eval()(normalize(images, IMAGENET_MEAN, IMAGENET_STD))).numpy()
    with (LabelStore.open(tmp_path / "eval" / "labels.cdul") as a,
          LabelStore.open(tmp_path / "train" / "labels.cdul") as b):
        pred, pred_train = np.asarray(a.array("pred")), np.asarray(b.array("pred"))
        np.testing.assert_allclose(pred, fresh, atol=1e-5)
        assert np.abs(pred - pred_train).max() > 1e-2  # train mode (batch statistics, flips) differs
        latent0 = ref.labels_to_latent(torch.from_numpy(np.array(a.array("init"))))
        want = ref.latent_update_(latent0, torch.from_numpy(pred.copy()), cfg.c1, cfg.sigma, cfg.psi_c2, cfg.label_lr)
        np.testing.assert_allclose(a.array("latent"), want.numpy(), atol=1e-5)  # the update used the fixed pred


def test_init_eps_sets_the_initial_latent(world, tmp_path):
    y = world["noisy"]
    assert (y < 0.05).mean() > 0.05  # enough entries for the clamp to show
    latents = {}
    for eps in (0.05, 1e-6):
        tr = Trainer(_cfg(world, tmp_path / str(eps), init_eps=eps), log=lambda s: None)
        latents[eps] = np.array(tr.store.array("latent"))
        np.testing.assert_array_equal(tr.store.array("labels"), y)  # the labels themselves are not clamped
        tr.store.close()
        c = np.clip(y.astype(np.float64), eps, 1 - eps)
        np.testing.assert_allclose(latents[eps], np.log(c / (1 - c)), atol=1e-4)
    assert latents[0.05].min() == pytest.approx(np.log(0.05 / 0.95), abs=1e-5)
    assert latents[1e-6].min() < np.log(0.05 / 0.95) - 1.0
    for bad in (0.0, 0.5, -1e-3, 0.7, float("nan"), float("inf"), "x"):
        with pytest.raises(ConfigError, match="--init-eps"):
            _cfg(world, tmp_path / "x", init_eps=bad).validate()


def test_role_learns_estimates_and_keeps_observed_positives(world, tmp_path, monkeypatch):
    def no_cdul_update(self):
        raise AssertionError("eq. 7-8 ran for role")

    monkeypatch.setattr(Trainer, "_update_latent", no_cdul_update)
    res = run_train(_cfg(world, tmp_path / "role", method="role", epochs=2, warmup=0), log=lambda s: None)
    with LabelStore.open(tmp_path / "role" / "labels.cdul") as st:
        init, latent, labels = (np.array(st.array(a)) for a in ("init", "latent", "labels"))
    observed = init >= 0.5
    latent0 = ref.labels_to_latent(torch.from_numpy(init)).numpy()
    assert observed.any() and np.all(labels[observed] == 1.0)
    np.testing.assert_array_equal(latent[observed], latent0[observed])  # never stepped
    np.testing.assert_allclose(labels[~observed], torch.sigmoid(torch.from_numpy(latent[~observed])).numpy(),
                               atol=1e-6)
    assert np.mean(np.abs(latent[~observed] - latent0[~observed]) > 1e-3) > 0.9  # the estimates moved
    assert res.history[2]["pseudo_map"] != res.history[0]["pseudo_map"]  # the history measures the estimates
    assert res.history[-1]["test_map"] > 40.0


@pytest.mark.parametrize("method", ["an", "ls", "epr"])
def test_baselines_learn_something(world, tmp_path, method):
    res = run_train(_cfg(world, tmp_path / method, method=method, epochs=2), log=lambda s: None)
    assert res.history[-1]["train_loss"] < res.history[1]["train_loss"] * 1.5
    assert res.history[-1]["test_map"] > 40.0  # 4 classes with ~50% prevalence: chance AP is ~50


def test_learns_from_noisy_pseudo_labels(world, tmp_path):
    res = run_train(_cfg(world, tmp_path / "learn", epochs=12, lr=2e-3, update_labels=False), log=lambda s: None)
    assert res.history[-1]["test_map"] > 75.0  # measured 85.6; chance is ~50


_KILLER = """
import os, signal, sys
import cdul_fast.train.trainer as T
orig = T.Trainer._checkpoint
def dying(self, epoch):
    orig(self, epoch)
    if epoch == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
T.Trainer._checkpoint = dying
from cdul_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(world: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "--labels", str(world["store"]), "--out", str(out), "--dataset", "folder", "--root",
            str(world["base"]), "--split", "train", "--test-split", "test", "--classes", ",".join(CLASSES),
            "--labels-csv", "labels.csv", "--arch", "shapesnet", "--image-size", "32", "--epochs", "4", "--warmup",
            "1", "--batch-size", "16", "--lr", "0.002", "--workers", "0", "--device", "cpu", "--backend", "torch",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs per method, made on first use."""
    return {}


# cdul killed during the warm-up and after latent updates (from fixed eval-mode predictions) started; role mid-run
@pytest.mark.parametrize("method, kill_at", [("cdul", 1), ("cdul", 3), ("role", 2)])
def test_killed_and_resumed_run_matches_uninterrupted(world, tmp_path, tmp_path_factory, uninterrupted, method,
                                                      kill_at):
    from cdul_fast.cli import main

    flags = ["--method", method, "--pred-source", "eval"]
    if method not in uninterrupted:
        uninterrupted[method] = tmp_path_factory.mktemp("whole") / "run"
        assert main(_cli(world, uninterrupted[method], *flags)) == 0
    whole, killed = uninterrupted[method], tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER, *_cli(world, killed, *flags)],
                          env={**os.environ, "KILL_AT": str(kill_at)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == kill_at
    assert main(_cli(world, killed, *flags)) == 2  # not empty: refuses without --resume
    assert main(_cli(world, killed, *flags, "--resume", "--lr", "0.001")) == 2  # different settings: refused
    assert main(_cli(world, killed, *flags, "--resume")) == 0
    a = load_state_dict_file(whole / "model.safetensors")
    b = load_state_dict_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "log.csv").read_text().splitlines()[1:] != []
    strip = [line.rsplit(",", 1)[0] for line in (whole / "log.csv").read_text().splitlines()]  # drop the timing
    assert strip == [line.rsplit(",", 1)[0] for line in (killed / "log.csv").read_text().splitlines()]
    with LabelStore.open(whole / "labels.cdul") as s1, LabelStore.open(killed / "labels.cdul") as s2:
        np.testing.assert_array_equal(s1.array("latent"), s2.array("latent"))
        np.testing.assert_array_equal(s1.array("labels"), s2.array("labels"))


# -------------------------------------------------------------------------------------------------- weights/config


def test_crafted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_atomic_save_leaves_no_temp_and_round_trips(tmp_path):
    save_atomic({"a": torch.arange(3), "epoch": 2}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 2


def test_pretrained_from_local_file(tmp_path):
    from safetensors.torch import save_file

    src = build_classifier("resnet18", 1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = build_classifier("resnet18", 7, str(tmp_path / "r18.safetensors"))
    assert torch.equal(model.conv1.weight, src.conv1.weight) and model.fc.out_features == 7
    with pytest.raises(WeightsError, match="does not fit"):
        build_classifier("resnet50", 7, str(tmp_path / "r18.safetensors"))
    with pytest.raises(ConfigError, match="unknown --arch"):
        build_classifier("resnet1001", 7)


def test_torchvision_checkpoints_load_into_the_timm_model(tmp_path):
    """Run folders and weight files of 0.1 (torchvision ResNets) still load: timm's ResNets use the same names."""
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18-tv.pth")
    model = build_classifier("resnet18", 4, str(tmp_path / "resnet18-tv.pth"))
    assert torch.equal(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight) and model.fc.out_features == 4
    tv.fc = torch.nn.Linear(512, 4)
    model.load_state_dict(tv.state_dict())  # a 0.1 run's model.safetensors: same keys, same shapes


def test_pretrained_tags_offline_fail_in_one_line(monkeypatch):
    import cdul_fast.clip.loader as cl

    monkeypatch.setattr(cl, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsError, match="not in the Hugging Face cache"):
        build_classifier("resnet18", 3, "IMAGENET1K_V1")  # torchvision's name for timm's tv_in1k
    with pytest.raises(WeightsError, match="neither a file nor a timm weights tag"):
        build_classifier("resnet18", 3, "no_such_tag")


def test_bad_configs_are_rejected(world, tmp_path):
    with pytest.raises(ConfigError, match="--method"):
        _cfg(world, tmp_path / "x", method="rolex").validate()
    with pytest.raises(ConfigError, match="not empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("1")
        Trainer(_cfg(world, tmp_path / "full"), log=lambda s: None)


def test_clipres_starts_from_the_shipped_clip_trunk():
    from safetensors.torch import load_file

    from cdul_fast.clip.loader import ALIASES

    clip = load_file(str(ALIASES["shapes-clip"] / "open_clip_model.safetensors"))
    model = build_classifier("clipres", 5, "shapes-clip")
    assert torch.equal(model.trunk.conv1.weight, clip["visual.conv1.weight"].float())
    assert torch.equal(model.trunk.layer4[0].conv3.weight, clip["visual.layer4.0.conv3.weight"].float())
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5)  # no attention pool: any input size
    fresh = build_classifier("clipres", 5)
    assert not torch.equal(fresh.trunk.conv1.weight, model.trunk.conv1.weight)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("damage", ["changed-lr", "truncated-checkpoint", "other-checkpoint-shape"])
def test_a_refused_resume_writes_nothing(world, tmp_path, damage):
    """Issue 14, 2: a resume that is refused or fails leaves config.yaml, labels.cdul and the checkpoint as they
    were (before, the run store was recreated with latent = logit(init) before the checkpoint was checked)."""
    out = tmp_path / "run"
    run_train(_cfg(world, out, epochs=2, warmup=0), log=lambda s: None)
    kw = {"epochs": 2, "warmup": 0, "resume": True}
    if damage == "changed-lr":
        kw["lr"] = 1e-4
    elif damage == "truncated-checkpoint":
        ck = (out / "checkpoint.pt").read_bytes()
        (out / "checkpoint.pt").write_bytes(ck[: len(ck) // 2])
    else:
        ck = load_checkpoint(out / "checkpoint.pt")
        ck["latent"] = ck["latent"][:3]
        torch.save(ck, out / "checkpoint.pt")
    before = _folder_bytes(out)
    with pytest.raises((ConfigError, WeightsError)):
        Trainer(_cfg(world, out, **kw), log=lambda s: None)
    assert _folder_bytes(out) == before


def test_a_store_whose_images_were_all_skipped_is_refused(world, tmp_path):
    """Issue 14, 8: training on zero images used to exit 0; now one line, nothing written."""
    store = tmp_path / "skipped.cdul"
    rows = len(world["gt"])
    with LabelStore.create(store, class_names=CLASSES, rows=rows, arrays=["final"],
                           meta={"dataset": "folder", "split": "train"}) as st:
        st.done[:] = 2  # SKIPPED: no image could be decoded
    with pytest.raises(StoreError, match="nothing to train on"):
        Trainer(_cfg(world, tmp_path / "run", labels=str(store)), log=lambda s: None)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------- issue 14, 8: images that are not what was labelled


def _own_world(world: dict, tmp_path: Path) -> tuple[dict, Path]:
    """A copy of the world whose store records the train images' file stats (as `label` writes it)."""
    import shutil

    from cdul_fast.datasets import load_dataset
    from cdul_fast.fsutil import file_stats

    base = tmp_path / "w"
    shutil.copytree(world["base"], base)
    ds = load_dataset("folder", base, "train", classes=",".join(CLASSES), labels="labels.csv")
    store = base / "own.cdul"
    with LabelStore.create(store, class_names=CLASSES, rows=len(ds), arrays=["final"], file_stats=file_stats(ds.paths),
                           meta={"dataset": "folder", "split": "train", "ids_sha256": ds.ids_digest()}) as st:
        st.write(0, {"final": world["noisy"]})
    return {**world, "base": base, "store": store}, base / "train"


def test_images_corrupted_after_labelling_are_refused(world, tmp_path):
    """Issue 14, 8: after the images were corrupted, train trained on black images and exited 0."""
    own, images = _own_world(world, tmp_path)
    (images / "im007.png").write_bytes(b"corrupted")
    with pytest.raises(StoreError, match=r"1 of the 96 images labelled .* differ from the files.*'train/im007.png'"):
        Trainer(_cfg(own, tmp_path / "run"), log=lambda s: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cache", ["yes", "no"])
def test_images_that_fail_to_decode_at_train_time_never_enter_training(world, tmp_path, monkeypatch, cache):
    """A file that is unchanged but cannot be decoded now (permissions, a flaky mount) is left out, with a note, of
    the batches, the label update and the metrics: never a black placeholder image."""
    import cdul_fast.views.square as square

    bad = {("train", "im003.png"), ("train", "im050.png"), ("test", "im007.png")}
    real = square.load_square

    def flaky(path, size):
        if (Path(path).parent.name, Path(path).name) in bad:
            raise OSError("Permission denied")
        return real(path, size)

    monkeypatch.setattr(square, "load_square", flaky)
    seen: list[np.ndarray] = []
    orig = Trainer._targets

    def spy(self, rows):
        seen.append(np.asarray(rows).copy())
        return orig(self, rows)

    monkeypatch.setattr(Trainer, "_targets", spy)
    notes: list[str] = []
    tr = Trainer(_cfg(world, tmp_path / "run", cache_images=cache, epochs=2, warmup=1), log=notes.append)
    latent0 = np.array(tr.store.array("latent"))
    tr.run()
    trained = np.unique(np.concatenate(seen))
    assert 3 not in trained and 50 not in trained and trained.size == 96 - 2
    assert sum("cannot be decoded now" in n for n in notes) == 2  # one note for train, one for test
    with LabelStore.open(tmp_path / "run" / "labels.cdul") as st:
        latent = np.asarray(st.array("latent"))
        np.testing.assert_array_equal(latent[[3, 50]], latent0[[3, 50]])  # no update from a missing prediction
        assert not np.array_equal(latent[[4, 51]], latent0[[4, 51]])


@pytest.mark.parametrize("cache", ["yes", "no"])
def test_training_when_no_labelled_image_decodes_is_refused(world, tmp_path, monkeypatch, cache):
    import cdul_fast.views.square as square

    def broken(path, size):
        raise OSError("Input/output error")

    monkeypatch.setattr(square, "load_square", broken)
    with pytest.raises(StoreError, match="nothing to train on"):
        tr = Trainer(_cfg(world, tmp_path / "run", cache_images=cache, test_split="none"), log=lambda s: None)
        tr.run()
    if cache == "yes":
        assert not (tmp_path / "run").exists()


def test_a_single_image_left_over_joins_the_batch_before_it(world, tmp_path):
    """96 images in batches of 5 leave 1: with a 1 x 1 feature map BatchNorm cannot train on it alone (this crashed
    with an internal error); it joins the batch before, for one process and for DDP's global batches alike."""
    from cdul_fast.train.trainer import _split_batches

    for n, b in ((0, 8), (1, 8), (8, 8), (9, 8), (10, 8), (17, 8), (89, 8)):
        head, last = _split_batches(np.arange(n), b)
        assert np.array_equal(np.concatenate([head, last]), np.arange(n)) and head.size % b == 0
        assert last.size != 1 or n == 1
        assert last.size <= b + 1
    res = run_train(_cfg(world, tmp_path / "r", arch="clipres", batch_size=5, epochs=1, warmup=0, test_split="none"),
                    log=lambda s: None)
    assert np.isfinite(res.last["train_loss"])
