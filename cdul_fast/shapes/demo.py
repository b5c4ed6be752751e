"""`cdul-fast demo`: label -> eval (Table 3 on the shapes world) -> train -> export -> predict -> report, in one
command."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..config import package_defaults


def _log(msg: str) -> None:
    print(msg, flush=True)


def _with_n(opts: dict, n: int | None) -> dict:
    return dict(opts, n=n) if n else dict(opts)


def demo_settings(quick: bool) -> dict:
    """demo.yaml, with its ``quick:`` section applied for --quick (``train:`` keys merged, the rest replaced)."""
    cfg = package_defaults("demo")
    quick_cfg = cfg.pop("quick", None) or {}
    if quick:
        for key, value in quick_cfg.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _dataset_flags(root: Path, split: str, opts: dict) -> str:
    flags = f"--dataset shapes --root {shlex.quote(str(root))} --split {split}"
    return flags + "".join(f" --dataset-opt {shlex.quote(f'{k}={v}')}" for k, v in opts.items())


def where_to_look(out: Path, root: Path, train_opts: dict, test_opts: dict, trained: bool) -> list[str]:
    """The closing lines: each output of the demo and a command that shows it."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    lines = ["Outputs:",
             f"  shapes world              {root}/ (train/, test/: JPEGs + manifest.json)",
             f"  label store (train)       {out / 'train.cdul'}"]
    cmds = [f"cdul-fast eval --labels {q(out / 'train.cdul')} {_dataset_flags(root, 'train', train_opts)}"]
    report = [f"  HTML report               {out / 'report' / 'index.html'} (open it in a browser)"]
    if trained:
        lines += [f"  training run              {out / 'run'}/ (config.yaml, log.csv, checkpoint.pt, model.*)",
                  f"  curves                    {out / 'run' / 'curves.png'}",
                  f"  ONNX model                {out / 'model.onnx'}",
                  f"  test predictions          {out / 'test_scores.csv'}"]
        cmds += [f"cdul-fast predict --model {q(out / 'model.onnx')} {_dataset_flags(root, 'test', test_opts)}",
                 f"cdul-fast predict --model {q(out / 'model.onnx')} --images {q(root / 'test')} "
                 f"--out {q(out / 'my_scores.csv')}",
                 f"column -s, -t < {q(out / 'run' / 'log.csv')}",
                 f"head -3 {q(out / 'test_scores.csv')}"]
    cmds.append(f"xdg-open {q(out / 'report' / 'index.html')}")
    return lines + report + ["Look at them:"] + [f"  {c}" for c in cmds]


def run_demo(args: dict) -> int:
    from ..datasets import load_dataset
    from ..deploy.export import export_onnx
    from ..deploy.predict import open_model, predict_paths, write_scores
    from ..evaluate import evaluate_scores, evaluate_store, format_table
    from ..label.pipeline import LabelConfig, run_label
    from ..train.trainer import TrainConfig, run_train

    cfg = demo_settings(bool(args.get("quick")))
    out = Path(args.get("out") or "cdul-demo")
    progress = not args.get("no_progress") and sys.stderr.isatty()
    device = args.get("device", "auto")
    t0 = time.perf_counter()
    root = out / "shapes"
    opts = dict(cfg.get("dataset_options") or {})
    _log(f"[1/6] generating the shapes world{' (reduced: --quick)' if args.get('quick') else ''} in {root}")
    train_opts = _with_n(opts, args.get("train_images") or cfg.get("train_images"))
    test_opts = _with_n(opts, args.get("test_images") or cfg.get("test_images"))
    train_ds = load_dataset("shapes", root, "train", **train_opts)
    test_ds = load_dataset("shapes", root, "test", **test_opts)
    _log(f"      {len(train_ds)} train / {len(test_ds)} test images, {train_ds.num_classes} classes")

    _log("[2/6] labelling the train split with the shipped CLIP (no annotation used)")
    store = out / "train.cdul"
    lcfg = LabelConfig(out=str(store), dataset="shapes", root=str(root), split="train",
                       dataset_options=train_opts, save=("global", "aggregate", "avg", "max", "cdul"),
                       overwrite=True, device=device, progress=progress,
                       **cfg["label"])
    res = run_label(lcfg, log=lambda s: _log("      " + s), dataset=train_ds)
    _log(f"      {res.labelled} images in {res.seconds:.1f}s ({res.images_per_second:.1f} img/s)")
    reports, _ = evaluate_store(store, train_ds, ["global", "avg", "max", "cdul"])
    _log("\nPseudo-label mAP (%) on the train split by aggregator (paper Table 3):")
    _log(format_table(reports, per_class=False))
    summary = {f"pseudo labels (train), {k}": r.map * 100 for k, r in reports.items()}
    if args.get("skip_train"):
        _log("\nwriting the report of the label store (per-class AP, score distributions, tags)")
        report = _report(store, out, device, progress, train_ds)
        _log("")
        for line in where_to_look(out, root, train_opts, test_opts, trained=False):
            _log(line)
        _log(f"done in {time.perf_counter() - t0:.0f}s")
        _log(f"report: {report.resolve()}")
        return 0

    _log("\n[3/6] training the classifier (KL loss, latent pseudo-label updates after the warm-up)")
    tc = dict(cfg["train"])
    if args.get("epochs"):
        tc["epochs"] = args["epochs"]
    tcfg = TrainConfig(labels=str(store), out=str(out / "run"), dataset="shapes", root=str(root), split="train",
                       test_split="test", dataset_options=train_opts, test_dataset_options=test_opts,
                       overwrite=True, device=device,
                       progress=progress, **tc)
    tres = run_train(tcfg, log=lambda s: _log("      " + s))
    last = tres.last
    summary["pseudo labels after training (train)"] = last.get("pseudo_map")
    summary["classifier, torch (test)"] = last.get("test_map")

    _log("\n[4/6] exporting to ONNX")
    onnx_path = out / "model.onnx"
    rep = export_onnx(out / "run", onnx_path)
    _log(f"      {onnx_path}: max |onnxruntime - torch| = {rep['max_abs_diff']:.1e}")

    _log("[5/6] predicting the test split with ONNX Runtime")
    model = open_model(onnx_path, "auto")
    scores, errors = predict_paths(model, list(test_ds.paths), 64, progress=progress)
    summary["classifier, ONNX Runtime (test)"] = evaluate_scores(scores, test_ds).map * 100
    write_scores(out / "test_scores.csv", list(test_ds.ids), model.class_names, scores)

    test_store = out / "test.cdul"
    run_label(LabelConfig(out=str(test_store), dataset="shapes", root=str(root), split="test",
                          dataset_options=test_opts,
                          save=(), overwrite=True, device=device, progress=False, **cfg["label"]),
              log=lambda s: None, dataset=test_ds)
    test_reports, _ = evaluate_store(test_store, test_ds, ["final"])
    summary["pseudo labels of the test split, cdul (reference)"] = test_reports["final"].map * 100

    _log("[6/6] writing the report (curves, per-class AP, tags, class activation maps)")
    report = _report(out / "run", out, device, progress)

    _log("\nSummary (mAP %):")
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        _log(f"  {k:<{width}}  {v:6.2f}" if v is not None else f"  {k:<{width}}     n/a")
    _log("")
    for line in where_to_look(out, root, train_opts, test_opts, trained=True):
        _log(line)
    _log(f"done in {time.perf_counter() - t0:.0f}s")
    _log(f"report: {report.resolve()}")
    return 0


def _report(source: Path, out: Path, device: str, progress: bool, dataset=None) -> Path:
    """The HTML report of the run (or, without training, of the label store) in ``out/report``."""
    from ..report.build import ReportConfig, build_report

    res = build_report(ReportConfig(source=str(source), out=str(out / "report"), device=device, progress=progress),
                       dataset)
    _log(f"      {res.path} ({res.seconds:.0f}s)")
    return res.path
