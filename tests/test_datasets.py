"""Dataset adapters against small official-layout fixtures (see tests/dataset_fixtures.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import (
    COCO_CATEGORIES,
    NUS_CONCEPTS,
    VOC_CLASSES,
    FixtureInfo,
    make_coco,
    make_folder,
    make_nus,
    make_voc,
)

from cdul_fast.datasets import IGNORE, NEGATIVE, POSITIVE, MultiLabelSet, list_datasets, load_dataset
from cdul_fast.errors import CdulError, DatasetError


def _load(info: FixtureInfo, split: str, root: Path | None = None, **options: object) -> MultiLabelSet:
    return load_dataset(info.name, root or info.root, split, **{**info.options, **options})


def _assert_matches(ds: MultiLabelSet, info: FixtureInfo, split: str) -> None:
    assert ds.class_names == info.class_names
    assert ds.ids == info.ids[split]
    assert ds.labels is not None and ds.labels.dtype == np.int8
    np.testing.assert_array_equal(ds.labels, info.labels[split])
    assert all(p.is_absolute() and p.is_file() for p in ds.paths)


def _rewrite(path: Path, edit) -> None:
    path.write_text(edit(path.read_text()))


# -------------------------------------------------------------------------------------------------- dispatch


def test_list_datasets_has_every_adapter():
    assert {"voc2007", "voc2012", "coco", "nus", "folder"} <= set(list_datasets())


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'.*coco.*folder.*nus.*voc2007.*voc2012"):
        load_dataset("imagenet", tmp_path)


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="needs --root"):
        load_dataset("coco", None)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("voc2007", tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        load_dataset("nus", tmp_path / "f.txt")


def test_dataset_error_is_a_cdul_error():
    assert issubclass(DatasetError, CdulError)


def test_default_split_is_the_training_split(tmp_path):
    info = make_voc(tmp_path, 2007)
    ds = load_dataset("voc2007", info.root)
    assert ds.split == "trainval" and ds.ids == info.ids["trainval"]


@pytest.mark.parametrize("name", ["voc2007", "voc2012", "coco", "nus", "folder"])
def test_unknown_option_lists_valid_options(tmp_path, name):
    with pytest.raises(DatasetError, match=r"unknown option\(s\) colour; valid options: \w+"):
        load_dataset(name, tmp_path, None, colour="red")


# ------------------------------------------------------------------------------------------------------- VOC


@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_matches_fixture_for_every_split(tmp_path, year):
    info = make_voc(tmp_path, year)
    expected_splits = {"train", "val", "trainval"} | ({"test"} if year == 2007 else set())
    assert set(info.ids) == expected_splits
    for split in info.ids:
        ds = _load(info, split)
        _assert_matches(ds, info, split)
        assert ds.class_names == VOC_CLASSES and ds.class_names[0] == "aeroplane" and ds.class_names[-1] == "tvmonitor"
        assert [p.name for p in ds.paths] == [f"{i}.jpg" for i in ds.ids]
        assert all(p.parent.name == "JPEGImages" for p in ds.paths)
        assert ds.split == split
    ids_2012 = _load(info, "train").ids if year == 2012 else ("2008_000001",)
    assert all(re.fullmatch(r"2008_\d{6}", i) for i in ids_2012)


def test_voc_root_may_be_devkit_year_folder_or_parent(tmp_path):
    info = make_voc(tmp_path, 2007)
    year_dir = info.extra["year_dir"]
    for root in (info.root, year_dir, info.root.parent):
        ds = _load(info, "train", root=root)
        assert ds.ids == info.ids["train"] and ds.root == year_dir.resolve()


def test_voc_rejects_other_year(tmp_path):
    info = make_voc(tmp_path, 2007)
    with pytest.raises(DatasetError, match="is a VOC2007 folder, but voc2012 expects VOC2012"):
        load_dataset("voc2012", info.extra["year_dir"], "train")
    with pytest.raises(DatasetError, match=r"not a VOC2012 root.*found: VOC2007/"):
        load_dataset("voc2012", info.root, "train")


def test_voc_wrong_root_says_what_was_expected_and_found(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(DatasetError, match=r"expected VOCdevkit/ containing VOC2007/.*found: photos/, readme.md"):
        load_dataset("voc2007", tmp_path, "train")


def test_voc_unknown_split_lists_valid_ones(tmp_path):
    info = make_voc(tmp_path, 2007)
    with pytest.raises(DatasetError, match="unknown split 'training'; valid splits: train, val, trainval, test"):
        _load(info, "training")


def test_voc2007_missing_test_split_explains_separate_tarball(tmp_path):
    info = make_voc(tmp_path, 2007)
    (info.extra["year_dir"] / "ImageSets/Main/test.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing split file .*test\.txt.*VOCtest_06-Nov-2007\.tar"):
        _load(info, "test")


def test_voc2012_has_no_test_split_by_default(tmp_path):
    info = make_voc(tmp_path, 2012)
    with pytest.raises(DatasetError, match="VOC2012test.tar"):
        _load(info, "test")


@pytest.mark.parametrize("mode, zero_to", [("ignore", IGNORE), ("positive", POSITIVE), ("negative", NEGATIVE)])
def test_voc_difficult_option_maps_difficult_only_entries(tmp_path, mode, zero_to):
    info = make_voc(tmp_path, 2007)
    codes = info.extra["codes"]["trainval"]
    assert (codes == 0).any(), "fixture must contain difficult-only entries"
    ds = _load(info, "trainval", difficult=mode)
    assert np.all(ds.labels[codes == 0] == zero_to)
    assert np.all(ds.labels[codes == 1] == POSITIVE) and np.all(ds.labels[codes == -1] == NEGATIVE)
    assert any(f"mapped to {mode}" in n for n in ds.notes)


def test_voc_bad_difficult_value(tmp_path):
    info = make_voc(tmp_path, 2007)
    with pytest.raises(DatasetError, match="difficult must be one of ignore, positive, negative"):
        _load(info, "train", difficult="maybe")


@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_xml_fallback_gives_the_same_labels(tmp_path, year):
    info = make_voc(tmp_path, year, class_files=False)
    for split in ("train", "trainval"):
        ds = _load(info, split)
        _assert_matches(ds, info, split)
        assert any("Annotations" in n for n in ds.notes)


def test_voc_without_any_ground_truth_still_loads_images(tmp_path):
    info = make_voc(tmp_path, 2007, class_files=False, annotations=False)
    ds = _load(info, "train")
    assert ds.labels is None and ds.ids == info.ids["train"]
    assert any("no ground truth" in n for n in ds.notes)


def test_voc_order_follows_the_split_file(tmp_path):
    info = make_voc(tmp_path, 2007, class_files=False)
    split_file = info.extra["year_dir"] / "ImageSets/Main/train.txt"
    shuffled = list(reversed(info.ids["train"]))
    split_file.write_text("\n".join(shuffled) + "\n")
    first = _load(info, "train")
    assert first.ids == tuple(shuffled)
    np.testing.assert_array_equal(first.labels, info.labels["train"][::-1])
    assert _load(info, "train").ids == first.ids


def test_voc_truncated_class_file(tmp_path):
    info = make_voc(tmp_path, 2007)
    path = info.extra["year_dir"] / "ImageSets/Main/cat_train.txt"
    _rewrite(path, lambda t: "".join(t.splitlines(keepends=True)[:-1]))
    with pytest.raises(DatasetError, match=r"cat_train\.txt has 5 entries but train\.txt lists 6.*truncated"):
        _load(info, "train")


def test_voc_malformed_class_line_names_file_and_line(tmp_path):
    info = make_voc(tmp_path, 2007)
    path = info.extra["year_dir"] / "ImageSets/Main/dog_val.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].split()[0] + "  2"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"dog_val\.txt:3: expected '<image id> 1\|-1\|0'"):
        _load(info, "val")


def test_voc_class_file_with_foreign_id(tmp_path):
    info = make_voc(tmp_path, 2007)
    path = info.extra["year_dir"] / "ImageSets/Main/bus_train.txt"
    _rewrite(path, lambda t: t.replace(info.ids["train"][0], "999999", 1))
    with pytest.raises(DatasetError, match=r"bus_train\.txt:1: image 999999 is not in train\.txt"):
        _load(info, "train")


def test_voc_some_class_files_missing(tmp_path):
    info = make_voc(tmp_path, 2007)
    (info.extra["year_dir"] / "ImageSets/Main/sofa_train.txt").unlink()
    with pytest.raises(DatasetError, match=r"lacks sofa_train\.txt"):
        _load(info, "train")


def test_voc_malformed_split_line(tmp_path):
    info = make_voc(tmp_path, 2007)
    _rewrite(info.extra["year_dir"] / "ImageSets/Main/val.txt", lambda t: t.replace("\n", " extra\n", 1))
    with pytest.raises(DatasetError, match=r"val\.txt:1: expected one image id per line"):
        _load(info, "val")


def test_voc_missing_image_errors_or_is_skipped(tmp_path):
    info = make_voc(tmp_path, 2007)
    gone = info.ids["train"][2]
    (info.extra["year_dir"] / "JPEGImages" / f"{gone}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"1 of 6 images are missing .*{gone}\.jpg.*skip_missing=true"):
        _load(info, "train")
    ds = _load(info, "train", skip_missing="true")
    assert gone not in ds.ids and len(ds) == 5
    np.testing.assert_array_equal(ds.labels, np.delete(info.labels["train"], 2, axis=0))
    assert any("skipped 1 of 6" in n for n in ds.notes)


def test_voc_bad_xml(tmp_path):
    info = make_voc(tmp_path, 2007, class_files=False)
    xml = info.extra["year_dir"] / "Annotations" / f"{info.ids['train'][0]}.xml"
    _rewrite(xml, lambda t: t.replace("</annotation>", ""))
    with pytest.raises(DatasetError, match="malformed XML"):
        _load(info, "train")
    _rewrite(xml, lambda t: re.sub(r"<object>\s*<name>\w+</name>", "<object><name>unicorn</name>", t + "</annotation>"))
    with pytest.raises(DatasetError, match="unknown class 'unicorn'"):
        _load(info, "train")


# ------------------------------------------------------------------------------------------------------ COCO


def test_coco_matches_fixture_ordered_by_image_id(tmp_path):
    info = make_coco(tmp_path)
    for split in ("train", "val"):
        ds = _load(info, split)
        _assert_matches(ds, info, split)
        numbers = [int(i.rsplit("_", 1)[1]) for i in ds.ids]
        assert numbers == sorted(numbers)
        assert all(p.parent.name == f"{split}2014" for p in ds.paths)
    assert ds.class_names == tuple(c[1] for c in COCO_CATEGORIES)
    assert len(ds.class_names) == 80 and ds.class_names[0] == "person" and ds.class_names[-1] == "toothbrush"


def test_coco_classes_follow_category_id_not_json_order(tmp_path):
    info = make_coco(tmp_path)
    path = info.root / "annotations/instances_val2014.json"
    doc = json.loads(path.read_text())
    doc["categories"].reverse()
    path.write_text(json.dumps(doc))
    ds = _load(info, "val")
    assert ds.class_names == info.class_names
    np.testing.assert_array_equal(ds.labels, info.labels["val"])


def test_coco_crowd_annotations_count_as_positive(tmp_path):
    info = make_coco(tmp_path)
    image_id, class_name = info.extra["crowd_only"]["train"]
    ds = _load(info, "train")
    assert ds.labels[ds.ids.index(image_id), ds.class_names.index(class_name)] == POSITIVE


def test_coco_unannotated_images_dropped_unless_kept(tmp_path):
    info = make_coco(tmp_path, n_unannotated=2)
    ds = _load(info, "train")
    assert len(ds) == 6 and any("dropped 2 image(s) without annotations" in n for n in ds.notes)
    kept = _load(info, "train", keep_unannotated=True)
    assert kept.ids == info.extra["all_ids"]["train"] and len(kept) == 8
    np.testing.assert_array_equal(kept.labels, info.extra["all_labels"]["train"])
    extra_rows = [kept.ids.index(i) for i in kept.ids if i not in ds.ids]
    assert np.all(kept.labels[extra_rows] == NEGATIVE)


def test_coco_verbatim_split_names_and_2017(tmp_path):
    info14 = make_coco(tmp_path / "a")
    assert _load(info14, "val2014").ids == info14.ids["val"]
    info17 = make_coco(tmp_path / "b", year=2017)
    ds = _load(info17, "train")
    _assert_matches(ds, info17, "train")
    assert all(re.fullmatch(r"\d{12}", i) for i in ds.ids)
    assert any("train2017" in n for n in ds.notes)
    assert _load(info17, "train2017").ids == ds.ids


def test_coco_split_errors(tmp_path):
    info = make_coco(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'holdout'; valid splits: train, val, train2014, val2014"):
        _load(info, "holdout")
    with pytest.raises(DatasetError, match=r"missing annotation file .*instances_test2015\.json"):
        _load(info, "test2015")
    (info.root / "annotations/instances_val2014.json").unlink()
    with pytest.raises(DatasetError, match=r"instances_val2014\.json \(found instance files for: train2014\)"):
        _load(info, "val")


def test_coco_wrong_root(tmp_path):
    (tmp_path / "train2014").mkdir()
    with pytest.raises(
        DatasetError, match=r"not a COCO root: expected annotations/instances_<split>\.json.*train2014/"
    ):
        load_dataset("coco", tmp_path, "train")


def test_coco_accepts_parent_folder_holding_coco(tmp_path):
    info = make_coco(tmp_path)
    assert _load(info, "val", root=info.root.parent).ids == info.ids["val"]


def test_coco_missing_images(tmp_path):
    info = make_coco(tmp_path)
    shutil.rmtree(info.root / "val2014")
    with pytest.raises(DatasetError, match=r"missing image folder .*val2014"):
        _load(info, "val")
    info2 = make_coco(tmp_path / "x")
    gone = info2.ids["train"][1]
    (info2.root / "train2014" / f"{gone}.jpg").unlink()
    with pytest.raises(DatasetError, match="1 of 6 images are missing"):
        _load(info2, "train")
    ds = _load(info2, "train", skip_missing=True)
    assert gone not in ds.ids and len(ds) == 5


def test_coco_malformed_json(tmp_path):
    info = make_coco(tmp_path)
    path = info.root / "annotations/instances_val2014.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc)[:-10])
    with pytest.raises(DatasetError, match=r"instances_val2014\.json: malformed JSON at line 1"):
        _load(info, "val")
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="missing the 'categories' list"):
        _load(info, "val")


def test_coco_inconsistent_json(tmp_path):
    info = make_coco(tmp_path)
    path = info.root / "annotations/instances_val2014.json"
    original = json.loads(path.read_text())
    doc = json.loads(json.dumps(original))
    doc["annotations"][0]["category_id"] = 12  # a gap in the official ids
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"annotations\[0\] refers to unknown category id 12"):
        _load(info, "val")
    doc = json.loads(json.dumps(original))
    doc["categories"][5]["name"] = "person"
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="duplicate class name"):
        _load(info, "val")
    doc = json.loads(json.dumps(original))
    del doc["images"][0]["file_name"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"images\[0\] lacks a valid 'file_name'"):
        _load(info, "val")


# ------------------------------------------------------------------------------------------------------- NUS


def test_nus_matches_fixture(tmp_path):
    info = make_nus(tmp_path)
    for split in ("train", "test"):
        ds = _load(info, split)
        _assert_matches(ds, info, split)
        assert len(ds.class_names) == 81 and ds.class_names == NUS_CONCEPTS  # trailing blanks stripped
        assert all("\\" not in i and i.count("/") == 1 for i in ds.ids)
        assert all(p.parent.parent.name == "Flickr" for p in ds.paths)


def test_nus_missing_images_dropped_with_note(tmp_path):
    info = make_nus(tmp_path, n_missing=2)
    ds = _load(info, "train")
    missing = info.extra["missing"]["train"]
    assert len(missing) == 2 and not set(missing) & set(ds.ids) and len(ds) == 6
    note = next(n for n in ds.notes if n.startswith("skipped"))
    assert "skipped 2 of 8" in note and missing[0] in note


def test_nus_drop_unlabeled(tmp_path):
    info = make_nus(tmp_path, n_missing=0, n_unlabeled=2)
    unlabeled = info.extra["unlabeled"]["train"]
    ds = _load(info, "train")
    assert set(unlabeled) <= set(ds.ids)
    dropped = _load(info, "train", drop_unlabeled=True)
    assert not set(unlabeled) & set(dropped.ids) and len(dropped) == len(ds) - 2
    assert np.all((dropped.labels == POSITIVE).any(axis=1))
    assert any("dropped 2 images without any positive concept" in n for n in dropped.notes)


def test_nus_images_dir_option_and_fallback(tmp_path):
    info = make_nus(tmp_path / "a", images_dir="pics")
    assert info.options == {"images_dir": "pics"}
    _assert_matches(_load(info, "test"), info, "test")
    with pytest.raises(DatasetError, match=r"no image folder: expected .*Flickr"):
        load_dataset("nus", info.root, "test")
    with pytest.raises(DatasetError, match=r"image folder .*nowhere \(images_dir\) does not exist"):
        _load(info, "test", images_dir="nowhere")
    info2 = make_nus(tmp_path / "b", images_dir="images")
    ds = load_dataset("nus", info2.root, "test")
    assert ds.ids == info2.ids["test"] and any("images/" in n for n in ds.notes)


def test_nus_no_image_found_is_an_error(tmp_path):
    info = make_nus(tmp_path)
    shutil.rmtree(info.root / "Flickr")
    (info.root / "Flickr").mkdir()
    with pytest.raises(DatasetError, match="none of the 8 images in TrainImagelist.txt exist"):
        _load(info, "train")


def test_nus_absolute_windows_paths_in_list(tmp_path):
    info = make_nus(tmp_path)
    path = info.root / "ImageList/TrainImagelist.txt"
    _rewrite(path, lambda t: "".join("C:\\ImageData\\Flickr\\" + ln for ln in t.splitlines(keepends=True)))
    assert _load(info, "train").ids == info.ids["train"]


@pytest.mark.parametrize("cut, match", [(1, r"has 7 lines but the image list has 8 \(truncated\?\)"), (-1, "has 9")])
def test_nus_label_file_length_must_match_list(tmp_path, cut, match):
    info = make_nus(tmp_path)
    path = info.root / "Groundtruth/TrainTestLabels/Labels_sky_Train.txt"
    _rewrite(path, lambda t: t[: -3 * cut] if cut > 0 else t + "0\r\n")
    with pytest.raises(DatasetError, match=r"Labels_sky_Train\.txt " + match):
        _load(info, "train")


def test_nus_malformed_label_line(tmp_path):
    info = make_nus(tmp_path)
    path = info.root / "Groundtruth/TrainTestLabels/Labels_cat_Test.txt"
    lines = path.read_text().splitlines()
    lines[1] = "yes"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"Labels_cat_Test\.txt:2: expected 0 or 1, got 'yes'"):
        _load(info, "test")


def test_nus_missing_label_file_and_concepts_mismatch(tmp_path):
    info = make_nus(tmp_path)
    (info.root / "Groundtruth/TrainTestLabels/Labels_zebra_Test.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing label file .*Labels_zebra_Test\.txt \(concept 'zebra'"):
        _load(info, "test")
    _rewrite(info.root / "Concepts81.txt", lambda t: t.replace("zebra", "sky"))
    with pytest.raises(DatasetError, match=r"duplicate class name\(s\) sky in .*Concepts81\.txt"):
        _load(info, "test")


def test_nus_layout_errors(tmp_path):
    info = make_nus(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'val'; valid splits: train, test"):
        _load(info, "val")
    with pytest.raises(DatasetError, match=r"not a NUS-WIDE root: expected Concepts81\.txt.*found: nus/"):
        load_dataset("nus", info.root.parent.parent, "train")
    assert _load(info, "train", root=info.root.parent).ids == info.ids["train"]  # parent holding NUS-WIDE/
    (info.root / "ImageList/TestImagelist.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing image list: .*TestImagelist\.txt"):
        _load(info, "test")


# ---------------------------------------------------------------------------------------------------- folder


@pytest.mark.parametrize("form", ["matrix", "names"])
def test_folder_matches_fixture(tmp_path, form):
    info = make_folder(tmp_path, csv=form)
    ds = _load(info, "all")
    _assert_matches(ds, info, "all")
    assert list(ds.ids) == sorted(ds.ids) and ds.ids[0].startswith("Z/")  # sorted by POSIX path, case-sensitive
    assert not any(part.startswith(".") for i in ds.ids for part in i.split("/"))
    assert not any(i.endswith(".txt") or i.endswith(".csv") for i in ds.ids)
    unlisted = info.extra["unlisted"][0]
    assert np.all(ds.labels[ds.ids.index(unlisted)] == IGNORE)
    assert any("1 image(s) have no row in labels.csv" in n for n in ds.notes)
    assert ds.paths == tuple(info.root.resolve() / i for i in ds.ids)


def test_folder_classes_option_forms_agree(tmp_path):
    info = make_folder(tmp_path, csv=None)
    txt = tmp_path / "classes.txt"
    txt.write_text("cat\r\n\r\n dog \nbird\n")
    for value in (["cat", "dog", "bird"], "cat, dog,bird", str(txt), txt):
        ds = load_dataset("folder", info.root, "all", classes=value)
        assert ds.class_names == ("cat", "dog", "bird") and ds.labels is None and ds.ids == info.ids["all"]


def test_folder_needs_classes_or_labels(tmp_path):
    info = make_folder(tmp_path, csv=None)
    with pytest.raises(DatasetError, match="--classes"):
        load_dataset("folder", info.root, "all")


@pytest.mark.parametrize("value, match", [("cat,dog,cat", "duplicate class name.*cat"), ("cat,,dog", "empty class")])
def test_folder_bad_class_lists(tmp_path, value, match):
    info = make_folder(tmp_path, csv=None)
    with pytest.raises(DatasetError, match=match):
        load_dataset("folder", info.root, "all", classes=value)


def test_folder_classes_from_csv_alone(tmp_path):
    matrix = make_folder(tmp_path / "m", classes=("zebra", "ant"), csv="matrix")
    ds = load_dataset("folder", matrix.root, "all", labels=matrix.options["labels"])
    assert ds.class_names == ("zebra", "ant")  # header order
    np.testing.assert_array_equal(ds.labels, matrix.labels["all"])
    names = make_folder(tmp_path / "n", classes=("zebra", "ant", "moth"), csv="names", seed=3)
    used = [j for j in range(3) if (names.labels["all"][:, j] == POSITIVE).any()]
    assert len(used) >= 2, "fixture must use at least two classes"
    ds = load_dataset("folder", names.root, "all", labels=names.options["labels"])
    order = sorted(used, key=lambda j: names.class_names[j])
    assert ds.class_names == tuple(names.class_names[j] for j in order)  # sorted union of the names used
    np.testing.assert_array_equal(ds.labels, names.labels["all"][:, order])


def test_folder_csv_columns_follow_classes_order(tmp_path):
    info = make_folder(tmp_path, csv="matrix")
    ds = _load(info, "all", classes="bird,cat,dog")
    assert ds.class_names == ("bird", "cat", "dog")
    np.testing.assert_array_equal(ds.labels, info.labels["all"][:, [2, 0, 1]])


def test_folder_csv_class_mismatch_and_unknown_class(tmp_path):
    info = make_folder(tmp_path, csv="matrix")
    with pytest.raises(DatasetError, match=r"class list mismatch.*missing from CSV: cow; not in --classes: bird"):
        _load(info, "all", classes="cat,dog,cow")
    names = make_folder(tmp_path / "n", csv="names")
    csv_path = Path(names.options["labels"])
    _rewrite(csv_path, lambda t: t.replace("\nZ/img_03.bmp,", "\nZ/img_03.bmp,unicorn;"))
    with pytest.raises(DatasetError, match=r"labels\.csv:\d+: unknown class\(es\) unicorn"):
        _load(names, "all")


def test_folder_csv_row_for_missing_file(tmp_path):
    info = make_folder(tmp_path, csv="matrix")
    _rewrite(Path(info.options["labels"]), lambda t: t + "gone/pic.jpg,1,0,0\n")
    with pytest.raises(DatasetError, match="names gone/pic.jpg, which is not a file"):
        _load(info, "all")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.replace("path,", "file,", 1), "header must be"),
        (lambda t: t + "img_00.jpg,1,0\n", r"labels\.csv:\d+: expected 4 columns, got 3"),
        (lambda t: t + "img_00.jpg,1,0,2\n", r"column 'bird' must be 1, 0 or -1, got '2'"),
        (lambda t: t + "./img_00.jpg,1,0,0\n", "duplicate row for img_00.jpg"),
        (lambda t: t + "/abs/img.jpg,1,0,0\n", "must be relative to the dataset root"),
    ],
)
def test_folder_malformed_csv(tmp_path, edit, match):
    info = make_folder(tmp_path, csv="matrix")
    _rewrite(Path(info.options["labels"]), edit)
    with pytest.raises(DatasetError, match=match):
        _load(info, "all")


def test_folder_subfolder_splits(tmp_path):
    info = make_folder(tmp_path, csv="matrix", splits=("train", "test"))
    for split in ("all", "train", "test"):
        ds = _load(info, split)
        _assert_matches(ds, info, split)
    assert all(i.startswith("train/") for i in _load(info, "train").ids)
    with pytest.raises(DatasetError, match="unknown split 'val'; valid splits: all, test, train"):
        _load(info, "val")
    with pytest.raises(DatasetError, match="unknown split '../x'"):
        _load(info, "../x")


def test_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset("folder", tmp_path / "empty", "all", classes="a,b")


def test_folder_labels_path_relative_to_root(tmp_path):
    info = make_folder(tmp_path, csv="matrix")
    ds = _load(info, "all", labels="labels.csv")
    np.testing.assert_array_equal(ds.labels, info.labels["all"])
    with pytest.raises(DatasetError, match="labels file nope.csv not found"):
        _load(info, "all", labels="nope.csv")


def test_class_lists_are_never_looked_up_on_disk(tmp_path, monkeypatch):
    """Issue 14, 5: a plain string is a list (a file named like a class is not read, an 80-class list longer than a
    file name works), a file is named with @; names with commas come from a file."""
    info = make_folder(tmp_path, csv=None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat").write_text("not\nclasses\n")
    assert load_dataset("folder", info.root, "all", classes="cat").class_names == ("cat",)
    many = [f"class number {i} with a long descriptive name" for i in range(80)]
    assert len(",".join(many)) > 255
    assert load_dataset("folder", info.root, "all", classes=",".join(many)).class_names == tuple(many)
    (tmp_path / "names").write_text("red, green\nblue\n")
    assert load_dataset("folder", info.root, "all", classes="@names").class_names == ("red, green", "blue")
    assert load_dataset("folder", info.root, "all", classes=["red, green", "blue"]).class_names == ("red, green",
                                                                                                 "blue")
    with pytest.raises(DatasetError, match="missing"):
        load_dataset("folder", info.root, "all", classes="@missing")
