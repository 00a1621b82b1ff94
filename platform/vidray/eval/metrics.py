"""Evaluation metrics with the conventions of REFERENCE.md.

Retrieval: R@1/5/10 and median rank (1-based) from a similarity matrix whose row i's correct
column is i; ties are broken pessimistically (a candidate scoring the same as the correct one
ranks above it), so a constant model scores at chance, never above it. Keys read
``t2v_R1`` for R@1 text -> video (MLflow metric names cannot hold "@").
"""

from __future__ import annotations

import numpy as np


def ranks_of_correct(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of the correct item (the diagonal) in each row, ties counted against it."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"need a square similarity matrix, got shape {similarity.shape}")
    correct = np.diag(similarity)[:, None]
    return (similarity >= correct).sum(axis=1)


def retrieval_metrics(similarity: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Text->video (rows = texts) and video->text metrics of a square similarity matrix."""
    out: dict[str, float] = {}
    for direction, matrix in (("t2v", similarity), ("v2t", np.asarray(similarity).T)):
        ranks = ranks_of_correct(matrix)
        for k in ks:
            out[f"{direction}_R{k}"] = float(np.mean(ranks <= k))
        out[f"{direction}_MdR"] = float(np.median(ranks))
    # What a random ranking scores on average, for each figure (the same both ways).
    n = len(similarity)
    out.update({f"chance_R{k}": min(k / n, 1.0) for k in ks})
    out["chance_MdR"] = (n + 1) / 2
    return out
