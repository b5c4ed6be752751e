"""The `cdul-fast` command line: label, eval, train, export, predict, demo.

Every flag is documented in --help with its default. Errors a user can fix print one line and exit 2; a
traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import package_defaults, parse_kv, resolve
from .errors import CdulError

SUPPRESS = argparse.SUPPRESS


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class _Flags:
    """Adds flags whose defaults come from the command's YAML and only records values given explicitly."""

    def __init__(self, parser: argparse.ArgumentParser, command: str) -> None:
        self.parser = parser
        self.defaults = package_defaults(command)

    def add(self, *names: str, help: str, key: str | None = None, **kw) -> None:  # noqa: A002 - argparse's name
        dest = key or names[0].lstrip("-").replace("-", "_")
        if dest in self.defaults and kw.get("action") not in ("store_true", "store_false"):
            shown = self.defaults[dest]
            help = f"{help} (default: {shown if shown not in (None, [], {}) else 'none'})"
        self.parser.add_argument(*names, dest=dest, default=SUPPRESS, help=help, **kw)


def _dataset_flags(f: _Flags, required_root: bool = False) -> None:
    f.add("--dataset", help="dataset in its official layout: voc2007, voc2012, coco, nus, folder, shapes")
    f.add("--root", help="the dataset's folder (VOCdevkit, COCO root, NUS-WIDE root, image folder)",
          required=required_root)
    f.add("--split", help="split to read (voc: train/val/trainval/test, coco: train/val, nus: train/test)")
    f.add("--classes", help="folder datasets: class names, comma-separated or a .txt file with one per line")
    f.add("--labels-csv", help="folder datasets: CSV of ground truth (path,<class>... with 0/1/-1, or path,labels)")
    f.add("--dataset-opt", action="append", metavar="KEY=VALUE",
          help="adapter option, repeatable (e.g. difficult=ignore for VOC, images_dir=Flickr for NUS, n=500 for "
               "shapes)")


def _dataset_options(args: dict) -> dict:
    opts = parse_kv(args.pop("dataset_opt", None))
    if "classes" in args:
        opts["classes"] = args.pop("classes")
    if "labels_csv" in args:
        opts["labels"] = args.pop("labels_csv")
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    f.add("--clip-precision", choices=["auto", "fp32", "fp16", "bf16"], help="encoder precision")
    f.add("--template", help="prompt template; '{}' is replaced by the class name")
    f.add("--grid", type=int, help="G: the image is cut into G x G snippets")
    f.add("--zeta", type=float, help="min-max threshold: a class keeps its max snippet score if it reaches zeta")
    f.add("--lam", type=float, help="lambda: 0 = average of global and aggregate scores, 1 = their max")
    f.add("--aggregator", choices=["global", "avg", "max", "cdul"], help="aggregator stored as 'final' (Table 3)")
    f.add("--save", type=_csv, help="extra arrays to store, comma-separated: global,aggregate,cdul,avg,max")
    f.add("--batch-size", type=int, help="images per encoder batch; a resumed run must use the same value")
    f.add("--decoder", choices=["auto", "dali", "torchvision"], help="image decode + tiling path")
    f.add("--workers", type=int, help="decode workers")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--backend", choices=["auto", "triton", "torch"], help="aggregation kernel")
    f.add("--seed", type=int, help="seed (random CLIP init)")
    f.add("--flush-every", type=int, help="msync the store every N batches")
    f.add("--resume", action="store_true", help="continue an interrupted store (same settings required)")
    f.add("--overwrite", action="store_true", help="replace an existing store")
    f.add("--no-progress", action="store_true", help="no progress bar", key="no_progress")
    f.add("--config", help="YAML file of option values (overridden by flags given here)")
    lab.set_defaults(func=cmd_label)

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
    ev.set_defaults(func=cmd_eval)
    return p


def cmd_label(args: dict) -> int:
    from .label import LabelConfig, run_label

    args["dataset_options"] = {**(args.get("dataset_options") or {}), **_dataset_options(args)}
    progress = not args.pop("no_progress", False)
    cfg_dict = resolve("label", args, args.pop("config", None))
    cfg_dict["save"] = tuple(cfg_dict.get("save") or ())
    cfg = LabelConfig(**cfg_dict, progress=progress and sys.stderr.isatty())
    res = run_label(cfg)
    status = "complete" if res.complete else "INCOMPLETE"
    print(f"{res.store}: {status}, {res.labelled} images labelled, {res.skipped} skipped, "
          f"{res.images_per_second:.1f} img/s")
    return 0


def cmd_eval(args: dict) -> int:
    from .datasets import load_dataset
    from .evaluate import evaluate_store, format_table, reports_json
    from .store import LabelStore

    opts = _dataset_options(args)
    name = args.get("dataset")
    if name is None:  # the store knows where it came from
        with LabelStore.open(args["labels"], mode="r", allow_incomplete=True) as st:
            name = st.meta.get("dataset")
            args.setdefault("split", st.meta.get("split"))
        if name is None:
            raise CdulError("--dataset is needed: the store does not record its dataset")
    ds = load_dataset(name, args.get("root"), args.get("split"), **opts)
    reports, notes = evaluate_store(args["labels"], ds, args.get("array"), args.get("allow_incomplete", False))
    if args.get("json"):
        print(reports_json(reports, notes))
    else:
        for n in notes:
            print(f"note: {n}")
        print(format_table(reports, per_class=not args.get("summary", False)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    debug = ns.debug or os.environ.get("CDUL_FAST_DEBUG") == "1"
    if ns.command is None:
        parser.print_help()
        return 2
    func: Callable[[dict], int] = ns.func
    args = {k: v for k, v in vars(ns).items() if k not in ("func", "command", "debug")}
    try:
        return func(args)
    except CdulError as exc:
        if debug:
            raise
        print(f"cdul-fast {ns.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cdul-fast {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"cdul-fast {ns.command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
