"""Asymmetric loss for partial labels on a 2-way (presence, absence) softmax.

Ridnik et al., "Asymmetric Loss for Multi-Label Classification" (ICCV 2021), Eq. 1-4, in the form DualCoOp and
PositiveCoOp train with: the probability of presence comes from a softmax over each class's two logits, and
labels that are unknown (−1) contribute nothing.
"""
import torch


def asymmetric_loss(logits, targets, gamma_pos=1.0, gamma_neg=2.0, clip=0.05, eps=1e-6):
    """(B, C, 2) logits, (B, C) targets in {1, 0, −1} -> scalar sum over the known labels.

    p = softmax(logits)[..., 0], q = 1 − p, q_c = min(q + clip, 1) (shifting the absence probability
    down-weights easy negatives)
      y = 1:  −(1 − p)^γ+ · log(max(p, eps))
      y = 0:  −(1 − q_c)^γ− · log(max(q_c, eps))
    The focusing weights (1 − ·)^γ are constants for the gradient (no_grad), as in the reference code.
    """
    p = torch.softmax(logits.float(), dim=-1)[..., 0]  # (B, C) probability of presence
    q = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    positive, negative = targets == 1, targets == 0
    with torch.no_grad():
        weight = torch.where(positive, (1 - p) ** gamma_pos, (1 - q) ** gamma_neg)
    loss = torch.where(positive, torch.log(p.clamp(min=eps)), torch.log(q.clamp(min=eps)))
    return -(weight * loss * (positive | negative)).sum()
