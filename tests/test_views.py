"""Views: exact open_clip preprocessing for the whole image, correct grid geometry, DALI close to PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cdul_fast.errors import ImageDecodeError
from cdul_fast.views.decode import load_rgb, to_rgb
from cdul_fast.views.geometry import ViewSpec, grid_boxes, normalize_views, resized_size, view_geometry
from cdul_fast.views.pil import PilViews
from cdul_fast.views.resample import pil_views
from cdul_fast.views.source import plan_blocks


def _smooth_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [127 + 100 * np.sin(x / 17.0 + seed), 127 + 100 * np.cos(y / 23.0), 127 + 60 * np.sin((x + y) / 31.0)], -1
    ).astype(np.uint8)


@pytest.mark.parametrize("size", [(300, 200), (123, 457), (64, 64), (1000, 333)])
def test_view0_equals_open_clip_preprocessing(size):
    from open_clip.transform import image_transform

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    spec = ViewSpec(224, grid=3)
    views = pil_views(img, spec)
    assert views.shape == (10, 224, 224, 3) and views.dtype == np.uint8
    ours = normalize_views(torch.from_numpy(views), spec.mean, spec.std)[0]
    ref = image_transform(224, is_train=False)(img)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_snippets_are_preprocessed_grid_cells():
    """Snippet j equals open_clip preprocessing of the exact crop of grid cell j (for integer cell edges)."""
    from open_clip.transform import image_transform

    img = Image.fromarray(_smooth_image(300, 240))
    spec = ViewSpec(64, grid=3)
    views = normalize_views(torch.from_numpy(pil_views(img, spec)), spec.mean, spec.std)
    tf = image_transform(64, is_train=False)
    for j, box in enumerate(grid_boxes(300, 240, 3)):
        crop = img.crop(tuple(int(v) for v in box))
        assert torch.allclose(views[1 + j], tf(crop), atol=1e-5), j


def test_grid_boxes_tile_the_image_row_major():
    boxes = grid_boxes(90, 60, 3)
    assert len(boxes) == 9
    assert boxes[0] == (0.0, 0.0, 30.0, 20.0)
    assert boxes[1] == (30.0, 0.0, 60.0, 20.0)  # row-major: second cell is to the right
    assert boxes[3] == (0.0, 20.0, 30.0, 40.0)
    area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
    assert area == pytest.approx(90 * 60)


def test_resized_size_matches_torchvision_rule():
    assert resized_size(200, 300, 224) == (224, 336)
    assert resized_size(300, 200, 224) == (336, 224)
    assert resized_size(123, 457, 224) == (224, int(224 * 457 / 123))


def test_view_geometry_rows():
    spec = ViewSpec(64, grid=2)
    g = view_geometry(128, 64, spec)
    assert g.shape == (5, 8)
    np.testing.assert_allclose(g[0], [0, 0, 64, 128, 64, 128, 0, 32])
    np.testing.assert_allclose(g[1, :4], [0, 0, 32, 64])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_to_rgb_handles_modes(mode):
    base = Image.fromarray(_smooth_image(40, 30))
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # 16-bit must be scaled, not clipped to white
        gray = np.asarray(base.convert("L"), dtype=np.int32)
        assert np.abs(np.asarray(out)[..., 0].astype(np.int32) - gray).max() <= 1


def test_transparent_pixels_become_white():
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out == 255).all()


def test_exif_rotation_applied(tmp_path):
    img = Image.fromarray(_smooth_image(60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "r.jpg"
    img.save(p, exif=exif)
    assert load_rgb(p).size == (20, 60)


def test_load_rgb_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        load_rgb(bad)
    with pytest.raises(ImageDecodeError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")


def test_normalize_views_layout():
    v = torch.randint(0, 255, (2, 3, 8, 8, 3), dtype=torch.uint8)
    x = normalize_views(v, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (6, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    expect = (v[1, 2, 3, 4, 1].float() / 255 - 0.5) / 0.25
    assert torch.isclose(x[5, 1, 3, 4], expect)


def test_plan_blocks_redoes_whole_blocks():
    blocks = plan_blocks(np.array([5, 6, 17, 20]), total=21, block_size=8)
    assert [b.tolist() for b in blocks] == [list(range(0, 8)), list(range(16, 21))]


def _write_images(tmp_path, sizes):
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(_smooth_image(w, h, i)).save(p, quality=95)
        paths.append(p)
    return paths


def test_pil_source_reports_bad_images(tmp_path):
    paths = _write_images(tmp_path, [(50, 40), (40, 50), (33, 33)])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths.insert(1, tmp_path / "bad.jpg")
    spec = ViewSpec(32, grid=2)
    out = list(PilViews(paths, spec, workers=0).batches(plan_blocks(np.arange(4), 4, 3)))
    assert [b.rows.tolist() for b in out] == [[0, 2], [3]]
    assert out[0].failed and out[0].failed[0][0] == 1 and "bad.jpg" in out[0].failed[0][1]
    assert out[0].views.shape == (2, 5, 32, 32, 3)
    np.testing.assert_array_equal(out[0].views[1].numpy(), pil_views(load_rgb(paths[2]), spec))


def test_dali_cpu_matches_pil_within_one_level(tmp_path):
    pytest.importorskip("nvidia.dali")
    from cdul_fast.views.dali import DaliViews

    paths = _write_images(tmp_path, [(300, 200), (123, 457), (64, 64), (1000, 333), (50, 700)])
    (tmp_path / "bad.jpg").write_bytes(b"notanimage")
    paths.append(tmp_path / "bad.jpg")
    spec = ViewSpec(48, grid=3)
    blocks = plan_blocks(np.arange(len(paths)), len(paths), 4)
    pil = list(PilViews(paths, spec, workers=0).batches(blocks))
    dali = list(DaliViews(paths, spec, batch_size=4, device=torch.device("cpu")).batches(blocks))
    assert [b.rows.tolist() for b in dali] == [b.rows.tolist() for b in pil] == [[0, 1, 2, 3], [4]]
    assert [r for r, _ in dali[1].failed] == [5]
    for a, b in zip(pil, dali):
        diff = (a.views.float() - b.views.float()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.5  # same regions; only the cubic filter implementations differ


# ------------------------------------------------------------------------- issue 14, 7: extreme aspect ratios


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize("w, h", [(3, 700), (900, 5), (40, 41)])
def test_the_bounded_path_gives_pils_bytes(monkeypatch, w, h, interp):
    """The path for extreme aspect ratios (no full-size intermediate) returns exactly PIL's resize + crop."""
    import cdul_fast.views.resample as resample

    img = Image.fromarray(_smooth_image(w, h, seed=3))
    spec = ViewSpec(24, grid=3, interpolation=interp)
    full = pil_views(img, spec)  # small enough that PIL's own path runs
    monkeypatch.setattr(resample, "oversized", lambda g, size: np.ones(len(g), dtype=bool))
    np.testing.assert_array_equal(pil_views(img, spec), full)


def test_the_bounded_geometry_samples_the_region_the_crop_keeps(monkeypatch):
    """DALI and NEAREST take the crop's own source region at S x S: the same pixels within interpolation error."""
    import cdul_fast.views.geometry as geometry

    img = Image.fromarray(_smooth_image(60, 900, seed=1))
    spec = ViewSpec(32, grid=3, interpolation="nearest")
    full = pil_views(img, spec).astype(np.int16)
    monkeypatch.setattr(geometry, "MAX_RESIZED_PIXELS", 0)
    bounded = pil_views(img, spec).astype(np.int16)
    g = view_geometry(60, 900, spec, bounded=True)
    assert np.all(g[:, 4:6] == 32) and np.all(g[:, 6:8] == 0)
    diff = np.abs(full - bounded)
    assert diff.mean() < 2.0 and np.quantile(diff, 0.95) <= 8  # a half-pixel phase at most


_EXTREME = """
import resource, sys, time
import numpy as np
from PIL import Image
from cdul_fast.views.geometry import ViewSpec
from cdul_fast.views.resample import pil_views
img = Image.fromarray(np.full((5000, 1, 3), 200, dtype=np.uint8))  # 1 x 5000
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
views = pil_views(img, ViewSpec(448, grid=3))
assert views.shape == (10, 448, 448, 3) and int(views.min()) == int(views.max()) == 200, views.shape
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_1x5000_image_is_cut_in_bounded_memory():
    """Issue 14, 7: one 1 x 5000 image took 4.6 GB (and 158 s) at 448 px: PIL resized it to 448 x 2240000 first."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EXTREME], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = int(proc.stdout.split()[-1])
    assert grown < 512 << 20, f"peak memory grew by {grown / 2**20:.0f} MiB"
