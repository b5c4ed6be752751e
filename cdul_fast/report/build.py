"""`cdul-fast report`: a training run or a label store as one HTML page a person can look at.

A run gives: its settings, loss and mAP per epoch, a per-class AP table (pseudo labels before/after training on the
train split, the classifier on the shown split), CLIP's global vs snippet score distributions (paper Fig. 4) when its
source store kept them, a gallery of images with the classifier's top tags, Grad-CAMs of the top classes (Fig. 5)
and, when the run kept per-epoch weights (``train --keep-epochs``), the same images over epochs (Fig. 6), plus the
zeta x lambda heat map of ``eval --sweep`` when one sits beside the store. A label store gives the same without the
classifier parts. Without ground truth the tables show score statistics instead of AP.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import __version__
from .._backend import resolve_device
from ..config import check_number
from ..datasets import MultiLabelSet
from ..datasets.base import IGNORE, POSITIVE
from ..errors import ConfigError, StoreError, WeightsError
from ..evaluate import average_precision, labelled_rows, mean_ap
from ..fsutil import write_text_atomic
from ..store.label_store import DONE, LabelStore
from ..views.decode import load_rgb
from ..views.square import load_square, normalize
from . import figures as fg
from . import page as pg
from .cam import grad_cam

LOCAL_ARRAYS = ("aggregate", "cdul", "max")  # Fig. 4's "local" side, in order of preference
TOP_TAGS = 5


@dataclass
class ReportConfig:
    source: str
    out: str | None = None
    split: str | None = None
    root: str | None = None
    images: int = 12
    cam_images: int = 6
    cam_classes: int = 3
    cam_epochs: str = "auto"
    eval_images: int = 2000
    threshold: float = 0.5
    stitch: str = "auto"
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        check_number("--images", self.images, lo=0, integer=True)
        check_number("--cam-images", self.cam_images, lo=0, integer=True)
        check_number("--cam-classes", self.cam_classes, lo=1, integer=True)
        check_number("--eval-images", self.eval_images, lo=1, integer=True)
        check_number("--threshold", self.threshold, lo=0.0, hi=1.0)
        check_number("--batch-size", self.batch_size, lo=1, integer=True)
        check_number("--seed", self.seed, lo=0, integer=True)
        if str(self.stitch) not in ("auto", "1", "2", "4"):
            raise ConfigError(f"--stitch must be auto, 1, 2 or 4, got {self.stitch!r}")
        _epoch_choice(self.cam_epochs)


@dataclass
class ReportResult:
    path: Path
    kind: str  # "run" or "store"
    sections: list[str]
    seconds: float


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "model.json").is_file() and (path / "config.yaml").is_file()


def default_out(source: str | Path) -> Path:
    p = Path(source)
    return p / "report" if p.is_dir() else p.with_name(p.name + ".report")


def _epoch_choice(text: str) -> list[int] | str:
    t = str(text).strip().lower()
    if t in ("auto", "all", "none"):
        return t
    try:
        nums = sorted({int(v) for v in t.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--cam-epochs must be auto, all, none or epoch numbers like 1,3,8, got {text!r}") from None
    if not nums or nums[0] < 1:
        raise ConfigError(f"--cam-epochs: epoch numbers start at 1, got {text!r}")
    return nums


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    """k rows of n, the same for a seed (a seeded permutation's prefix, sorted)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:min(k, n)]).astype(np.int64)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.2f}"


def _ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP per class over the rows whose scores are all finite (a diverged model, an unlabelled row); all NaN when no
    row is left."""
    ok = np.isfinite(scores).all(axis=1)
    if not ok.any():
        return np.full(scores.shape[1], np.nan)
    return average_precision(scores[ok], labels[ok])


# ------------------------------------------------------------------------------------------------------ the builders


class _Builder:
    def __init__(self, cfg: ReportConfig) -> None:
        self.cfg = cfg
        self.notes: list[str] = []

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=not self.cfg.progress, dynamic_ncols=True,
                    file=sys.stderr)

    # -- shared sections

    def histograms(self, page: pg.Page, store_path: Path) -> None:
        """Fig. 4 from a label store that kept the global and a local aggregate array."""
        try:
            with LabelStore.open(store_path, mode="r", verify=False) as st:
                local = next((a for a in LOCAL_ARRAYS if a in st.array_names), None)
                if "global" not in st.array_names or local is None:
                    self.notes.append(f"{store_path.name} keeps no global and aggregate arrays: label with --save "
                                      "global,aggregate for the score distributions (paper Fig. 4)")
                    return
                rows = np.flatnonzero(np.asarray(st.done) == DONE)
                g = np.asarray(st.array("global"))[rows]
                loc = np.asarray(st.array(local))[rows]
                names = st.class_names
        except StoreError as exc:
            self.notes.append(f"score distributions left out: {exc}")
            return
        png = fg.histograms_png(g, loc, names, local)
        shift = [f"{n}: {100 * float((loc[:, i] >= 0.5).mean()):.1f} % vs {100 * float((g[:, i] >= 0.5).mean()):.1f} %"
                 for i, n in enumerate(names)]
        page.add("histograms", "CLIP's scores: whole image (global) vs snippets (paper Fig. 4)",
                 pg.img_tag(png, "image/png", "score histograms", "plot")
                 + f'<p class="note">{len(rows)} images of {pg.esc(store_path.name)}; share of images scored '
                   f"&ge; 0.5 with the {pg.esc(local)} vs the global scores: {pg.esc('; '.join(shift))}.</p>")

    def sweep(self, page: pg.Page, store_path: Path) -> None:
        png = store_path.with_name(store_path.name + ".sweep.png")
        if not png.is_file():
            return
        body = pg.img_tag(png.read_bytes(), "image/png", "zeta x lambda sweep", "plot")
        table = store_path.with_name(store_path.name + ".sweep.csv")
        best = _best_sweep_point(table)
        if best:
            body += f'<p class="note">best grid point: {pg.esc(best)} (from {pg.esc(table.name)})</p>'
        page.add("sweep", "zeta x lambda sweep (supplement 6.1)", body)

    def gallery(self, page: pg.Page, ds: MultiLabelSet, rows: np.ndarray, scores: np.ndarray, what: str) -> None:
        """Tiles of ``rows`` with their top tags (``scores`` aligned with ``rows``)."""
        tiles = []
        for r, s in zip(rows, scores):
            try:
                img = fg.thumbnail(load_rgb(ds.paths[r]))
            except Exception as exc:  # noqa: BLE001 - an undecodable image is shown as a note, not a crash
                self.notes.append(f"{ds.ids[r]} left out of the gallery: {exc}")
                continue
            top = np.argsort(-s)[:TOP_TAGS]
            gt = ds.labels[r] if ds.labels is not None else None
            chips = []
            for c in top:
                kind = "" if gt is None or gt[c] == IGNORE else ("ok" if gt[c] == POSITIVE else "bad")
                text = f"{ds.class_names[c]} {s[c]:.2f}"
                chips.append(pg.tag(text, kind) if s[c] >= self.cfg.threshold else
                             f'<span style="opacity:.55">{pg.tag(text, kind)}</span>')
            if gt is not None:
                chips += [pg.tag(ds.class_names[c], "miss", "ground truth, not in the top tags")
                          for c in np.flatnonzero(gt == POSITIVE) if c not in top]
            tiles.append(pg.figure(pg.img_tag(fg.jpeg(img), "image/jpeg", ds.ids[r]),
                                   f"<b>{pg.esc(ds.ids[r])}</b><br>{''.join(chips)}"))
        legend = (f"Top {TOP_TAGS} {what} scores per image; faded: below the threshold "
                  f"{self.cfg.threshold:g}.")
        if ds.labels is not None:
            legend += (' <span class="tag ok">correct</span> <span class="tag bad">not in the ground truth</span> '
                       '<span class="tag miss">missed</span>')
        page.add("gallery", f"Sample images of {ds.name}/{ds.split}",
                 f'<p class="note">{legend}</p><div class="grid">{"".join(tiles)}</div>')


def _best_sweep_point(path: Path) -> str | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("aggregator") == "cdul"]
        best = max(rows, key=lambda r: float(r["mAP"]))
        return f"zeta {best['zeta']}, lambda {best['lam']}: mAP {float(best['mAP']):.2f} %"
    except (OSError, KeyError, ValueError):
        return None


class _RunReport(_Builder):
    """The report of a run folder of `cdul-fast train`."""

    def build(self, run: Path) -> tuple[pg.Page, str]:
        from ..deploy.export import load_trained
        from ..train.trainer import TrainConfig, run_datasets

        cfg = self.cfg
        try:
            settings = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{run / 'config.yaml'} cannot be read: {exc}") from exc
        if not isinstance(settings, dict):
            raise ConfigError(f"{run / 'config.yaml'} is not a mapping of settings")
        for key, kinds in (("dataset_options", dict), ("test_dataset_options", dict), ("root", (str, type(None))),
                           ("dataset", (str, type(None))), ("split", (str, type(None))),
                           ("test_split", (str, type(None)))):
            if key in settings and not isinstance(settings[key], kinds):
                raise ConfigError(f"{run / 'config.yaml'}: {key} has the wrong type ({type(settings[key]).__name__})")
        known = {f.name for f in fields(TrainConfig)}
        try:
            tcfg = TrainConfig(**{k: v for k, v in settings.items() if k in known and k not in ("labels", "out")},
                               labels=str(settings.get("labels", "")), out=str(run))
        except TypeError as exc:
            raise ConfigError(f"{run / 'config.yaml'} does not hold the settings of a training run: {exc}") from exc
        if cfg.root:
            tcfg.root = cfg.root
        source_store = self._source_store(run, Path(tcfg.labels))
        store_meta = {}
        if source_store.is_file():
            try:
                with LabelStore.open(source_store, mode="r", verify=False) as st:
                    store_meta = dict(st.meta)
            except StoreError as exc:
                self.notes.append(f"the run's source store cannot be read: {exc}")
                source_store = Path("")
        train_ds, test_ds = run_datasets(tcfg, store_meta)
        if cfg.split and cfg.split not in (train_ds.split, test_ds.split if test_ds is not None else None):
            from ..datasets import load_dataset

            shown = load_dataset(train_ds.name, tcfg.root, cfg.split,  # a split other than train: test's options
                                 **{**tcfg.dataset_options, **tcfg.test_dataset_options})
        elif cfg.split == train_ds.split or test_ds is None:
            shown = train_ds
        else:
            shown = test_ds
        self.epoch_files = self._kept_epochs(run)
        trained = load_trained(run)
        if list(trained.info["class_names"]) != list(train_ds.class_names):
            raise WeightsError(f"the model in {run} has other classes than {train_ds.name}: it does not belong to "
                               "this dataset")
        device = resolve_device(cfg.device)
        model = trained.module.model.to(device).eval()
        info = trained.info
        history = _read_log(run / "log.csv")
        last = history[-1] if history else {}

        page = pg.Page(f"cdul-fast report: {run.resolve().parent.name}/{run.name}",
                       f"training run {run.resolve()} · {train_ds.name} · {len(train_ds.class_names)} classes · "
                       f"cdul-fast {__version__} · {time.strftime('%Y-%m-%d %H:%M')}")
        cards = [("pseudo-label mAP (train, last epoch)", last.get("pseudo_map")),
                 ("classifier mAP (test, last epoch)", last.get("test_map")),
                 ("epochs", len([h for h in history if h.get("epoch", 0) >= 1]) or None)]
        page.add("summary", "Summary", '<div class="cards">' + "".join(
            f'<div class="card"><b>{pg.esc(v if isinstance(v, int) else f"{v:.2f}")}</b><span>{pg.esc(k)}</span>'
            "</div>" for k, v in cards if v is not None) + "</div>")
        if history:
            page.add("curves", "Loss and mAP per epoch", pg.img_tag(fg.curves_png(history), "image/png", "curves",
                                                                     "plot"))
        # predictions of the classifier on (a sample of) the shown split
        eval_rows = _sample(len(shown), cfg.eval_images, cfg.seed)
        probs = self.predict(model, info, shown, eval_rows, device)
        self.per_class(page, run, train_ds, shown, eval_rows, probs)
        if source_store.is_file():
            self.histograms(page, source_store)
        else:
            self.notes.append(f"the run's source store {source_store} is gone: no score distributions")
        pick = _sample(eval_rows.size, cfg.images, cfg.seed + 1)  # positions in eval_rows (and probs)
        gal = eval_rows[pick]
        if gal.size:
            self.gallery(page, shown, gal, probs[pick], "classifier")
        cam_rows = gal[:cfg.cam_images]
        if cam_rows.size:
            x, ok = self._inputs(info, shown, cam_rows, device)  # decoded once for both CAM sections
            if ok:
                try:
                    self.cams(page, model, shown, cam_rows, x, ok, int(info["image_size"]))
                    few = sum(1 for i in ok if i < 4)  # the first four CAM images (ok is increasing)
                    self.cam_epochs(page, model, info, shown, cam_rows, x[:few], ok[:few])
                except ConfigError as exc:  # e.g. a vision transformer: no feature map to draw
                    self.notes.append(f"no class activation maps for {info.get('arch')}: {exc}")
        if source_store.is_file():
            self.sweep(page, source_store)
        page.add("config", "Settings (config.yaml)",
                 pg.definition_list(sorted(settings.items(), key=lambda kv: str(kv[0]))))
        return page, "run"

    @staticmethod
    def _source_store(run: Path, recorded: Path) -> Path:
        """The label store the run was trained from: the absolute path the run store recorded, else config.yaml's
        (relative to where `train` ran)."""
        try:
            with LabelStore.open(run / "labels.cdul", mode="r", verify=False) as st:
                source = st.meta.get("source")
        except StoreError:
            source = None
        return Path(source) if source and Path(source).is_file() else recorded

    def _kept_epochs(self, run: Path) -> list[tuple[int, Path]]:
        """The per-epoch weights that --cam-epochs picks (checked before any work is done)."""
        choice = _epoch_choice(self.cfg.cam_epochs)
        files = {int(m.group(1)): p for p in sorted((run / "epochs").glob("epoch_*.safetensors"))
                 if (m := re.fullmatch(r"epoch_([0-9]{1,6})", p.stem))}
        if choice == "none":
            return []
        if not files:
            if isinstance(choice, list):
                raise ConfigError(f"{run} kept no per-epoch weights: train with --keep-epochs to see CAMs over epochs")
            self.notes.append("no per-epoch weights in the run (train --keep-epochs): no CAMs over epochs")
            return []
        if isinstance(choice, list):
            missing = [e for e in choice if e not in files]
            if missing:
                raise ConfigError(f"--cam-epochs: {run} has no weights of epoch(s) {', '.join(map(str, missing))}; "
                                  f"it kept {', '.join(map(str, sorted(files)))}")
            return [(e, files[e]) for e in choice]
        have = sorted(files)
        if choice == "auto":
            have = sorted({have[round(i)] for i in np.linspace(0, len(have) - 1, min(6, len(have)))})
        return [(e, files[e]) for e in have]

    def _inputs(self, info: dict, ds: MultiLabelSet, rows: np.ndarray, device) -> tuple[torch.Tensor, list[int]]:
        """Normalized model inputs of ``rows`` and the positions that decoded."""
        size = int(info["image_size"])
        arrays, ok = [], []
        for i, r in enumerate(rows):
            try:
                arrays.append(load_square(ds.paths[r], size))
                ok.append(i)
            except Exception as exc:  # noqa: BLE001 - undecodable images are noted and left out
                self.notes.append(f"{ds.ids[r]} left out: {exc}")
        if not arrays:
            return torch.zeros(0, 3, size, size, device=device), ok
        x = torch.from_numpy(np.stack(arrays)).to(device)
        return normalize(x, info["mean"], info["std"]), ok

    def predict(self, model, info: dict, ds: MultiLabelSet, rows: np.ndarray, device) -> np.ndarray:
        out = np.full((rows.size, len(ds.class_names)), np.nan, dtype=np.float32)
        bs = self.cfg.batch_size
        with self.bar(rows.size, f"predict {ds.split}") as bar, torch.no_grad():
            for b0 in range(0, rows.size, bs):
                x, ok = self._inputs(info, ds, rows[b0:b0 + bs], device)
                if ok:
                    out[b0 + np.asarray(ok)] = torch.sigmoid(model(x).float()).cpu().numpy()
                bar.update(min(bs, rows.size - b0))
        return out

    def per_class(self, page: pg.Page, run: Path, train_ds: MultiLabelSet, shown: MultiLabelSet,
                  eval_rows: np.ndarray, probs: np.ndarray) -> None:
        names = shown.class_names
        ok = np.isfinite(probs).all(axis=1)
        cols: dict[str, np.ndarray] = {}
        if train_ds.labels is not None and (run / "labels.cdul").is_file():
            with LabelStore.open(run / "labels.cdul", mode="r", expect_classes=names) as st:
                rows, _ = labelled_rows(st, train_ds, allow_incomplete=True)
                for arr, title in (("init", "pseudo labels, start (train)"), ("labels", "pseudo labels, end (train)")):
                    cols[title] = _ap(np.asarray(st.array(arr))[rows], train_ds.labels[rows])
        head = ["class"]
        body_rows = []
        if shown.labels is not None:
            y = shown.labels[eval_rows[ok]]
            cols[f"classifier ({shown.split})"] = _ap(probs[ok], y)
            positives = (y == POSITIVE).sum(0)
            head += ["positives", *[f"AP %: {t}" for t in cols], ""]
            clf = cols[f"classifier ({shown.split})"]
            for i, n in enumerate(names):
                width = 0 if math.isnan(clf[i]) else round(100 * clf[i])
                body_rows.append([pg.esc(n), str(int(positives[i])), *[_pct(v[i]) for v in cols.values()],
                                  f'<td class="bar"><i style="width:{width}px"></i></td>'])
            foot = ["mAP", "", *[_pct(mean_ap(v)) for v in cols.values()], ""]
            lost = eval_rows.size - int(ok.sum())
            note = (f"AP on {int(ok.sum())} of {len(shown)} images of {shown.name}/{shown.split} for the classifier"
                    f"{' (a seeded sample: --eval-images)' if eval_rows.size < len(shown) else ''}"
                    f"{f'; {lost} undecodable or with non-finite scores left out' if lost else ''}"
                    "; pseudo labels on the "
                    f"train split's {len(train_ds)} images, before and after the latent updates.")
        else:
            head += ["mean score", f"images tagged (>= {self.cfg.threshold:g})"]
            for i, n in enumerate(names):
                body_rows.append([pg.esc(n), f"{float(probs[ok, i].mean()):.3f}",
                                  str(int((probs[ok, i] >= self.cfg.threshold).sum()))])
            foot = None
            note = f"{shown.name}/{shown.split} has no ground truth: score statistics of {int(ok.sum())} images."
        page.add("per-class", "Per-class results", pg.table(head, body_rows, "per-class-table", foot)
                 + f'<p class="note">{pg.esc(note)}</p>')

    @property
    def stitch(self) -> int | str:
        return self.cfg.stitch if self.cfg.stitch == "auto" else int(self.cfg.stitch)

    def cams(self, page: pg.Page, model, ds: MultiLabelSet, rows: np.ndarray, x: torch.Tensor, ok: list[int],
             size: int) -> None:
        """Fig. 5: the CAMs of each image's top classes (``x``: the decoded inputs of ``rows[ok]``)."""
        res = grad_cam(model, x, top_k=self.cfg.cam_classes, stitch=self.stitch, max_batch=self.cfg.batch_size)
        up = res.upsampled(size).cpu().numpy()
        lines = []
        for j, i in enumerate(ok):
            r = int(rows[i])
            img = load_rgb(ds.paths[r])
            tiles = [pg.figure(pg.img_tag(fg.jpeg(fg.thumbnail(img)), "image/jpeg", ds.ids[r]),
                               f"<b>{pg.esc(ds.ids[r])}</b>")]
            for k in range(res.classes.shape[1]):
                c = int(res.classes[j, k])
                gt = ds.labels[r][c] if ds.labels is not None else None
                kind = "" if gt is None or gt == IGNORE else ("ok" if gt == POSITIVE else "bad")
                tile = fg.cam_overlay(img, up[j, k], tuple(res.peaks[j, k].tolist()))
                tiles.append(pg.figure(pg.img_tag(fg.jpeg(tile), "image/jpeg", f"CAM {ds.class_names[c]}"),
                                       pg.tag(f"{ds.class_names[c]} {float(res.scores[j, k]):.2f}", kind)))
            lines.append(f'<div class="row">{"".join(tiles)}</div>')
        page.add("cams", "Class activation maps of the top classes (paper Fig. 5)",
                 f'<p class="note">Grad-CAM of the trained classifier for its {res.classes.shape[1]} highest-scoring '
                 f"classes; a map cell is {res.stride:g} input pixels"
                 f"{f' (shift-and-stitch, {res.stitch} x {res.stitch} shifted copies)' if res.stitch > 1 else ''}; "
                 "the cross marks its peak (none: no positive evidence). "
                 "Green: the class is in the ground truth.</p>" + "".join(lines))

    def cam_epochs(self, page: pg.Page, model, info: dict, ds: MultiLabelSet, rows: np.ndarray, x: torch.Tensor,
                   ok: list[int]) -> None:
        """Fig. 6: one class per image with the weights kept after each epoch (``x``: the inputs of ``rows[ok]``)."""
        from ..train.checkpoint import load_state_dict_file

        files = self.epoch_files
        if not files:
            return
        if not _epochs_fit(files, info):
            self.notes.append("the run's epochs/ folder holds weights of more epochs than it trained (an older run's): "
                              "no CAMs over epochs")
            return
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            probs = torch.sigmoid(model(x)).cpu()
        if ds.labels is not None:  # the best-scored class that is really there (as the paper's Fig. 6 shows)
            gt = torch.from_numpy(ds.labels[rows[ok]] == POSITIVE)
            probs = torch.where(gt.any(dim=1, keepdim=True), probs.masked_fill(~gt, -1.0), probs)
        top = probs.argmax(dim=1, keepdim=True).to(x.device)
        size = int(info["image_size"])
        per_epoch = []
        try:
            for e, path in files:
                try:
                    model.load_state_dict(load_state_dict_file(path))
                except (RuntimeError, WeightsError) as exc:  # truncated, or another run's
                    self.notes.append(f"epoch {e} left out of the CAMs over epochs: {path.name} does not fit the "
                                      f"run's model ({str(exc).splitlines()[0][:160]})")
                    continue
                res = grad_cam(model, x, classes=top, stitch=self.stitch, max_batch=self.cfg.batch_size)
                per_epoch.append((e, res.upsampled(size).cpu().numpy(), res.peaks.cpu().numpy(),
                                  res.scores.cpu().numpy()))
        finally:
            model.load_state_dict(final)
        lines = []
        for j, i in enumerate(ok):
            r = int(rows[i])
            img = load_rgb(ds.paths[r])
            c = int(top[j, 0])
            tiles = [pg.figure(pg.img_tag(fg.jpeg(fg.thumbnail(img, fg.SMALL)), "image/jpeg", ds.ids[r]),
                               f"<b>{pg.esc(ds.ids[r])}</b><br>{pg.esc(ds.class_names[c])}")]
            for e, up, peaks, scores in per_epoch:
                tile = fg.cam_overlay(img, up[j, 0], tuple(peaks[j, 0].tolist()), side=fg.SMALL)
                tiles.append(pg.figure(pg.img_tag(fg.jpeg(tile), "image/jpeg", f"epoch {e}"),
                                       f"epoch {e}: p = {float(scores[j, 0]):.2f}"))
            lines.append(f'<div class="row">{"".join(tiles)}</div>')
        page.add("cam-epochs", "The same images over epochs (paper Fig. 6)",
                 '<p class="note">Grad-CAM of one class per image (the final model\'s best-scored class among those '
                 "in the ground truth, else its top class) with the weights kept after each epoch.</p>"
                 + "".join(lines))


def _epochs_fit(files: list[tuple[int, Path]], info: dict) -> bool:
    """Kept epochs all within the run's epoch count (a folder reused without clearing holds more)."""
    try:
        return max(e for e, _ in files) <= int(info.get("epochs") or 0)
    except (TypeError, ValueError):
        return False


class _StoreReport(_Builder):
    """The report of a label store (no classifier: no CAMs)."""

    def build(self, path: Path, ds: MultiLabelSet) -> tuple[pg.Page, str]:
        with LabelStore.open(path, mode="r", expect_classes=ds.class_names) as st:
            rows, notes = labelled_rows(st, ds, allow_incomplete=True)
            if rows.size == 0:
                raise StoreError(f"{path} has no labelled rows yet: finish it with `cdul-fast label ... --resume`")
            self.notes += notes
            arrays = {a: np.array(st.array(a))[rows] for a in st.array_names}
            meta = dict(st.meta)
        main = next((a for a in ("final", "labels") if a in arrays), next(iter(arrays)))  # labels: a run's store
        page = pg.Page(f"cdul-fast report: {path.name}", f"label store {path.resolve()} · {ds.name}/{ds.split} · "
                       f"{len(ds.class_names)} classes · {rows.size} of {len(ds)} images labelled · cdul-fast "
                       f"{__version__} · {time.strftime('%Y-%m-%d %H:%M')}")
        names = ds.class_names
        if ds.labels is not None:
            aps = {a: _ap(v, ds.labels[rows]) for a, v in arrays.items()}
            positives = (ds.labels[rows] == POSITIVE).sum(0)
            body = [[pg.esc(n), str(int(positives[i])), *[_pct(ap[i]) for ap in aps.values()]]
                    for i, n in enumerate(names)]
            page.add("summary", "Summary", '<div class="cards">' + "".join(
                f'<div class="card"><b>{_pct(mean_ap(ap))}</b><span>mAP % of {pg.esc(a)}</span></div>'
                for a, ap in aps.items()) + "</div>")
            table = pg.table(["class", "positives", *[f"AP %: {a}" for a in aps]], body, "per-class-table",
                             ["mAP", "", *[_pct(mean_ap(ap)) for ap in aps.values()]])
        else:
            v = arrays[main]
            body = [[pg.esc(n), f"{float(v[:, i].mean()):.3f}", str(int((v[:, i] >= self.cfg.threshold).sum()))]
                    for i, n in enumerate(names)]
            table = pg.table(["class", f"mean score ({main})", f"images tagged (>= {self.cfg.threshold:g})"], body,
                             "per-class-table")
        page.add("per-class", "Per-class results", table)
        self.histograms(page, path)
        if self.cfg.images:
            pick = _sample(rows.size, self.cfg.images, self.cfg.seed + 1)
            self.gallery(page, ds, rows[pick], arrays[main][pick], f"pseudo-label ({main})")
        self.sweep(page, path)
        self.notes.append("class activation maps need a trained classifier: report a run folder of `cdul-fast train`")
        shown = {k: v for k, v in meta.items() if k != "embeddings" and len(str(v)) < 400}
        page.add("config", "Store metadata", pg.definition_list(sorted(shown.items(), key=lambda kv: str(kv[0]))))
        return page, "store"


def _read_log(path: Path) -> list[dict]:
    """log.csv rows as numbers (empty or unreadable cells: None; rows without an epoch left out); [] when there is no
    readable log."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    out = []
    for r in rows:
        row: dict = {}
        for k, v in r.items():
            if not isinstance(k, str) or not isinstance(v, str):
                continue  # extra or missing fields of a damaged row
            try:
                row[k] = None if v == "" else (int(v) if k == "epoch" else float(v))
            except ValueError:
                row[k] = None
        if row.get("epoch") is not None:
            out.append(row)
    return out


def build_report(cfg: ReportConfig, dataset: MultiLabelSet | None = None) -> ReportResult:
    """Write ``<out>/index.html`` for a run folder, or for a label store of ``dataset``."""
    cfg.validate()
    t0 = time.perf_counter()
    src = Path(cfg.source)
    if not src.exists():
        raise ConfigError(f"{src} not found: pass a run folder of `cdul-fast train` or a label store (.cdul)")
    out = Path(cfg.out) if cfg.out else default_out(src)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: the report is a folder (index.html inside)")
    if src.is_dir():
        if not is_run(src):
            raise ConfigError(f"{src} is not a run folder of `cdul-fast train` (no model.json and config.yaml)")
        builder: _Builder = _RunReport(cfg)
        page, kind = builder.build(src)
    else:
        if dataset is None:
            raise ConfigError(f"the dataset of {src} is needed (--dataset, --root, --split)")
        builder = _StoreReport(cfg)
        page, kind = builder.build(src, dataset)
    if builder.notes:
        page.add("notes", "Notes", "<ul>" + "".join(f"<li>{pg.esc(n)}</li>" for n in builder.notes) + "</ul>")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    write_text_atomic(path, page.render())
    return ReportResult(path, kind, [s[0] for s in page.sections], time.perf_counter() - t0)
