"""Mean average precision over classes, the metric of every multi-label table in the PositiveCoOp paper.

AP of a class = the mean, over its positive images, of the precision among the images ranked at or above that
positive. Equal to scikit-learn's `average_precision_score` when no two scores tie; ties are ranked in input
order. Unknown labels (−1) are left out; a class with no positive has no AP and is left out of the mean.
"""
import numpy as np


def average_precision(scores, targets):
    """(N, C) scores, (N, C) targets in {1, 0, −1} -> (C,) AP in [0, 1], NaN for a class with no positive."""
    scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    targets = np.asarray(targets.detach().cpu() if hasattr(targets, "detach") else targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C)")
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, C) best first, per class
    ranked = np.take_along_axis(targets, order, axis=0)  # (N, C) labels in rank order
    positive = (ranked == 1).astype(np.float64)
    known = (ranked >= 0).astype(np.float64)
    hits = positive.cumsum(axis=0)  # positives at or above each rank
    seen = known.cumsum(axis=0)  # known labels at or above each rank
    precision = np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)
    n_pos = positive.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (precision * positive).sum(axis=0) / n_pos, np.nan)


def mean_average_precision(scores, targets):
    """Mean of the per-class APs over classes that have a positive, in percent."""
    ap = average_precision(scores, targets)
    if np.isnan(ap).all():
        raise ValueError("no class has a positive label: mAP is undefined")
    return 100.0 * float(np.nanmean(ap))
