"""A trained head as a model (a layer): tag new images with it, or score its run's test split again.

    python -m clipmlr.predict RUN_DIR PATH... [--threshold 0.5] [--top-k K] [--json FILE]   (in any order)
    python -m clipmlr.predict RUN_DIR --evaluate [--tolerance 0.01] [--threshold 0.5] [--top-k 3]

RUN_DIR is the --out folder of a finished `python run.py ...`. Its head.pt describes the head (type, class
names, context, image size, and the CLIP it was trained on, by name and sha256), so the head is rebuilt from
it alone; the run's CLIP is loaded as run.py loaded it (a head on another CLIP is refused, naming both
hashes). A PATH is an image or a folder of images; each image is encoded once at the run's resolution, in
batches, never all held in memory. An unreadable image is reported by name and skipped. Per image, the classes
whose probability passes --threshold (or the --top-k most likely) are printed with their probability; --json
writes, for every image and class, the probability and the logit margin (presence − absence), which is what
an AP ranks by: probabilities saturate at 1.0 and tie, margins do not.

--evaluate scores the run's test split again from head.pt (with the run's own feature cache if it used one,
at --cache-dir if it moved; features are cached per device type and precision, so on another device type the
test split is encoded anew, as it says), prints the precision/recall/F1 metrics in both conventions
(metrics.threshold_metrics, at --threshold and --top-k, default 0.5 and 3) and the mAP beside results.json's
`map` and their difference: equal in the same setting, a last digit apart on a GPU, under torchrun or with
other thread counts (the sums run in another order); the exit status is 1 only beyond --tolerance.

Loading the CLIP takes a while (~20 s for RN101), so everything that needs no CLIP is checked first: both
files of the run folder, the run's options, every PATH (and that a folder holds images), the --json
destination. What it is doing (the run, the CLIP being loaded, the images to tag) is printed as it goes.
"""
import json
import os
import sys

import torch
from tqdm import tqdm

from . import cli, distributed
from .augment import image_transform
from .checkpoint import save_atomic
from .data import DataError, read_image
from .heads import build_head, frozen_encoder
from .metrics import format_metrics, margin, margins_of, scores_of_margins

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
HEAD_KEYS = ("state_dict", "head", "classnames", "n_ctx", "shared_context", "absence_weights", "residual",
             "image_size", "clip")  # what run.py saves in head.pt
RESULTS_KEYS = ("settings", "data_root", "cache_dir", "weights_dir", "clip", "map")  # what predict reads


class PredictError(Exception):
    """A run folder, image path or option that predict cannot use; the message says what to give instead."""


def read_head(run_dir):
    """head.pt's record (the head's description and weights), read without the CLIP."""
    path = os.path.join(run_dir, "head.pt")
    if not os.path.isfile(path):
        raise PredictError(f"{run_dir} holds no head.pt: give the --out folder of a finished "
                           f"`python run.py ...`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, text, not a torch file: torch's message is long and not for them
        raise PredictError(f"{path} is not a head saved by run.py (torch cannot read it: "
                           f"{type(e).__name__}); train the run again, or give the --out folder of another "
                           f"finished run") from None
    missing = [k for k in HEAD_KEYS if k not in record] if isinstance(record, dict) else list(HEAD_KEYS)
    if missing:
        raise PredictError(f"{path} is not a head saved by run.py (it lacks {', '.join(missing)}: a bare "
                           f"state dict from an older clipmlr, or another torch file); train the run again")
    return record


def load_head(run_dir, model, clip_info, record=None):
    """(head in eval mode, head.pt's record) of a finished run, on `model`; refused for another CLIP.
    `record` is head.pt's, if already read (read_head)."""
    record = read_head(run_dir) if record is None else record
    trained, loaded = record["clip"]["identity"], cli.clip_identity(clip_info, model)
    if trained != loaded:
        raise PredictError(f"{run_dir} was trained on CLIP {record['clip']['name']} ({trained}), but the "
                           f"CLIP loaded is {clip_info['name']} ({loaded}); give the run's CLIP with --clip")
    head = build_head(record["head"], model, record["classnames"], n_ctx=record["n_ctx"],
                      class_specific=not record["shared_context"], absence_weights=record["absence_weights"],
                      residual=record["residual"])
    head.load_state_dict(record["state_dict"])
    return head.eval(), record


def read_results(run_dir):
    """results.json of a finished run, checked for what predict reads in it."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise PredictError(f"{run_dir} holds no results.json: give the --out folder of a finished "
                           f"`python run.py ...`")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise PredictError(f"{path} is not a results.json written by run.py (not JSON: {e}); train the run "
                           f"again, or give the --out folder of another finished run") from None
    missing = ([k for k in RESULTS_KEYS if k not in results] if isinstance(results, dict)
               else list(RESULTS_KEYS))
    if missing:
        raise PredictError(f"{path} is not a results.json written by run.py (it lacks {', '.join(missing)}: "
                           f"from an older clipmlr, or another JSON file); train the run again")
    return results


def load_run(run_dir, device="auto", clip=None, weights_dir=None, workers=0, data_root=None,
             say=lambda *a: None, cache_dir=None, evaluating=False):
    """(head, CLIP, head.pt's record, results.json, run.py's arguments) of a finished run. The run's CLIP
    checkpoint, weights folder and data are found where the run had them (absolute paths in results.json),
    from any working directory; `clip`, `weights_dir`, `data_root` and `cache_dir` say where they are now if
    they moved.
    Both files and the run's options are checked before the CLIP is loaded (the slow step)."""
    results, record = read_results(run_dir), read_head(run_dir)
    settings = results["settings"]
    clip = clip or results.get("clip_path")
    argv = cli.settings_argv({**settings, "clip": None}) + [
        "--device", device, "--weights-dir", weights_dir or results["weights_dir"], "--data-root",
        data_root or results["data_root"], "--cache-dir", cache_dir or results["cache_dir"], "--workers",
        str(workers)]
    args = cli.parse_args(argv + (["--clip", clip or settings["clip"]] if clip or settings["clip"] else []),
                          prog="python -m clipmlr.predict")
    if evaluating and args.cache_features:  # --evaluate reads (or writes) the run's test features there
        cli.check_writable(args.cache_dir, "--cache-dir")
    args.device = str(distributed.use_device(args.device))  # e.g. cuda:1 made current, as run.py does
    classes = len(record["classnames"])
    say(f"run {run_dir}: {record['head']} head, {classes} class{'' if classes == 1 else 'es'}, CLIP "
        f"{record['clip']['name']}; loading the CLIP on {args.device}")
    model, clip_info = cli.load_clip(args, say=lambda *a: None)
    head, record = load_head(run_dir, model, clip_info, record)
    return head, model, record, results, args


def image_paths(paths):
    """The image files named by `paths`: files as given, folders searched recursively for IMAGE_TYPES, sorted.
    A PATH that does not exist, or a folder without an image in it or below, is an error naming them all."""
    found, missing, empty = [], [], []
    for p in paths:
        if os.path.isdir(p):
            images = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                            if f.lower().endswith(IMAGE_TYPES))
            found += images
            empty += [] if images else [p]
        elif os.path.isfile(p):
            found.append(p)
        else:
            missing.append(p)
    if missing:
        raise PredictError(f"{', '.join(missing)}: no such image or folder; give images, or folders of "
                           f"images")
    if empty:
        where = "this folder" if len(empty) == 1 else "these folders"
        raise PredictError(f"{', '.join(empty)}: no image ({' '.join(IMAGE_TYPES)}) in {where} or below; "
                           f"give folders of images, or the images themselves")
    return found


def check_json(path):
    """Raises an error naming the --json file `path` and the folder that cannot be written, unless the file
    can be written: save_atomic creates the missing folders above it, or replaces it in its folder."""
    if not os.path.exists(path):  # a file can be made where a folder could: the deepest existing one decides
        cli.check_writable(path, "--json")
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        cli.check_writable(folder, "--json")
    except cli.RunError:
        raise PredictError(f"--json {path}: the folder {folder} is not writable, so the file cannot be "
                           f"replaced; give a file in a folder you may write to") from None


class Images(torch.utils.data.Dataset):
    """(image (3, S, S) or zeros, error message or '', index): an unreadable image is reported, not raised."""

    def __init__(self, paths, transform, size):
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(read_image(self.paths[i])), "", i
        except DataError as e:
            return torch.zeros(3, self.size, self.size), str(e), i


@torch.inference_mode()
def predict(head, model, paths, image_size, device, batch_size=32, workers=0):
    """Yields (path, (C,) margins) per readable image, in order, and (path, error message) per unreadable
    one. Images are read and encoded batch by batch (never all in memory); the class embeddings are computed
    once."""
    encode = frozen_encoder(model, device)
    head.eval()
    embeddings = head.class_embeddings()
    data = Images(paths, image_transform(image_size, train=False), image_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)
    for images, errors, index in tqdm(loader, desc="predicting", unit="batch", disable=None, leave=False):
        readable = torch.tensor([not e for e in errors])
        rows = iter(margin(head.logits(encode(images[readable]), embeddings)).float().cpu() if readable.any()
                    else [])
        for i, error in zip(index.tolist(), errors):
            yield (paths[i], error) if error else (paths[i], next(rows))


def evaluate(head, model, record, results, args, threshold=0.5, top_k=3):
    """(mAP, threshold metrics) of the run's test split again, from head.pt, as run.py scored it (the same
    test split, batches and metrics.scores_of_margins; with its cache, the same cached features when the
    device type is the run's: features are keyed by the device type and precision they were computed in)."""
    _, _, test, test_y, _ = cli.load_data(args, say=lambda *a: None)
    encode = frozen_encoder(model, args.device)
    key = cli.feature_key(args, results["clip"], model)
    loader, _, features_of = cli.test_split(args, test, test_y, encode, key, max(args.batch_size, 100))
    margins = margins_of(head, loader, features_of)  # (N, C)
    scores = scores_of_margins(margins, test_y, threshold, top_k)
    return scores["map"], scores["metrics"]


def parse_args(argv=None):
    """predict's options, before or after the PATHs; a bad one is one line and exit status 2 (cli.Parser)."""
    p = cli.Parser(prog="python -m clipmlr.predict", description=__doc__.split("\n\n")[0],
                   formatter_class=cli.Help)
    p.add_argument("run", help="a finished run.py --out folder (holding head.pt and results.json)")
    p.add_argument("paths", nargs="*", help="images, or folders of images")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="print the classes whose probability passes this (with --evaluate: the threshold of "
                   "the precision/recall metrics)")
    p.add_argument("--top-k", type=int, default=None, help="print the K most likely classes instead (with "
                   "--evaluate: the k of the metrics' top-k variant, default 3)")
    p.add_argument("--json", default=None, help="write every image's probability and margin per class here")
    p.add_argument("--evaluate", action="store_true",
                   help="score the run's test split again and print its mAP")
    p.add_argument("--tolerance", type=float, default=0.01, help="how far --evaluate's mAP may be from "
                   "results.json's, in mAP points, before the exit status is 1: on a GPU, under torchrun or "
                   "with other thread counts the sums run in another order and the last digits differ")
    p.add_argument("--clip", default=None,
                   help="the run's CLIP checkpoint, if not where it was (the same sha256)")
    p.add_argument("--weights-dir", default=None, help="where CLIP checkpoints are (default: the run's)")
    p.add_argument("--data-root", default=None,
                   help="where the run's dataset is now, for --evaluate (default: where it was)")
    p.add_argument("--cache-dir", default=None,
                   help="where the run's feature cache is now, for --evaluate (default: where it was)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=cli.default_workers(), help="data-loading worker processes")
    args = p.parse_intermixed_args(argv)  # `RUN --json out.json a.jpg` as well as `RUN a.jpg --json out.json`
    if not args.paths and not args.evaluate:
        p.error("give images or folders to tag, or --evaluate")
    if not 0 <= args.threshold <= 1:
        p.error(f"--threshold {args.threshold:g} is a probability: give a value in [0, 1]")
    if args.evaluate and not 0 < args.threshold < 1:
        p.error(f"--threshold {args.threshold:g}: --evaluate's precision/recall metrics need a probability "
                f"strictly between 0 and 1")
    if not args.tolerance >= 0:  # NaN too
        p.error(f"--tolerance {args.tolerance:g} must be 0 or more (mAP points)")
    for name in ("top_k", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers} must be 0 or more")
    if args.json and os.path.isdir(args.json):
        p.error(f"--json {args.json} is a folder; give the path of the JSON file to write")
    return args


def run(opts):
    """Tags the images and/or evaluates; returns the exit status (1 if --evaluate is beyond --tolerance).
    What needs no CLIP is checked first (here and in load_run): loading the CLIP is the slow step."""
    paths = image_paths(opts.paths)
    if opts.json:
        check_json(opts.json)
    head, model, record, results, args = load_run(opts.run, opts.device, opts.clip, opts.weights_dir,
                                                  opts.workers, opts.data_root, print, opts.cache_dir,
                                                  opts.evaluate)
    status = 0
    if opts.evaluate:
        print(f"scoring {args.data}'s test split again")
        ran_on = torch.device(results.get("device", args.device)).type
        if args.cache_features and ran_on != torch.device(args.device).type:
            print(f"note: the run encoded its features on {ran_on}, this is {args.device}: the test split is "
                  f"encoded again here (features are cached per device type and precision), and the mAP "
                  f"differs by more than the last digits")
        value, metrics = evaluate(head, model, record, results, args, opts.threshold, opts.top_k or 3)
        print(format_metrics(metrics))
        difference = value - results["map"]
        within = abs(difference) <= opts.tolerance
        print(f"mAP {value:.4f} on {args.data}'s test split; results.json: {results['map']:.4f}; difference "
              f"{difference:+.4f}, {'within' if within else 'outside'} the tolerance {opts.tolerance:g}")
        status = 0 if within else 1
    if paths:
        tag(head, model, record, args, paths, opts)
    return status


def tag(head, model, record, args, paths, opts):
    """Prints each image's classes (--threshold, or the --top-k most likely) and writes --json."""
    names = record["classnames"]
    print(f"{cli.plural(len(paths), 'image')} to tag")
    probabilities, margins, unreadable = {}, {}, {}
    for path, out in predict(head, model, paths, record["image_size"], torch.device(args.device),
                             opts.batch_size, opts.workers):
        if isinstance(out, str):
            unreadable[path] = out
            continue
        p = torch.sigmoid(out)  # = softmax(logits)[..., 0], for people to read
        order = torch.argsort(out, descending=True)[: opts.top_k] if opts.top_k else \
            [c for c in torch.argsort(out, descending=True).tolist() if p[c] >= opts.threshold]
        shown = (", ".join(f"{names[c]} {p[c]:.3f}" for c in order)
                 or f"(no class at or above {opts.threshold:g})")
        print(f"{path}: {shown}")
        probabilities[path] = {n: float(v) for n, v in zip(names, p)}
        margins[path] = {n: float(v) for n, v in zip(names, out)}
    for path, error in unreadable.items():
        print(f"skipped, unreadable: {error}", file=sys.stderr)
    print(f"{cli.plural(len(probabilities), 'image')} tagged"
          + (f", {len(unreadable)} unreadable (listed above)" if unreadable else ""))
    if opts.json:
        save_atomic({"run": os.path.abspath(opts.run), "clip": record["clip"], "threshold": opts.threshold,
                     "probabilities": probabilities, "margins": margins, "unreadable": unreadable}, opts.json)
        print(f"-> {opts.json}")


def main(argv=None):
    opts = parse_args(argv)
    try:
        return run(opts)
    except Exception as e:
        if not cli.is_user_error(e):  # a bug: it keeps its traceback
            raise
        print(f"error: {e}", file=sys.stderr)  # the user's to fix: one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
