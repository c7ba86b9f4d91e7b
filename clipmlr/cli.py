"""The command line that run.py and the analyses share (a layer): the options, and the data and CLIP
they name.

    args = parse_args(argv)                     every option, with its default and unit (python run.py --help)
    check_writable(path, "--out")               before anything is loaded, so a bad folder fails at once
    train, train_y, test, test_y, classnames = load_data(args)        VOC2007, COCO2014 or the offline demo
    model, clip_info = load_clip(args)          a checkpoint, an OpenAI name, or "demo" (the miniature)
    split_set(args, images, labels, train, ...) a split as run.py reads it: images, or their cached features
    loader, shard, features_of = test_split(...)   this rank's share of the test split, as run.py scores it

Errors a user can cause are the project's own types (`is_user_error`); run.py and the analyses print them as
one line and exit with status 2. Anything else is a bug and keeps its traceback.
"""
import argparse
import math
import os
import tempfile

import torch

from . import clip, distributed
from .data import ImageDataset, load_coco, load_voc
from .heads import HEADS, prompt_tokens

# The other layers (the cache, downloads, your own folder, the demo, the input pipelines) are imported where
# they are used, so a project that vendors the loop without them still runs.


class RunError(Exception):
    """A run that cannot start or go on (a folder that cannot be written, a loss that became NaN, ...)."""


def is_user_error(error):
    """True for an error the user can cause and fix (run.py and the commands print it as one line, exit 2):
    every error type clipmlr defines (DataError, CacheError, CheckpointError, RunError, clip.LoadError, ...).
    Python's own (an AssertionError, a TypeError, ...) is a bug and keeps its traceback."""
    return type(error).__module__.split(".")[0] == "clipmlr"


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad option is one line on stderr (no usage block) and exit status 2; under
    torchrun only rank 0 prints it (every rank parses the same options)."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
        self.exit(2)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help already tells the default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(prog=None):
    """Every option of run.py, with its default and unit (`python run.py --help`)."""
    p = Parser(prog=prog, formatter_class=Help, description="Train and evaluate one head for multi-label "
               "recognition with partial labels on a frozen CLIP.")
    p.add_argument("--head", choices=sorted(HEADS), default="positive", help="which head to train")
    p.add_argument("--data", choices=["voc", "coco", "nuswide", "folder", "demo"], default="demo",
                   help="dataset (folder: your own images, --data-root DIR holding train.csv and test.csv; "
                   "see README.md)")
    p.add_argument("--labels", type=float, default=1.0, help="fraction of training labels kept, in (0, 1] "
                   "(with --data folder: of those your CSV gives; its unknown cells stay unknown)")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/voc2007, data/coco2014, "
                   "data/nuswide or data/folder)")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--nuswide-skip-missing", action="store_true", help="--data nuswide: train and test on "
                   "the listed images that are on disk (copies in circulation lack some); without it a "
                   "missing image stops the run")
    p.add_argument("--clip", default=None, help="CLIP name (RN101, RN50, ...; demo: the miniature pretrained "
                   "on the demo's scenes, usable on any data) or checkpoint path (default RN101; demo for "
                   "--data demo)")
    p.add_argument("--weights-dir", default="weights", help="where CLIP checkpoints are downloaded")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default 448; demo 128)")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimizer step")
    p.add_argument("--lr-prompt", type=float, default=None, help="SGD lr of the prompts' context vectors "
                   f"(default {PAPER_LRS['prompt']:g}, the paper's Sec. 4)")
    p.add_argument("--lr-embedding", type=float, default=None, help="SGD lr of PositiveCoOp's / "
                   "NegativeCoOp's free class embeddings and residuals (default "
                   f"{PAPER_LRS['embedding']:g}, the paper's Sec. 4)")
    p.add_argument("--lr-linear", type=float, default=None, help="SGD lr of the baseline's projector "
                   f"(default {PAPER_LRS['linear']:g}, the paper's Sec. 4)")
    p.add_argument("--lr", type=float, default=None, help="the learning rates as the authors' train.py sets "
                   "them from its --lr: LR for the free embeddings, LR x 0.01 for the context vectors and "
                   "the baseline's projector (instead of the three above; their yaml's default is 0.002)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay (PositiveCoOp's code uses 0, DualCoOp's 5e-4)")
    p.add_argument("--loss-weight", type=float, default=None,
                   help="multiplies the summed loss (the authors' loss_w: 1.0 in their opts.py, 0.03 in "
                   "their READMEs' examples; default: clipmlr's rule 0.03 · 0.5 / the fraction of training "
                   "labels known, 0.03 at 50%%, 0.15 at 10%%; give a number to fix it)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs at the constant --warmup-lr")
    p.add_argument("--warmup-lr", type=float, default=0.005, help="lr of every group during warm-up")
    p.add_argument("--n-ctx", type=int, default=16, help="learned context tokens per prompt")
    p.add_argument("--shared-context", action="store_true",
                   help="one context for all classes instead of one per class")
    p.add_argument("--absence-weights", choices=["presence", "own"], default="presence",
                   help="spatial weights of the absence side: the presence side's softmax (the authors' "
                   "code) or its own (as the paper's Sec. 3.1 reads)")
    p.add_argument("--no-residual", action="store_true", help="PositiveCoOp / NegativeCoOp without the "
                   "learned residual on the prompt's text feature (the authors' code has it; the paper does "
                   "not describe it)")
    p.add_argument("--pipeline", choices=["auto", "pil", "tensor", "device"], default="auto", help="image "
                   "pipeline: pil (the authors': PIL images in the workers), tensor (uint8 tensors in the "
                   "workers, the same policy and draws on torchvision's tensor kernels) or device (the "
                   "workers read bytes; decoding and augmentation run in batches on --device: the GPU's "
                   "input path, not yet run on a GPU); auto: pil, on the CPU and on CUDA")
    p.add_argument("--randaugment", choices=["authors", "torchvision"], default="authors",
                   help="RandAugment policy: the authors' (2 of 15 operations, each p=0.5, magnitude 1-9 "
                   "drawn each time) or torchvision's (2 of 14, always applied, fixed magnitude 9)")
    p.add_argument("--voc-difficult", choices=["absent", "unknown", "present"], default="absent",
                   help="how VOC objects marked difficult count (the reference code: absent)")
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="encode every image once (K augmented views for training) and train on the stored "
                   "features (default: on for the demo, off otherwise)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="Cutout + RandAugment on training images (default: on, off for the demo, whose "
                   "classes differ by colour, which RandAugment's colour operations wash out)")
    p.add_argument("--cache-views", type=int, default=8,
                   help="augmented views per training image in the cache")
    p.add_argument("--cache-dir", default="cache", help="where --cache-features stores the encoded features")
    p.add_argument("--demo-images", type=int, default=1024,
                   help="demo training images (the test split has half)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate every N epochs (0: last epoch only)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability over which a label counts as "
                   "predicted, for the precision/recall/F1 metrics reported beside the mAP")
    p.add_argument("--top-k", type=int, default=3, help="the top-k variant of those metrics (ML-GCN's top-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label mask, the head's init, the data "
                   "order and the augmentations (0 or more)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/<data>-<head>-<labels>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out (a run "
                   "with no checkpoint yet starts at epoch 1, keeping any feature cache it had begun)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=None, help="data-loading worker processes, kept from epoch "
                   "to epoch (default: the CPU cores this process may use, shared among torchrun's "
                   "processes, at most 16)")
    return p


def parse_args(argv=None, prog=None):
    """The options of run.py (and of the commands that share them), checked, with their defaults resolved."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    check_values(p, args)
    if args.workers is None:
        args.workers = default_workers()
    if args.clip and args.clip not in ["demo", *clip.available_models()] and not os.path.isfile(args.clip):
        p.error(f"--clip {args.clip}: no such file, and not one of the model names "
                f"{['demo', *clip.available_models()]}")
    demo = args.data == "demo"
    args.cache_features = demo if args.cache_features is None else args.cache_features
    args.augment = not demo if args.augment is None else args.augment
    args.image_size = args.image_size or (128 if demo else 448)
    folders = {"voc": "voc2007", "coco": "coco2014"}
    args.data_root = args.data_root or os.path.join("data", folders.get(args.data, args.data))
    if args.download and args.data not in ("voc", "coco"):
        p.error(f"--download fetches VOC2007 or COCO2014; --data {args.data} has nothing to download")
    if args.nuswide_skip_missing and args.data != "nuswide":
        p.error(f"--nuswide-skip-missing does nothing for --data {args.data}; leave it out")
    args.out = args.out or os.path.join("runs", f"{args.data}-{args.head}-{args.labels:g}-seed{args.seed}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device; give auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu (or auto)")
    if args.pipeline == "auto":  # the device pipeline becomes auto's choice on CUDA once it has run on a GPU
        args.pipeline = "pil"
    lrs = authors_lrs(args.lr) if args.lr is not None else PAPER_LRS
    for group, lr in lrs.items():  # the head's own groups; None (recorded as such) for those it does not have
        name = f"lr_{group}"
        if args.head not in USED_BY[name]:
            setattr(args, name, None)
        elif getattr(args, name) is None:
            setattr(args, name, lr)
    return args


PAPER_LRS = {"prompt": 0.002, "embedding": 1.0, "linear": 0.01}  # the paper's Sec. 4


def authors_lrs(lr):
    """The learning rates the authors' train.py (PositiveCoOp, NegativeCoOp, baseline) derives from its --lr:
    the context vectors' group `lr * 0.01`, the free embeddings' group `lr`; the baseline's projector
    `lr * 0.01`."""
    return {"prompt": lr * 0.01, "embedding": lr, "linear": lr * 0.01}


# the options that only some heads use: given to another head they would do nothing, and are refused
USED_BY = {"n_ctx": ("dual", "positive", "negative"), "shared_context": ("dual", "positive", "negative"),
           "absence_weights": ("dual", "positive", "negative"), "no_residual": ("positive", "negative"),
           "lr_prompt": ("dual", "positive", "negative"), "lr_embedding": ("positive", "negative"),
           "lr_linear": ("baseline",)}


def check_values(p, args):
    """p.error (one line, exit 2) for a value out of range, or an option that does nothing for --head."""
    if not 0 < args.labels <= 1:
        p.error(f"--labels {args.labels} is outside (0, 1]: give the fraction of training labels to keep, "
                f"e.g. --labels 0.1 for 10%")
    if not 0 < args.threshold < 1:  # NaN too
        p.error(f"--threshold {args.threshold} is a probability: give a value strictly between 0 and 1, "
                f"e.g. 0.5")
    for name in ("epochs", "batch_size", "cache_views", "n_ctx", "image_size", "demo_images", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value} must be at least 1")
    for name in ("eval_every", "warmup_epochs", "seed", "workers"):
        value = getattr(args, name)
        if value is not None and value < 0:
            p.error(f"--{name.replace('_', '-')} {value} must be 0 or more")
    for name in ("lr_prompt", "lr_embedding", "lr_linear", "lr", "loss_weight", "warmup_lr", "weight_decay",
                 "momentum"):
        value, positive = getattr(args, name), name in ("lr", "loss_weight")  # a zero would train nothing
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            p.error(f"--{name.replace('_', '-')} {value} must be a finite number "
                    f"{'>' if positive else '>='} 0")
    if args.momentum >= 1:
        p.error(f"--momentum {args.momentum} must be below 1 (SGD diverges at 1 and above)")
    if args.image_size is not None and args.image_size < 32:
        p.error(f"--image-size {args.image_size} is below 32: the image encoder downsamples by 32, so give "
                f"at least 32 (the paper: 448)")
    given = [name for name in ("lr_prompt", "lr_embedding", "lr_linear") if getattr(args, name) is not None]
    if args.lr is not None and given:
        p.error(f"--lr sets every learning rate as the authors' train.py does; give it or "
                f"--{given[0].replace('_', '-')}, not both")
    for name, heads in USED_BY.items():
        if args.head not in heads and getattr(args, name) != p.get_default(name):
            p.error(f"--{name.replace('_', '-')} does nothing for --head {args.head} (only for "
                    f"{', '.join(heads)}); leave it out")


def head_argv(argv, head):
    """`argv` (run.py options) without those that do nothing for `head` (USED_BY), so that a sweep over all
    four heads can pass, e.g., --no-residual or --n-ctx 8 to the heads that use it."""
    flags = {"--" + name.replace("_", "-") for name, heads in USED_BY.items() if head not in heads}
    switches = {"--shared-context", "--no-residual"}  # the two of them that take no value
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = arg not in switches
        elif arg.split("=")[0] not in flags:
            out.append(arg)
    return out


def plural(n, noun):
    """'1 image', '2 images'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def default_workers(cap=16):
    """The CPU cores this process may use (its affinity, not the machine's count), shared among the processes
    torchrun started, at most `cap`: decoding and augmenting images is what the workers do, one core each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores // int(os.environ.get("WORLD_SIZE", "1"))))


def settings_of(args):
    """What a run's numbers depend on: saved with it, and compared on --resume (and by the sweep)."""
    keys = ["head", "data", "labels", "seed", "clip", "image_size", "epochs", "batch_size", "lr_prompt",
            "lr_embedding", "lr_linear", "momentum", "weight_decay", "loss_weight", "warmup_epochs",
            "warmup_lr", "n_ctx", "shared_context", "absence_weights", "no_residual", "randaugment",
            "pipeline", "voc_difficult", "augment", "cache_features", "cache_views", "demo_images"]
    if args.data == "nuswide":  # which images a NUS-WIDE run uses
        keys.append("nuswide_skip_missing")
    return {k: getattr(args, k) for k in keys}


def check_writable(path, option):
    """Raises RunError unless the folder `path` exists and is writable, or could be created; leaves nothing
    behind. Writability is tried (a temporary file in the deepest existing folder), not read off the
    permission bits, which say yes for root and for /proc."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunError(f"{option} {path}: {existing} is a file, not a folder, so {path} cannot be created; "
                       f"give another {option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RunError(f"{option} {path}: the folder {existing} is not writable ({e.strerror}); give a "
                       f"folder you may write to") from None


def load_data(args, say=print):
    """(train images, (N, C) train labels, test images, (N', C) test labels, class names) that --data
    names."""
    if args.data == "demo":
        from .demo import DEMO_CLASSES, demo_split
        # the demo set and its CLIP are fixed (seed 0) like a real dataset; --seed varies mask, init and order
        say(f"generating the demo images ({args.demo_images} training, {max(1, args.demo_images // 2)} test)")
        train, train_y = demo_split(args.demo_images, 0, args.image_size)
        test, test_y = demo_split(max(1, args.demo_images // 2), 0, args.image_size, offset=10**6)
        names = list(DEMO_CLASSES)
    else:
        if args.download:
            from .download import download_coco, download_voc
            (download_voc if args.data == "voc" else download_coco)(args.data_root)
        say(f"reading the {args.data} labels in {args.data_root}")
        if args.data == "voc":
            train, train_y, names = load_voc(args.data_root, "trainval", args.voc_difficult)
            test, test_y, _ = load_voc(args.data_root, "test", args.voc_difficult)
        elif args.data == "folder":
            from .folder import load_folder
            train, train_y, names = load_folder(args.data_root, "train")
            test, test_y, _ = load_folder(args.data_root, "test", names)
        elif args.data == "nuswide":
            from .nuswide import load_nuswide_splits
            train, train_y, test, test_y, names = load_nuswide_splits(
                args.data_root, args.nuswide_skip_missing, say)
        else:
            train, train_y, names = load_coco(args.data_root, "train2014")
            test, test_y, _ = load_coco(args.data_root, "val2014")
    # a prompt over the text encoder's 77 tokens fails now, not after loading CLIP
    if args.head != "baseline":
        prompt_tokens(names, args.n_ctx)
    return train, train_y, test, test_y, names


def load_clip(args, say=print):
    """(model, {"name", "sha256"}) of the CLIP that --clip names: an OpenAI name (downloaded into
    --weights-dir), a checkpoint file, or "demo", the miniature pretrained on the demo's scenes
    (weights/demo-clip.pt; the default for --data demo, and usable on any data)."""
    name = args.clip or ("demo" if args.data == "demo" else "RN101")
    path = name
    if name == "demo":
        from .demo import MINIATURE_NOTE, demo_clip_path
        path = demo_clip_path()
        if not os.path.isfile(path):
            raise RunError(f"the demo's CLIP {path} is missing; build it with `python -m clipmlr.pretrain "
                           f"--out {path}` (minutes on a CPU), or give another --clip")
        say(f"loading CLIP {name}: {MINIATURE_NOTE}")
    else:
        say(f"loading CLIP {name}")
    model, _ = clip.load(path, device=args.device, download_root=args.weights_dir)
    return model, {"name": name, "sha256": model.sha256}


def clip_identity(clip_info, model):
    """What names a CLIP's weights: its checkpoint's sha256, or for an unsaved (random) model a hash of
    them."""
    from .cache import weights_fingerprint
    return clip_info["sha256"] or f"weights {weights_fingerprint(model)}"


def split_set(args, images, labels, train, encode=None, key=None):
    """One split as run.py reads it: the images through --pipeline (augmented for training with --augment), or
    with --cache-features their features from the cache (encoded now by `encode` when missing; `key` is
    `feature_key`'s). Items are (image (3, S, S) or features (L, D), labels (C,), index)."""
    from .pipelines import image_pipeline
    augment = train and args.augment
    dataset = ImageDataset(images, labels, image_pipeline(args.image_size, augment, args.randaugment,
                                                          args.pipeline))
    if not args.cache_features:
        return dataset
    from .cache import encode_split  # [layer: cache] every image encoded once (training: V augmented views)
    views = args.cache_views if augment else 1
    key = {**key, "split": "train" if train else "test", "view": "augmented" if augment else "plain"}
    return encode_split(dataset, views, encode, args.batch_size, args.workers, args.cache_dir, key,
                        seed=args.seed if augment else 0, pin_memory=torch.device(args.device).type == "cuda")


def test_split(args, test, test_y, encode, key, batch_size):
    """(loader, shard, features_of): this process's share of the test split as run.py scores it (all of it
    with one process; [layer: torchrun] a contiguous shard per rank), the shard's image indices, and the
    function from the loader's batches to their (B, L, D) features (`features_of`)."""
    from .pipelines import collate
    test_set = split_set(args, test, test_y, False, encode, key)
    shard = distributed.shard(len(test_set))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, shard.tolist()),
                                         batch_size=batch_size,
                                         num_workers=0 if args.cache_features else args.workers,
                                         collate_fn=collate)
    return loader, shard, features_of(args, encode)


def features_of(args, encode):
    """batch -> (B, L, D) fp32 features on the run's device: `encode` on images, or, with --cache-features,
    the cached features (fp16 on disk) moved there."""
    if not args.cache_features:
        return encode
    device = torch.device(args.device)
    return lambda batch: batch.to(device, non_blocking=True).float()


def settings_argv(settings):
    """The run.py options that give back `settings` (as settings_of records them), e.g. to rebuild a run."""
    argv = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if key in ("augment", "cache_features") and value is not None:
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return head_argv(argv, settings["head"]) if "head" in settings else argv  # a head's own options only


def feature_key(args, clip_info, model):
    """What stored features depend on, besides the split, view and seed (the cache refuses any mismatch):
    also the device type and precision they were computed in (bf16 autocast on CUDA, fp32 on the CPU;
    heads.frozen_encoder). None without --cache-features (nothing is stored)."""
    if not args.cache_features:
        return None
    device = torch.device(args.device).type
    key = {"clip": clip_info["name"], "clip_sha256": clip_info["sha256"], "data": args.data,
           "image_size": args.image_size,
           "data_root": None if args.data == "demo" else os.path.abspath(args.data_root),
           "device": device, "precision": "bf16 autocast" if device == "cuda" else "fp32"}
    if clip_info["sha256"] is None:  # an unsaved model (a test's random one): named by its weights
        from .cache import weights_fingerprint
        key["weights"] = weights_fingerprint(model)
    return key
