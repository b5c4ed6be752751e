"""The baselines of the paper's Tables 1 and 3 on the same data and loop: k-means on learned features, and the
ablations as switches of ``DiscoverConfig`` (a network trained with CE alone gives Table 1's "supervised"
features)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .data import DiscoverData
from .metrics import ClusterScores, cluster_scores
from .model import DiscoveryNet
from .trainer import DiscoverConfig, features

ABLATIONS: dict[str, dict] = {
    "full": {},
    "-MSE": {"use_mse": False},
    "-BCE": {"use_bce": False},
    "-NCE-I": {"use_nce_i": False},
    "-NCE-C": {"use_nce_c": False},
    "-CL": {"use_nce_i": False, "use_nce_c": False},
    "supervised only": {"use_bce": False, "use_mse": False, "use_nce_i": False, "use_nce_c": False},
}


def variant(cfg: DiscoverConfig, name: str) -> DiscoverConfig:
    return dataclasses.replace(cfg, **ABLATIONS[name])


def kmeans_scores(model: DiscoveryNet, data: DiscoverData, device, seed: int = 0) -> ClusterScores:
    """k-means (k = the novel class count, 10 restarts) on z-bar of the unlabelled training items."""
    from sklearn.cluster import KMeans

    feats = features(model, data.x_train[data.unlabelled], device)
    pred = KMeans(n_clusters=len(data.novel), n_init=10, random_state=seed).fit_predict(feats.astype(np.float64))
    return cluster_scores(data.y_train[data.unlabelled], pred)
