"""Mean average precision over classes, the metric of every multi-label table in the PositiveCoOp paper.

AP of a class = the mean, over its positive images, of the precision among the images ranked at or above that
positive. Equal to scikit-learn's `average_precision_score` when no two scores tie; ties are ranked in input
order. Unknown labels (−1) are left out; a class with no positive has no AP and is left out of the mean.

Images are ranked by the logit margin, `margin(logits)`, never by a softmax probability: logits reach ±100
(5 · 20 · cos), and an fp32 probability is exactly 1.0 (or 0.0) once the margin passes about 17, so
confident images would tie and the mAP would depend on the order of the test images. The margin orders
images exactly as the probability does where the probability does not saturate (p = sigmoid(margin) is
increasing).

Threshold metrics (precision P, recall R, F1; per class "C", overall "O") in the two conventions papers mix:
- ML-GCN / SSGRL: megvii-research/ML-GCN `util.py`, `AveragePrecisionMeter.evaluation` (+ `overall`,
  `overall_topk`); CF1 is the harmonic mean of CP and CR.
- ASL / DualCoOp / PositiveCoOp: Alibaba-MIIL/ASL `validate.py`, `validate_multi`, and the same lines in
  sunxm2357/DualCoOp `utils/validations.py`, `validate` (PositiveCoOp's `train.py` calls that `validate`);
  CF1 is the mean of the per-class F1 scores.
"""
import math

import numpy as np
import torch


def margin(logits):
    """(..., 2) logits -> (...) presence minus absence: the score every AP ranks by (softmax's p = sigmoid of
    it)."""
    return logits[..., 0] - logits[..., 1]


@torch.inference_mode()
def margins_of(head, loader, features_of):
    """(N, C) margins of every image `loader` yields ((images or features, labels, index) batches), in order.

    `features_of(batch)` gives the (B, L, D) features of a batch; the class embeddings are computed once.
    """
    mode = head.training
    head.eval()
    embeddings = head.class_embeddings()
    out = [margin(head.logits(features_of(batch), embeddings)).float().cpu()  # (B, C)
           for batch, _, _ in loader]
    head.train(mode)  # the mode it was found in
    return torch.cat(out) if out else torch.empty(0, 0)


def _scores_and_targets(scores, targets):
    """(N, C) scores, targets (arrays or tensors) -> float64 scores and targets on the CPU; checks shapes."""
    scores = torch.as_tensor(scores).detach().cpu().double()
    targets = torch.as_tensor(targets).detach().cpu()
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be "
                         f"(N, C)")
    return scores, targets


def average_precision(scores, targets):
    """(N, C) scores, (N, C) targets in {1, 0, −1} -> (C,) AP in [0, 1], NaN for a class with no positive.

    Numpy arrays or tensors. Sorting is torch's (multi-threaded): COCO's 40,504 × 80 take ~0.2 s on 2 cores.
    """
    scores, targets = _scores_and_targets(scores, targets)
    # (C, N) best first
    order = torch.sort(scores.t().contiguous(), dim=1, descending=True, stable=True).indices
    ranked = targets.t().gather(1, order)  # (C, N) labels in rank order
    positive = ranked == 1
    hits = positive.cumsum(dim=1)  # positives at or above each rank
    seen = (ranked >= 0).cumsum(dim=1)  # known labels at or above each rank
    precision = hits.double() / seen.clamp(min=1)
    n_pos = positive.sum(dim=1)
    ap = (precision * positive).sum(dim=1) / n_pos  # 0 / 0 = NaN for a class with no positive
    return ap.numpy()


def mean_average_precision(scores, targets):
    """(mAP in percent, (C,) APs in [0, 1]): the mean over the classes that have a positive; NaN for the
    others.

    Raises ValueError when no class has a positive (the mAP is undefined)."""
    ap = average_precision(scores, targets)
    if np.isnan(ap).all():
        raise ValueError("no class has a positive label: mAP is undefined")
    return 100.0 * float(np.nanmean(ap)), ap


def ap_by_class(classnames, ap):
    """{class name: AP in percent, or None (JSON null) for a class with no positive test label}."""
    return {name: None if np.isnan(a) else 100.0 * float(a) for name, a in zip(classnames, ap)}


# Threshold metrics. Inputs are (N, C) logit margins; a probability threshold t becomes the margin threshold
# logit(t), since p = sigmoid(margin) is increasing: p >= t <=> margin >= logit(t), exactly in real numbers.
# At t = 0.5, logit(t) is exactly 0.0: a margin of exactly 0 is a tie, predicted by ML-GCN (>=), not ASL (>).
# For other t, logit(t) is rounded to float64 and an fp32 probability saturates (see above), so a margin
# within an ulp of logit(t) may land on the other side than a comparison of stored probabilities puts it.

METRIC_NAMES = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def margin_threshold(threshold):
    """Probability threshold t in (0, 1) -> margin threshold logit(t) = log(t / (1 - t)) (0.0 at t = 0.5)."""
    t = float(threshold)
    if not 0.0 < t < 1.0:  # also rejects NaN
        raise ValueError(f"threshold {threshold!r} must be a probability strictly between 0 and 1, e.g. 0.5")
    return math.log(t / (1.0 - t))


def top_k_mask(scores, k):
    """(N, C) scores -> (N, C) bool, True at each image's k highest scores; ties go to the lower class."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (N, C) best first
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :k], True)


def label_counts(predicted, targets):
    """(N, C) bool predictions, targets in {1, 0, −1} -> (C,) Ng (positives), Np (predicted), Nc (correct).

    Unknown (−1) entries are left out of all three counts."""
    known, positive = targets >= 0, targets == 1
    predicted = predicted & known
    n_pos, n_pred, n_correct = positive.sum(0), predicted.sum(0), (predicted & positive).sum(0)
    return n_pos.double(), n_pred.double(), n_correct.double()


def _percent(numerator, denominator):
    """100 · numerator / denominator as a float, None (JSON null) when the denominator is 0."""
    return None if denominator == 0 else 100.0 * float(numerator / denominator)


def _harmonic(p, r):
    """F1 of a precision and a recall in percent: None if either is undefined, 0 when both are 0."""
    if p is None or r is None:
        return None
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def mlgcn_metrics(n_pos, n_pred, n_correct):
    """(C,) Ng, Np, Nc -> {CP, CR, CF1, OP, OR, OF1} in percent, as ML-GCN `AveragePrecisionMeter.evaluation`.

    OP = ΣNc / ΣNp, OR = ΣNc / ΣNg, CP = mean_c Nc/Np, CR = mean_c Nc/Ng; each F1 = harmonic mean of P, R.
    As there, Np is taken as 1 for a never-predicted class, in CP and in OP's sum. A class with no positive
    (Ng = 0; their CR is NaN then) is left out of CR's mean; it still counts in CP, as in their code."""
    n_pred = n_pred.clamp(min=1)  # util.py: Np[Np == 0] = 1
    has_pos = n_pos > 0
    cp = _percent((n_correct / n_pred).sum(), len(n_pred))
    cr = _percent((n_correct[has_pos] / n_pos[has_pos]).sum(), int(has_pos.sum()))
    op = _percent(n_correct.sum(), n_pred.sum())
    o_r = _percent(n_correct.sum(), n_pos.sum())
    return {"CP": cp, "CR": cr, "CF1": _harmonic(cp, cr), "OP": op, "OR": o_r, "OF1": _harmonic(op, o_r)}


def asl_metrics(n_pos, n_pred, n_correct):
    """(C,) Ng, Np, Nc -> {CP, CR, CF1, OP, OR, OF1} in percent, as ASL's `validate_multi` (and DualCoOp's).

    Per class: P = Nc/Np, R = Nc/Ng, F1 = 2PR/(P+R), all three 0 for a class with no true positive (Nc = 0);
    CP, CR, CF1 = their means over all C classes. OP = ΣNc/ΣNp, OR = ΣNc/ΣNg, OF1 = harmonic mean of
    them."""
    p = n_correct / n_pred.clamp(min=1)  # 0 when Nc = 0 (also when Np or Ng is 0)
    r = n_correct / n_pos.clamp(min=1)
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    c = len(n_pos)
    op, o_r = _percent(n_correct.sum(), n_pred.sum()), _percent(n_correct.sum(), n_pos.sum())
    return {"CP": _percent(p.sum(), c), "CR": _percent(r.sum(), c), "CF1": _percent(f1.sum(), c),
            "OP": op, "OR": o_r, "OF1": _harmonic(op, o_r)}


def threshold_metrics(margins, targets, threshold=0.5, top_k=3):
    """(N, C) margins, (N, C) targets in {1, 0, −1} -> the six metrics in percent in both conventions
    (JSON).

    ML-GCN predicts a label when p >= t (margin >= logit(t)); its top-k variant (`overall_topk`) also needs
    the label among the image's k highest margins: ranks are over all C classes, unknown ones included, ties
    to the lower class index (theirs: torch.topk's order). ASL predicts when p > t (strictly). Unknown labels
    are left out of every count (ML-GCN's `overall` makes them negatives; ASL's code has no unknowns: there a
    −1 label with pred 0 would count as a false positive).
    None (JSON null) where a value is undefined (0 / 0)."""
    margins, targets = _scores_and_targets(margins, targets)
    if margins.shape[1] == 0:
        raise ValueError("margins have no class (C = 0): threshold metrics are undefined")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k {top_k!r} must be a whole number >= 1 (ML-GCN reports top-3)")
    cut = margin_threshold(threshold)
    over = margins >= cut  # (N, C)
    in_top = top_k_mask(margins, min(int(top_k), margins.shape[1]))  # (N, C); all classes when C <= k
    return {"threshold": float(threshold), "top_k": int(top_k),
            "mlgcn": {"at_threshold": mlgcn_metrics(*label_counts(over, targets)),
                      "top_k": mlgcn_metrics(*label_counts(over & in_top, targets))},
            "asl": {"at_threshold": asl_metrics(*label_counts(margins > cut, targets))}}


def scores_of_margins(margins, targets, threshold=0.5, top_k=3):
    """{"map": mAP in percent, "ap": (C,) APs, "metrics": threshold_metrics} of (N, C) margins: what run.py
    reports of its test split, and predict --evaluate again."""
    mean_ap, ap = mean_average_precision(margins, targets)
    return {"map": mean_ap, "ap": ap, "metrics": threshold_metrics(margins, targets, threshold, top_k)}


def format_metrics(metrics):
    """The dict of `threshold_metrics` -> a short text table, one row per convention, values in percent."""
    t, k = metrics["threshold"], metrics["top_k"]
    rows = [(f"ML-GCN (score >= {t:g}, CF1 = harmonic mean of CP and CR)", metrics["mlgcn"]["at_threshold"]),
            (f"ML-GCN top-{k} (in top {k} and score >= {t:g})", metrics["mlgcn"]["top_k"]),
            (f"ASL (score > {t:g}, CF1 = mean of per-class F1)", metrics["asl"]["at_threshold"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'threshold metrics (%)':<{width}}" + "".join(f"{m:>7}" for m in METRIC_NAMES)]
    for name, values in rows:
        cells = ("—" if values[m] is None else f"{values[m]:.2f}" for m in METRIC_NAMES)
        lines.append(f"{name:<{width}}" + "".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)
