"""`cdul-fast report`: Grad-CAM math and localisation on the shapes boxes, the page's content, its CLI, and the page
rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdul_fast.cli import main
from cdul_fast.datasets import load_dataset
from cdul_fast.deploy.export import load_trained
from cdul_fast.errors import ConfigError
from cdul_fast.report.build import ReportConfig, build_report
from cdul_fast.report.cam import grad_cam, peak_in_boxes
from cdul_fast.shapes.localisation import cam_localisation
from cdul_fast.store.label_store import LabelStore
from cdul_fast.train.checkpoint import load_state_dict_file
from cdul_fast.train.trainer import TrainConfig, run_train
from cdul_fast.views.square import load_square, normalize


class _PooledLinear(nn.Module):
    """conv trunk -> (avg | max) pool -> linear: Grad-CAM of such a head is relu(W_c . A) up to scale."""

    def __init__(self, pool: str, classes: int = 5, stride: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, stride, stride), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward_features(self, x):
        return self.trunk(x)

    def forward_head(self, a):
        return self.fc(self.pool(a).flatten(1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _normalized(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(-2)
    return (flat / flat.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(m.shape)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_grad_cam_of_a_pooled_linear_head_is_the_class_activation_map(pool, torch_seed):
    model = _PooledLinear(pool)
    x = torch.randn(4, 3, 32, 32)
    res = grad_cam(model, x, top_k=3, stitch=1)
    a = model.forward_features(x).detach()
    logits = model(x).detach()
    assert torch.equal(res.classes, logits.topk(3, dim=1).indices)
    assert torch.allclose(res.scores, torch.sigmoid(logits).gather(1, res.classes), atol=1e-6)
    cam = torch.relu(torch.einsum("bck,bkhw->bchw", model.fc.weight.detach()[res.classes], a))
    assert torch.allclose(res.maps, _normalized(cam), atol=1e-5)
    assert res.maps.shape == (4, 3, 4, 4) and res.stride == 8
    # the peak is the argmax cell's centre, in input pixels; a map with no positive cell has none
    idx, some = cam.flatten(-2).argmax(-1), cam.flatten(-2).amax(-1) > 0
    assert some.sum() >= 6 and torch.isnan(res.peaks[~some]).all()
    assert torch.equal(res.peaks[..., 0][some], ((idx % 4).float() * 8 + 4)[some])
    assert torch.equal(res.peaks[..., 1][some], ((idx // 4).float() * 8 + 4)[some])


def test_grad_cam_batched_equals_one_image_at_a_time(torch_seed):
    model = _PooledLinear("avg")
    x = torch.randn(5, 3, 32, 32)
    classes = torch.randint(0, 5, (5, 2))
    batched = grad_cam(model, x, classes=classes, stitch=2)
    for i in range(5):
        one = grad_cam(model, x[i:i + 1], classes=classes[i:i + 1], stitch=2)
        assert torch.allclose(batched.maps[i], one.maps[0], atol=1e-5)
        assert torch.allclose(batched.peaks[i], one.peaks[0], equal_nan=True)
    assert model.fc.weight.grad is None  # the model's parameters are left alone


@pytest.mark.parametrize("stitch", [2, 4])
def test_shift_and_stitch_interleaves_the_maps_of_shifted_images(stitch):
    """A trunk that averages 32 x 32 windows (stride 32): each stitched cell must be the mean of the replicate-padded
    window centred at that cell's centre, i.e. cells on a grid of 32 / s pixels."""

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0.1, 1.0, (2, 3, 128, 128)).astype(np.float32))
    res = grad_cam(_Windows(), x, classes=torch.zeros(2, 1, dtype=torch.long), stitch=stitch)
    side = 4 * stitch
    assert res.maps.shape == (2, 1, side, side) and res.stride == 32 / stitch
    pad = 16
    padded = F.pad(x[:, :1], (pad,) * 4, mode="replicate")
    fine = 32 // stitch
    want = torch.empty(2, side, side)
    for i in range(side):
        for j in range(side):
            cy, cx = i * fine + fine // 2, j * fine + fine // 2  # the cell centre in image pixels
            want[:, i, j] = padded[:, 0, pad + cy - 16:pad + cy + 16, pad + cx - 16:pad + cx + 16].mean(dim=(1, 2))
    assert torch.allclose(res.maps[:, 0], _normalized(want), atol=1e-5)


class _Windows(nn.Module):
    """A trunk that averages 32 x 32 windows (stride 32, floored like a ResNet); the head takes the map's maximum."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward_features(self, x):
        return F.avg_pool2d(x[:, :1], 32) * self.scale

    def forward_head(self, a):
        return a.amax(dim=(2, 3))


def test_a_side_that_is_not_a_multiple_of_the_stride_keeps_the_stride():
    x = torch.zeros(1, 3, 112, 112)
    x[..., 70:90, 40:60] = 1.0  # inside the cell (2, 1) of the 3 x 3 map that covers 96 px
    res = grad_cam(_Windows(), x, classes=torch.zeros(1, 1, dtype=torch.long), stitch=1)
    assert res.maps.shape[-2:] == (3, 3) and res.stride == 32
    assert res.peaks[0, 0].tolist() == [48.0, 80.0]  # the cell's centre, not (i + 0.5) * 112 / 3
    up = res.upsampled(112)[0, 0]
    assert float(up[96:].abs().max()) == 0.0 and float(up[:, 96:].abs().max()) == 0.0  # nothing covered there
    y, x_ = divmod(int(up.argmax()), 112)
    assert abs(y + 0.5 - 80) <= 1 and abs(x_ + 0.5 - 48) <= 1  # the upsampled map peaks at the cell centre too
    auto = grad_cam(_Windows(), torch.zeros(1, 3, 144, 144) + 0.5, classes=torch.zeros(1, 1, dtype=torch.long))
    assert auto.stride == 16 and auto.stitch == 2  # 144 px: a 4 x 4 map of stride 32 (not 36), stitched


def test_a_map_without_positive_evidence_has_no_peak():
    res = grad_cam(_Windows(scale=-1.0), torch.rand(2, 3, 64, 64) + 0.1, classes=torch.zeros(2, 1, dtype=torch.long),
                   stitch=1)
    assert torch.isnan(res.peaks).all() and float(res.maps.abs().max()) == 0.0
    assert not peak_in_boxes(tuple(res.peaks[0, 0].tolist()), [[0, 0, 64, 64]])


def test_grad_cam_restores_every_submodule_mode_and_chunks(torch_seed):
    model = _PooledLinear("avg")
    model.trunk.append(nn.Dropout(0.5))
    model.trunk.append(nn.BatchNorm2d(6))
    model.train()
    model.trunk[-1].eval()  # a frozen BN stays frozen
    x = torch.randn(5, 3, 32, 32)
    whole = grad_cam(model, x, top_k=2, stitch=2)
    chunked = grad_cam(model, x, top_k=2, stitch=2, max_batch=8)  # 2 images x 4 copies per trunk call
    assert model.training and model.trunk[2].training and not model.trunk[-1].training
    assert torch.allclose(whole.maps, chunked.maps, atol=1e-6) and torch.equal(whole.classes, chunked.classes)


def test_channels_last_feature_maps_are_permuted(torch_seed):
    nchw = _PooledLinear("avg")

    class Nhwc(nn.Module):
        output_fmt = "NHWC"  # timm's Swin-style models

        def forward_features(self, x):
            return nchw.forward_features(x).permute(0, 2, 3, 1)

        def forward_head(self, a):
            return nchw.forward_head(a.permute(0, 3, 1, 2))

    x = torch.randn(2, 3, 32, 32)
    a, b = grad_cam(nchw, x, top_k=2, stitch=1), grad_cam(Nhwc(), x, top_k=2, stitch=1)
    assert torch.allclose(a.maps, b.maps, atol=1e-6) and torch.allclose(a.peaks, b.peaks, equal_nan=True)


def test_grad_cam_refuses_what_it_cannot_map():
    with pytest.raises(ConfigError, match="forward_features"):
        grad_cam(nn.Linear(3, 2), torch.zeros(1, 3, 8, 8))

    class Tokens(_PooledLinear):
        def forward_features(self, x):
            return self.trunk(x).flatten(2).transpose(1, 2)

    with pytest.raises(ConfigError, match="convolutional"):
        grad_cam(Tokens("avg"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="class indices"):
        grad_cam(_PooledLinear("avg"), torch.zeros(2, 3, 32, 32), classes=torch.full((2, 1), 7))
    with pytest.raises(ConfigError, match="stitch"):
        grad_cam(_PooledLinear("avg"), torch.zeros(1, 3, 32, 32), stitch=3)


# ------------------------------------------------------------------------------------------- shapes: a trained model


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """clipres (from the shipped CLIP's trunk) trained 4 epochs on the shapes world's ground truth, per-epoch
    weights kept: a classifier that knows the objects, so its CAMs can be held to the boxes."""
    base = tmp_path_factory.mktemp("shapes_report")
    root = base / "shapes"
    train = load_dataset("shapes", root, "train", n=600)
    test = load_dataset("shapes", root, "test", n=150)
    store = base / "gt.cdul"
    st = LabelStore.create(store, class_names=train.class_names, rows=len(train),
                           arrays=["final", "global", "aggregate"],
                           meta={"dataset": "shapes", "split": "train", "ids_sha256": train.ids_digest()})
    gt = (train.labels > 0).astype(np.float32)
    rng = np.random.default_rng(0)
    st.write(0, {"final": gt, "global": gt * 0.4 + rng.uniform(0, 0.2, gt.shape).astype(np.float32),
                 "aggregate": gt * 0.7 + rng.uniform(0, 0.3, gt.shape).astype(np.float32)})
    st.close()
    cfg = TrainConfig(labels=str(store), out=str(base / "run"), dataset="shapes", root=str(root), split="train",
                      test_split="test", dataset_options={"n": 600}, test_dataset_options={"n": 150}, arch="clipres",
                      pretrained="shapes-clip", image_size=128, epochs=4, warmup=4, batch_size=32, lr=1e-3,
                      weight_decay=5e-4, update_labels=False, keep_epochs=True, device="cpu", progress=False)
    res = run_train(cfg, log=lambda s: None)
    return {"run": base / "run", "root": root, "store": store, "test": test, "history": res.history}


def test_cam_peaks_fall_inside_the_objects_boxes(shapes_run):
    trained = load_trained(shapes_run["run"])
    loc = cam_localisation(trained.module.model, trained.info, shapes_run["test"])
    assert loc.detected >= 100  # the classifier detects most objects (150 images, 2-4 objects each)
    assert loc.rate >= 0.8, f"CAM peak inside the box for {loc.rate:.0%} of the {loc.detected} detected objects"
    assert loc.chance() < 0.3, loc.chance()  # the same peaks against another image's boxes
    assert all(loc.hits[i] == peak_in_boxes(loc.peaks[i], loc.boxes[i]) for i in range(loc.detected))
    print(f"CAM peak inside the box: {loc.rate:.1%} of {loc.detected} detected objects (chance {loc.chance():.1%})")


def test_peak_in_boxes_counts_the_edges():
    assert peak_in_boxes((10.0, 20.0), [[10, 20, 30, 40]])
    assert peak_in_boxes((30.0, 40.0), [[0, 0, 1, 1], [10, 20, 30, 40]])
    assert not peak_in_boxes((9.5, 25.0), [[10, 20, 30, 40]]) and not peak_in_boxes((5.0, 5.0), [])


def test_report_of_a_run_shows_every_part(shapes_run, tmp_path):
    (shapes_run["store"].with_name("gt.cdul.sweep.png")).write_bytes(
        (shapes_run["run"] / "curves.png").read_bytes())  # any PNG stands in for an eval --sweep heat map
    res = build_report(ReportConfig(source=str(shapes_run["run"]), out=str(tmp_path / "rep"), images=6, cam_images=3,
                                    cam_classes=2, device="cpu", progress=False))
    html = res.path.read_text(encoding="utf-8")
    assert res.kind == "run"
    assert res.sections[:2] == ["summary", "curves"]
    assert {"per-class", "histograms", "gallery", "cams", "cam-epochs", "sweep", "config"} <= set(res.sections)
    body = html.split('id="per-class-table"')[1].split("</tbody>")[0]
    assert body.count("<tr>") == 1 + 12  # the header row and one row per class
    # the classifier column's mAP equals an independent evaluation of the same model on the same images
    trained = load_trained(shapes_run["run"])
    test = shapes_run["test"]
    x = normalize(torch.from_numpy(np.stack([load_square(p, 128) for p in test.paths])), [0.485, 0.456, 0.406],
                  [0.229, 0.224, 0.225])
    with torch.no_grad():
        probs = trained.module.model(x).sigmoid().numpy()
    from sklearn.metrics import average_precision_score

    want = np.mean([average_precision_score(test.labels[:, c] == 1, probs[:, c]) for c in range(12)]) * 100
    foot = re.search(r"<tfoot><tr>(.*?)</tr></tfoot>", html).group(1)
    assert float(re.findall(r"\d+\.\d+", foot)[-1]) == pytest.approx(want, abs=0.02)
    # 6 gallery tiles; 3 CAM rows of 1 + 2 tiles; 3 rows of 1 + 4 epochs; every picture inlined
    imgs = re.findall(r'<img[^>]*src="([^"]*)"', html)
    cam_tiles = html.split('id="cams"')[1].split("</section>")[0].count("<img")
    epoch_tiles = html.split('id="cam-epochs"')[1].split("</section>")[0].count("<img")
    assert (cam_tiles, epoch_tiles) == (3 * 3, 3 * (1 + 4))
    assert all(s.startswith("data:image/") for s in imgs) and len(imgs) >= 6 + 9 + 15 + 3
    assert "http://" not in html and "https://" not in html


def test_cam_epochs_are_the_kept_weights(shapes_run, tmp_path):
    kept = sorted((shapes_run["run"] / "epochs").glob("epoch_*.safetensors"))
    assert [p.name for p in kept] == [f"epoch_{e:03d}.safetensors" for e in range(1, 5)]
    final = load_state_dict_file(shapes_run["run"] / "model.safetensors")
    last, first = load_state_dict_file(kept[-1]), load_state_dict_file(kept[0])
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert not all(torch.equal(final[k], first[k]) for k in final)
    res = build_report(ReportConfig(source=str(shapes_run["run"]), out=str(tmp_path / "r"), images=2, cam_images=2,
                                    cam_epochs="2,4", device="cpu", progress=False))
    part = res.path.read_text().split('id="cam-epochs"')[1].split("</section>")[0]
    assert re.findall(r"epoch (\d): p =", part) == ["2", "4", "2", "4"]


def test_report_of_a_label_store(shapes_run, tmp_path, capsys):
    out = tmp_path / "store_report"
    code = main(["report", str(shapes_run["store"]), "--out", str(out), "--images", "4", "--root",
                 str(shapes_run["root"]), "--dataset-opt", "n=600", "--no-progress"])
    assert code == 0
    html = (out / "index.html").read_text()
    assert capsys.readouterr().out.strip() == f"report: {(out / 'index.html').resolve()}"
    assert html.split('id="per-class-table"')[1].split("</tbody>")[0].count("<tr>") == 13
    assert "100.00" in html  # the ground-truth 'final' array scores AP 1 on every class
    assert 'id="histograms"' in html and 'id="cams"' not in html and html.count('<figure>') == 4


@pytest.mark.parametrize("argv,message", [
    (["--cam-epochs", "9"], "no weights of epoch"),
    (["--out", "{tmp}/file"], "is a file"),
    (["--stitch", "3"], "--stitch must be"),
    (["--images", "-1"], "--images"),
    (["--dataset", "voc2007"], "only --root"),
])
def test_report_errors_are_one_line(shapes_run, tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["report", str(shapes_run["run"]), "--out", str(tmp_path / "x"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_report_of_the_train_split_and_of_a_run_store(shapes_run, tmp_path, capsys):
    res = build_report(ReportConfig(source=str(shapes_run["run"]), out=str(tmp_path / "t"), split="train", images=3,
                                    cam_images=0, device="cpu", progress=False))
    html = res.path.read_text()
    assert "Sample images of shapes/train" in html and "of 600 images of shapes/train" in html
    # the run's own store has no 'final' array: its current labels are shown
    code = main(["report", str(shapes_run["run"] / "labels.cdul"), "--out", str(tmp_path / "s"), "--dataset", "shapes",
                 "--root", str(shapes_run["root"]), "--split", "train", "--dataset-opt", "n=600", "--images", "2"])
    assert code == 0, capsys.readouterr().err
    assert "AP %: labels" in (tmp_path / "s" / "index.html").read_text()


def _run_copy(shapes_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(shapes_run["run"], run, ignore=shutil.ignore_patterns("checkpoint.pt"))
    return run


def test_a_damaged_run_still_gets_a_report_with_notes(shapes_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = _run_copy(shapes_run, tmp_path)
    (run / "log.csv").write_bytes(b"epoch,train_loss\n1,0.5,extra\nx,\xff\xfe\n")  # not UTF-8, extra fields
    (run / "epochs" / "epoch_002.safetensors").write_bytes(b"truncated")
    state = load_file(str(run / "model.safetensors"))
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))  # a diverged model: non-finite scores
    save_file(state, str(run / "model.safetensors"))
    res = build_report(ReportConfig(source=str(run), out=str(tmp_path / "r"), images=2, cam_images=1, device="cpu",
                                    progress=False))
    html = res.path.read_text()
    assert "curves" not in res.sections and "epoch 2 left out" in html and "non-finite scores left out" in html
    assert re.findall(r"epoch (\d): p =", html) == ["1", "3", "4"]
    (run / "epochs" / "epoch_009.safetensors").write_bytes((run / "epochs" / "epoch_001.safetensors").read_bytes())
    res = build_report(ReportConfig(source=str(run), out=str(tmp_path / "r"), images=1, cam_images=1, device="cpu",
                                    progress=False))
    assert "cam-epochs" not in res.sections and "older run" in res.path.read_text()


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("dataset_options:", "dataset_options: abc\nold_dataset_options:"), "wrong type"),
    (lambda t: "[1, 2]\n", "not a mapping"),
])
def test_a_run_config_of_the_wrong_shape_is_one_line(shapes_run, tmp_path, capsys, edit, message):
    run = _run_copy(shapes_run, tmp_path)
    (run / "config.yaml").write_text(edit((run / "config.yaml").read_text()))
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_report_refuses_what_is_not_a_run_or_store(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["report", str(tmp_path / "file")]) == 2  # not a label store: one line
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal" not in err, err


# ------------------------------------------------------------------------------------------------ a real browser

_PROBE = """<script>
window.__errors = [];
addEventListener("error", e => __errors.push(String(e.message || (e.target && (e.target.src || "").slice(0, 40)))),
                 true);
const __err = console.error;
console.error = (...a) => { __errors.push(a.join(" ")); __err(...a); };
addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors: __errors, images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    rows: document.querySelectorAll("#per-class-table tbody tr").length,
    height: document.body.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CDUL_FAST_REQUIRE_BROWSER") == "1":
            pytest.fail("headless Chromium is required here (.ci/run installs the Debian package chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return exe


def _browse(exe: str, page: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
             f"--user-data-dir={page.parent / 'chromium-profile'}"]
    return subprocess.run([exe, *flags, *extra, page.as_uri()], capture_output=True, text=True, timeout=180)


def _probe(exe: str, html: str, where: Path) -> dict:
    probed = where / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    proc = _browse(exe, probed, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    res = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    res["console"] = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    return res


def test_the_report_renders_in_a_browser(shapes_run, tmp_path):
    exe = _chromium()
    res = build_report(ReportConfig(source=str(shapes_run["run"]), out=str(tmp_path / "rep"), images=6, cam_images=2,
                                    device="cpu", progress=False))
    html = res.path.read_text(encoding="utf-8")
    probe = _probe(exe, html, tmp_path)
    assert probe["errors"] == [] and probe["console"] == [], probe
    assert probe["images"] == html.count("<img") >= 6 + 2 * 4 and probe["loaded"] == probe["images"], probe
    assert probe["rows"] == 12 and probe["height"] > 2000, probe
    shot = tmp_path / "report.png"
    proc = _browse(exe, res.path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert arr.shape[:2] == (2400, 1280)
    assert arr[:60].mean() < 100 < arr[200:].mean()  # the dark header above the light page: styles applied
    assert arr.std(axis=(0, 1)).min() > 20  # plots and photos, not a blank page
    keep = os.environ.get("CDUL_FAST_REPORT_SHOT")
    if keep:
        shutil.copy(shot, keep)


def test_the_browser_probe_sees_a_broken_page(shapes_run, tmp_path):
    """The harness itself can fail: a corrupted picture and a script error are caught."""
    exe = _chromium()
    res = build_report(ReportConfig(source=str(shapes_run["run"]), out=str(tmp_path / "rep"), images=2, cam_images=0,
                                    device="cpu", progress=False))
    html = res.path.read_text(encoding="utf-8")
    broken = html.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,AAAA', 1)
    broken = broken.replace("</body>", "<script>undefined_function()</script></body>")
    probe = _probe(exe, broken, tmp_path)
    assert probe["loaded"] == probe["images"] - 1
    assert any("undefined_function" in e for e in probe["errors"]), probe
