"""A sweep of heads x label proportions x seeds through run.py, and its table and plot beside the paper's
numbers.

Each (head, labels, seed) is one run of run.py in a process of its own (`python run.py ...`, as a user would
type it; the package never imports run.py), into its own folder under the sweep's folder; a run whose
results.json exists is skipped and an interrupted one is resumed, so a sweep that stops can be started again
with the same command. The table has the layout of the PositiveCoOp paper's Table 1 (rows heads,
columns the fraction of labels kept, then the average) with the trainable parameters and the training time per
run (supplement Table 3); the paper's own rows sit under ours for VOC2007 and COCO2014.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np

from ..checkpoint import settings_mismatch
from ..cli import head_argv, parse_args, settings_of
from ..demo import DEMO_CLIP, MINIATURE_NOTE
from .plots import colour_of, line_plot

PROPORTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PAPER_TABLE1 = {  # mAP (%) at 10% ... 90% labels, ResNet-101 CLIP (Table 1)
    "voc": {
        "baseline": [90.5, 92.2, 92.8, 93.0, 93.3, 93.8, 93.9, 94.0, 94.2],
        "dual": [90.3, 92.2, 92.8, 93.3, 93.6, 93.9, 94.0, 94.1, 94.2],
        "positive": [91.4, 92.8, 93.4, 93.6, 93.8, 94.0, 94.2, 94.2, 94.3],
        "negative": [88.9, 89.3, 89.6, 89.9, 90.7, 91.2, 91.8, 92.1, 92.4],
    },
    "coco": {
        "baseline": [78.9, 80.6, 81.3, 81.9, 82.7, 82.8, 82.9, 83.2, 83.5],
        "dual": [78.7, 80.9, 81.7, 82.0, 82.5, 82.7, 82.8, 83.0, 83.1],
        "positive": [79.8, 82.1, 83.0, 83.5, 83.7, 83.9, 84.0, 84.2, 84.4],
        "negative": [77.8, 80.3, 81.0, 81.9, 82.2, 82.4, 82.7, 82.8, 82.9],
    },
}
PAPER_AVERAGE = {"voc": {"baseline": 93.1, "dual": 93.2, "positive": 93.6, "negative": 90.8},
                 "coco": {"baseline": 82.0, "dual": 81.9, "positive": 83.2, "negative": 81.6}}
# (trainable parameters as printed, GPU hours on one RTX A4000) from Table 1 and supplement Table 3
PAPER_COST = {
    "voc": {"baseline": ("20k", 1.5), "dual": ("0.3M", 3.55), "positive": ("0.17M", 3),
            "negative": ("0.17M", 3)},
    "coco": {"baseline": ("80k", 7.97), "dual": ("1.3M", 16), "positive": ("0.73M", 16),
             "negative": ("0.73M", 16)},
}
DEMO_NOTE = f"the demo's CLIP, {MINIATURE_NOTE}"


class SweepError(Exception):
    """A run of the sweep that failed, or a folder holding a run made with other settings."""


def run_folder(out, data, head, labels, seed):
    return os.path.join(out, f"{data}-{head}-{labels:g}-seed{seed}")


def find_run_script(script=None):
    """The run.py to train with: `script`, else ./run.py, else the one beside the clipmlr package."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "run.py")
    for path in ([script] if script else ["run.py", beside]):
        if os.path.isfile(path):
            return path
    raise SweepError(f"the sweep trains each run with run.py, and found none ({script or 'run.py'}); run it "
                     f"from the folder holding run.py, or give --run-script PATH")


def train(script, argv):
    """One training run: `python run.py ARGV` in its own process, its output shown as it comes;
    the exit code."""
    return subprocess.run([sys.executable, script, *argv]).returncode


PROTOCOLS = {  # how the sweep's runs see the training images
    "cached": ["--cache-features"],  # encoded once, V augmented views (fast: the encoder runs V + 1 times)
    "paper": ["--no-cache-features"],  # the paper's: encoder in the loop, a fresh augmentation every epoch
}


def protocol_of(settings):
    """In words, how a run saw its training images (from its settings)."""
    if settings.get("cache_features") is None:
        return "unknown"
    if settings["cache_features"]:
        views = settings.get("cache_views", 1) if settings.get("augment") else 1
        return f"cached features ({views} view{'s' * (views > 1)} of each training image, encoded once)"
    return "the paper's protocol (encoder in the loop, " + \
        ("a fresh augmentation every epoch)" if settings.get("augment") else "no augmentation)")


def run_sweep(heads, proportions, seeds, run_argv, out, script=None, protocol="cached"):
    """Trains every (head, labels, seed) not done yet through run.py; returns the list of their results dicts.

    run_argv: further run.py options shared by every run (e.g. ["--data", "voc", "--epochs", "50"]);
    protocol: "cached" (features encoded once, V views) or "paper" (encoder in the loop).
    """
    script = find_run_script(script)
    base = parse_args(head_argv(list(run_argv), heads[0]) + ["--head", heads[0]])
    run_argv = list(run_argv) + PROTOCOLS[protocol]
    results = []
    for head in heads:
        for labels in proportions:
            for seed in seeds:
                folder = run_folder(out, base.data, head, labels, seed)
                argv = head_argv(run_argv, head) + ["--head", head, "--labels", str(labels),
                                                    "--seed", str(seed), "--out", folder]
                results.append(train_or_reuse(script, argv, folder,
                                              f"sweep: training {head}, labels {labels:g}, seed {seed}"))
    return results


def train_or_reuse(script, argv, folder, what):
    """The results of `python run.py ARGV` into `folder`: read back if it finished earlier with the same
    settings (other settings are refused), resumed if it was interrupted, else trained now. `what` names it in
    the output."""
    done = os.path.join(folder, "results.json")
    if os.path.isfile(done):
        with open(done) as f:
            result = json.load(f)
        diff = settings_mismatch(result["settings"], settings_of(parse_args(argv)))
        if diff:
            raise SweepError(f"{folder} holds a run with other settings ({diff}); give another --out, or "
                             f"delete that folder to train it again")
        print(f"{what.split(':')[0]}: {folder} is done, skipped")
        return result
    if os.path.isfile(os.path.join(folder, "checkpoint.pt")):
        argv = argv + ["--resume"]  # interrupted earlier: continue where it stopped
    print(f"{what} -> {folder}", flush=True)
    code = train(script, argv)
    if code != 0:
        raise SweepError(f"the run in {folder} stopped (exit code {code}); the finished runs are kept, so "
                         f"run the same command again to continue once the problem is fixed")
    with open(done) as f:
        return json.load(f)


def summarise(results):
    """{head: {labels: [mAP per seed]}}, {head: (trainable parameters, mean training seconds per run)}."""
    maps, cost = {}, {}
    for r in results:
        maps.setdefault(r["head"], {}).setdefault(r["labels"], []).append(r["map"])
        cost.setdefault(r["head"], []).append((r["trainable_params"], r["train_seconds"]))
    return maps, {h: (c[0][0], float(np.mean([s for _, s in c]))) for h, c in cost.items()}


def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.2f} h"


def cell(values):
    if not values:
        return "–"
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values):.1f}" if len(values) > 1 else "")


def sweep_table(results, zero_shot, data, clip_name):
    """(Markdown text, CSV rows) in Table 1's layout: ours per head, then the paper's row for that head.

    results: run.py results dicts; zero_shot: a zero-shot result dict (see analysis.zero_shot) or None.
    """
    maps, cost = summarise(results)
    columns = sorted({r["labels"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    paper = PAPER_TABLE1.get(data, {})
    names = [f"{100 * p:g}%" for p in columns]
    header = ["Method"] + names + ["Avg", "#Params", "Train time / run"]
    rows_md, rows_csv = [], []

    def add(method, source, values_per_column, params, time_text, seconds):  # one row of each table
        means = [float(np.mean(v)) if v else None for v in values_per_column]
        known = [m for m in means if m is not None]
        average = float(np.mean(known)) if known else None
        rows_md.append([method] + [cell(v) for v in values_per_column] +
                       ["–" if average is None else f"{average:.1f}", params, time_text])
        rows_csv.append({"method": method, "source": source, **{n: m for n, m in zip(names, means)},
                         "avg": average, "params": params.replace(",", ""), "seconds_per_run": seconds})

    if zero_shot is not None:
        zs = [[zero_shot["map"]]] * len(columns)  # no training: the same at every proportion
        add(f"zero-shot (\"{zero_shot['presence']}\" / \"{zero_shot['absence']}\")", "ours", zs, "0", "0 s",
            0.0)
    footnotes = []
    for head in maps:
        params, seconds = cost[head]
        add(head, "ours", [maps[head].get(p, []) for p in columns], f"{params:,}", duration(seconds), seconds)
        if head in paper:
            values = [[paper[head][PROPORTIONS.index(p)]] if p in PROPORTIONS else [] for p in columns]
            p_params, hours = PAPER_COST[data][head]
            add(f"{head} (paper)", "paper", values, p_params, f"{hours:g} GPU-h", hours * 3600)
            if columns == list(PROPORTIONS):  # the published average, not the mean of rounded cells
                rows_md[-1][len(columns) + 1] = f"{PAPER_AVERAGE[data][head]:.1f}"
                rows_csv[-1]["avg"] = PAPER_AVERAGE[data][head]
            else:
                rows_md[-1][len(columns) + 1] += "*"
                footnotes.append(f"{head}: the paper's Avg over 10%…90% is {PAPER_AVERAGE[data][head]}")

    title = f"# Sweep on {data}, CLIP {clip_name}"
    lines = [title, ""]
    if clip_name == DEMO_CLIP:
        lines += [f"**{DEMO_NOTE}.**", ""]
    seeds_text = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
                  else f"seed {seeds[0]}")
    protocols = sorted({protocol_of(r.get("settings", {})) for r in results})
    lines += [f"mAP (%) of the last epoch on the test split; columns: fraction of training labels kept; "
              f"Avg: mean of the columns; {seeds_text}. Training images: {'; '.join(protocols)}. "
              f"Train time: training epochs only, mean per run on this machine (the paper: GPU hours on one "
              f"RTX A4000, supplement Table 3; its rows use a ResNet-101 CLIP).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows_md]
    if footnotes:
        lines += ["", "\\* mean of the shown columns; " + "; ".join(footnotes) + "."]
    return "\n".join(lines) + "\n", rows_csv


def sweep_plot(results, zero_shot, data, clip_name):
    """A PIL image: mAP against the fraction of labels kept, per head;
    the paper's values as hollow squares."""
    maps, _ = summarise(results)
    paper = PAPER_TABLE1.get(data, {})
    series = []
    for i, head in enumerate(maps):
        xs = sorted(maps[head])
        series.append({"label": head, "colour": colour_of(head, i), "xs": xs, "style": "line",
                       "ys": [float(np.mean(maps[head][x])) for x in xs]})
        if head in paper:
            series.append({"label": f"{head} (paper)", "colour": colour_of(head, i), "xs": list(PROPORTIONS),
                           "ys": paper[head], "style": "markers"})
    if zero_shot is not None:
        series.append({"label": "zero-shot", "colour": colour_of("zero-shot"), "xs": [0.0],
                       "ys": [zero_shot["map"]], "style": "hline"})
    title = f"mAP against labels kept: {data}, CLIP {clip_name}"
    if clip_name == DEMO_CLIP:
        title += " (the demo's miniature CLIP: not the paper's numbers)"
    return line_plot(series, title, "fraction of training labels kept", "mAP (%)")


def write_sweep(results, zero_shot, data, clip_name, out):
    """Writes table.md, table.csv, runs.csv and plot.png into `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    text, rows = sweep_table(results, zero_shot, data, clip_name)
    paths = {name: os.path.join(out, name) for name in ("table.md", "table.csv", "runs.csv", "plot.png")}
    with open(paths["table.md"], "w") as f:
        f.write(text)
    with open(paths["table.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["runs.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "labels", "seed", "map", "trainable_params", "train_seconds"])
        for r in sorted(results, key=lambda r: (r["head"], r["labels"], r["seed"])):
            writer.writerow([r["head"], r["labels"], r["seed"], r["map"], r["trainable_params"],
                             r["train_seconds"]])
    sweep_plot(results, zero_shot, data, clip_name).save(paths["plot.png"])
    return paths
