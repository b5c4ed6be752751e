"""CLIP loading: JSON configs, folders, local weights (safe formats only), clear errors offline."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cdul_fast.clip.loader import load_clip
from cdul_fast.errors import ConfigError, WeightsError

TINY = Path(__file__).parent / "data" / "tiny_clip.json"


@pytest.fixture(scope="module")
def tiny():
    return load_clip(str(TINY), "random", seed=3)


def test_random_tiny_clip_is_seeded(tiny):
    again = load_clip(str(TINY), "random", seed=3)
    other = load_clip(str(TINY), "random", seed=4)
    w = tiny.model.visual.conv1.weight
    assert torch.equal(w, again.model.visual.conv1.weight)
    assert not torch.equal(w, other.model.visual.conv1.weight)
    assert tiny.identity == again.identity != other.identity


def test_text_embeddings_normalized_and_cached(tiny):
    t = tiny.encode_text(["cat", "dog", "bus"])
    assert t.shape == (3, 32) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert tiny.encode_text(["cat", "dog", "bus"]) is t
    with pytest.raises(ConfigError, match="must contain"):
        tiny.encode_text(["cat"], template="a photo")


def test_logit_scale_is_clip_temperature(tiny):
    assert tiny.logit_scale == pytest.approx(float(tiny.model.logit_scale.exp()))
    assert tiny.preprocess_cfg["size"] == 32


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_safetensors_weights_round_trip(tiny, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_clip(str(TINY), str(path), seed=99)
    with torch.inference_mode():
        assert torch.allclose(loaded.encode_image(_images()), tiny.encode_image(_images()))


def test_plain_state_dict_pt_loads(tiny, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": tiny.model.state_dict()}, path)
    loaded = load_clip(str(TINY), str(path), seed=99)
    assert torch.equal(loaded.model.visual.conv1.weight, tiny.model.visual.conv1.weight)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Evil(str(marker))}, fh)
    with pytest.raises(WeightsError):
        load_clip(str(TINY), str(path))
    assert not marker.exists()


def test_mismatched_weights_rejected_with_one_line(tiny, tmp_path):
    sd = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    sd["text_projection"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match="do not fit") as err:
        load_clip(str(TINY), str(path))
    assert "\n" not in str(err.value)


def test_folder_layout(tiny, tmp_path):
    folder = tmp_path / "clipdir"
    folder.mkdir()
    cfg = json.loads(TINY.read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = load_clip(str(folder))
    assert loaded.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and loaded.preprocess_cfg["size"] == 32
    assert torch.equal(loaded.model.visual.conv1.weight, tiny.model.visual.conv1.weight)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="holds no weights"):
        load_clip(str(folder))


def test_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown CLIP"):
        load_clip("no-such-model")
    with pytest.raises(WeightsError, match="--clip-weights"):
        load_clip(str(TINY))
    with pytest.raises(WeightsError, match="not found"):
        load_clip(str(TINY), str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ConfigError, match="vision_cfg"):
        load_clip(str(bad), "random")
    with pytest.raises(WeightsError, match="neither a pretrained tag"):
        load_clip("RN50", "no-such-tag")


def test_offline_tag_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="offline.*--clip-weights"):
        load_clip("RN50", "openai", cache_dir=str(tmp_path / "hf"))


def test_shipped_alias_missing_is_clear(monkeypatch, tmp_path):
    from cdul_fast.clip import loader as clip_loader

    monkeypatch.setitem(clip_loader.ALIASES, "shapes-clip", tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="missing from the installation"):
        load_clip("shapes-clip")


def test_identity_follows_weight_content(tiny, tmp_path):
    """A resumed label run must not silently switch models; a copied weights file is the same model."""
    a = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(a))
    b = tmp_path / "b.safetensors"
    shutil.copy(a, b)
    assert load_clip(str(TINY), str(a)).identity == load_clip(str(TINY), str(b)).identity
    other = load_clip(str(TINY), "random", seed=5)
    c = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(c))
    assert load_clip(str(TINY), str(c)).identity != load_clip(str(TINY), str(a)).identity


def test_classes_whose_cut_prompts_are_equal_are_refused(tiny):
    """Issue 14, 6: names longer than the context used to give identical score columns silently."""
    stem = " ".join(["very"] * 100)
    with pytest.raises(ConfigError, match="same prompt"):
        tiny.encode_text([f"{stem} cat", f"{stem} dog"])
    assert tiny.encode_text(["cat " + stem, "dog " + stem]).shape[0] == 2  # they differ before the cut: fine
