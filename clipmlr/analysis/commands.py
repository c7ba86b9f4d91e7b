"""The PositiveCoOp paper's analyses as commands, on any CLIP checkpoint or the demo's miniature CLIP.

    python -m clipmlr.analysis sweep --data voc --heads baseline dual positive negative --labels 0.1 0.5 0.9
    python -m clipmlr.analysis switches --data demo --labels 0.3   # the paper vs the authors' code,
                                                                   # one at a time
    python -m clipmlr.analysis zeroshot --data voc             # hand-written prompts, no training
    python -m clipmlr.analysis negation --clip RN101           # Sec. 5.2, Table 2
    python -m clipmlr.analysis maps --data demo --index 3 [--run runs/demo-positive-1-seed0]    # Fig. 1

Options a subcommand does not list are run.py's (--data, --clip, --epochs, --image-size, --device, ...; they
live in clipmlr/cli.py, shared by both) and mean what they mean there; the sweep passes them to every run.
Outputs go under runs/analysis/ unless --out says otherwise; every command prints where it wrote them.
"""
import json
import os
import sys

import torch
from PIL import Image

from .. import cli
from ..checkpoint import save_atomic
from ..augment import image_transform
from ..heads import HEADS, frozen_encoder
from ..aggregation import prompt_logits
from ..metrics import ap_by_class, margin, mean_average_precision
from ..predict import PredictError, load_head
from .plots import similarity_figure
from ..demo import DEMO_CLASSES, DEMO_CLIP
from .similarity import (linear_maps, negation_similarities, negation_summary, negation_table,
                         similarity_maps, text_features)
from .sweep import DEMO_NOTE, PROPORTIONS, run_sweep, write_sweep
from .switches import SWITCHES, run_switches, switches_table
from .templates import ABSENCE, COCO_CLASSES, PRESENCE, fill


class AnalysisError(Exception):
    """A bad argument or input of an analysis command; the message says what to give instead."""


# ---------------------------------------------------------------------------------------------- zero-shot

@torch.no_grad()
def zero_shot(args, presence=PRESENCE, absence=ABSENCE):
    """mAP of hand-written prompts on the test split of `args.data`, aggregated and ranked like the heads'."""
    _, _, test, test_y, classnames = cli.load_data(args)
    model, clip_info = cli.load_clip(args)
    device = torch.device(args.device)
    # (C, D) x2
    embeddings = [text_features(model, fill(t, classnames)).to(device) for t in (presence, absence)]
    encode = frozen_encoder(model, device)
    key = cli.feature_key(args, clip_info, model)  # run.py's cache, with --cache-features
    loader, _, features_of = cli.test_split(args, test, test_y, encode, key, args.batch_size)
    # (N, C, 2)
    logits = torch.cat([prompt_logits(features_of(x), *embeddings).float().cpu() for x, _, _ in loader])
    # presence − absence, as the heads are ranked
    mean_ap, ap = mean_average_precision(margin(logits), test_y)
    # the presence prompt alone: "not a photo of" out
    alone, _ = mean_average_precision(logits[..., 0], test_y)
    return {"map": mean_ap, "map_presence_alone": alone,  # a class with no positive test label: no AP (null)
            "per_class_ap": ap_by_class(classnames, ap),
            "presence": presence, "absence": absence, "data": args.data, "image_size": args.image_size,
            "test_images": len(test), "clip": clip_info, "settings": zero_shot_settings(args)}


def zero_shot_settings(args):
    """What a zero-shot result depends on (a stored one is reused only when they are the same)."""
    return {k: getattr(args, k, None) for k in ("data", "data_root", "clip", "image_size", "demo_images",
                                                 "voc_difficult", "nuswide_skip_missing", "pipeline")}


def zero_shot_markdown(result):
    lines = [f"# Zero-shot reference on {result['data']}, CLIP {result['clip']['name']}", ""]
    if result["clip"]["name"] == DEMO_CLIP:
        lines += [f"**{DEMO_NOTE}.**", ""]
    lines += [f"Hand-written prompts, no training: presence \"{result['presence']}\", absence "
              f"\"{result['absence']}\"; the heads' aggregation (20·cos, softmax over positions) and mAP on "
              f"{result['test_images']} test images.", "",
              f"mAP, ranked by presence − absence (as the heads): "
              f"{result['map']:.2f}; by the presence prompt alone: {result['map_presence_alone']:.2f}", "",
              "| Class | AP |", "|---|---|"]
    lines += [f"| {n} | {'–' if a is None else f'{a:.1f}'} |" for n, a in result["per_class_ap"].items()]
    return "\n".join(lines) + "\n"


def check_folders(out, args):
    """The command's output folder and, with --cache-features, the cache folder must be writable: checked
    before anything is loaded, so a bad folder is one line at once, not a traceback at the end."""
    cli.check_writable(out, "--out")
    if args.cache_features:
        cli.check_writable(args.cache_dir, "--cache-dir")


def cmd_zeroshot(opts, extras):
    args = cli.parse_args(extras, prog="python -m clipmlr.analysis zeroshot")
    out = opts.out or os.path.join("runs", "analysis", f"zeroshot-{args.data}")
    check_folders(out, args)
    result = zero_shot(args, opts.presence, opts.absence)
    os.makedirs(out, exist_ok=True)
    save_atomic(result, os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(zero_shot_markdown(result))
    demo = " (the demo's miniature CLIP)" if result["clip"]["name"] == DEMO_CLIP else ""
    print(f"zero-shot mAP {result['map']:.2f} (presence − absence), {result['map_presence_alone']:.2f} "
          f"(presence prompt alone){demo}")
    print(f"wrote {out}/results.json and {out}/table.md")


# ---------------------------------------------------------------------------------------------- sweep

def cmd_sweep(opts, extras):
    for p in opts.labels:
        if not 0 < p <= 1:
            raise AnalysisError(f"--labels {p} is outside (0, 1]: give fractions of labels kept, "
                                f"e.g. 0.1 0.5 0.9")
    for own, instead in (("--head", "--heads"), ("--seed", "--seeds"),
                         ("--resume", "nothing: it resumes by itself"),
                         ("--cache-features", "--protocol cached"),
                         ("--no-cache-features", "--protocol paper")):
        if any(a == own or a.startswith(own + "=") for a in extras):
            raise AnalysisError(f"the sweep sets {own} for each run itself; give {instead}")
    for head in opts.heads:  # each head's options as its runs will get them (without those it does not use)
        args = cli.parse_args(cli.head_argv(extras, head) + ["--head", head],
                              prog="python -m clipmlr.analysis sweep")
    out = opts.out or os.path.join("runs", "analysis", f"sweep-{args.data}")
    check_folders(out, args)
    results = run_sweep(opts.heads, opts.labels, opts.seeds, extras, out, opts.run_script, opts.protocol)
    zero = None
    if not opts.no_zero_shot:
        path = os.path.join(out, "zeroshot.json")
        if os.path.isfile(path):  # done by an earlier call of this sweep, perhaps with other settings
            with open(path) as f:
                zero = json.load(f)
            if zero.get("settings") != json.loads(json.dumps(zero_shot_settings(args))):
                zero = None
        if zero is None:
            zero = zero_shot(args)
            save_atomic(zero, path)
    paths = write_sweep(results, zero, args.data, results[0]["clip"]["name"], out)
    with open(paths["table.md"]) as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))


# ---------------------------------------------------------------------------------------------- switches

def cmd_switches(opts, extras):
    own = sorted({o for _, options in SWITCHES for o in options if o.startswith("--")})
    given = [a for a in extras if a.split("=")[0] in own]
    if given:
        raise AnalysisError(f"the switches set {', '.join(given)} themselves, one at a time; leave those "
                            f"options out (the first row must be the defaults)")
    args = cli.parse_args(extras, prog="python -m clipmlr.analysis switches")
    out = opts.out or os.path.join("runs", "analysis", f"switches-{args.data}-{args.head}")
    check_folders(out, args)
    rows = run_switches(extras, out, opts.run_script)
    text = switches_table(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    save_atomic([{"switch": w, "option": o, "map": None if r is None else r["map"]} for w, o, r in rows],
                os.path.join(out, "results.json"))
    print(text)
    print(f"wrote {out}/table.md and {out}/results.json")


# ---------------------------------------------------------------------------------------------- negation

def cmd_negation(opts, extras):
    args = cli.parse_args(extras, prog="python -m clipmlr.analysis negation")
    if opts.out:
        check_folders(opts.out, args)
    model, clip_info = cli.load_clip(args)
    name = clip_info["name"]
    out = opts.out or os.path.join("runs", "analysis",
                                   f"negation-{os.path.splitext(os.path.basename(name))[0]}")
    check_folders(out, args)
    # the paper's COCO classes; the demo's miniature knows only its twelve shapes' words, so it is asked of
    # them
    classes = list(DEMO_CLASSES) if name == DEMO_CLIP else COCO_CLASSES
    similarities = negation_similarities(model, classes)
    summaries = negation_summary(similarities)
    text = negation_table(summaries, name, len(classes))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    per_class = {"classes": classes,
                 "one prompt": {k: v.tolist() for k, v in similarities["one prompt"].items()},
                 "85 templates, per-class mean": {
                     "p1_n1": similarities["85 templates"]["p1_n1"].mean(0).tolist(),
                     "p1_p2": similarities["85 templates"]["p1_p2"].mean(1).tolist()}}
    save_atomic({"clip": clip_info, "summary": summaries, "per_class": per_class},
                os.path.join(out, "results.json"))
    print(text)
    print(f"wrote {out}/table.md and {out}/results.json")


# ---------------------------------------------------------------------------------------------- maps

def pick_image(opts, test, test_y, classnames):
    """(RGB image, its present class names, a label for the file name): --image, or test image --index."""
    if opts.image:
        try:
            with Image.open(opts.image) as f:
                return f.convert("RGB"), [], os.path.splitext(os.path.basename(opts.image))[0]
        except OSError as e:
            raise AnalysisError(f"cannot read the image {opts.image}: {e}") from None
    if not 0 <= opts.index < len(test):
        raise AnalysisError(f"--index {opts.index} is outside the test split's 0..{len(test) - 1}")
    image = test[opts.index]
    if not isinstance(image, Image.Image):  # a path
        with Image.open(image) as f:
            image = f.convert("RGB")
    present = [classnames[c] for c in torch.nonzero(test_y[opts.index] == 1).flatten()]
    return image.convert("RGB"), present, f"test{opts.index}"


@torch.no_grad()
def cmd_maps(opts, extras):
    if opts.panel < 32:
        raise AnalysisError(f"--panel {opts.panel} is too small to draw on; give at least 32 "
                            f"(pixels per panel)")
    settings = None
    if opts.run:
        path = os.path.join(opts.run, "results.json")
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(opts.run, "head.pt")):
            raise AnalysisError(f"--run {opts.run} holds no finished run (results.json and head.pt); give "
                                f"the --out folder of a completed `python run.py ...`")
        with open(path) as f:
            settings = json.load(f)["settings"]
        keep = ("data", "clip", "image_size", "demo_images")  # what rebuilds the run's data and CLIP
        extras = cli.settings_argv({k: settings.get(k) for k in keep}) + extras
    args = cli.parse_args(extras, prog="python -m clipmlr.analysis maps")
    out = opts.out or os.path.join("runs", "analysis", "maps")
    check_folders(out, args)
    train = test = test_y = classnames = None
    if args.data == "demo" or opts.image is None:
        train, _, test, test_y, classnames = cli.load_data(args)
    model, clip_info = cli.load_clip(args)
    head = None
    if settings is not None:
        try:
            head, record = load_head(opts.run, model, clip_info)
        except PredictError as e:
            raise AnalysisError(str(e)) from None
        classnames, head_name = record["classnames"], record["head"]

    image, present, label = pick_image(opts, test, test_y, classnames)
    name = opts.cls or (present[0] if present else None)
    if name is None:
        raise AnalysisError("give the class to map with --class NAME")
    if head is not None and name not in classnames:
        raise AnalysisError(f"--class {name!r} is not one of the run's classes {classnames}")

    # the two embeddings (or the baseline's two channels) and the per-position maps
    device = model.token_embedding.weight.device
    # (L, D)
    features = model.encode_dense(image_transform(args.image_size, train=False)(image)[None].to(device))[0]
    value_name = "cosine similarity"
    if head is None:
        prompts = [fill(t, [name])[0] for t in (opts.presence, opts.absence)]
        presence, absence = text_features(model, prompts)
        maps, source, captions = similarity_maps(features, presence, absence), "hand-written", prompts
        described = "hand-written prompts"
    elif head_name == "baseline":
        maps = linear_maps(head, features, classnames.index(name))
        source, captions, value_name = "baseline", ["presence channel", "absence channel"], "linear output"
        described = "the baseline head's linear channels"
    else:
        presence, absence = (e[classnames.index(name)] for e in head.class_embeddings())
        maps, source = similarity_maps(features, presence, absence), head_name
        captions = [f"learned presence ({head_name})", f"learned absence ({head_name})"]
        described = f"the {head_name} head's learned embeddings"
    title = f"{name}: {described}; CLIP {clip_info['name']}"
    if clip_info["name"] == DEMO_CLIP:
        title += " (the demo's miniature CLIP)"
    figure = similarity_figure(image, list(maps.numpy()),
                               ["image" + (f" ({', '.join(present)})" if present else "")] + captions, title,
                               panel=opts.panel, value_name=value_name)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{label}-{name.replace(' ', '_')}-{source}.png")
    figure.save(path)
    print(f"maps of {name!r} ({source}): presence {maps[0].min():.3f}..{maps[0].max():.3f}, absence "
          f"{maps[1].min():.3f}..{maps[1].max():.3f} ({value_name}); wrote {path} "
          f"({figure.size[0]}x{figure.size[1]})")


# ---------------------------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    """(the analysis' own options, the rest for run.py)."""
    p = cli.Parser(prog="python -m clipmlr.analysis", description=__doc__.split("\n\n")[0],
                   epilog="Any other option is run.py's (see python run.py --help).", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", allow_abbrev=False,
                       help="train heads x label proportions x seeds; table and plot")
    s.add_argument("--heads", nargs="+", choices=sorted(HEADS),
                   default=["baseline", "dual", "positive", "negative"],
                   help="heads to train, the table's rows (default: all four)")
    s.add_argument("--labels", nargs="+", type=float, default=list(PROPORTIONS),
                   help="fractions of training labels kept, the table's columns (default: 0.1 0.2 ... 0.9)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds per (head, labels), mean ± std "
                   "(default: 0)")
    s.add_argument("--no-zero-shot", action="store_true", help="leave out the zero-shot reference row")
    s.add_argument("--out", default=None, help="sweep folder (default: runs/analysis/sweep-<data>)")
    s.add_argument("--protocol", choices=["cached", "paper"], default="cached", help="cached: features "
                   "encoded once, K augmented views (run.py's --cache-features); paper: the encoder in the "
                   "loop and a fresh augmentation every epoch, as the paper trains (default: cached)")
    s.add_argument("--run-script", default=None, help="the run.py that trains each run (default: ./run.py, "
                   "else the one beside the clipmlr package)")
    w = sub.add_parser("switches", allow_abbrev=False,
                       help="the paper/authors' code choices, one at a time: mAP")
    w.add_argument("--out", default=None,
                   help="output folder (default: runs/analysis/switches-<data>-<head>)")
    w.add_argument("--run-script", default=None, help="the run.py that trains each run (default: ./run.py, "
                   "else the one beside the clipmlr package)")
    z = sub.add_parser("zeroshot", allow_abbrev=False, help="hand-written prompts, no training: test mAP")
    z.add_argument("--out", default=None, help="output folder (default: runs/analysis/zeroshot-<data>)")
    n = sub.add_parser("negation", allow_abbrev=False,
                       help="cosine of 'photo of a {}' and 'not a photo of a {}'")
    n.add_argument("--out", default=None, help="output folder (default: runs/analysis/negation-<clip>)")
    m = sub.add_parser("maps", allow_abbrev=False,
                       help="an image's similarity maps with presence/absence embeddings")
    m.add_argument("--run", default=None, help="a finished run.py folder: map its learned embeddings "
                   "(default: hand-written prompts)")
    m.add_argument("--class", dest="cls", default=None,
                   help="class to map (default: the image's first label)")
    m.add_argument("--image", default=None, help="an image file (default: test image --index of --data)")
    m.add_argument("--index", type=int, default=0,
                   help="which test image when no --image is given (default: 0)")
    m.add_argument("--panel", type=int, default=256, help="side of each panel in pixels (default: 256); the "
                   "PNG is (3·panel + 32) x (panel + 100)")
    m.add_argument("--out", default=None, help="output folder (default: runs/analysis/maps)")
    for q in (z, m):
        q.add_argument("--presence", default=PRESENCE, help=f"hand-written presence template, {{}} = class "
                       f"name (default: {PRESENCE!r})")
        q.add_argument("--absence", default=ABSENCE,
                       help=f"hand-written absence template (default: {ABSENCE!r})")
    return p.parse_known_args(argv)


COMMANDS = {"sweep": cmd_sweep, "switches": cmd_switches, "zeroshot": cmd_zeroshot, "negation": cmd_negation,
            "maps": cmd_maps}


def main(argv=None):
    opts, extras = parse_args(argv)
    try:
        for template in (getattr(opts, "presence", "{}"), getattr(opts, "absence", "{}")):
            if template.count("{}") != 1:
                raise AnalysisError(f"the prompt template {template!r} must hold exactly one {{}} for the "
                                    f"class name, e.g. 'a photo of a {{}}.'")
        COMMANDS[opts.command](opts, extras)
    except Exception as e:
        if not cli.is_user_error(e):  # a bug: it keeps its traceback
            raise
        print(f"error: {e}", file=sys.stderr)  # the user's to fix: one line
        return 2
    return 0


