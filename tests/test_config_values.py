"""Issue 14, "more of the same kind": config values of the wrong type and odd flag values are one line, exit 2,
and a refused `label --overwrite` / `train --overwrite` leaves the store or run folder as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdul_fast.cli import main
from cdul_fast.config import resolve

TINY = str(Path(__file__).parent / "data" / "tiny_clip.json")


@pytest.mark.parametrize("text, message", [
    ("grid: 3.7\n", "grid must be an integer"), ("grid: three\n", "grid must be an integer"),
    ("grid: null\n", "grid must be an integer"), ("grid: true\n", "grid must be an integer"),
    ("template: 5\n", "template must be a string"), ("flush_every: abc\n", "flush_every must be an integer"),
])
def test_label_config_values_of_the_wrong_type_are_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "s.cdul"
    assert main(["label", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "internal error" not in err[0]
    assert not out.exists()


def test_yaml_1_1_strings_become_the_defaults_type(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("lr: 1e-3\nupdate_labels: 'false'\npsi: 'no'\n")
    got = resolve("train", {}, str(cfg))
    assert got["lr"] == 0.001 and got["update_labels"] is False and got["psi"] is False


@pytest.mark.parametrize("path_kind", ["dir", "binary"])
def test_an_unreadable_config_file_is_one_line(tmp_path, capsys, path_kind):
    cfg = tmp_path / "c"
    if path_kind == "dir":
        cfg.mkdir()
    else:
        cfg.write_bytes(b"\xff\xfe\xfa grid: 3")
    assert main(["label", "--config", str(cfg), "--out", str(tmp_path / "s.cdul")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--workers", "-1"], ["--grid", "100000"], ["--seed", "99999999999999999999"],
                                   ["--flush-every", "-5"], ["--batch-size", "100000000000"]])
def test_label_overwrite_with_a_bad_flag_keeps_the_store(tmp_path, capsys, flags):
    """A refused `label --overwrite` used to replace the complete store first (then the run failed)."""
    root = tmp_path / "imgs"
    root.mkdir()
    import numpy as np
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    out = tmp_path / "s.cdul"
    base = ["label", "--out", str(out), "--dataset", "folder", "--root", str(root), "--classes", "a,b",
            "--clip", TINY, "--clip-weights", "random", "--decoder", "pil", "--workers", "0", "--device", "cpu",
            "--no-progress"]
    assert main(base) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*base, "--overwrite", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be a finite integer" in err[0]
    assert out.read_bytes() == before


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("c1", float("nan")), ("c2", float("inf")),
                                          ("weight_decay", float("nan")), ("workers", -1), ("smoothing", 2.0),
                                          ("image_size", 100000), ("seed", 10**20)])
def test_train_settings_that_cannot_work_are_refused_up_front(field, value):
    from cdul_fast.errors import ConfigError
    from cdul_fast.train.trainer import TrainConfig

    with pytest.raises(ConfigError, match="must be a finite"):
        TrainConfig(labels="x", out="y", **{field: value}).validate()
