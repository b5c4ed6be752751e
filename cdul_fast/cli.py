"""The `cdul-fast` command line: label, rescore, eval, train, export, predict, tags, report, discover, demo.

Every flag is documented in --help with its default. Errors a user can fix print one line and exit 2; a
traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import (
    AGGREGATORS,
    BACKENDS,
    CACHE_MODES,
    METHODS,
    OUTPUTS,
    PRECISIONS,
    PRED_SOURCES,
    PROVIDERS,
    SCHEDULERS,
    TARGETS,
    package_defaults,
    parse_kv,
    resolve,
)
from .dist import env_rank, env_world_size
from .errors import CdulError, ConfigError, DependencyError
from .views.registry import CHOICES as DECODER_CHOICES
from .views.registry import decoder_help

SUPPRESS = argparse.SUPPRESS
# Errors of writing that the user fixes (space, permissions, read-only mounts): one line, not an internal error.
# a full disk, a read-only or foreign folder, or a path whose folder is a file (or a folder where a file goes)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                 errno.EISDIR}


DISTRIBUTED_COMMANDS = ("label", "train")
"""The commands that split their work over the processes torchrun starts (docs/distributed.md)."""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class _Flags:
    """Adds flags whose defaults come from the command's YAML and only records values given explicitly."""

    def __init__(self, parser: argparse.ArgumentParser, command: str, unset: str = "none") -> None:
        self.parser = parser
        self.defaults = package_defaults(command)
        self.unset = unset  # what a null default means, as shown in --help

    def add(self, *names: str, help: str, key: str | None = None, **kw) -> None:  # noqa: A002 - argparse's name
        dest = key or names[0].lstrip("-").replace("-", "_")
        if dest in self.defaults and kw.get("action") not in ("store_true", "store_false"):
            shown = self.defaults[dest]
            help = f"{help} (default: {shown if shown not in (None, [], {}) else self.unset})"
        self.parser.add_argument(*names, dest=dest, default=SUPPRESS, help=help, **kw)


def _float_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _dataset_flags(f: _Flags, required_root: bool = False) -> None:
    f.add("--dataset", help="dataset in its official layout: voc2007, voc2012, coco, nus, folder, shapes")
    f.add("--root", help="the dataset's folder (VOCdevkit, COCO root, NUS-WIDE root, image folder)",
          required=required_root)
    f.add("--split", help="split to read (voc: train/val/trainval/test, coco: train/val, nus: train/test)")
    f.add("--classes", help="folder datasets: class names, comma-separated (cat,dog), or @FILE (or a .txt file) "
                            "with one name per line; names with commas need the file form")
    f.add("--labels-csv", help="folder datasets: CSV of ground truth (path,<class>... with 0/1/-1, or path,labels)")
    f.add("--dataset-opt", action="append", metavar="KEY=VALUE",
          help="adapter option, repeatable (e.g. difficult=ignore for VOC, images_dir=Flickr for NUS, n=500 for "
               "shapes)")


def _prompt_flags(f: _Flags) -> None:
    f.add("--template", help="prompt template; '{}' is replaced by the class name")
    f.add("--templates", metavar="FILE",
          help="prompt ensemble: a file with one template per line; each class embedding is the normalized mean "
               "over the templates (CLIP's zero-shot recipe); replaces --template")
    f.add("--synonyms", metavar="FILE",
          help="class synonyms: lines 'name: synonym | synonym'; a class's embedding averages its name and synonyms")


def _scoring_flags(f: _Flags) -> None:
    f.add("--zeta", type=float, help="min-max threshold: a class keeps its max snippet score if it reaches zeta")
    f.add("--lam", type=float, help="lambda: 0 = average of global and aggregate scores, 1 = their max")
    f.add("--aggregator", choices=AGGREGATORS, help="aggregator stored as 'final' (Table 3)")
    f.add("--save", type=_csv, help=f"extra arrays to store, comma-separated: {','.join(OUTPUTS)}")


def _dataset_options(args: dict) -> dict:
    opts = parse_kv(args.pop("dataset_opt", None))
    if "classes" in args:
        opts["classes"] = args.pop("classes")
    if "labels_csv" in args:
        opts["labels"] = args.pop("labels_csv")
    return opts


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line naming the problem and where help is, not argparse's usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cdul-fast",
        description="CLIP-driven unsupervised multi-label image classification (CDUL, ICCV 2023): label images "
                    "without annotation, train a classifier from the labels, deploy it with ONNX Runtime.",
    )
    p.add_argument("--version", action="version", version=f"cdul-fast {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    lab = sub.add_parser("label", help="write CDUL pseudo labels of a dataset to a label store",
                         description="Score each image and its G x G snippets with a frozen CLIP, aggregate with "
                                     "min-max (zeta) and combine with the global scores (lambda); write the soft "
                                     "pseudo-label matrix to a memory-mapped label store. Resumable.")
    f = _Flags(lab, "label")
    f.add("--out", "-o", help="label store to write (e.g. runs/voc07.cdul)", required=True)
    _dataset_flags(f)
    f.add("--clip", help="open_clip model name (paper: RN50x64), a folder with open_clip_config.json + weights, a "
                         "JSON model config, or the shipped 'shapes-clip'")
    f.add("--clip-weights", help="pretrained tag (e.g. openai), local checkpoint (.safetensors/.pt), or 'random' "
                                 "(seeded random init, for tests); omitted = the model's default")
    f.add("--clip-precision", choices=PRECISIONS, help="encoder precision")
    _prompt_flags(f)
    f.add("--grid", type=int, help="G: the image is cut into G x G snippets")
    _scoring_flags(f)
    f.add("--save-embeddings", action="store_true",
          help="also store the normalized image embedding of every view [rows, 1+G^2, K], so `cdul-fast rescore` "
               "and `eval --sweep` can re-score with other classes, prompts, zeta, lambda or aggregators without "
               "decoding or encoding an image again")
    f.add("--embedding-dtype", choices=("fp16", "fp32"),
          help="dtype of the stored embeddings: fp16 = half the size, fp32 = rescore reproduces label exactly")
    f.add("--batch-size", type=int, help="images per encoder batch; a resumed run must use the same value")
    f.add("--decoder", choices=DECODER_CHOICES, help=decoder_help())
    f.add("--workers", type=int, help="decode workers")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--backend", choices=BACKENDS, help="aggregation kernel")
    f.add("--seed", type=int, help="seed (random CLIP init)")
    f.add("--flush-every", type=int, help="msync the store every N batches")
    f.add("--resume", action="store_true", help="continue an interrupted store (same settings required)")
    f.add("--overwrite", action="store_true", help="replace an existing store")
    f.add("--no-progress", action="store_true", help="no progress bar", key="no_progress")
    f.add("--config", help="YAML file of option values (overridden by flags given here)")
    lab.set_defaults(func=cmd_label)

    rs = sub.add_parser("rescore", help="new pseudo labels from a store's saved embeddings (no image decoded)",
                        description="Re-score the view embeddings a store saved with `label --save-embeddings` for "
                                    "another class list, template(s), synonyms, zeta, lambda or aggregator: only the "
                                    "text encoder runs (the image encoder is never loaded) and the fused aggregation "
                                    "kernel streams over row blocks of the mapped embeddings. Writes a normal label "
                                    "store for eval, train and tags. Unset options keep the source's values.")
    f = _Flags(rs, "rescore", unset="the source store's")
    f.add("--labels", "--from", key="source", help="label store with embeddings (label --save-embeddings)",
          required=True)
    f.add("--out", "-o", help="new label store to write", required=True)
    f.add("--classes", help="new class list: comma-separated (cat,dog) or @FILE with one name per line")
    _prompt_flags(f)
    _scoring_flags(f)
    f.add("--debias", choices=("none", "ccd"),
          help="ccd: divide each class's scores by CLIP's bias for it (mean confident top-1 probability, CCD, "
               "CVPR 2025) and clip to [0, 1]: calibrates classes against each other for thresholded tags and hard "
               "targets (the clip creates ties, which can lower mAP: docs/rescore.md)")
    f.add("--debias-entropy", type=float, help="ccd: only images whose whole-image softmax entropy (nats) is at most "
                                               "this count towards the bias")
    f.add("--clip", help="the CLIP the store was labelled with, when its recorded location moved")
    f.add("--clip-weights", help="its weights (tag or file); its identity must match the store's")
    f.add("--block-rows", type=int, help="rows per block read from the mapped embeddings")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--backend", choices=BACKENDS, help="aggregation kernel")
    f.add("--resume", action="store_true", help="continue an interrupted rescore (same settings required)")
    f.add("--overwrite", action="store_true", help="replace an existing output store")
    f.add("--no-progress", action="store_true", help="no progress bar", key="no_progress")
    f.add("--config", help="YAML file of option values (overridden by flags given here)")
    rs.set_defaults(func=cmd_rescore)

    ev = sub.add_parser("eval", help="mAP and per-class AP of a label store (or predictions) against ground truth",
                        description="Evaluate a label store's arrays against the dataset's ground truth: per-class "
                                    "AP and mAP (macro over classes with at least one positive), via torchmetrics.")
    f = _Flags(ev, "eval")
    f.add("--labels", help="label store written by `cdul-fast label`", required=True)
    _dataset_flags(f)
    f.add("--array", type=_csv, help="arrays to evaluate, comma-separated (default: all arrays in the store)")
    f.add("--json", action="store_true", help="print a JSON report instead of a table")
    f.add("--summary", action="store_true", help="only the mAP line, no per-class rows")
    f.add("--allow-incomplete", action="store_true", help="evaluate the rows labelled so far of an unfinished store")
    f.add("--sweep", metavar="SPEC",
          help="from the store's saved embeddings, the mAP of cdul labels over a zeta x lambda grid (supplement "
               "6.1) plus the global/avg/max aggregators, e.g. zeta=0:0.4:0.05,lam=0,1 (start:stop:step or values); "
               "prints a table and writes CSV + PNG heat map")
    f.add("--sweep-out", metavar="PREFIX", help="--sweep: files PREFIX.csv and PREFIX.png (default: <store>.sweep)")
    f.add("--device", help="--sweep: auto, cpu, cuda or cuda:N")
    ev.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train", help="train a classifier on a label store (KL loss + latent label updates)",
                        description="Gradient-alignment training (paper 3.2, supplement 6.2): the classifier learns "
                                    "from the soft pseudo labels with a KL loss; after the warm-up, every epoch ends "
                                    "with a psi-weighted update of the whole latent pseudo-label matrix. Baselines "
                                    "(an, ls, epr, role) use the same loop. Checkpoints every epoch; --resume "
                                    "continues.")
    f = _Flags(tr, "train")
    f.add("--labels", help="label store written by `cdul-fast label`", required=True)
    f.add("--out", "-o", help="run folder (checkpoints, log, plot, final model)", required=True)
    _dataset_flags(f)
    f.add("--test-split", help="split for test mAP each epoch ('none' to skip)")
    f.add("--labels-array", help="store array that initializes the pseudo labels")
    f.add("--arch", help="timm model name (resnet101, resnet50, convnext_tiny, ...), shapesnet (small CNN), or "
                         "clipres (an open_clip ResNet trunk; with --pretrained shapes-clip the shipped CLIP's)")
    f.add("--pretrained", help="timm weights tag read from the Hugging Face cache (tv2_in1k, a1h_in1k, DEFAULT; "
                               "torchvision's IMAGENET1K_V1/V2 name timm's tv_in1k/tv2_in1k), a local weights file "
                               "(.safetensors or weights-only .pth), or for clipres a CLIP folder/alias (shapes-clip)")
    f.add("--image-size", type=int, help="input side: the whole image is resized to S x S")
    f.add("--epochs", type=int, help="training epochs")
    f.add("--warmup", type=int,
          help="epochs before the first latent label update (cdul; role estimates labels from the first batch)")
    f.add("--batch-size", type=int, help="images per step (under torchrun the global batch, split over the processes)")
    f.add("--lr", type=float, help="AdamW learning rate")
    f.add("--weight-decay", type=float, help="AdamW weight decay")
    f.add("--scheduler", choices=SCHEDULERS, help="learning-rate schedule")
    f.add("--method", choices=METHODS,
          help="cdul (KL + latent updates), an (BCE, assume negative), ls (label smoothing), epr (expected positive "
               "regularization), role (regularized online label estimation, Cole et al. 2021: label estimates "
               "learnt with the network from the first batch, the hard pseudo positives fixed at 1)")
    f.add("--targets", choices=TARGETS, help="soft pseudo labels or hard (thresholded) ones")
    f.add("--hard-threshold", type=float,
          help="threshold for hard labels and the baselines (role: its observed positives)")
    f.add("--no-update-labels", action="store_false", key="update_labels",
          help="ablation: never update the pseudo labels (cdul)")
    f.add("--no-psi", action="store_false", key="psi", help="ablation: latent step without the psi weight")
    f.add("--c1", type=float, help="psi: scale c1")
    f.add("--sigma", type=float, help="psi: width sigma of the Gaussian around 0.5")
    f.add("--c2", type=float, help="psi: offset c2 (default: psi(0) = psi(1) = 0)")
    f.add("--label-lr", type=float, help="step size of the latent update (cdul)")
    f.add("--pred-source", choices=PRED_SOURCES,
          help="predictions y_p of the latent update (cdul): eval = one pass of the trained network after the "
               "epoch, in eval mode without flips (paper 3.2: fix y_p when the training is done); train = the "
               "sigmoids collected during the epoch's training pass (weights changing, random flips)")
    f.add("--init-eps", type=float,
          help="initial latent = logit(clamp(y, eps, 1 - eps)) of the pseudo labels y (cdul, and role's estimates); "
               "in (0, 0.5)")
    f.add("--role-lr", type=float,
          help="role: SGD step size of the label-estimate logits, per unit gradient of one entry's loss (each "
               "estimate gets one step per epoch, when its image is in a batch)")
    f.add("--smoothing", type=float, help="label smoothing of the ls baseline")
    f.add("--epr-weight", type=float, help="weight of the expected-positive penalty (epr and role baselines)")
    f.add("--no-flip", action="store_false", key="flip", help="no random horizontal flips")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--backend", choices=BACKENDS, help="latent-update kernel")
    f.add("--workers", type=int, help="image decode workers")
    f.add("--cache-images", choices=CACHE_MODES, help="keep decoded training images in RAM")
    f.add("--seed", type=int, help="seed (data order, augmentation, initialization)")
    f.add("--no-sync-bn", action="store_false", key="sync_bn",
          help="under torchrun: BatchNorm with each process's share of the batch (plain DDP) instead of the global "
               "batch; the default keeps the run independent of the number of processes")
    f.add("--keep-epochs", action="store_true",
          help="also keep the weights after every epoch (epochs/epoch_NNN.safetensors in the run folder), so "
               "`cdul-fast report` can show class activation maps over epochs (paper Fig. 6)")
    f.add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    f.add("--overwrite", action="store_true", help="start over in a non-empty run folder")
    f.add("--no-progress", action="store_true", help="no progress bars", key="no_progress")
    f.add("--config", help="YAML file of option values (overridden by flags given here)")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help="export a trained classifier to ONNX (checked against torch)",
                        description="Write the classifier of a training run as ONNX with a dynamic batch axis. "
                                    "Input: float32 RGB in [0,1], [N, 3, S, S]; output: per-class probabilities. "
                                    "The file is checked with onnx.checker and ONNX Runtime against torch.")
    ex.add_argument("--checkpoint", required=True,
                    help="run folder of `cdul-fast train`, its model.safetensors, or its checkpoint.pt")
    ex.add_argument("--out", "-o", required=True, help="ONNX file to write")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    ex.add_argument("--atol", type=float, default=1e-4, help="max |ONNX Runtime - torch| accepted (default: 1e-4)")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="per-class scores of images with an exported ONNX model (ONNX Runtime)",
                        description="Run an ONNX model from `cdul-fast export` on a folder of images or a dataset "
                                    "split; write scores as CSV or JSON and report mAP when ground truth exists.")
    f = _Flags(pr, "predict")
    f.add("--model", help="ONNX model written by `cdul-fast export`", required=True)
    f.add("--images", help="folder of images to score (recursively)")
    _dataset_flags(f)
    f.add("--out", "-o", help="scores file: .csv (id + one column per class) or .json")
    f.add("--batch-size", type=int, help="images per ONNX Runtime call")
    f.add("--device", choices=PROVIDERS, help="execution provider")
    f.add("--no-progress", action="store_true", help="no progress bar", key="no_progress")
    pr.set_defaults(func=cmd_predict)

    tg = sub.add_parser("tags", help="per-image tags (CSV, JSON or parquet) from a label store",
                        description="Cut a label store's soft scores into tags per image, without ground truth: one "
                                    "threshold for all classes, per-class thresholds from each class's own score "
                                    "distribution (Otsu), the top k classes, or a thresholds file. Writes the tags "
                                    "(format from the --out suffix) and the thresholds used (<out>.thresholds.csv, "
                                    "editable, for --thresholds). See docs/tags.md.")
    f = _Flags(tg, "tags")
    f.add("--labels", help="label store (from label or rescore)", required=True)
    f.add("--out", "-o", help="tags file: .csv (path,tags,scores), .json, or .parquet (needs pyarrow)",
          required=True)
    _dataset_flags(f)
    f.add("--array", help="store array to cut")
    f.add("--threshold", type=float, help="one threshold for every class (the default mode, 0.5)")
    f.add("--auto", choices=("otsu",), help="otsu: a threshold per class from its score histogram (docs/tags.md)")
    f.add("--top-k", type=int, help="the k best classes of every image")
    f.add("--thresholds", metavar="FILE", help="per-class thresholds: CSV class,threshold (e.g. an edited "
                                               "<out>.thresholds.csv)")
    f.add("--min-score", type=float, help="no tag below this score, in every mode")
    f.add("--allow-incomplete", action="store_true", help="tag the rows labelled so far of an unfinished store")
    tg.set_defaults(func=cmd_tags)

    rp = sub.add_parser("report", help="one HTML page of a run or label store: curves, per-class AP, tags, CAMs",
                        description="Write a self-contained HTML page (every picture inlined; opens offline) about a "
                                    "training run or a label store: settings, loss and mAP per epoch, per-class AP "
                                    "(with ground truth) or score statistics, CLIP's global vs snippet score "
                                    "distributions (paper Fig. 4), a gallery with the top tags, Grad-CAMs of the "
                                    "classifier's top classes (Fig. 5), the same images over epochs when the run kept "
                                    "them (train --keep-epochs; Fig. 6) and the eval --sweep heat map when one "
                                    "exists. Prints the page's path.")
    f = _Flags(rp, "report")
    rp.add_argument("source", metavar="RUN_OR_STORE",
                    help="a run folder of `cdul-fast train` or a label store (.cdul) of `label`/`rescore`")
    f.add("--out", "-o", help="folder to write index.html into (default: RUN/report/ or STORE.report/)")
    f.add("--dataset", help="label stores: dataset in its official layout (default: the one the store records)")
    f.add("--root", help="the dataset's folder, when it moved (runs and stores)")
    f.add("--split", help="runs: the split shown and evaluated (default: the run's test split); stores: the split "
                          "the store was labelled from")
    f.add("--classes", help="label stores of folder datasets: class names, comma-separated, or @FILE")
    f.add("--labels-csv", help="label stores of folder datasets: CSV of ground truth")
    f.add("--dataset-opt", action="append", metavar="KEY=VALUE", help="label stores: adapter option, repeatable")
    f.add("--images", type=int, help="images in the gallery")
    f.add("--cam-images", type=int, help="gallery images that also get class activation maps (runs)")
    f.add("--cam-classes", type=int, help="CAMs of each image's top classes (runs)")
    f.add("--cam-epochs", help="CAMs over epochs (runs kept with train --keep-epochs): auto (up to 6 epochs), all, "
                               "none, or epoch numbers like 1,3,8")
    f.add("--eval-images", type=int, help="the classifier's per-class AP on at most this many images (runs)")
    f.add("--threshold", type=float, help="tags at or above this score are shown solid")
    f.add("--stitch", help="CAM shift-and-stitch per axis: auto, 1, 2 or 4 (finer maps from a coarse network)")
    f.add("--batch-size", type=int, help="images per forward pass")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--seed", type=int, help="seed of the image sample")
    f.add("--no-progress", action="store_true", help="no progress bar", key="no_progress")
    rp.set_defaults(func=cmd_report)

    dc = sub.add_parser("discover", help="find the categories nobody named: novel category discovery (WTA hashing)",
                        description="Novel category discovery (Jia et al., ICCV 2021): learn a representation from "
                                    "labelled known classes and unlabelled images of other classes (contrastive "
                                    "NCE-I + NCE-C), pair the unlabelled images by WTA hashing, and train a head "
                                    "that partitions them into the novel classes (BCE + CE + MSE with ramp-up). "
                                    "Writes results.json (Hungarian ACC, NMI, ARI), clusters.csv and a contact sheet "
                                    "per cluster.")
    f = _Flags(dc, "discover")
    f.add("--out", "-o", help="output folder (config.yaml, results.json, clusters.csv, clusters/*.png)",
          required=True)
    f.add("--dataset", help="digits (scikit-learn's bundled handwritten digits), shapes (the shapes world's "
                            "single-object images, made under --root if missing), cifar10, cifar100 (the official "
                            "python versions under --root), folder (--root/<class>/<images> with --class-split)")
    f.add("--root", help="shapes, cifar10, cifar100, folder: the dataset's folder (with --labels: the store's images, "
                         "if the store's saved config does not say)")
    f.add("--labels", help="a label store written with --save-embeddings: group the images every known class scores "
                           "below --poor, with the images scoring >= --confident as the labelled set (CLIP "
                           "embeddings as features); writes groups.cdul, clusters.csv and contact sheets")
    f.add("--confident", type=float, help="--labels: an image whose best known score reaches this is labelled")
    f.add("--poor", type=float, help="--labels: an image whose every known score is below this is grouped")
    f.add("--novel", type=int, help="--labels: K, the number of new groups (default: estimated: the best k-means "
                                    "silhouette over k = 2..--max-novel)")
    f.add("--max-novel", type=int, help="--labels: the largest K the estimate tries")
    f.add("--labels-array", help="--labels: the store's array read as known-class scores")
    f.add("--class-split", help="folder: YAML file {known: [class folders], novel: [class folders]}")
    f.add("--image-size", type=int, help="shapes and folder: images are resized to this many pixels square")
    f.add("--known", type=int, help="classes 0..known-1 are labelled, the rest are the novel ones to discover "
                                    "(default: the dataset's standard split: digits 5, cifar10 5, cifar100 80, "
                                    "shapes 6)")
    f.add("--encoder", choices=("auto", "small", "resnet18"),
          help="image encoder: small (3-layer CNN), resnet18 (the paper's, CIFAR stem); auto = small for digits and "
               "shapes, resnet18 for cifar and folder")
    f.add("--epochs", type=int, help="training epochs")
    f.add("--batch-size", type=int, help="items per step (labelled and unlabelled drawn together)")
    f.add("--lr", type=float, help="Adam learning rate (cosine schedule)")
    f.add("--weight-decay", type=float, help="Adam weight decay")
    f.add("--tau", type=float, help="NCE temperature (eq. 1-2)")
    f.add("--ramp-lambda", type=float, help="lambda of the ramp-up omega(r) = lambda exp(-5 (1 - r/T)^2), <= 1")
    f.add("--feat-dim", type=int, help="width of the shared representation z-bar")
    f.add("--proj-dim", type=int, help="width of the L2-normalized contrastive projection")
    f.add("--head-hidden", type=int, help="novel head: 0 = linear, else an MLP with this hidden width")
    f.add("--bce-views", type=int, choices=(1, 2), help="BCE on the pairs of view 1 only, or of both views")
    f.add("--pairs", choices=("wta", "rankstats", "cosine"),
          help="pairwise pseudo labels: wta (eq. 6), rankstats (equal top-k index sets), cosine (threshold)")
    f.add("--wta-hashes", type=int, help="H, the number of WTA permutations (default: the feature width)")
    f.add("--wta-k", type=int, help="WTA window: each code is the argmax of the first k permuted entries")
    f.add("--wta-mu-fraction", type=_float_or_auto,
          help="mu / H: a pair agreeing on this share of the codes is positive; auto = the candidate that best "
               "clusters known classes pretending to be novel (the paper's section 4.4; costs candidates x folds "
               "short runs)")
    f.add("--mu-candidates", type=_float_list, help="--wta-mu-fraction auto: the values tried, comma-separated")
    f.add("--select-epochs", type=int, help="--wta-mu-fraction auto: epochs of each trial run")
    f.add("--select-folds", type=int, help="--wta-mu-fraction auto: rotations of the known classes that pretend to "
                                           "be novel (their scores are averaged)")
    f.add("--rank-k", type=int, help="--pairs rankstats: the top-k feature indices compared")
    f.add("--cosine-threshold", type=float, help="--pairs cosine: pairs at or above it are positive")
    f.add("--no-ce", action="store_false", key="use_ce", help="ablation: no cross-entropy on the known classes")
    f.add("--no-bce", action="store_false", key="use_bce", help="ablation: no pairwise BCE on the unlabelled images")
    f.add("--no-mse", action="store_false", key="use_mse", help="ablation: no consistency between the two views")
    f.add("--no-nce-i", action="store_false", key="use_nce_i", help="ablation: no instance discrimination")
    f.add("--no-nce-c", action="store_false", key="use_nce_c", help="ablation: no category discrimination")
    f.add("--seed", type=int, help="seed (initialization, data order, views, permutations)")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--no-progress", action="store_true", help="no progress bar", key="no_progress")
    f.add("--config", help="YAML file of option values (overridden by flags given here)")
    dc.set_defaults(func=cmd_discover)

    de = sub.add_parser("demo", help="the whole pipeline on the embedded shapes world with the shipped tiny CLIP",
                        description="Generate the shapes world, label its train split with the shipped CLIP, print "
                                    "the pseudo-label mAP of the global/avg/max/cdul aggregators, train a small "
                                    "classifier with latent label updates, export it to ONNX, report its test "
                                    "mAP with ONNX Runtime and write an HTML report (report/index.html).")
    demo_full, demo_quick = package_defaults("demo"), package_defaults("demo").get("quick", {})
    de.add_argument("--out", "-o", default="cdul-demo", help="work folder (default: ./cdul-demo)")
    de.add_argument("--quick", action="store_true",
                    help=f"the same six steps on a reduced world ({demo_quick.get('train_images')} train / "
                         f"{demo_quick.get('test_images')} test images, {demo_quick.get('train', {}).get('epochs')} "
                         "epochs): one to two minutes on 2 CPU cores")
    de.add_argument("--train-images", type=int, default=None,
                    help=f"images in the train split (default: {demo_full.get('train_images')})")
    de.add_argument("--test-images", type=int, default=None,
                    help=f"images in the test split (default: {demo_full.get('test_images')})")
    de.add_argument("--epochs", type=int, default=None,
                    help=f"classifier epochs (default: {demo_full.get('train', {}).get('epochs')})")
    de.add_argument("--skip-train", action="store_true", help="stop after the pseudo-label table")
    de.add_argument("--device", default="auto", help="auto, cpu or cuda")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.set_defaults(func=cmd_demo)
    return p


def cmd_label(args: dict) -> int:
    from .label.pipeline import LabelConfig, run_label

    args["dataset_options"] = {**(args.get("dataset_options") or {}), **_dataset_options(args)}
    progress = not args.pop("no_progress", False)
    cfg_dict = resolve("label", args, args.pop("config", None))
    cfg_dict["save"] = tuple(cfg_dict.get("save") or ())
    cfg = LabelConfig(**cfg_dict, progress=progress and sys.stderr.isatty())
    res = run_label(cfg)
    if env_rank() != 0:  # under torchrun rank 0 speaks for the job
        return 0
    status = "complete" if res.complete else "INCOMPLETE"
    now = f" ({res.labelled_now} by this run)" if res.labelled_now != res.labelled else ""
    print(f"{res.store}: {status}, {res.rows} images: {res.labelled} labelled{now}, {res.skipped} skipped, "
          f"{res.images_per_second:.1f} img/s")
    return 0


def _labelled_with(store: str) -> dict:
    """The label configuration saved beside ``store`` (``<store>.yaml``), following a rescored store, or the groups
    `discover --labels` wrote, to its source; empty when there is none (it only fills in options the user did not
    give)."""
    from pathlib import Path

    import yaml

    from .store.label_store import LabelStore

    path = store
    for _ in range(4):  # the store itself, then the stores it was discovered in or re-scored from
        try:
            data = yaml.safe_load(Path(f"{path}.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = {}
        if isinstance(data, dict) and "root" in data:
            return data
        try:
            with LabelStore.open(path, mode="r", verify=False) as st:
                path = st.meta.get("discovered_from") or (st.meta.get("rescored_from") or {}).get("store")
        except CdulError:
            return {}
        if not path:
            return {}
    return {}


def _store_dataset(args: dict):
    """The dataset a store's rows belong to: the flags given, else what the store and its saved config record."""
    from .datasets import load_dataset
    from .store.label_store import LabelStore

    opts = _dataset_options(args)
    name = args.get("dataset")
    if name is None:  # the store knows where it came from
        with LabelStore.open(args["labels"], mode="r", verify=False) as st:
            name = st.meta.get("dataset")
            args.setdefault("split", st.meta.get("split"))
        if name is None:
            raise CdulError("--dataset is needed: the store does not record its dataset")
        saved = _labelled_with(args["labels"])
        if saved.get("dataset") == name:
            args.setdefault("root", saved.get("root"))
            opts = {**(saved.get("dataset_options") or {}), **opts}
    return load_dataset(name, args.get("root"), args.get("split"), **opts)


def cmd_eval(args: dict) -> int:
    from .evaluate import evaluate_store, format_table, reports_json

    ds = _store_dataset(args)
    if args.get("sweep"):
        return _eval_sweep(args, ds)
    if args.get("sweep_out") or args.get("device"):
        raise CdulError("--sweep-out and --device belong to --sweep")
    reports, notes = evaluate_store(args["labels"], ds, args.get("array"), args.get("allow_incomplete", False))
    if args.get("json"):
        print(reports_json(reports, notes))
    else:
        for n in notes:
            print(f"note: {n}")
        print(format_table(reports, per_class=not args.get("summary", False)))
    return 0


def _eval_sweep(args: dict, ds) -> int:
    from ._backend import resolve_device
    from .label.sweep import format_sweep, run_sweep, write_sweep

    if args.get("array") or args.get("allow_incomplete") or args.get("summary"):
        raise CdulError("--sweep scores the store's embeddings: --array, --summary and --allow-incomplete do not apply")
    res = run_sweep(args["labels"], ds, args["sweep"], resolve_device(args.get("device") or "auto"))
    csv_path, png_path = write_sweep(res, args.get("sweep_out") or f"{args['labels']}.sweep")
    if args.get("json"):
        import json

        print(json.dumps({"sweep": [{"aggregator": a, "zeta": z, "lam": lam, "mAP": round(100 * m, 4)}
                                    for a, z, lam, m in res.rows()], "notes": res.notes,
                          "csv": str(csv_path), "png": str(png_path)}, indent=2))
        return 0
    for n in res.notes:
        print(f"note: {n}")
    print(format_sweep(res))
    print(f"wrote {csv_path} and {png_path}")
    return 0


def cmd_rescore(args: dict) -> int:
    from .label.rescore import RescoreConfig, run_rescore

    progress = not args.pop("no_progress", False)
    cfg_dict = resolve("rescore", args, args.pop("config", None))
    if cfg_dict.get("save") is not None:
        cfg_dict["save"] = tuple(cfg_dict["save"])
    res = run_rescore(RescoreConfig(**cfg_dict, progress=progress and sys.stderr.isatty()))
    print(f"{res.store}: {res.rows} rows: {res.labelled} labelled ({res.rescored_now} by this run), {res.skipped} "
          f"skipped, {res.rows_per_second:.0f} rows/s")
    return 0


def cmd_train(args: dict) -> int:
    from .train.trainer import TrainConfig, run_train

    args["dataset_options"] = {**(args.get("dataset_options") or {}), **_dataset_options(args)}
    progress = not args.pop("no_progress", False)
    cfg = TrainConfig(**resolve("train", args, args.pop("config", None)), progress=progress and sys.stderr.isatty())
    res = run_train(cfg)
    if env_rank() != 0:
        return 0
    last = res.last
    shown = ", ".join(f"{k} {last[k]:.2f}" for k in ("pseudo_map", "test_map") if last.get(k) is not None)
    print(f"{res.out}: {len(res.history) - 1} epochs{', ' + shown if shown else ''} ({res.seconds:.0f}s)")
    return 0


def cmd_export(args: dict) -> int:
    from .deploy.export import export_onnx

    rep = export_onnx(args["checkpoint"], args["out"], opset=args["opset"], atol=args["atol"])
    print(f"{rep['out']}: {rep['classes']} classes, input [N, 3, {rep['image_size']}, {rep['image_size']}], "
          f"max |onnxruntime - torch| = {rep['max_abs_diff']:.2e}")
    return 0


def cmd_predict(args: dict) -> int:
    from pathlib import Path

    from .datasets import load_dataset
    from .deploy.predict import open_model, predict_paths, write_scores
    from .errors import ConfigError
    from .evaluate import evaluate_scores, format_table

    cfg = resolve("predict", args)
    model = open_model(cfg["model"], cfg["device"])
    opts = _dataset_options(cfg)
    if cfg.get("images") and cfg.get("dataset"):
        raise ConfigError("pass either --images or --dataset, not both")
    if cfg.get("images"):
        opts.setdefault("classes", list(model.class_names))  # a list: names may hold commas, lists may be long
        ds = load_dataset("folder", cfg["images"], "all", **opts)
    elif cfg.get("dataset"):
        ds = load_dataset(cfg["dataset"], cfg.get("root"), cfg.get("split"), **opts)
    else:
        raise ConfigError("pass --images DIR or --dataset NAME (with --root/--split) to predict on")
    if tuple(ds.class_names) != model.class_names:
        raise ConfigError(f"the model's {len(model.class_names)} classes differ from {ds.name}'s "
                          f"{len(ds.class_names)}: {', '.join(model.class_names[:5])}, ...")
    scores, errors = predict_paths(model, list(ds.paths), cfg["batch_size"],
                                   progress=not cfg.get("no_progress") and sys.stderr.isatty())
    for r, why in sorted(errors.items()):
        print(f"skipped {ds.ids[r]}: {why}", file=sys.stderr)
    if cfg.get("out"):
        write_scores(Path(cfg["out"]), list(ds.ids), model.class_names, scores)
        print(f"{cfg['out']}: scores of {len(ds) - len(errors)} images ({model.provider})")
    if ds.labels is not None:
        import numpy as np

        rows = np.array([r for r in range(len(ds)) if r not in errors], dtype=np.int64)
        print(format_table({"onnx": evaluate_scores(scores, ds, rows)}, per_class=False))
    elif not cfg.get("out"):
        raise ConfigError("nothing to report: the images have no ground truth, pass --out FILE for the scores")
    return 0


def cmd_tags(args: dict) -> int:
    from .config import check_number
    from .deploy.tags import run_tags

    args = resolve("tags", args)
    chosen = [k for k in ("threshold", "auto", "top_k", "thresholds") if args.get(k) is not None]
    if len(chosen) > 1:
        raise CdulError("pass one of --threshold, --auto, --top-k and --thresholds")
    check_number("--threshold", args.get("threshold"), lo=0.0, hi=1.0, optional=True)
    check_number("--top-k", args.get("top_k"), lo=1, integer=True, optional=True)
    check_number("--min-score", args["min_score"], lo=0.0, hi=1.0)
    mode = {"threshold": "fixed", "auto": args.get("auto"), "top_k": "top-k", "thresholds": "file"}.get(
        chosen[0] if chosen else "threshold")
    ds = _store_dataset(args)
    res = run_tags(args["labels"], ds, args["out"], args["array"], mode, args.get("threshold"), args.get("top_k"),
                   args.get("thresholds"), args["min_score"], args.get("allow_incomplete", False))
    for n in res.notes:
        print(f"note: {n}")
    what = {"fixed": f"threshold {args.get('threshold') or 0.5:g}", "otsu": "per-class Otsu thresholds",
            "top-k": f"top {args.get('top_k')}", "file": f"thresholds of {args.get('thresholds')}"}[mode]
    print(f"{res.out}: {res.images} images, {res.tags} tags ({res.tags / max(res.images, 1):.1f} per image), "
          f"{what}; thresholds in {res.thresholds_file}")
    return 0


def cmd_report(args: dict) -> int:
    from pathlib import Path

    from .report.build import ReportConfig, build_report, is_run

    progress = not args.pop("no_progress", False)
    src = Path(args["source"])
    dataset = None
    if src.is_file():
        dataset = _store_dataset({**args, "labels": args["source"]})
    elif any(k in args for k in ("dataset", "classes", "labels_csv", "dataset_opt")) and is_run(src):
        raise CdulError("a run's dataset comes from its config.yaml: only --root (moved data) and --split apply")
    for k in ("dataset", "classes", "labels_csv", "dataset_opt"):
        args.pop(k, None)
    cfg = ReportConfig(**resolve("report", args), progress=progress and sys.stderr.isatty())
    res = build_report(cfg, dataset)
    print(f"report: {res.path.resolve()}")
    return 0


def cmd_discover(args: dict) -> int:
    from pathlib import Path

    from .discover.run import run
    from .discover.trainer import DiscoverConfig

    progress = not args.pop("no_progress", False)
    out = Path(args.pop("out"))
    cfg = DiscoverConfig(**resolve("discover", args, args.pop("config", None)))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; discover writes a folder (give a new or existing folder)")
    try:  # before training: a folder that cannot be made fails in a second, not after the run
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the --out folder {out}: {exc.strerror or exc}") from None
    if cfg.labels is not None:
        from .discover.run import run_store

        cfg.validate()
        ds = _store_dataset({k: v for k, v in (("labels", cfg.labels), ("dataset", cfg.dataset), ("root", cfg.root))
                             if v is not None})
        res = run_store(cfg, ds, out, progress=progress and sys.stderr.isatty(),
                        log=lambda s: print(s, file=sys.stderr))
        gt = res.get("ground_truth")
        scored = (f"; on the ground truth of {gt['scored_images']} images of unnamed classes: ACC "
                  f"{100 * gt['groups']['acc']:.1f} % (k-means on the CLIP embeddings "
                  f"{100 * gt['kmeans_on_clip_embeddings']['acc']:.1f} %)") if gt else ""
        print(f"{out}: {res['novel_groups']} new groups among {res['candidates']} poorly-scored images (sizes "
              f"{res['cluster_sizes']}); {res['labelled']} confident images of {len(res['known_classes'])} known "
              f"classes as the labelled set{scored}; contact sheets in {out / 'clusters'}")
        return 0
    res = run(cfg, out, progress=progress and sys.stderr.isatty(), log=lambda s: None)
    u, t = res["unlabelled_train"], res["held_out_novel"]
    km, known = res["kmeans_on_learned_features"]["acc"], res["known_head_accuracy"]
    print(f"{out}: novel classes {res['novel']}: ACC {100 * u['acc']:.1f} % (NMI {u['nmi']:.3f}, ARI {u['ari']:.3f}) "
          f"on the unlabelled images, {100 * t['acc']:.1f} % held out; k-means on the learned features "
          f"{100 * km:.1f} %; known classes {100 * known:.1f} %")
    return 0


def cmd_demo(args: dict) -> int:
    from .shapes.demo import run_demo

    return run_demo(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a bad flag, already printed: the status, for callers in-process
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    debug = ns.debug or os.environ.get("CDUL_FAST_DEBUG") == "1"
    if ns.command is None:
        parser.print_help()
        return 2
    func: Callable[[dict], int] = ns.func
    args = {k: v for k, v in vars(ns).items() if k not in ("func", "command", "debug")}
    try:
        if ns.command not in DISTRIBUTED_COMMANDS and env_world_size() > 1:
            exc = ConfigError(f"{ns.command} runs in one process (under torchrun only "
                              f"{' and '.join(DISTRIBUTED_COMMANDS)} are split over processes): start it without "
                              "torchrun")
            exc.from_rank0 = env_rank() != 0  # said once, by rank 0
            raise exc
        return func(args)
    except CdulError as exc:
        if debug:
            raise
        if not exc.from_rank0:  # rank 0 printed the error it shared with the other ranks
            print(f"cdul-fast {ns.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cdul-fast {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:  # a full disk, a read-only or foreign folder
            where = f" {exc.filename}" if exc.filename else ""
            print(f"cdul-fast {ns.command}: error: cannot write{where}: {exc.strerror or exc} (free space, or choose "
                  "another --out)", file=sys.stderr)
            return 2
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and missing.split(".")[0] != "cdul_fast":  # one of ours missing is a packaging bug: internal
            err = DependencyError(f"this command needs the Python package {missing!r}, which is not installed in "
                                  f"{sys.prefix}: reinstall cdul-fast (its dependencies include it) or pip install it")
            print(f"cdul-fast {ns.command}: error: {err}", file=sys.stderr)
            return err.exit_code
        print(f"cdul-fast {ns.command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
