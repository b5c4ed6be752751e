"""How the field scores a clustering: accuracy under the best one-to-one assignment of clusters to classes
(Hungarian, scipy), plus NMI and ARI (scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """max over one-to-one maps e of mean(y_true == e(y_pred)); clusters beyond the class count score 0."""
    from scipy.optimize import linear_sum_assignment

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return float("nan")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / y_true.size


@dataclass
class ClusterScores:
    acc: float
    nmi: float
    ari: float

    def as_dict(self) -> dict:
        return {"acc": self.acc, "nmi": self.nmi, "ari": self.ari}


def cluster_scores(y_true: np.ndarray, y_pred: np.ndarray) -> ClusterScores:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return ClusterScores(cluster_accuracy(y_true, y_pred), float(normalized_mutual_info_score(y_true, y_pred)),
                         float(adjusted_rand_score(y_true, y_pred)))
