"""`cdul-fast discover` end to end: data -> training -> scores -> files a person can look at.

Writes ``config.yaml`` (the resolved settings), ``results.json`` (Hungarian ACC, NMI, ARI of the novel head on the
unlabelled training images and on held-out novel images; k-means on the learned features; the known head's accuracy),
``clusters.csv`` (every unlabelled image: its cluster and the head's confidence) and one contact sheet per cluster
(``clusters/cluster_NN.png``: its most confident members) for naming the groups.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import ConfigError
from ..fsutil import atomic_write, save_yaml_atomic, write_text_atomic
from .baselines import kmeans_scores
from .benchmarks import cifar, image_folder
from .data import DiscoverData, digits, shapes_novel
from .trainer import DiscoverConfig, DiscoverResult, _predict, run_discover

DATASETS = ("digits", "shapes", "cifar10", "cifar100", "folder")
SHEET = 8  # contact sheets: SHEET x SHEET tiles
TILE = 40


def load_data(cfg: DiscoverConfig) -> DiscoverData:
    if cfg.dataset is not None and cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown discover dataset {cfg.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if cfg.dataset in (None, "digits"):
        return digits(5 if cfg.known is None else cfg.known)
    if cfg.dataset == "shapes":
        return shapes_novel(cfg.root, size=cfg.image_size, known=6 if cfg.known is None else cfg.known)
    if cfg.root is None:
        raise ConfigError(f"--dataset {cfg.dataset} needs --root (the dataset's folder)")
    if cfg.dataset == "folder":
        if cfg.class_split is None:
            raise ConfigError("--dataset folder needs --class-split FILE (YAML with known: and novel: class lists)")
        if cfg.known is not None:
            raise ConfigError("--dataset folder takes its known classes from --class-split, not --known")
        return image_folder(cfg.root, cfg.class_split, cfg.image_size)
    return cifar(cfg.root, cfg.dataset, cfg.known)


def contact_sheet(images: torch.Tensor, title: str) -> bytes:
    """PNG of up to SHEET x SHEET images [N, C, H, W] in [0, 1], nearest-upscaled to TILE pixels, with a title."""
    n = min(len(images), SHEET * SHEET)
    cols = SHEET
    rows = max(1, -(-n // cols))
    sheet = Image.new("RGB", (cols * TILE, rows * TILE + 18), "white")
    ImageDraw.Draw(sheet).text((4, 3), title, fill="black")
    for i in range(n):
        arr = (images[i].clamp(0, 1).numpy() * 255).astype(np.uint8)
        tile = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        sheet.paste(tile.convert("RGB").resize((TILE - 2, TILE - 2), Image.Resampling.NEAREST),
                    ((i % cols) * TILE + 1, (i // cols) * TILE + 19))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(out: Path, data: DiscoverData, res: DiscoverResult, kmeans: dict) -> dict:
    _save_config(out, res.config)  # an "auto" mu as chosen
    rows = np.flatnonzero(data.unlabelled)
    pred = _predict(res.model, data.x_train[torch.from_numpy(rows)], next(res.model.parameters()).device)
    probs = torch.softmax(pred["novel"], dim=1)
    conf, cluster = probs.max(dim=1)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "true_class", "cluster", "confidence"])
            for r, c, p in zip(rows, cluster.tolist(), conf.tolist()):
                w.writerow([int(r), data.class_names[data.y_train[r]], c, f"{p:.4f}"])

    atomic_write(out / "clusters.csv", write_csv)
    sheets = out / "clusters"
    sheets.mkdir(exist_ok=True)
    for c in range(len(data.novel)):
        members = torch.nonzero(cluster == c).flatten()
        top = members[conf[members].argsort(descending=True)]
        png = contact_sheet(data.x_train[torch.from_numpy(rows[top.numpy()])] if top.numel() else
                            torch.zeros(0, 1, 8, 8), f"cluster {c}: {members.numel()} images")
        atomic_write(sheets / f"cluster_{c:02d}.png", lambda tmp, b=png: tmp.write_bytes(b))
    results = {"dataset": data.name, "known": list(data.known), "novel": list(data.novel),
               "unlabelled_train": res.train_novel.as_dict() if res.train_novel else None,
               "held_out_novel": res.test_novel.as_dict() if res.test_novel else None,
               "kmeans_on_learned_features": kmeans,
               "known_head_accuracy": None if math.isnan(res.test_known_acc) else res.test_known_acc,
               "wta_mu_fraction": res.config.wta_mu_fraction,
               "mu_selection": {f"{k:g}": v for k, v in res.mu_scores.items()} if res.mu_scores else None,
               "seconds": round(res.seconds, 1), "cluster_sizes": torch.bincount(cluster, minlength=len(data.novel))
               .tolist()}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _save_config(out: Path, cfg: DiscoverConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_yaml_atomic({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}, out / "config.yaml")


def run_store(cfg: DiscoverConfig, ds, out: Path, progress: bool = False, log=print) -> dict:
    """Discovery among a label store's poorly-scored images (``from_store``); scored against the dataset's ground
    truth where it names classes the store's vocabulary lacks, next to k-means on the same CLIP embeddings."""
    from sklearn.cluster import KMeans

    from .from_store import store_split, truth_of, write_store_outputs
    from .metrics import cluster_scores

    cfg.validate()
    split = store_split(cfg.labels, ds, cfg.confident, cfg.poor, cfg.novel, cfg.max_novel, cfg.labels_array,
                        cfg.seed)
    for note in split.notes:
        log(note)
    data = split.data
    res = run_discover(data, cfg, log=log, progress=progress)
    n_lab = int(data.labelled.sum())
    pred = _predict(res.model, data.x_train[n_lab:], next(res.model.parameters()).device)
    probs = torch.softmax(pred["novel"], dim=1).numpy()
    info = {"confident": cfg.confident, "poor": cfg.poor, "wta_mu_fraction": res.config.wta_mu_fraction,
            "mu_selection": {f"{k:g}": v for k, v in res.mu_scores.items()} if res.mu_scores else None,
            "seconds": round(res.seconds, 1)}
    idx, truth = truth_of(ds, split.vocabulary, split.candidates)
    if idx.size and len(set(truth.tolist())) > 1:
        k = len(data.novel)
        km = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit_predict(data.x_train[n_lab:][idx].numpy())
        info["ground_truth"] = {"scored_images": int(idx.size), "classes": sorted({ds.class_names[t] for t in truth}),
                                "groups": cluster_scores(truth, probs[idx].argmax(1)).as_dict(),
                                "kmeans_on_clip_embeddings": cluster_scores(truth, km).as_dict()}
    _save_config(out, res.config)
    return write_store_outputs(out, ds, cfg.labels, split, probs, info)


def run(cfg: DiscoverConfig, out: Path, progress: bool = False, log=print) -> dict:
    cfg.validate()  # before any data is read
    data = load_data(cfg)
    res = run_discover(data, cfg, log=log, progress=progress)
    km = kmeans_scores(res.model, data, next(res.model.parameters()).device, seed=cfg.seed).as_dict()
    return write_outputs(out, data, res, km)
