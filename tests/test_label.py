"""End-to-end `label` and `eval`: rows against an independent reference, resume after SIGKILL, skips, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdul_fast.cli import main
from cdul_fast.clip.loader import load_clip
from cdul_fast.datasets import load_dataset
from cdul_fast.errors import StoreError
from cdul_fast.evaluate import evaluate_store
from cdul_fast.label.pipeline import LabelConfig, run_label
from cdul_fast.store.label_store import LabelStore

TINY = str(Path(__file__).parent / "data" / "tiny_clip.json")
CLASSES = ("circle", "square", "triangle", "star", "cross", "heart", "ring")
SIZE = 32  # tiny_clip.json image size
GRID = 3


def _draw(rng: np.random.Generator, side: int) -> Image.Image:
    """A noisy background with a few coloured rectangles: enough structure that CLIP features differ per view."""
    arr = rng.integers(0, 60, size=(side, side, 3), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        y, x = rng.integers(0, side - 8, size=2)
        h, w = rng.integers(4, side // 2, size=2)
        arr[y:y + h, x:x + w] = rng.integers(60, 256, size=3, dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PNG images of side G * S (snippets are exactly S x S pixels) plus a labels CSV with 1/0/-1 entries."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    lines = ["path," + ",".join(CLASSES)]
    for i in range(11):
        _draw(rng, GRID * SIZE).save(root / f"im{i:02d}.png")
        row = rng.integers(0, 2, size=len(CLASSES))
        row[0] = 1 if i % 2 else 0  # every class column has positives and negatives
        if i == 3:
            row[2] = -1
        lines.append(f"im{i:02d}.png," + ",".join(str(int(v)) for v in row))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY, "random", device="cpu", precision="fp32", seed=0)


def _cfg(out: Path, root: Path, **kw) -> LabelConfig:
    base = dict(out=str(out), dataset="folder", root=str(root),
                dataset_options={"classes": ",".join(CLASSES), "labels": "labels.csv"}, clip=TINY,
                clip_weights="random", grid=GRID, zeta=0.3, lam=1.0, batch_size=4, decoder="pil",
                workers=0, device="cpu", backend="torch", progress=False)
    base.update(kw)
    return LabelConfig(**base)


def _independent_reference(clip, paths, zeta: float, lam: float) -> dict[str, np.ndarray]:
    """Eq. 1-6 and the lambda combine written out here, with open_clip's own transform for the whole image."""
    import open_clip

    tf = open_clip.image_transform(SIZE, is_train=False)  # open_clip's defaults: OpenAI mean/std, bicubic
    norm = tf.transforms[-1]
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    text = clip.model.encode_text(clip.tokenizer([f"a photo of the {c}" for c in CLASSES]))
    text = text / text.norm(dim=-1, keepdim=True)
    scale = clip.model.logit_scale.exp()
    out: dict[str, list] = {k: [] for k in ("global", "aggregate", "cdul", "avg", "max")}
    for path in paths:
        img = Image.open(path).convert("RGB")
        arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
        views = [tf(img)]
        for i in range(GRID):
            for j in range(GRID):
                views.append((arr[:, i * SIZE:(i + 1) * SIZE, j * SIZE:(j + 1) * SIZE] - mean) / std)
        with torch.no_grad():
            f = clip.model.encode_image(torch.stack(views))
        f = f / f.norm(dim=-1, keepdim=True)
        p = torch.softmax(scale * f @ text.T, dim=-1)
        g, snip = p[0], p[1:]
        hi, lo = snip.max(dim=0).values, snip.min(dim=0).values
        agg = torch.where(hi >= zeta, hi, lo)
        out["global"].append(g)
        out["aggregate"].append(agg)
        out["cdul"].append(lam * torch.maximum(g, agg) + (1 - lam) * (g + agg) / 2)
        out["avg"].append(p.mean(dim=0))
        out["max"].append(p.max(dim=0).values)
    return {k: torch.stack(v).detach().numpy() for k, v in out.items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_match_independent_reference(tmp_path, image_folder, clip, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    out = tmp_path / "labels.cdul"
    res = run_label(_cfg(out, image_folder, backend=backend, lam=0.5,
                         save=("global", "aggregate", "cdul", "avg", "max")), log=lambda s: None, clip=clip)
    assert res.complete and res.labelled == 11 and res.skipped == 0
    ds = load_dataset("folder", image_folder, "all", classes=",".join(CLASSES), labels="labels.csv")
    ref = _independent_reference(clip, ds.paths, zeta=0.3, lam=0.5)
    with LabelStore.open(out) as st:
        assert st.clean and st.class_names == CLASSES and st.meta["grid"] == GRID
        assert np.all(np.asarray(st.done) == 1)
        for name, expected in ref.items():
            np.testing.assert_allclose(st.array(name), expected, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_array_equal(st.array("final"), st.array("cdul"))
    # the saved YAML holds the resolved config
    assert (tmp_path / "labels.cdul.yaml").read_text().count("grid: 3") == 1


def test_aggregator_choice_changes_final(tmp_path, image_folder, clip):
    out = tmp_path / "g.cdul"
    run_label(_cfg(out, image_folder, aggregator="global", save=("cdul",)), log=lambda s: None, clip=clip)
    with LabelStore.open(out) as st:
        final, cdul = np.asarray(st.array("final")), np.asarray(st.array("cdul"))
    assert not np.allclose(final, cdul)  # global-only differs from the min-max combination
    np.testing.assert_allclose(final.sum(axis=1), 1.0, atol=1e-5)  # a softmax row


_SIGNALLER = """
import os, signal, sys
import cdul_fast.label.job as J
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a job started with `&` ignores SIGINT
count = {"n": 0}
orig = J._write_runs
def signalled(store, rows, values):
    orig(store, rows, values)
    count["n"] += 1
    if count["n"] == int(os.environ["SIGNAL_AFTER"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
J._write_runs = signalled
from cdul_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""  # runs `cdul-fast` with its arguments and sends itself $SIGNAL after $SIGNAL_AFTER store writes


def _cli_args(out: Path, root: Path, *extra: str) -> list[str]:
    return ["label", "--out", str(out), "--dataset", "folder", "--root", str(root), "--classes", ",".join(CLASSES),
            "--clip", TINY, "--clip-weights", "random", "--batch-size", "2", "--decoder", "pil",
            "--workers", "0", "--device", "cpu", "--backend", "torch", "--flush-every", "1", "--save", "global",
            "--no-progress", *extra]


@pytest.mark.parametrize("seed,extra", [(0, ()), (1, ()), (2, ()), (3, ("--save-embeddings",)),
                                        (4, ("--save-embeddings", "--embedding-dtype", "fp32"))])
def test_resume_after_sigkill_is_byte_identical(tmp_path, image_folder, seed, extra):
    whole = tmp_path / "whole.cdul"
    killed = tmp_path / "killed.cdul"
    kill_after = int(np.random.default_rng(seed).integers(1, 6))  # a random point among the 6 batches
    env = {**os.environ, "SIGNAL": "SIGKILL", "SIGNAL_AFTER": str(kill_after)}
    proc = subprocess.run([sys.executable, "-c", _SIGNALLER, *_cli_args(killed, image_folder, *extra)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    with LabelStore.open(killed) as st:  # torn: not clean, partly done
        assert not st.clean
        done = int((np.asarray(st.done) == 1).sum())
    assert 0 < done < 11
    assert main(_cli_args(whole, image_folder, *extra)) == 0
    assert main(_cli_args(killed, image_folder, *extra)) == 2  # exists: must ask for --resume
    assert main(_cli_args(killed, image_folder, "--resume", "--grid", "2", *extra)) == 2  # other settings: refused
    if extra:  # with or without embeddings is another setting too
        assert main(_cli_args(killed, image_folder, "--resume")) == 2
    assert main(_cli_args(killed, image_folder, "--resume", *extra)) == 0
    assert killed.read_bytes() == whole.read_bytes()
    if extra:
        with LabelStore.open(killed) as st:
            assert st.tensor("embeddings").any(axis=(1, 2)).all()  # every row's embeddings were written


def test_undecodable_image_is_skipped_and_logged(tmp_path, image_folder, clip):
    root = tmp_path / "bad"
    root.mkdir()
    for p in sorted(image_folder.glob("im0[0-4].png")):
        (root / p.name).write_bytes(p.read_bytes())
    (root / "im02.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "labels.csv").write_text("\n".join((image_folder / "labels.csv").read_text().splitlines()[:6]) + "\n")
    out = tmp_path / "bad.cdul"
    res = run_label(_cfg(out, root), log=lambda s: None, clip=clip)
    assert res.skipped == 1 and res.labelled == 4 and res.complete
    with LabelStore.open(out) as st:
        assert list(np.asarray(st.done)) == [1, 1, 2, 1, 1]
        assert np.all(np.asarray(st.array("final"))[2] == 0)
    tsv = (tmp_path / "bad.cdul.skipped.tsv").read_text().splitlines()
    assert tsv[1].startswith("2\tim02.png\t") and "cannot decode" in tsv[1]
    ds = load_dataset("folder", root, "all", classes=",".join(CLASSES), labels="labels.csv")
    reports, notes = evaluate_store(out, ds)
    assert any("left out" in n for n in notes)


def test_eval_matches_sklearn(tmp_path, image_folder, clip, capsys):
    from sklearn.metrics import average_precision_score

    out = tmp_path / "e.cdul"
    run_label(_cfg(out, image_folder, save=("global",)), log=lambda s: None, clip=clip)
    ds = load_dataset("folder", image_folder, "all", classes=",".join(CLASSES), labels="labels.csv")
    with LabelStore.open(out) as st:
        scores = np.array(st.array("final"))
    aps = []
    for c in range(len(CLASSES)):
        keep = ds.labels[:, c] >= 0
        aps.append(average_precision_score(ds.labels[keep, c], scores[keep, c]))
    argv = ["eval", "--labels", str(out), "--dataset", "folder", "--root", str(image_folder), "--classes",
            ",".join(CLASSES), "--labels-csv", "labels.csv", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    final = report["arrays"]["final"]
    assert final["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-3)
    assert final["classes"]["circle"]["ap"] == pytest.approx(100 * aps[0], abs=1e-3)
    assert set(report["arrays"]) == {"final", "global"}


def test_cli_errors_are_one_line(tmp_path, image_folder, capsys):
    assert main(["label", "--out", str(tmp_path / "x.cdul"), "--dataset", "voc2007"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--root" in err[0]
    assert main(_cli_args(tmp_path / "y.cdul", image_folder, "--zeta", "1.5")) == 2
    assert "--zeta" in capsys.readouterr().err
    assert main(["eval", "--labels", str(tmp_path / "missing.cdul"), "--dataset", "folder", "--root",
                 str(image_folder), "--classes", "a,b"]) == 2
    assert "missing.cdul" in capsys.readouterr().err


def test_ctrl_c_leaves_a_clean_store_and_says_how_to_resume(tmp_path, image_folder):
    out = tmp_path / "int.cdul"
    proc = subprocess.run([sys.executable, "-c", _SIGNALLER, *_cli_args(out, image_folder)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "SIGNAL": "SIGINT", "SIGNAL_AFTER": "2"})
    assert proc.returncode == 130
    assert "--resume" in proc.stdout + proc.stderr
    with LabelStore.open(out) as st:  # checksums verified: closed cleanly
        assert st.clean and 0 < int((np.asarray(st.done) == 1).sum()) < 11
    assert main(_cli_args(out, image_folder, "--resume")) == 0
    whole = tmp_path / "whole.cdul"
    assert main(_cli_args(whole, image_folder)) == 0
    assert out.read_bytes() == whole.read_bytes()


def test_a_store_resumes_when_the_same_weights_moved(tmp_path, image_folder, clip):
    """09bd33f installed the shipped CLIP elsewhere: same weights (same clip_identity), another path; still resumes.
    Other weights (another identity) are still refused."""
    out = tmp_path / "moved.cdul"
    run_label(_cfg(out, image_folder), log=lambda s: None, clip=clip)
    with LabelStore.open(out, mode="r+") as st:
        st.update_meta({**st.meta, "clip_weights": "/old/site-packages/cdul_fast/assets/x.safetensors"})
        st.done[8:] = 0
    assert run_label(_cfg(out, image_folder, resume=True), log=lambda s: None, clip=clip).complete
    with LabelStore.open(out, mode="r+") as st:
        st.update_meta({**st.meta, "clip_identity": "0123456789abcdef"})
        st.done[8:] = 0
    with pytest.raises(StoreError, match="clip_identity"):
        run_label(_cfg(out, image_folder, resume=True), log=lambda s: None, clip=clip)


@pytest.mark.parametrize("decoder", ["pil", "auto", "torchvision"])
def test_a_store_of_09bd33f_with_the_old_decoder_name_resumes(tmp_path, image_folder, clip, decoder):
    """Stores written before the decoders were renamed record "torchvision" (now pil): they still resume."""
    out = tmp_path / "old.cdul"
    run_label(_cfg(out, image_folder), log=lambda s: None, clip=clip)
    with LabelStore.open(out, mode="r+") as st:
        assert st.meta["decoder"] == "pil"
        whole = np.array(st.array("final"))
        st.update_meta({**st.meta, "decoder": "torchvision"})
        st.done[6:] = 0  # an interrupted run: rows 6.. still pending
        st.array("final")[6:] = 0
    res = run_label(_cfg(out, image_folder, resume=True, decoder=decoder), log=lambda s: None, clip=clip)
    assert res.complete and res.labelled == 11 and res.labelled_now == 11 - 4  # rows 4..7 redone whole (batch 4)
    with LabelStore.open(out) as st:
        np.testing.assert_array_equal(st.array("final"), whole)


def test_a_store_is_refused_for_another_image_list(tmp_path, image_folder, clip):
    """Issue 14, 1 (image lists): same number of images and same classes are not enough for eval or train."""
    import shutil

    from cdul_fast.train.trainer import TrainConfig, Trainer

    other = tmp_path / "other"
    other.mkdir()
    for i, p in enumerate(sorted(image_folder.glob("*.png"))):
        shutil.copy(p, other / f"renamed{i:02d}.png")
    store = tmp_path / "other.cdul"
    run_label(_cfg(store, other, dataset_options={"classes": ",".join(CLASSES)}), log=lambda s: None, clip=clip)
    ds = load_dataset("folder", image_folder, "all", classes=",".join(CLASSES), labels="labels.csv")
    with pytest.raises(StoreError, match="other images"):
        evaluate_store(store, ds)
    with pytest.raises(StoreError, match="other images"):
        Trainer(TrainConfig(labels=str(store), out=str(tmp_path / "run"), dataset="folder", root=str(image_folder),
                            split="all", test_split="none", dataset_options={"classes": ",".join(CLASSES)},
                            arch="shapesnet", image_size=32, device="cpu", progress=False), log=lambda s: None)
    assert not (tmp_path / "run").exists()
    own = load_dataset("folder", other, "all", classes=",".join(CLASSES))
    with LabelStore.open(store) as st:
        st.check_images(own.ids_digest(), "its own images")  # accepted: no error
        assert st.meta["ids_sha256"] == own.ids_digest() != ds.ids_digest()


# ------------------------------------------------------------------------------- issue 14: which files a store is of


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _redraw(path: Path, seed: int) -> None:
    """Another image under the same name (new size and mtime)."""
    _draw(np.random.default_rng(seed), GRID * SIZE + 3).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems still see a change


def _train_cfg(store: Path, root: Path, out: Path):
    from cdul_fast.train.trainer import TrainConfig

    return TrainConfig(labels=str(store), out=str(out), dataset="folder", root=str(root), split="all",
                       test_split="none", dataset_options={"classes": ",".join(CLASSES)}, arch="shapesnet",
                       image_size=32, device="cpu", workers=0, progress=False)


def test_a_store_is_refused_for_other_files_with_the_same_names(tmp_path, image_folder, clip):
    """Issue 14, 1: a store labelled on folder B was accepted for folder A (same names, size, classes)."""
    from cdul_fast.train.trainer import Trainer

    other = _copy_folder(image_folder, tmp_path / "b")
    for i in range(11):
        _redraw(other / f"im{i:02d}.png", 100 + i)
    store = tmp_path / "b.cdul"
    run_label(_cfg(store, other), log=lambda s: None, clip=clip)
    ds_a = load_dataset("folder", image_folder, "all", classes=",".join(CLASSES), labels="labels.csv")
    assert ds_a.ids_digest() == load_dataset("folder", other, "all", classes=",".join(CLASSES)).ids_digest()
    with pytest.raises(StoreError, match="11 of the 11 images labelled .* differ from the files"):
        evaluate_store(store, ds_a)
    with pytest.raises(StoreError, match="differ from the files"):
        Trainer(_train_cfg(store, image_folder, tmp_path / "run"), log=lambda s: None)
    assert not (tmp_path / "run").exists()
    evaluate_store(store, load_dataset("folder", other, "all", classes=",".join(CLASSES), labels="labels.csv"))


def test_label_resume_relabels_images_edited_in_place(tmp_path, image_folder, clip):
    """Issue 14, 1: rows labelled before an edit kept the old image's labels. Now the resumed store equals a fresh
    store of the edited folder, byte for byte, and eval accepts it again."""
    root = _copy_folder(image_folder, tmp_path / "f")
    out = tmp_path / "f.cdul"
    run_label(_cfg(out, root), log=lambda s: None, clip=clip)
    _redraw(root / "im05.png", 7)
    (root / "im09.png").write_bytes(b"not an image any more")
    ds = load_dataset("folder", root, "all", classes=",".join(CLASSES), labels="labels.csv")
    with pytest.raises(StoreError, match="2 of the 11 images labelled"):
        evaluate_store(out, ds)
    notes: list[str] = []
    res = run_label(_cfg(out, root, resume=True), log=notes.append, clip=clip)
    assert any("2 images changed since they were labelled" in n for n in notes)
    assert res.complete and res.labelled == 10 and res.skipped == 1
    assert res.labelled_now == 4 + 2  # the blocks of rows 4-7 and 8-10 are redone; 9 is skipped now
    fresh = tmp_path / "fresh.cdul"
    run_label(_cfg(fresh, root), log=lambda s: None, clip=clip)
    assert out.read_bytes() == fresh.read_bytes()
    evaluate_store(out, ds)  # accepted again


# ------------------------------------------------------------------------------------- issue 14: the skip log


def _skip_log(out: Path) -> list[str]:
    return (out.parent / (out.name + ".skipped.tsv")).read_text(encoding="utf-8").splitlines()


def test_a_broken_file_with_a_newline_in_its_name_leaves_the_folder_labellable(tmp_path, image_folder, capsys):
    """Issue 14, 3: the name broke the log's TSV, so --resume died ("not enough values to unpack") after flipping
    the clean store to WRITING, and --overwrite truncated the store, then crashed."""
    root = _copy_folder(image_folder, tmp_path / "nl")
    (root / "bad\nname\t.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "nl.cdul"
    args = _cli_args(out, root)
    assert main(args) == 0
    log = _skip_log(out)
    assert len(log) == 2 and log[1].split("\t")[1] == "bad\\nname\\t.png" and "cannot decode" in log[1]
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "12 images: 11 labelled (0 by this run), 1 skipped" in capsys.readouterr().out
    assert out.read_bytes() == before  # still clean, nothing relabelled
    with LabelStore.open(out) as st:
        assert st.clean
    assert main([*args, "--overwrite"]) == 0
    assert out.read_bytes() == before and _skip_log(out) == log


def test_the_skip_log_always_agrees_with_the_done_map(tmp_path, image_folder, capsys):
    """Issue 14, 3: --overwrite after fixing an image kept its old entry; a kill before the log was written lost
    entries. The log is rewritten from the done map; a missing reason is found by decoding the file again."""
    root = _copy_folder(image_folder, tmp_path / "s")
    good = (root / "im04.png").read_bytes()
    (root / "im04.png").write_bytes(b"broken")
    out = tmp_path / "s.cdul"
    args = _cli_args(out, root)
    assert main(args) == 0
    entry = _skip_log(out)[1]
    assert entry.startswith("4\tim04.png\t")
    log = out.parent / (out.name + ".skipped.tsv")
    log.write_text("row\tid\treason\nnot a row\n99\tim99.png\tstale\n3\tim03.png\tstale, wrong row\n")  # a bad log
    assert main([*args, "--resume"]) == 0
    assert _skip_log(out) == ["row\tid\treason", entry]  # the reason is found again, the junk is gone
    log.unlink()  # a run killed before it wrote the log
    assert main([*args, "--resume"]) == 0
    assert _skip_log(out) == ["row\tid\treason", entry]
    (root / "im04.png").write_bytes(good)  # fixed
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0
    assert "11 images: 11 labelled, 0 skipped" in capsys.readouterr().out and not log.exists()


# ---------------------------------------------------------------------------------------- issue 14: a full disk


def _unshare_works() -> bool:
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces to mount a small tmpfs")
def test_label_on_a_full_disk_is_one_line_not_sigbus(tmp_path, image_folder):
    """Issue 14, 4: the store was sized with ftruncate (a hole) and written through the mapping: on a full disk
    `label` died of SIGBUS (exit 135) with no message. Now the space is reserved first: one line, exit 2."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "s.cdul"
    # the header and metadata (68 KiB) fit in 80 KiB; the done map, 6 arrays and the file stats (a page each) do not
    args = [*_cli_args(out, image_folder)[:-1], "--save", "global,aggregate,cdul,avg,max", "--no-progress"]
    script = (f"mount -t tmpfs -o size=80k none {disk} && cd {Path(__file__).parent.parent} && "
              f"{sys.executable} -m cdul_fast.cli {' '.join(repr(a) for a in args)}")
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "not enough disk space" in lines[0] and "free" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_store_that_does_not_fit_is_refused_before_anything_is_mapped(tmp_path, monkeypatch):
    """Issue 14, 4: where fallocate says ENOSPC, create fails in one line naming the bytes, and leaves no file."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "s.cdul"
    with pytest.raises(StoreError, match=r"not enough disk space for label store .* needs [0-9.]+ KiB more"):
        LabelStore.create(path, CLASSES, 1000, ["final"])
    assert not path.exists()


def test_a_sparse_store_is_reserved_when_it_is_opened_for_writing(tmp_path):
    """Stores written before this change (or copied sparse) get their holes allocated before they are resumed."""
    path = tmp_path / "s.cdul"
    LabelStore.create(path, CLASSES, 5000, ["final", "global"]).close()
    data = path.read_bytes()
    path.unlink()
    with open(path, "wb") as fh:  # the same bytes, written sparse: only the header pages hold blocks
        fh.write(data[:8192])
        fh.truncate(len(data))
    assert path.stat().st_blocks * 512 < len(data)
    with LabelStore.open(path, mode="r+"):
        pass
    assert path.stat().st_blocks * 512 >= len(data)
