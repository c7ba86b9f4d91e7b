"""The choices where the paper, the authors' code and clipmlr differ, switched one at a time on one setting.

Each row trains the same head on the same data and labels with one run.py option changed from the defaults
(the paper's learning rates, the authors' code in the other choices, clipmlr's loss-weight rule; README.md
says which default comes from where), each in a process of its own (see sweep.train), and reports the mAP
beside the defaults'. On the demo's miniature CLIP the numbers show which choices move the result there, in
miniature; they are not the paper's numbers.
"""
import os

from ..cli import parse_args
from . import sweep

SWITCHES = [  # (what the row changes, run.py options); the first row is the defaults
    ("defaults (the paper's learning rates, the authors' code elsewhere, clipmlr's loss weight)", []),
    ("absence side weighted by its own softmax (the paper's Sec. 3.1)", ["--absence-weights", "own"]),
    ("no residual on the prompt's text feature (the paper's description)", ["--no-residual"]),
    ("learning rates as the authors' train.py sets them from --lr 0.2 (prompts 0.002, embeddings 0.2)",
     ["--lr", "0.2"]),
    ("loss weight fixed at 0.03 (the authors' READMEs' examples)", ["--loss-weight", "0.03"]),
    ("loss weight 1 (the authors' opts.py default)", ["--loss-weight", "1"]),
    ("one context shared by all classes (DualCoOp's default)", ["--shared-context"]),
    ("torchvision's RandAugment policy", ["--randaugment", "torchvision"]),
    ("warm-up lr 1e-5 (DualCoOp's config)", ["--warmup-lr", "1e-5"]),
    ("weight decay 5e-4 (DualCoOp's)", ["--weight-decay", "5e-4"]),
]


def run_switches(run_argv, out, script=None):
    """Trains the defaults and every switch (skipping finished runs);
    returns [(row, option, results or None)].

    A switch that cannot matter for these settings (RandAugment without augmentation, the residual for heads
    that have none) is listed with no run.
    """
    script = sweep.find_run_script(script)
    base = parse_args(list(run_argv))
    rows = []
    for i, (what, options) in enumerate(SWITCHES):
        moot = ("--randaugment" in options and not base.augment) or \
            ("--no-residual" in options and base.head not in ("positive", "negative")) or \
            ("--absence-weights" in options and base.head == "baseline") or \
            ("--shared-context" in options and base.head == "baseline")
        if moot:
            rows.append((what, " ".join(options), None))
            continue
        folder = os.path.join(out, f"{i}-" + ("defaults" if not options else options[0].lstrip("-")))
        result = sweep.train_or_reuse(script, list(run_argv) + options + ["--out", folder], folder,
                                      f"switches: {what}")
        rows.append((what, " ".join(options) or "(none)", result))
    return rows


def switches_table(rows):
    """Markdown: one row per switch, its mAP and the difference from the defaults' mAP."""
    default = rows[0][2]
    s = default["settings"]
    lines = [f"# One switch at a time: {s['head']} on {s['data']}, {100 * s['labels']:g}% of labels, "
             f"{s['epochs']} epochs, CLIP {default['clip']['name']}", ""]
    if default["clip"]["name"] == sweep.DEMO_CLIP:
        lines += [f"**{sweep.DEMO_NOTE}.**", ""]
    lines += ["| switch | run.py option | mAP | vs defaults |", "|---|---|---|---|"]
    for what, option, result in rows:
        if result is None:
            lines.append(f"| {what} | {option} | – | cannot matter here |")
        else:
            delta = "" if result is default else f"{result['map'] - default['map']:+.2f}"
            lines.append(f"| {what} | {option} | {result['map']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"
