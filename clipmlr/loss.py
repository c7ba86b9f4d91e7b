"""Asymmetric loss for partial labels on a 2-way (presence, absence) softmax.

Ridnik et al., "Asymmetric Loss for Multi-Label Classification" (ICCV 2021), Eq. 1-4, in the form DualCoOp and
PositiveCoOp train with: the probabilities of presence and absence come from a softmax over each class's two
logits, and labels that are unknown (−1) contribute nothing.
"""
import torch


def asymmetric_loss(logits, targets, gamma_pos=1.0, gamma_neg=2.0, clip=0.05, eps=1e-6):
    """(B, C, 2) logits, (B, C) targets in {1, 0, −1} -> scalar sum over the known labels.

    p, q = softmax(logits) (presence, absence); q_c = min(q + clip, 1) (shifting the absence probability
    down-weights easy negatives)
      y = 1:  −(1 − p)^γ+ · log(max(p, eps))
      y = 0:  −(1 − q_c)^γ− · log(max(q_c, eps))
    q is the softmax's own absence output, not 1 − p: when p is near 1, 1 − p keeps few correct digits and
    the gradient through it loses them (the authors' code takes q from the softmax too). Computed in at least
    float32, never below the input's precision. The focusing weights (1 − ·)^γ are constants for the
    gradient (no_grad), as in the reference code.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 up, float64 kept
    p, q = torch.softmax(logits, dim=-1).unbind(dim=-1)  # (B, C) each: presence, absence
    if clip > 0:
        q = (q + clip).clamp(max=1)
    positive, negative = targets == 1, targets == 0
    with torch.no_grad():
        weight = torch.where(positive, (1 - p) ** gamma_pos, (1 - q) ** gamma_neg)
    loss = torch.where(positive, torch.log(p.clamp(min=eps)), torch.log(q.clamp(min=eps)))
    return -(weight * loss * (positive | negative)).sum()


def loss_weight_rule(known_fraction, weight_at_half=0.03):
    """The default loss weight: 0.03 · 0.5 / (fraction of training labels known).

    The loss is a sum over the known labels, so with 10% of labels it has a fifth of the terms it has with
    50%, and a fifth of the gradient. The authors use 0.03 at 50% (their README) and "larger for smaller
    fractions" without publishing the values; this rule keeps the expected number of summed terms, times the
    weight, what it is at 50% with 0.03 (10%: 0.15; 100%: 0.015).
    """
    return weight_at_half * 0.5 / known_fraction
