"""One block of view embeddings to the arrays of a label store: the math `label`, `rescore` and the eval sweep share.

``label`` computes normalized embeddings from images, ``rescore`` and ``eval --sweep`` read them from a store; both
then run exactly this, so re-scoring float32 embeddings with the settings of a label run gives its arrays bit for
bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import dispatch as ops

EMBEDDINGS = "embeddings"
"""The store tensor of L2-normalized view embeddings [rows, 1 + G^2, K] (``label --save-embeddings``)."""
EMBEDDING_DTYPES = {"fp16": "float16", "fp32": "float32"}


def label_arrays(aggregator: str, save: tuple[str, ...] | list[str]) -> list[str]:
    """The store's label arrays: ``final`` (the chosen aggregator) first, then the extra ones asked for."""
    return ["final", *[a for a in save if a != "final"]]


def normalize_embeddings(feats: torch.Tensor) -> torch.Tensor:
    """float32 unit-length view embeddings: what is stored, and what the cosine scores are computed from."""
    return F.normalize(feats.float(), dim=-1)


def score_block(emb: torch.Tensor, text: torch.Tensor, logit_scale: float, zeta: float, lam: float,
                aggregator: str, arrays: list[str], backend: str = "auto") -> dict[str, torch.Tensor]:
    """The label arrays [B, C] of normalized view embeddings [B, V, K] against class embeddings [C, K]."""
    cos = ops.cosine_scores(emb.float(), text)
    outputs = sorted({aggregator, *[a for a in arrays if a != "final"]})
    scores = ops.aggregate_scores(cos, logit_scale, zeta, lam, outputs, backend=backend)
    values = {"final": scores[aggregator]}
    values.update({a: scores[a] for a in arrays if a != "final"})
    return values
