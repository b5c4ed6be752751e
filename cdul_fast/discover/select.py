"""Choosing the WTA threshold mu without looking at the novel classes (Jia et al., section 4.4).

The paper picks mu (and k) on the labelled data alone: part of the known classes pretend to be unlabelled, the method
runs on that split for each candidate, and the candidate that clusters the pretend-novel classes best wins. Here
``pseudo_novel_count`` known classes play the novel ones (as many as the real novel classes, leaving at least two
labelled classes for CE and NCE-C), and the score is the Hungarian ACC on their training items, averaged over
``select_folds`` rotations of which known classes pretend (on digits one split's score swings by 30 points when a run
merges two classes, so one split alone picks by luck).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError
from .data import DiscoverData


def pseudo_novel_count(data: DiscoverData) -> int:
    """How many known classes pretend to be novel: the real novel count, leaving at least two labelled classes."""
    return min(len(data.novel), len(data.known) - 2)


def pseudo_split(data: DiscoverData, fold: int = 0, folds: int = 1) -> DiscoverData:
    """The known classes only, ``pseudo_novel_count`` of them unlabelled: no novel-class item is used. Fold f of
    ``folds`` rotates the known classes by f * len(known) // folds first, so folds pretend with different classes."""
    m = pseudo_novel_count(data)
    if m < 2:
        raise ConfigError(f"--wta-mu-fraction auto needs at least 4 known classes (2 labelled, 2 pretending to be "
                          f"novel), got {len(data.known)}; give a number instead")
    r = fold * len(data.known) // folds
    order = data.known[r:] + data.known[:r]
    known, novel = tuple(sorted(order[:-m])), tuple(sorted(order[-m:]))
    tr, te = np.isin(data.y_train, data.known), np.isin(data.y_test, data.known)
    y_tr = data.y_train[tr]
    return dataclasses.replace(data, name=f"{data.name} (known-class split)", x_train=data.x_train[np.flatnonzero(tr)],
                               y_train=y_tr, labelled=np.isin(y_tr, known), x_test=data.x_test[np.flatnonzero(te)],
                               y_test=data.y_test[te], known=known, novel=novel)  # modality, views, encoder kept


def select_mu(data: DiscoverData, cfg, run: Callable, log: Callable[[str], None] = lambda s: None
              ) -> tuple[float, dict[float, float]]:
    """The candidate mu / H with the best fold-mean pretend-novel ACC (ties: the smaller mu) and every candidate's
    fold-mean score.

    ``run(data, cfg)`` trains and returns a result with ``train_novel.acc`` (the trainer's ``run_discover``; passed in
    so this module does not import the trainer)."""
    splits = [pseudo_split(data, f, cfg.select_folds) for f in range(cfg.select_folds)]
    scores: dict[float, float] = {}
    for mu in cfg.mu_candidates:
        accs = [float(run(split, dataclasses.replace(cfg, wta_mu_fraction=float(mu), epochs=cfg.select_epochs))
                      .train_novel.acc) for split in splits]
        scores[float(mu)] = float(np.mean(accs))
        log(f"mu / H {mu:.2f}: pretend-novel ACC {100 * scores[float(mu)]:.1f} % "
            f"({', '.join(f'{100 * a:.1f}' for a in accs)})")
    best = max(scores, key=lambda m: (scores[m], -m))
    return best, scores
