"""Where a classifier looks, held to the truth: the shapes manifests record every object's box, so a class activation
map can be checked against it (the CAM test, bench/bench_cam.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..datasets import MultiLabelSet
from ..errors import DatasetError
from ..report.cam import grad_cam, peak_in_boxes
from ..views.square import load_square, normalize


def object_boxes(ds: MultiLabelSet) -> tuple[list[list[tuple[int, list[float]]]], int]:
    """(class index, box [x0, y0, x1, y1] in image pixels) of every object of every image of a shapes split, from
    its manifest, and the image side."""
    man_path = ds.paths[0].parent / "manifest.json" if len(ds) else None
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
        by_id = dict(zip(man["ids"], man["objects"]))
        side = int(man["options"]["size"])
        return [[(ds.class_names.index(o["class"]), o["box"]) for o in by_id[p.name]] for p in ds.paths], side
    except (AttributeError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{ds.name}/{ds.split} records no object boxes (a shapes train or test split has them)") \
            from exc


@dataclass
class Localisation:
    """The CAM peak of every (image, ground-truth class) the classifier detects, and whether it lies in a box of
    that class."""

    objects: int  # (image, class) pairs in the ground truth
    rows: list[int] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    peaks: list[tuple[float, float]] = field(default_factory=list)  # input pixels
    boxes: list[list[list[float]]] = field(default_factory=list)  # that class's boxes, input pixels
    hits: list[bool] = field(default_factory=list)

    @property
    def detected(self) -> int:
        return len(self.hits)

    @property
    def rate(self) -> float:
        return float(np.mean(self.hits)) if self.hits else float("nan")

    def chance(self) -> float:
        """Each peak against the boxes of the next detected pair of another image: what luck alone scores."""
        n = len(self.peaks)
        hits = []
        for i in range(n):
            j = next((j % n for j in range(i + 1, i + n) if self.rows[j % n] != self.rows[i]), None)
            if j is not None:
                hits.append(peak_in_boxes(self.peaks[i], self.boxes[j]))
        return float(np.mean(hits)) if hits else float("nan")


def cam_localisation(model: torch.nn.Module, info: dict, ds: MultiLabelSet, stitch: int | str = "auto",
                     threshold: float = 0.5, batch_size: int = 32, device: torch.device | str = "cpu") -> Localisation:
    """Grad-CAMs of a trained classifier (``info``: model.json's image_size, mean, std) for each ground-truth class
    of each image that it scores at least ``threshold``, checked against the objects' boxes."""
    boxes, side = object_boxes(ds)
    size = int(info["image_size"])
    scale = size / side
    res = Localisation(objects=sum(len({c for c, _ in objs}) for objs in boxes))
    model = model.to(device).eval()
    for b0 in range(0, len(ds), batch_size):
        rows = list(range(b0, min(b0 + batch_size, len(ds))))
        x = normalize(torch.from_numpy(np.stack([load_square(ds.paths[r], size) for r in rows])).to(device),
                      info["mean"], info["std"])
        with torch.no_grad():
            probs = torch.sigmoid(model(x)).cpu()
        found = [sorted(c for c in {c for c, _ in boxes[r]} if probs[j, c] >= threshold) for j, r in enumerate(rows)]
        keep = [j for j, f in enumerate(found) if f]
        if not keep:
            continue
        k = max(len(found[j]) for j in keep)
        classes = torch.tensor([found[j] + found[j][:1] * (k - len(found[j])) for j in keep])  # padded: one batch
        cams = grad_cam(model, x[keep], classes=classes, stitch=stitch)
        for n, j in enumerate(keep):
            for r_k, c in enumerate(found[j]):
                peak = tuple(cams.peaks[n, r_k].tolist())
                cls_boxes = [[v * scale for v in b] for cc, b in boxes[rows[j]] if cc == c]
                res.rows.append(rows[j])
                res.classes.append(c)
                res.peaks.append(peak)
                res.boxes.append(cls_boxes)
                res.hits.append(peak_in_boxes(peak, cls_boxes))
    return res
