"""Builders of small but faithful official-layout datasets (real tiny image files) for tests.

Each ``make_*`` writes under its own subfolder of ``tmp_path`` and returns a :class:`FixtureInfo` holding what the
adapter must produce: ``load_dataset(info.name, info.root, split, **info.options)`` should give
``info.ids[split]`` and ``info.labels[split]`` for every split in ``info.ids``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1

VOC_CLASSES: tuple[str, ...] = tuple(
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person pottedplant "
    "sheep sofa train tvmonitor".split()
)

_COCO_TEXT = """
person: 1 person
vehicle: 2 bicycle, 3 car, 4 motorcycle, 5 airplane, 6 bus, 7 train, 8 truck, 9 boat
outdoor: 10 traffic light, 11 fire hydrant, 13 stop sign, 14 parking meter, 15 bench
animal: 16 bird, 17 cat, 18 dog, 19 horse, 20 sheep, 21 cow, 22 elephant, 23 bear, 24 zebra, 25 giraffe
accessory: 27 backpack, 28 umbrella, 31 handbag, 32 tie, 33 suitcase
sports: 34 frisbee, 35 skis, 36 snowboard, 37 sports ball, 38 kite, 39 baseball bat, 40 baseball glove, 41 skateboard,
    42 surfboard, 43 tennis racket
kitchen: 44 bottle, 46 wine glass, 47 cup, 48 fork, 49 knife, 50 spoon, 51 bowl
food: 52 banana, 53 apple, 54 sandwich, 55 orange, 56 broccoli, 57 carrot, 58 hot dog, 59 pizza, 60 donut, 61 cake
furniture: 62 chair, 63 couch, 64 potted plant, 65 bed, 67 dining table, 70 toilet
electronic: 72 tv, 73 laptop, 74 mouse, 75 remote, 76 keyboard, 77 cell phone
appliance: 78 microwave, 79 oven, 80 toaster, 81 sink, 82 refrigerator
indoor: 84 book, 85 clock, 86 vase, 87 scissors, 88 teddy bear, 89 hair drier, 90 toothbrush
"""


def _parse_coco_text(text: str) -> tuple[tuple[int, str, str], ...]:
    out = []
    for block in re.split(r"\n(?=\w+:)", text.strip()):
        supercategory, rest = block.split(":", 1)
        for item in rest.replace("\n", " ").split(","):
            cid, name = item.strip().split(" ", 1)
            out.append((int(cid), name, supercategory))
    return tuple(out)


COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = _parse_coco_text(_COCO_TEXT)
"""(id, name, supercategory) of the 80 COCO categories, as in instances_*.json (ids 1..90 with gaps)."""

NUS_CONCEPTS: tuple[str, ...] = tuple(
    "airport animal beach bear birds boats book bridge buildings cars castle cat cityscape clouds computer coral cow "
    "dancing dog earthquake elk fire fish flags flowers food fox frost garden glacier grass harbor horses house lake "
    "leaf map military moon mountain nighttime ocean person plane plants police protest railroad rainbow reflection "
    "road rocks running sand sign sky snow soccer sports statue street sun sunset surf swimmers tattoo temple tiger "
    "tower town toy train tree valley vehicle water waterfall wedding whales window zebra".split()
)
"""The 81 NUS-WIDE concepts in Concepts81.txt order."""

_NUS_TAG_FOLDERS = ("actor", "airplane", "beach", "sunset", "zoo")


@dataclass(frozen=True)
class FixtureInfo:
    """Where a fixture lives and what its adapter must return (with ``options``) for each split."""

    name: str
    root: Path
    class_names: tuple[str, ...]
    ids: dict[str, tuple[str, ...]]
    labels: dict[str, np.ndarray]
    train_split: str
    test_split: str
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (20, 15)) -> None:
    """A real, decodable tiny image; the format follows the suffix (JPEG, PNG, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF"}[path.suffix.lower()]
    Image.fromarray(pixels).save(path, format=fmt)


# ----------------------------------------------------------------------------------------------------------- VOC


def make_voc(
    tmp_path: Path,
    year: int = 2007,
    n_train: int = 6,
    n_test: int = 4,
    seed: int = 0,
    *,
    n_val: int | None = None,
    class_files: bool = True,
    annotations: bool = True,
) -> FixtureInfo:
    """VOCdevkit/VOC<year> with JPEGImages, Annotations (with <part>s) and ImageSets/Main lists.

    2007: train/val/trainval plus a test split of ``n_test`` images; 2012: no test split, val has ``n_test``
    images unless ``n_val`` is given. ``extra['codes'][split]`` holds the raw devkit codes (1/-1/0 difficult).
    """
    rng = np.random.default_rng(seed)
    n_val = n_test if n_val is None else n_val
    sizes = {"train": n_train, "val": n_val}
    if year == 2007:
        sizes["test"] = n_test
    total = sum(sizes.values())
    numbers = np.sort(rng.choice(np.arange(1, 10 * total + 10), size=total, replace=False))
    all_ids = [f"{n:06d}" if year == 2007 else f"2008_{n:06d}" for n in numbers]
    owner = np.concatenate([np.full(k, i) for i, k in enumerate(sizes.values())])
    rng.shuffle(owner)
    split_ids = {s: [i for i, o in zip(all_ids, owner) if o == k] for k, s in enumerate(sizes)}
    split_ids["trainval"] = sorted(split_ids["train"] + split_ids["val"])

    year_dir = tmp_path / f"voc{year}" / "VOCdevkit" / f"VOC{year}"
    main = year_dir / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (year_dir / "Annotations").mkdir()
    objects: dict[str, list[tuple[str, bool]]] = {}
    for s in sizes:
        for k, image_id in enumerate(split_ids[s]):
            objects[image_id] = _voc_objects(rng, force_difficult_only=k == 0)
    codes_all = {i: _voc_codes(objs) for i, objs in objects.items()}
    for image_id, objs in objects.items():
        write_image(year_dir / "JPEGImages" / f"{image_id}.jpg", rng)
        if annotations:
            _write_voc_xml(year_dir / "Annotations" / f"{image_id}.xml", image_id, objs, year)
    if not annotations:
        (year_dir / "Annotations").rmdir()

    ids: dict[str, tuple[str, ...]] = {}
    labels: dict[str, np.ndarray] = {}
    codes: dict[str, np.ndarray] = {}
    for s, members in split_ids.items():
        (main / f"{s}.txt").write_text("".join(f"{i}\n" for i in members))
        codes[s] = np.stack([codes_all[i] for i in members])
        if class_files:
            for j, c in enumerate(VOC_CLASSES):
                (main / f"{c}_{s}.txt").write_text("".join(f"{i} {codes[s][r, j]:2d}\n" for r, i in enumerate(members)))
        ids[s] = tuple(members)
        labels[s] = np.where(codes[s] == 1, POSITIVE, np.where(codes[s] == -1, NEGATIVE, IGNORE)).astype(np.int8)
    return FixtureInfo(
        name=f"voc{year}",
        root=year_dir.parent,
        class_names=VOC_CLASSES,
        ids=ids,
        labels=labels,
        train_split="trainval" if year == 2007 else "train",
        test_split="test" if year == 2007 else "val",
        extra={"codes": codes, "year_dir": year_dir},
    )


def _voc_objects(rng: np.random.Generator, force_difficult_only: bool) -> list[tuple[str, bool]]:
    picks = rng.choice(len(VOC_CLASSES), size=int(rng.integers(1, 4)), replace=True)
    objs = [(VOC_CLASSES[int(j)], bool(rng.random() < 0.2)) for j in picks]
    if force_difficult_only:  # also a person, whose <part> names (head, ...) must not be read as objects
        objs.insert(0, ("person", False))
        present = {n for n, _ in objs}
        absent = [c for c in VOC_CLASSES if c not in present]
        objs.append((absent[int(rng.integers(len(absent)))], True))
    return objs


def _voc_codes(objs: list[tuple[str, bool]]) -> np.ndarray:
    codes = np.full(len(VOC_CLASSES), -1, dtype=np.int8)
    for name, difficult in objs:
        j = VOC_CLASSES.index(name)
        codes[j] = max(codes[j], 0 if difficult else 1)
    return codes


def _write_voc_xml(path: Path, image_id: str, objs: list[tuple[str, bool]], year: int) -> None:
    parts = []
    for k, (name, difficult) in enumerate(objs):
        # Some VOC2012 files omit <difficult> for ordinary objects; persons carry <part> elements with names.
        diff = "" if (year == 2012 and not difficult and k % 2) else f"\t\t<difficult>{int(difficult)}</difficult>\n"
        part = (
            "\t\t<part>\n\t\t\t<name>head</name>\n\t\t\t<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>5</xmax><ymax>5</ymax>"
            "</bndbox>\n\t\t</part>\n"
            if name == "person"
            else ""
        )
        parts.append(
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n{diff}"
            "\t\t<bndbox>\n\t\t\t<xmin>1</xmin>\n\t\t\t<ymin>1</ymin>\n\t\t\t<xmax>19</xmax>\n\t\t\t<ymax>14</ymax>\n"
            f"\t\t</bndbox>\n{part}\t</object>\n"
        )
    path.write_text(
        f"<annotation>\n\t<folder>VOC{year}</folder>\n\t<filename>{image_id}.jpg</filename>\n"
        "\t<source>\n\t\t<database>The VOC Database</database>\n\t</source>\n"
        "\t<size>\n\t\t<width>20</width>\n\t\t<height>15</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segmented>0</segmented>\n" + "".join(parts) + "</annotation>\n"
    )


# ---------------------------------------------------------------------------------------------------------- COCO


def make_coco(
    tmp_path: Path,
    n_train: int = 6,
    n_test: int = 4,
    seed: int = 0,
    *,
    year: int = 2014,
    n_unannotated: int = 1,
) -> FixtureInfo:
    """coco/annotations/instances_{train,val}<year>.json and coco/{train,val}<year>/ images.

    JSON lists are shuffled (rows must come out ordered by image id); every split has a category present only
    through a crowd annotation (``extra['crowd_only']``) and ``n_unannotated`` images without annotations, which
    the default options drop (``extra['all_ids']`` / ``extra['all_labels']`` include them, as keep_unannotated does).
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    cat_ids = [c[0] for c in COCO_CATEGORIES]
    ids: dict[str, tuple[str, ...]] = {}
    labels: dict[str, np.ndarray] = {}
    all_ids: dict[str, tuple[str, ...]] = {}
    all_labels: dict[str, np.ndarray] = {}
    crowd_only: dict[str, tuple[str, str]] = {}
    used: set[int] = set()
    ann_id = 1
    for short, n in (("train", n_train), ("val", n_test)):
        split_name = f"{short}{year}"
        image_ids = []
        while len(image_ids) < n + n_unannotated:
            cand = int(rng.integers(1, 600_000))
            if cand not in used:
                used.add(cand)
                image_ids.append(cand)
        files = {i: (f"COCO_{split_name}_{i:012d}.jpg" if year == 2014 else f"{i:012d}.jpg") for i in image_ids}
        images, annotations = [], []
        rows: dict[int, np.ndarray] = {}
        for k, image_id in enumerate(image_ids):
            write_image(root / split_name / files[image_id], rng)
            images.append(
                {
                    "license": 1,
                    "file_name": files[image_id],
                    "coco_url": "",
                    "height": 15,
                    "width": 20,
                    "date_captured": "2013-11-14 16:28:13",
                    "flickr_url": "",
                    "id": image_id,
                }
            )
            row = np.full(len(cat_ids), NEGATIVE, dtype=np.int8)
            if k >= n:
                rows[image_id] = row
                continue
            picks = [int(j) for j in rng.choice(len(cat_ids), size=int(rng.integers(1, 5)), replace=True)]
            crowd = [False] * len(picks)
            if k == 0:
                spare = next(j for j in range(len(cat_ids)) if j not in picks)
                picks.append(spare)
                crowd.append(True)
                crowd_only[short] = (Path(files[image_id]).stem, COCO_CATEGORIES[spare][1])
            for j, is_crowd in zip(picks, crowd):
                annotations.append(
                    {
                        "segmentation": [[1.0, 1.0, 10.0, 1.0, 10.0, 10.0]],
                        "area": 40.5,
                        "iscrowd": int(is_crowd),
                        "image_id": image_id,
                        "bbox": [1.0, 1.0, 9.0, 9.0],
                        "category_id": cat_ids[j],
                        "id": ann_id,
                    }
                )
                ann_id += 1
                row[j] = POSITIVE
            rows[image_id] = row
        rng.shuffle(images)
        rng.shuffle(annotations)
        doc = {
            "info": {"description": "fixture", "year": year},
            "images": images,
            "licenses": [{"url": "", "id": 1, "name": "fixture"}],
            "annotations": annotations,
            "categories": [{"supercategory": sc, "id": cid, "name": nm} for cid, nm, sc in COCO_CATEGORIES],
        }
        (root / "annotations" / f"instances_{split_name}.json").write_text(json.dumps(doc))
        order = sorted(image_ids)
        annotated = sorted(image_ids[:n])
        ids[short] = tuple(Path(files[i]).stem for i in annotated)
        labels[short] = np.stack([rows[i] for i in annotated])
        all_ids[short] = tuple(Path(files[i]).stem for i in order)
        all_labels[short] = np.stack([rows[i] for i in order])
    return FixtureInfo(
        name="coco",
        root=root,
        class_names=tuple(c[1] for c in COCO_CATEGORIES),
        ids=ids,
        labels=labels,
        train_split="train",
        test_split="val",
        extra={"all_ids": all_ids, "all_labels": all_labels, "crowd_only": crowd_only, "year": year},
    )


# ---------------------------------------------------------------------------------------------------------- NUS


def make_nus(
    tmp_path: Path,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    *,
    n_missing: int = 1,
    n_unlabeled: int = 1,
    images_dir: str = "Flickr",
) -> FixtureInfo:
    """NUS-WIDE root: Concepts81.txt, ImageList/{Train,Test}Imagelist.txt (Windows paths, CRLF),
    Groundtruth/TrainTestLabels/Labels_<concept>_<Train|Test>.txt and ``images_dir``/<tag>/<nnnn_flickrid>.jpg.

    Per split, ``n_missing`` listed images are not written (the adapter drops them; ``extra['missing']``) and
    ``n_unlabeled`` images have no positive concept (kept by default; ``extra['unlabeled']``).
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / "nus" / "NUS-WIDE"
    (root / "ImageList").mkdir(parents=True)
    gt = root / "Groundtruth" / "TrainTestLabels"
    gt.mkdir(parents=True)
    # Trailing blanks as in some copies of the official file; the adapter must strip them.
    (root / "Concepts81.txt").write_text(
        "".join(f"{c}{' ' if k % 7 == 0 else ''}\r\n" for k, c in enumerate(NUS_CONCEPTS))
    )
    ids: dict[str, tuple[str, ...]] = {}
    labels: dict[str, np.ndarray] = {}
    missing: dict[str, tuple[str, ...]] = {}
    unlabeled: dict[str, tuple[str, ...]] = {}
    counter = 0
    all_lines = []
    for split, tag, n in (("train", "Train", n_train), ("test", "Test", n_test)):
        entries, matrix = [], np.zeros((n, len(NUS_CONCEPTS)), dtype=np.int8)
        for k in range(n):
            counter += 1
            folder = _NUS_TAG_FOLDERS[int(rng.integers(len(_NUS_TAG_FOLDERS)))]
            entries.append(f"{folder}/{counter:04d}_{int(rng.integers(10**9, 10**10))}.jpg")
            if k >= n_unlabeled:
                matrix[k, rng.choice(len(NUS_CONCEPTS), size=int(rng.integers(1, 4)), replace=False)] = POSITIVE
        drop = set(rng.choice(n, size=n_missing, replace=False).tolist()) if n_missing else set()
        for k, rel in enumerate(entries):
            if k not in drop:
                write_image(root / images_dir / rel, rng)
        (root / "ImageList" / f"{tag}Imagelist.txt").write_text("".join(e.replace("/", "\\") + "\r\n" for e in entries))
        all_lines += [f"C:\\ImageData\\Flickr\\{e.replace('/', chr(92))}\r\n" for e in entries]
        for j, c in enumerate(NUS_CONCEPTS):
            (gt / f"Labels_{c}_{tag}.txt").write_text("".join(f"{v}\r\n" for v in matrix[:, j]))
        keep = [k for k in range(n) if k not in drop]
        ids[split] = tuple(entries[k] for k in keep)
        labels[split] = matrix[keep]
        missing[split] = tuple(entries[k] for k in sorted(drop))
        unlabeled[split] = tuple(entries[k] for k in keep if k < n_unlabeled)
    (root / "ImageList" / "Imagelist.txt").write_text("".join(all_lines))
    return FixtureInfo(
        name="nus",
        root=root,
        class_names=NUS_CONCEPTS,
        ids=ids,
        labels=labels,
        train_split="train",
        test_split="test",
        options={} if images_dir in ("Flickr", "images") else {"images_dir": images_dir},
        extra={"missing": missing, "unlabeled": unlabeled},
    )


# -------------------------------------------------------------------------------------------------------- folder


def make_folder(
    tmp_path: Path,
    n: int = 6,
    seed: int = 0,
    *,
    classes: tuple[str, ...] = ("cat", "dog", "bird"),
    csv: str | None = "matrix",
    n_unlisted: int = 1,
    splits: tuple[str, ...] = (),
) -> FixtureInfo:
    """A plain image folder with nested dirs, mixed/upper-case extensions, a hidden file and dir, a non-image file.

    ``csv`` is "matrix" (``path,<class>...`` with 1/0/-1), "names" (``path,labels`` with ``;``) or None; the last
    ``n_unlisted`` images get no CSV row (expected IGNORE). With ``splits`` the images sit under those subfolders
    (``n`` each) and ``ids`` has one entry per subfolder plus "all".
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / "folder_ds"
    root.mkdir(parents=True)
    suffixes = (".jpg", ".PNG", ".jpeg", ".bmp", ".JPG", ".gif")
    subdirs = ("", "b", "a/deep", "Z")
    rels: list[str] = []
    for prefix in [f"{s}/" for s in splits] or [""]:
        for k in range(n):
            sub = subdirs[k % len(subdirs)]
            rels.append(f"{prefix}{sub + '/' if sub else ''}img_{k:02d}{suffixes[k % len(suffixes)]}")
    for rel in rels:
        write_image(root / rel, rng)
    write_image(root / ".hidden.jpg", rng)
    write_image(root / ".cache" / "thumb.jpg", rng)
    readme = root / (f"{splits[0]}/b" if splits else "b") / "README.txt"
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text("not an image\n")

    order = sorted(rels)
    listed = rels[: len(rels) - n_unlisted] if n_unlisted else rels
    table = {rel: rng.choice([POSITIVE, NEGATIVE], size=len(classes)).astype(np.int8) for rel in listed}
    if csv == "matrix" and listed:
        table[listed[0]][0] = IGNORE
    options: dict[str, Any] = {"classes": ",".join(classes)}
    if csv is not None:
        path = root / "labels.csv"
        if csv == "matrix":
            body = [",".join([r, *(str(int(v)) for v in table[r])]) for r in listed]
            path.write_text("\n".join([",".join(["path", *classes]), *body]) + "\n")
        else:
            body = [f"{r},{';'.join(c for c, v in zip(classes, table[r]) if v == POSITIVE)}" for r in listed]
            path.write_text("\n".join(["path,labels", *body]) + "\n")
        options["labels"] = str(path)
    ignore_row = np.full(len(classes), IGNORE, dtype=np.int8)
    ids = {"all": tuple(order)}
    for s in splits:
        ids[s] = tuple(r for r in order if r.startswith(f"{s}/"))
    labels = {s: np.stack([table.get(r, ignore_row) for r in members]) for s, members in ids.items()}
    return FixtureInfo(
        name="folder",
        root=root,
        class_names=tuple(classes),
        ids=ids,
        labels=labels if csv is not None else {},
        train_split=splits[0] if splits else "all",
        test_split=splits[-1] if splits else "all",
        options=options,
        extra={"unlisted": tuple(r for r in rels if r not in listed), "csv": csv},
    )
