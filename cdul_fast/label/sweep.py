"""`cdul-fast eval --sweep`: the zeta x lambda grid of supplement 6.1 (and Table 3's aggregators) from one set of
stored embeddings.

One pass over the store's embedding blocks: the cosine scores of a block are computed once and every grid point runs
the same fused aggregation kernel as ``label`` on them, so each cell equals the mAP of a ``label`` run with that
zeta and lambda. Memory: one float32 [rows, classes] matrix per grid point held (NUS-WIDE's 161,789 train rows x 81
classes: 52 MB per point); a grid larger than ``memory_budget`` (2 GiB) is done in several passes over the embeddings.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..clip.prompts import encode_classes, prompts_from_meta
from ..datasets import MultiLabelSet
from ..errors import ConfigError
from ..evaluate import evaluate_scores, labelled_rows
from ..fsutil import write_text_atomic
from ..ops import dispatch as ops
from .rescore import block_embeddings, embedding_blocks, load_text_encoder, open_source

AXES = ("zeta", "lam")
BASELINES = ("global", "avg", "max")
MAX_POINTS = 400


def _frange(text: str, axis: str) -> list[float]:
    parts = text.split(":")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--sweep {axis}: {text!r} is not a number or start:stop:step range") from None
    if len(nums) != 3:
        raise ConfigError(f"--sweep {axis}: a range is start:stop:step, got {text!r}")
    start, stop, step = nums
    if not all(math.isfinite(v) for v in nums) or step <= 0 or stop < start:
        raise ConfigError(f"--sweep {axis}: range {text!r} needs finite start <= stop and step > 0")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    if n > MAX_POINTS:
        raise ConfigError(f"--sweep {axis}: {text!r} has {n} values (at most {MAX_POINTS})")
    return [round(start + i * step, 10) for i in range(n)]


def parse_sweep(text: str, defaults: dict[str, float]) -> dict[str, list[float]]:
    """``zeta=0:0.4:0.05,lam=0,1`` -> {"zeta": [0, 0.05, ..., 0.4], "lam": [0, 1]}; a value without ``=`` belongs to
    the axis before it; an axis not named keeps the store's value (``defaults``)."""
    axes: dict[str, list[float]] = {}
    current = None
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if "=" in token:
            current, token = (p.strip() for p in token.split("=", 1))
            if current not in AXES:
                raise ConfigError(f"--sweep axes are {', '.join(AXES)}, got {current!r}")
            if current in axes:
                raise ConfigError(f"--sweep names {current} twice")
            axes[current] = []
        if current is None:
            raise ConfigError(f"--sweep must start with an axis, e.g. zeta=0:0.4:0.05,lam=0,1 (got {text!r})")
        axes[current].extend(_frange(token, current) if ":" in token else [_number(token, current)])
    if not axes:
        raise ConfigError("--sweep needs at least one axis, e.g. zeta=0:0.4:0.05,lam=0,1")
    for axis in AXES:
        values = axes.get(axis) or [float(defaults[axis])]
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"--sweep {axis} values must lie in [0, 1], got {values}")
        axes[axis] = sorted(set(values))
    if len(axes["zeta"]) * len(axes["lam"]) > MAX_POINTS:
        raise ConfigError(f"--sweep has more than {MAX_POINTS} grid points")
    return {a: axes[a] for a in AXES}


def _number(token: str, axis: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ConfigError(f"--sweep {axis}: {token!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"--sweep {axis}: {token!r} is not finite")
    return value


@dataclass
class SweepResult:
    zetas: list[float]
    lams: list[float]
    cdul_map: np.ndarray  # [len(zetas), len(lams)], mAP in [0, 1]
    baselines: dict[str, float]
    images: int
    notes: list[str]

    def rows(self) -> list[tuple[str, float | None, float | None, float]]:
        out: list[tuple[str, float | None, float | None, float]] = [
            ("cdul", z, lam, float(self.cdul_map[i, j])) for i, z in enumerate(self.zetas)
            for j, lam in enumerate(self.lams)]
        out += [(a, None, None, m) for a, m in self.baselines.items()]
        return out


def run_sweep(path: str | Path, ds: MultiLabelSet, spec: str, device: torch.device, backend: str = "auto",
              block_rows: int = 2048, clip: str | None = None, clip_weights: str | None = None,
              memory_budget: int = 2 << 30) -> SweepResult:
    """mAP of CDUL's labels at every (zeta, lambda) of ``spec`` and of the global/avg/max aggregators, from the
    embeddings of the store ``path`` (its classes and prompts), against ``ds``'s ground truth."""
    if ds.labels is None:
        raise ConfigError(f"dataset {ds.name}/{ds.split} has no ground truth to sweep against")
    with open_source(path) as src:
        if tuple(ds.class_names) != src.class_names:
            raise ConfigError(f"{path} has other classes than {ds.name}/{ds.split}")
        rows, notes = labelled_rows(src, ds)
        axes = parse_sweep(spec, {"zeta": src.meta.get("zeta", 0.0), "lam": src.meta.get("lam", 1.0)})
        model = load_text_encoder(src.meta, device, clip, clip_weights)
        text = encode_classes(model, src.class_names, prompts_from_meta(src.meta))
        scale = float(src.meta.get("logit_scale", model.logit_scale))
        points = [(z, lam) for z in axes["zeta"] for lam in axes["lam"]]
        C = len(src.class_names)
        per_pass = max(1, int(memory_budget // max(src.rows * C * 4, 1)))  # grid points held per pass
        maps: list[float] = []
        baselines: dict[str, float] = {}
        for first in range(0, len(points), per_pass):
            group = points[first:first + per_pass]
            cdul = np.zeros((len(group), src.rows, C), dtype=np.float32)
            base = {a: np.zeros((src.rows, C), dtype=np.float32) for a in BASELINES} if not baselines else {}
            for block in embedding_blocks(src, rows, block_rows):
                r0, r1 = int(block[0]), int(block[-1]) + 1
                with torch.inference_mode():
                    cos = ops.cosine_scores(block_embeddings(src, block, device), text)
                    for k, (z, lam) in enumerate(group):
                        cdul[k, r0:r1] = ops.aggregate_scores(cos, scale, z, lam, ("cdul",), backend)["cdul"].cpu()
                    if base:
                        for a, v in ops.aggregate_scores(cos, scale, 0.0, 0.0, BASELINES, backend).items():
                            base[a][r0:r1] = v.cpu()
            maps += [evaluate_scores(cdul[k], ds, rows).map for k in range(len(group))]
            baselines = baselines or {a: evaluate_scores(base[a], ds, rows).map for a in BASELINES}
    maps_arr = np.array(maps)
    return SweepResult(zetas=axes["zeta"], lams=axes["lam"], cdul_map=maps_arr.reshape(len(axes["zeta"]), -1),
                       baselines=baselines, images=int(rows.size), notes=notes)


def format_sweep(res: SweepResult) -> str:
    """Rows zeta, columns lambda: CDUL's pseudo-label mAP (%), then the aggregators without zeta or lambda."""
    head = f"{'zeta':>6} " + " ".join(f"{'lam=' + format(lam, 'g'):>9}" for lam in res.lams)
    lines = [f"pseudo-label mAP (%) of cdul over {res.images} images", head, "-" * len(head)]
    for i, z in enumerate(res.zetas):
        lines.append(f"{z:>6g} " + " ".join(f"{100 * res.cdul_map[i, j]:9.2f}" for j in range(len(res.lams))))
    best = np.unravel_index(int(np.nanargmax(res.cdul_map)), res.cdul_map.shape)
    lines.append(f"best: zeta {res.zetas[best[0]]:g}, lam {res.lams[best[1]]:g} ({100 * res.cdul_map[best]:.2f})")
    lines.append("other aggregators: " + ", ".join(f"{a} {100 * m:.2f}" for a, m in res.baselines.items()))
    return "\n".join(lines)


def write_sweep(res: SweepResult, prefix: str | Path) -> tuple[Path, Path]:
    """``<prefix>.csv`` (aggregator, zeta, lam, mAP %) and ``<prefix>.png`` (a zeta x lambda heat map)."""
    import io

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["aggregator", "zeta", "lam", "map"])
    for agg, z, lam, m in res.rows():
        w.writerow([agg, "" if z is None else f"{z:g}", "" if lam is None else f"{lam:g}", f"{100 * m:.4f}"])
    csv_path = prefix.with_name(prefix.name + ".csv")
    write_text_atomic(csv_path, buf.getvalue())
    png_path = prefix.with_name(prefix.name + ".png")
    _heat_map(res, png_path)
    return csv_path, png_path


def _heat_map(res: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = 100 * res.cdul_map
    fig, ax = plt.subplots(figsize=(max(4.8, 2.2 + 1.1 * len(res.lams)), 1.6 + 0.42 * len(res.zetas)))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(res.lams)), [f"{v:g}" for v in res.lams])
    ax.set_yticks(range(len(res.zetas)), [f"{v:g}" for v in res.zetas])
    ax.set_xlabel("lambda (0 = average, 1 = max)")
    ax.set_ylabel("zeta")
    mid = np.nanmean(data)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if data[i, j] > mid else "white")
    others = ", ".join(f"{a} {100 * m:.1f}" for a, m in res.baselines.items())
    ax.set_title(f"cdul pseudo-label mAP (%), {res.images} images\n{others}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
