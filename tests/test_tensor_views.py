"""The tensor decoder (torchvision.io decode + PIL-exact tiling): resampling, EXIF orientation, fallbacks, and the
same store as PIL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdul_fast.clip.loader import load_clip
from cdul_fast.errors import ConfigError
from cdul_fast.views.decode import load_rgb
from cdul_fast.views.geometry import ViewSpec
from cdul_fast.views.pil import PilViews
from cdul_fast.views.registry import make_view_source
from cdul_fast.views.resample import pil_coefficients, pil_views, resample_views
from cdul_fast.views.source import plan_blocks
from cdul_fast.views.tensor import TensorViews, exif_orient


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("h", "w", "size", "grid", "interp"),
    [
        (288, 384, 64, 3, "bicubic"),
        (375, 500, 224, 3, "bicubic"),  # a typical Flickr/NUS-WIDE size at CLIP's 224
        (100, 37, 64, 2, "bilinear"),  # upsampling along one axis
        (50, 80, 96, 4, "bicubic"),  # every view is upsampled
        (301, 203, 77, 3, "lanczos"),  # odd sizes, fractional cell edges
        (640, 480, 224, 1, "bicubic"),
        (7, 1000, 32, 3, "bicubic"),  # extreme aspect ratio: cells 2-3 pixels high
    ],
)
def test_resample_views_is_bit_exact_with_pil(h, w, size, grid, interp):
    """Noise is the hardest case for rounding: every pixel of every view must equal PIL's."""
    a = _noise(h, w, seed=h * w)
    spec = ViewSpec(size, grid, interpolation=interp)
    ours = resample_views(torch.from_numpy(a), spec).numpy()
    ref = pil_views(Image.fromarray(a), spec)
    assert ours.shape == ref.shape == (spec.num_views, size, size, 3)
    np.testing.assert_array_equal(ours, ref)


def test_coefficients_sum_to_one_in_fixed_point():
    """Each output's integer weights add up to 2^22 (+- rounding of the ksize terms): a constant image stays put."""
    _, count, k = pil_coefficients(500, np.array([0.0, 166.6667]), np.array([500.0, 333.3333]),
                                   np.array([298, 224]), np.array([37, 0]), 224, "bicubic")
    sums = k.sum(axis=2)
    assert np.all(np.abs(sums - 2**22) <= k.shape[2]) and np.all(count >= 1)
    flat = np.full((60, 90, 3), 173, dtype=np.uint8)
    assert (resample_views(torch.from_numpy(flat), ViewSpec(40, 3)) == 173).all()


def test_nearest_interpolation_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="--decoder pil"):
        resample_views(torch.zeros((10, 10, 3), dtype=torch.uint8), ViewSpec(8, 2, interpolation="nearest"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation):
    from PIL import ImageOps

    a = _noise(5, 8, seed=orientation)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(exif_orient(torch.from_numpy(a), orientation).numpy(), ref)


def _collection(tmp_path):
    """JPEGs (RGB, grayscale, rotated by EXIF, CMYK), a PNG with alpha, a corrupt file and a non-image."""
    paths = []
    for i, (h, w) in enumerate([(120, 160), (97, 61), (200, 150)]):
        p = tmp_path / f"rgb{i}.jpg"
        Image.fromarray(_noise(h, w, i)).save(p, quality=85)
        paths.append(p)
    p = tmp_path / "gray.jpg"
    Image.fromarray(_noise(80, 100, 7)[:, :, 0], "L").save(p)
    paths.append(p)
    p = tmp_path / "rot6.jpg"
    im = Image.fromarray(_noise(90, 140, 8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(p, exif=exif.tobytes())
    paths.append(p)
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(_noise(70, 70, 9)).convert("CMYK").save(p)
    paths.append(p)
    p = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([_noise(64, 48, 10), _noise(64, 48, 11)[:, :, :1]]), "RGBA").save(p)
    paths.append(p)
    p = tmp_path / "corrupt.jpg"
    good = io.BytesIO()
    Image.fromarray(_noise(50, 50, 12)).save(good, format="JPEG")
    p.write_bytes(good.getvalue()[:200])
    paths.append(p)
    p = tmp_path / "notes.jpg"
    p.write_text("not an image")
    paths.append(p)
    return paths


def test_tensor_source_on_cpu_equals_pil_source(tmp_path):
    """On CPU, decode_jpeg is libjpeg-turbo like PIL: the views equal the PIL path's for every decodable file,
    and the same files are reported as undecodable (with the file named)."""
    paths = _collection(tmp_path)
    spec = ViewSpec(48, 3)
    blocks = plan_blocks(np.arange(len(paths)), len(paths), 4)
    ours = list(TensorViews(paths, spec, device=torch.device("cpu"), workers=2).batches(blocks))
    ref = list(PilViews(paths, spec, workers=0).batches(blocks))
    assert [b.block for b in ours] == [b.block for b in ref] == [0, 1, 2]
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        assert [r for r, _ in a.failed] == [r for r, _ in b.failed]
        for (_, why), path_row in zip(a.failed, [r for r, _ in a.failed], strict=True):
            assert paths[path_row].name in why
        if a.rows.size:
            assert a.views.dtype == torch.uint8
            np.testing.assert_array_equal(a.views.numpy(), b.views.numpy())
    failed = sorted(r for b in ours for r, _ in b.failed)
    assert [paths[r].name for r in failed] == ["corrupt.jpg", "notes.jpg"]
    # the EXIF-rotated JPEG came out upright (portrait), as PIL shows it
    assert load_rgb(paths[4]).size == (90, 140)


def test_auto_decoder_choice_and_unknown_name(tmp_path):
    spec = ViewSpec(32, 2)
    assert make_view_source("auto", [], spec, torch.device("cpu"), 4).name == "pil"
    assert make_view_source("tensor", [], spec, torch.device("cpu"), 4).name == "tensor"
    for old, new in (("nvjpeg", "tensor"), ("torchvision", "pil")):  # the names stores of 09bd33f recorded
        assert make_view_source(old, [], spec, torch.device("cpu"), 4).name == new
    with pytest.raises(ConfigError, match="--decoder"):
        make_view_source("pillow", [], spec, torch.device("cpu"), 4)


def test_label_store_identical_with_tensor_and_pil_decoders_on_cpu(tmp_path):
    """Same collection labelled through both decoders on CPU: identical stores rows (same views, same math)."""
    from cdul_fast.label.pipeline import LabelConfig, run_label
    from cdul_fast.store.label_store import LabelStore

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(6):
        Image.fromarray(_noise(60 + 7 * i, 80, i)).save(img_dir / f"{i}.jpg")
    clip = load_clip(str(Path(__file__).parent / "data" / "tiny_clip.json"), "random", device="cpu",
                     precision="fp32", seed=0)
    finals = {}
    for dec in ("tensor", "pil"):
        cfg = LabelConfig(out=str(tmp_path / f"{dec}.cdul"), dataset="folder", root=str(img_dir),
                          dataset_options={"classes": "a,b,c"}, grid=2, batch_size=4, decoder=dec, device="cpu",
                          progress=False, workers=0 if dec == "pil" else 2)
        run_label(cfg, log=lambda s: None, clip=clip)
        with LabelStore.open(cfg.out) as st:
            assert st.meta["decoder"] == dec
            finals[dec] = np.array(st.array("final"))
    np.testing.assert_array_equal(finals["tensor"], finals["pil"])


def _photo_like(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus mild noise: what cameras produce (pure noise exaggerates decoder differences)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(coarse).astype(np.int16) + rng.integers(-4, 5, (h, w, 3), dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


@pytest.mark.gpu
def test_tensor_decoder_on_cuda_close_to_pil(tmp_path):
    """nvJPEG's IDCT/upsampling differ from libjpeg-turbo by a few levels; the tiling itself is exact (below)."""
    paths = []
    for i, (h, w) in enumerate([(120, 160), (97, 61), (375, 500)]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(_photo_like(h, w, i)).save(paths[-1], quality=90)
    paths.append(tmp_path / "rot6.jpg")
    im = Image.fromarray(_photo_like(90, 140, 9))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(paths[-1], exif=exif.tobytes())
    paths.append(tmp_path / "alpha.png")  # not a JPEG: decoded by PIL, uploaded, tiled on the GPU
    Image.fromarray(np.dstack([_photo_like(64, 48, 10), _noise(64, 48, 11)[:, :, :1]]), "RGBA").save(paths[-1])
    spec = ViewSpec(64, 3)
    blocks = plan_blocks(np.arange(len(paths)), len(paths), 8)
    (ours,) = list(TensorViews(paths, spec, device=torch.device("cuda")).batches(blocks))
    (ref,) = list(PilViews(paths, spec, workers=0).batches(blocks))
    assert ours.views.device.type == "cuda" and not ours.failed
    np.testing.assert_array_equal(ours.rows, ref.rows)
    diff = (ours.views.cpu().int() - ref.views.int()).abs()
    assert diff.float().mean() < 1.0 and diff.max() <= 16
    assert diff[-1].max() == 0  # the PNG went through PIL: only the (exact) tiling ran on the GPU


@pytest.mark.gpu
def test_resample_views_on_cuda_is_bit_exact():
    a = _noise(375, 500, 3)
    spec = ViewSpec(224, 3)
    ours = resample_views(torch.from_numpy(a).cuda(), spec).cpu().numpy()
    np.testing.assert_array_equal(ours, pil_views(Image.fromarray(a), spec))


@pytest.mark.gpu
def test_label_on_cuda_with_tensor_decoder_close_to_cpu(tmp_path):
    """End to end on the GPU (nvJPEG decode, Triton aggregation, deferred pinned writes): every row written, and the
    labels close to the CPU run's (fp32 encoder on both, so what differs is nvJPEG's decode and TF32 convolutions)."""
    from cdul_fast.label.pipeline import LabelConfig, run_label
    from cdul_fast.store.label_store import LabelStore

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(13):
        Image.fromarray(_photo_like(60 + 5 * i, 90, i)).save(img_dir / f"{i}.jpg", quality=95)
    tiny = str(Path(__file__).parent / "data" / "tiny_clip.json")
    finals = {}
    for dev, dec in (("cuda", "tensor"), ("cpu", "pil")):
        clip = load_clip(tiny, "random", device=dev, precision="fp32", seed=0)
        cfg = LabelConfig(out=str(tmp_path / f"{dev}.cdul"), dataset="folder", root=str(img_dir),
                          dataset_options={"classes": "a,b,c"}, grid=3, batch_size=4, decoder=dec, device=dev,
                          progress=False, workers=0 if dev == "cpu" else 2, clip_precision="fp32")
        res = run_label(cfg, log=lambda s: None, clip=clip)
        assert res.complete and res.labelled == 13
        with LabelStore.open(cfg.out) as st:
            finals[dev] = np.array(st.array("final"))
    assert np.abs(finals["cuda"] - finals["cpu"]).max() < 0.02


def test_prefetched_raises_thread_errors_and_stops_on_early_exit():
    """The background producer shared by the DALI and tensor decoders: its errors reach the consumer, and a consumer
    that stops early leaves no thread blocked on a full queue."""
    import threading
    import time

    from cdul_fast.views.source import prefetched

    def failing():
        yield 1
        raise OSError("disk gone")

    it = prefetched(failing, depth=2, name="t-fail")
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetched(endless, depth=2, name="t-endless")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops early (what an exception in the label loop does)
    deadline = time.monotonic() + 5
    while any(t.name == "t-endless" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "t-endless" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 2  # never more than the queue depth (+ one in hand) ahead
