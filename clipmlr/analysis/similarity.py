"""Cosine similarities of frozen-CLIP features with prompts: the PositiveCoOp paper's Sec. 5.2 analyses.

    text_features(model, prompts)                    unit text features of hand-written prompts
    negation_similarities(model, classnames)         "photo of a {}" vs "not a photo of a {}" (Table 2)
    similarity_maps(features, presence, absence)     per-position cosine with two embeddings (Fig. 1)

Shape key: B batch, C classes, D feature dim, M templates, L positions (1 + H*W, the mean token first).
"""
import math

import torch
import torch.nn.functional as F

from ..clip import tokenize
from ..demo import DEMO_CLIP, MINIATURE_NOTE
from .templates import N1, P1, P2, TEMPLATES, fill, negated

PAPER_TABLE2 = {  # (mean, std, min, max) over COCO's 80 classes, ResNet-101 CLIP
    "one prompt": {"p1_n1": (0.58, 0.06, 0.37, 0.69), "p1_p2": (0.53, 0.04, 0.51, 0.67)},
    "85 templates": {"p1_n1": (0.56, 0.06, 0.37, 0.67), "p1_p2": (0.61, 0.01, 0.55, 0.63)},
}


@torch.no_grad()
def text_features(model, prompts, batch_size=512):
    """(M,) prompt strings -> (M, D) L2-normalised text features, on the CPU."""
    device = model.token_embedding.weight.device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenize(prompts[i:i + batch_size], context_length=model.context_length)  # (m, T)
        out.append(F.normalize(model.encode_text(ids.to(device)).float(), dim=-1).cpu())
    return torch.cat(out)


def summary(values):
    """{"mean", "std", "min", "max", "n"} of a tensor of cosines (std over the values, not unbiased)."""
    v = values.flatten().double()
    return {"mean": v.mean().item(), "std": v.std(unbiased=False).item(), "min": v.min().item(),
            "max": v.max().item(), "n": v.numel()}


def negation_similarities(model, classnames, templates=TEMPLATES):
    """Cosines between text features of prompt pairs, per class (Sec. 5.2, Table 2).

    one prompt:   p1_n1 (C,) = cos("photo of a {c}", "not a photo of a {c}"), p1_p2 (C,) = cos(P1, "picture
                  of a {c}").
    85 templates: p1_n1 (M, C) = cos(t(c), "not " + t(c)) for every template t; p1_p2 (C, M(M-1)/2) =
                  cos(t(c), t'(c)) for every pair of distinct templates: two positive prompts of one class.
    """
    p1, n1, p2 = (text_features(model, fill(t, classnames)) for t in (P1, N1, P2))  # (C, D) each
    k, c = len(templates), len(classnames)
    # (M, C, D)
    pos = text_features(model, [p for t in templates for p in fill(t, classnames)]).view(k, c, -1)
    neg = text_features(model, [p for t in templates for p in fill(negated(t), classnames)]).view(k, c, -1)
    gram = torch.einsum("kcd,jcd->ckj", pos, pos)  # (C, M, M) template against template, per class
    first, second = torch.triu_indices(k, k, offset=1)
    return {"one prompt": {"p1_n1": (p1 * n1).sum(-1), "p1_p2": (p1 * p2).sum(-1)},
            "85 templates": {"p1_n1": (pos * neg).sum(-1), "p1_p2": gram[:, first, second]}}


def negation_summary(similarities):
    """Table 2's rows: statistics over the classes (templates first averaged per class),
    and over every pair."""
    one, many = similarities["one prompt"], similarities["85 templates"]
    return {
        "one prompt": {k: summary(v) for k, v in one.items()},
        "85 templates": {"p1_n1": summary(many["p1_n1"].mean(0)), "p1_p2": summary(many["p1_p2"].mean(1))},
        "85 templates, every pair": {k: summary(v) for k, v in many.items()},
    }


def negation_table(summaries, clip_name, n_classes=80):
    """Markdown in the layout of Table 2, the paper's rows under ours (COCO's 80 classes; the demo's own)."""
    def fmt(s):
        return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}, {s['max']:.2f})"

    c = n_classes
    rows = [(f"{c} classes, 1 prompt", "one prompt"),
            (f"{c} classes, 85 templates (per-class mean)", "85 templates"),
            (f"85 templates × {c} classes (every pair)", "85 templates, every pair")]
    lines = [f"# Cosine similarity between prompt features, CLIP {clip_name} "
             f"(PositiveCoOp Sec. 5.2, Table 2)", ""]
    if clip_name == DEMO_CLIP:
        lines += [f"**the demo's CLIP, {MINIATURE_NOTE}.**", ""]
    lines += [f"Mean ± std (min, max) over {'COCO' if c == 80 else 'the demo'}'s {c} classes. "
              "P1 'photo of a {}', N1 'not a photo of a {}', P2 "
              "'picture of a {}'; with the 85 templates of the supplement's Table 4, N1 is 'not ' + the "
              "template and P1-P2 pairs are two different templates of one class.", "",
              "| Setting | P1-N1 | P1-P2 |", "|---|---|---|"]
    for name, key in rows:
        lines.append(f"| {name} | {fmt(summaries[key]['p1_n1'])} | {fmt(summaries[key]['p1_p2'])} |")
        if key in PAPER_TABLE2:
            paper = {pair: dict(zip(("mean", "std", "min", "max"), v))
                     for pair, v in PAPER_TABLE2[key].items()}
            lines.append(f"| 80 classes{name.split('classes', 1)[1]}, paper (RN101, COCO) | "
                         f"{fmt(paper['p1_n1'])} | {fmt(paper['p1_p2'])} |")
    return "\n".join(lines) + "\n"


def grid_side(positions):
    side = math.isqrt(positions - 1)
    assert side * side == positions - 1, f"{positions} positions are not 1 + a square grid"
    return side


def similarity_maps(features, presence, absence):
    """(L, D) dense features of one image, (D,) presence and (D,) absence embeddings -> (2, H, W) cosines of
    every grid position (the mean token left out) with each embedding (Fig. 1)."""
    side = grid_side(features.shape[0])
    grid = F.normalize(features[1:].float(), dim=-1)  # (H*W, D)
    embeddings = F.normalize(torch.stack([presence, absence]).float().to(grid.device), dim=-1)  # (2, D)
    return (grid @ embeddings.t()).t().reshape(2, side, side).cpu()  # (H*W, 2) -> (2, H, W)


def linear_maps(head, features, index):
    """The baseline's (2, H, W) per-position outputs for class `index`: its presence and absence channels."""
    side = grid_side(features.shape[0])
    a = head.proj(features[1:].float())  # (H*W, 2C): presence channels first, then absence
    return torch.stack([a[:, index], a[:, a.shape[1] // 2 + index]]).reshape(2, side, side).cpu()
