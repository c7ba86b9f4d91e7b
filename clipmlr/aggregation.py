"""Class-specific region aggregation (DualCoOp, Sun et al. 2022, Sec. 3.3; PositiveCoOp paper Sec. 3.1).

Every spatial position of an image votes for every class; the votes are weighted by a softmax over the
positions, so the regions that look most like the class dominate the image-level logit.

Shape key: B batch, L positions (1 + H*W, the mean token first), D feature dim, C classes.
"""
import torch
import torch.nn.functional as F

SIMILARITY_SCALE = 20.0  # multiplies the cosine similarity of a position with a class embedding
LOGIT_SCALE = 5.0  # multiplies the weighted sum over positions


def aggregate(scores, weights_from):
    """Softmax-weighted sum over positions: (B, L, C') scores, (B, L, C') -> (B, C'), C' channels (C or 2C).

    logit_c = 5 · Σ_l softmax_l(weights_from[:, :, c]) · scores[:, l, c]      (paper Sec. 3.1, aggregation)
    """
    weights = F.softmax(weights_from, dim=1)  # over positions
    return LOGIT_SCALE * (weights * scores).sum(dim=1)


ABSENCE_WEIGHTS = ("presence", "own")  # the spatial weights of the absence side: the default first


def prompt_logits(features, presence, absence, absence_weights="presence"):
    """Aggregated logits of a prompt head: (B, L, D) features, (C, D) and (C, D) embeddings -> (B, C, 2).

    s_± = 20 · cos(feature at l, embedding_±). By default both sides use the softmax of the presence side,
    s_+, as their spatial weights, as DualCoOp's and PositiveCoOp's code computes it; absence_weights="own"
    gives the absence side the softmax of its own s_−, as the paper's Sec. 3.1 reads. [..., 0] presence,
    [..., 1] absence.
    """
    features = F.normalize(features, dim=-1)
    embeddings = F.normalize(torch.cat([presence, absence]), dim=-1)  # (2C, D)
    scores = SIMILARITY_SCALE * features @ embeddings.to(features.dtype).t()  # (B, L, 2C)
    s_pos, s_neg = scores.chunk(2, dim=-1)  # (B, L, C) each
    weights = {"presence": s_pos, "own": s_neg}[absence_weights]
    return torch.stack([aggregate(s_pos, s_pos), aggregate(s_neg, weights)], dim=-1)  # (B, C, 2)
