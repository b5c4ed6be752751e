"""`cdul-fast discover --labels STORE`: the groups a labelling run's vocabulary missed.

A label store written with ``label --save-embeddings`` holds every image's CLIP embedding next to its pseudo labels.
Images whose best known-class score is at least ``confident`` become the labelled set (their top class is the label);
images whose best score is below ``poor`` are the ones the vocabulary describes badly, and discovery partitions
them into K new groups. The features are the CLIP whole-image embeddings (view 0), so no image is decoded for
training; the views are feature dropout and noise (``data.augment_embedding``). K is ``--novel`` or, if not given,
the k in 2..``max_novel`` whose k-means partition of the poorly-scored embeddings has the best silhouette score.

Outputs: a label store bound to the same images (classes ``novel_00`` ...: each candidate row's cluster
probabilities; other rows skipped) that ``tags`` reads, ``clusters.csv`` (path, cluster, confidence,
best known score) and a contact sheet per cluster of its most confident images, for a person to name.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..datasets import MultiLabelSet
from ..errors import CdulError, ConfigError
from ..evaluate import labelled_rows
from ..fsutil import atomic_write, write_text_atomic
from ..label.scoring import EMBEDDINGS
from ..store.label_store import SKIPPED, LabelStore
from .data import DiscoverData

THUMB = 64
SHEET = 6  # contact sheets: SHEET x SHEET thumbnails


@dataclass
class StoreSplit:
    data: DiscoverData
    rows: np.ndarray  # store row of every training item (labelled first, then the candidates)
    candidates: np.ndarray  # store rows of the poorly-scored images (the unlabelled set)
    best: np.ndarray  # best known-class score of each candidate
    k_scores: dict[int, float] | None  # silhouette per k when K was estimated
    notes: list[str]
    vocabulary: tuple[str, ...]  # the store's classes


def estimate_k(x: np.ndarray, max_k: int, seed: int = 0) -> tuple[int, dict[int, float]]:
    """The k in 2..max_k whose k-means partition of ``x`` has the highest silhouette score (cosine ≈ euclidean for
    unit embeddings), and every k's score."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    top = min(max_k, len(x) - 1)
    if top < 2:
        raise ConfigError(f"estimating K needs at least 3 poorly-scored images, got {len(x)}; pass --novel K")
    sample = np.random.default_rng(seed).permutation(len(x))[:4000]  # silhouette is quadratic in the items
    scores = {}
    for k in range(2, top + 1):
        pred = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        scores[k] = float(silhouette_score(x[sample], pred[sample])) if len(set(pred[sample])) > 1 else -1.0
    return max(scores, key=lambda k: (scores[k], -k)), scores


def _embeddings(store: LabelStore, ds: MultiLabelSet, rows: np.ndarray) -> np.ndarray:
    """View 0 (the whole image) of the store's embeddings, or of the store it was re-scored from (a rescore keeps
    none: they are the source's), after checking that store belongs to the same images."""
    if EMBEDDINGS in store.tensor_names:
        return np.asarray(store.tensor(EMBEDDINGS)[rows, 0], dtype=np.float32)
    source = (store.meta.get("rescored_from") or {}).get("store")
    if source and Path(source).is_file():
        with LabelStore.open(source, mode="r") as src:
            if EMBEDDINGS in src.tensor_names:
                labelled_rows(src, ds)  # rows, ids digest and file stats of the same images
                return np.asarray(src.tensor(EMBEDDINGS)[rows, 0], dtype=np.float32)
    raise ConfigError(f"{store.path} holds no image embeddings{' (nor does ' + source + ')' if source else ''}: label "
                      "with --save-embeddings (discovery clusters the CLIP embeddings)")


def store_split(store_path: str | Path, ds: MultiLabelSet, confident: float, poor: float, novel: int | None,
                max_novel: int, array: str = "final", seed: int = 0) -> StoreSplit:
    """Labelled and candidate images of a store that belongs to ``ds``, with their embeddings."""
    if not 0 <= poor <= confident <= 1:
        raise ConfigError(f"need 0 <= --poor <= --confident <= 1, got poor {poor}, confident {confident}")
    with LabelStore.open(store_path, mode="r") as store:  # its vocabulary may differ from ds's (a rescore)
        rows, notes = labelled_rows(store, ds)
        vocab = store.class_names
        if array not in store.array_names:
            raise ConfigError(f"{store_path} has no array {array!r}; it has {', '.join(store.array_names)}")
        scores = np.asarray(store.array(array))[rows]
        emb = _embeddings(store, ds, rows)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    best, top = scores.max(axis=1), scores.argmax(axis=1)
    lab, cand = best >= confident, best < poor
    classes = sorted(set(top[lab].tolist()))
    if len(classes) < 2:
        raise ConfigError(f"only {lab.sum()} images score a known class >= --confident {confident} "
                          f"({len(classes)} classes): lower --confident")
    if cand.sum() < 3:
        raise ConfigError(f"only {cand.sum()} images score every known class below --poor {poor}: nothing to "
                          "discover (raise --poor)")
    k_scores = None
    if novel is None:
        novel, k_scores = estimate_k(emb[cand], max_novel, seed)
        notes.append(f"K = {novel} novel groups (best silhouette of k-means on the candidates' embeddings, k = 2.."
                     f"{max(k_scores)})")
    elif not 2 <= novel <= cand.sum():
        raise ConfigError(f"--novel must be in 2..{cand.sum()} (the poorly-scored images), got {novel}")
    known_names = tuple(vocab[c] for c in classes)
    lut = {c: i for i, c in enumerate(classes)}
    order = np.concatenate([np.flatnonzero(lab), np.flatnonzero(cand)])
    y = np.concatenate([[lut[c] for c in top[lab]], np.full(int(cand.sum()), -1)]).astype(np.int64)
    names = known_names + tuple(f"novel_{i:02d}" for i in range(novel))
    notes.append(f"{int(lab.sum())} confident images of {len(classes)} known classes, {int(cand.sum())} "
                 f"poorly-scored images to group, {len(rows) - len(order)} in between left out")
    data = DiscoverData(f"{ds.name} store", torch.from_numpy(emb[order]), y, np.arange(len(order)) < lab.sum(),
                        torch.zeros(0, emb.shape[1]), np.zeros(0, np.int64), tuple(range(len(classes))),
                        tuple(range(len(classes), len(classes) + novel)), names, modality="embedding",
                        encoder="mlp")
    return StoreSplit(data, rows[order], rows[cand], best[cand], k_scores, notes, tuple(vocab))


def _sheet(paths: list[str], title: str) -> bytes:
    from ..views.decode import load_rgb

    n = len(paths)
    rows = max(1, -(-n // SHEET))
    sheet = Image.new("RGB", (SHEET * THUMB, rows * THUMB + 18), "white")
    ImageDraw.Draw(sheet).text((4, 3), title, fill="black")
    for i, p in enumerate(paths):
        try:
            im = load_rgb(p)
        except CdulError:  # unreadable since labelling: a grey tile, the sheet still shows the rest
            im = Image.new("RGB", (THUMB - 2, THUMB - 2), "grey")
        im.thumbnail((THUMB - 2, THUMB - 2))
        sheet.paste(im, ((i % SHEET) * THUMB + 1, (i // SHEET) * THUMB + 19))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def truth_of(ds: MultiLabelSet, store_classes: tuple[str, ...], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the dataset has ground truth: of ``rows``, those with exactly one true class and that class outside the
    store's vocabulary (a class the labelling run did not name), and that class — what the groups can be scored on."""
    if ds.labels is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    y = np.asarray(ds.labels)[rows] > 0
    named = np.isin(np.asarray(ds.class_names), np.asarray(store_classes))
    ok = (y.sum(axis=1) == 1) & ~(y[:, named].any(axis=1))
    return np.flatnonzero(ok), y[ok].argmax(axis=1)


def write_store_outputs(out: Path, ds: MultiLabelSet, store_path: str | Path, split: StoreSplit, probs: np.ndarray,
                        info: dict) -> dict:
    """The cluster store, clusters.csv, contact sheets and results.json for the candidates' probabilities [n, K]."""
    out.mkdir(parents=True, exist_ok=True)
    k = probs.shape[1]
    names = [f"novel_{i:02d}" for i in range(k)]
    with LabelStore.open(store_path, mode="r", verify=False) as src:
        meta = {"kind": "cdul-discovered-groups", "dataset": ds.name, "split": ds.split, "images": len(ds),
                "ids_sha256": ds.ids_digest(), "discovered_from": str(Path(store_path).resolve()),
                "known_classes": list(split.data.class_names[:len(split.data.known)]), **info}
        stats = src.file_stats
        rows = src.rows
    path = out / "groups.cdul"
    with LabelStore.create(path, names, rows, ["final"], meta=meta, overwrite=True, file_stats=stats) as st:
        order = np.argsort(split.candidates)
        cand, p = split.candidates[order], probs[order].astype(np.float32)
        breaks = np.flatnonzero(np.diff(cand) != 1) + 1
        for run_rows, run_p in zip(np.split(cand, breaks), np.split(p, breaks)):
            st.write(int(run_rows[0]), {"final": run_p})
        skipped = np.ones(rows, dtype=bool)
        skipped[cand] = False
        st.done[skipped] = SKIPPED
    conf, cluster = probs.max(axis=1), probs.argmax(axis=1)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "cluster", "confidence", "best_known_score"])
            for r, c, q, b in zip(split.candidates, cluster, conf, split.best):
                w.writerow([ds.paths[r], names[c], f"{q:.4f}", f"{b:.4f}"])

    atomic_write(out / "clusters.csv", write_csv)
    sheets = out / "clusters"
    sheets.mkdir(exist_ok=True)
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        top = members[np.argsort(-conf[members], kind="stable")][:SHEET * SHEET]
        png = _sheet([ds.paths[split.candidates[i]] for i in top], f"{names[c]}: {members.size} images")
        atomic_write(sheets / f"{names[c]}.png", lambda tmp, b=png: tmp.write_bytes(b))
    results = {"dataset": ds.name, "split": ds.split, "store": str(store_path), "groups_store": str(path),
               "known_classes": list(split.data.class_names[:len(split.data.known)]), "novel_groups": k,
               "k_silhouette": {str(kk): v for kk, v in split.k_scores.items()} if split.k_scores else None,
               "candidates": int(split.candidates.size), "labelled": int(split.data.labelled.sum()),
               "cluster_sizes": np.bincount(cluster, minlength=k).tolist(), "notes": split.notes, **info}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
