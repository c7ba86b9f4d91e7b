"""Train and evaluate one head for multi-label recognition with partial labels on a frozen CLIP.

    python run.py --head positive --data voc --labels 0.1          # the paper's VOC2007 setting, 10% labels
    python run.py --head dual --data demo                          # offline demo, about a minute on a CPU

Protocol (PositiveCoOp paper, Sec. 4): the training labels are masked (kept with probability --labels), the head is
trained with the asymmetric loss for 50 epochs with SGD and a cosine schedule, and the mAP of the LAST epoch on
the full test split is reported. Results go to --out (default runs/<data>-<head>-<labels>-seed<seed>/).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from clipmlr import clip as clipmodule
from clipmlr import distributed
from clipmlr.checkpoint import CheckpointError, load_checkpoint, save_atomic, settings_mismatch
from clipmlr.data import DataError, ImageDataset, image_transform, load_coco, load_voc, mask_labels
from clipmlr.data import download_coco, download_voc
from clipmlr.demo import DEMO_CLASSES, demo_split, tiny_clip
from clipmlr.features import encode_split
from clipmlr.heads import HEADS, build_head, count_trainable, parameter_groups
from clipmlr.loss import asymmetric_loss
from clipmlr.metrics import average_precision



class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help already tells the default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--head", choices=sorted(HEADS), default="positive", help="which head to train")
    p.add_argument("--data", choices=["voc", "coco", "demo"], default="demo", help="dataset")
    p.add_argument("--labels", type=float, default=1.0, help="fraction of training labels kept, in (0, 1]")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/voc2007 or data/coco2014)")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--clip", default=None, help="CLIP name or checkpoint path (default RN101; for the demo a "
                   "random miniature CLIP unless weights/RN101.pt exists)")
    p.add_argument("--weights-dir", default="weights", help="where CLIP checkpoints are downloaded")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default 448; demo 224)")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimizer step")
    p.add_argument("--lr-prompt", type=float, default=0.002, help="SGD lr of the prompts' context vectors")
    p.add_argument("--lr-embedding", type=float, default=1.0, help="SGD lr of the free class embeddings")
    p.add_argument("--lr-linear", type=float, default=0.01, help="SGD lr of the baseline's projector")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay (PositiveCoOp's code uses 0, DualCoOp's 5e-4)")
    p.add_argument("--loss-weight", type=float, default=0.03,
                   help="multiplies the summed loss (the authors' loss_w; their README example uses 0.03)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs at the constant --warmup-lr")
    p.add_argument("--warmup-lr", type=float, default=0.005, help="lr of every group during warm-up")
    p.add_argument("--n-ctx", type=int, default=16, help="learned context tokens per prompt")
    p.add_argument("--shared-context", action="store_true",
                   help="one context for all classes instead of one per class")
    p.add_argument("--voc-difficult", choices=["absent", "unknown", "present"], default="absent",
                   help="how VOC objects marked difficult count (the reference code: absent)")
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="encode every image once (K augmented views for training) and train on the stored "
                   "features (default: on for the demo, off otherwise)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="Cutout + RandAugment on training images (default: on, off for the demo, whose classes "
                   "differ by colour, which RandAugment's colour operations wash out)")
    p.add_argument("--cache-views", type=int, default=8, help="augmented views per training image in the cache")
    p.add_argument("--cache-dir", default="cache", help="where --cache-features stores the encoded features")
    p.add_argument("--demo-images", type=int, default=256, help="demo training images (the test split has half)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N epochs (0: last epoch only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label mask, the head's init and the data order")
    p.add_argument("--out", default=None, help="output folder (default runs/<data>-<head>-<labels>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    args = p.parse_args(argv)
    if not 0 < args.labels <= 1:
        p.error(f"--labels {args.labels} is outside (0, 1]: give the fraction of training labels to keep, "
                f"e.g. --labels 0.1 for 10%")
    for name in ("epochs", "batch_size", "cache_views", "n_ctx", "image_size", "demo_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.clip and args.clip not in clipmodule.available_models() and not os.path.isfile(args.clip):
        p.error(f"--clip {args.clip}: no such file, and not one of the model names {clipmodule.available_models()}")
    demo = args.data == "demo"
    args.cache_features = demo if args.cache_features is None else args.cache_features
    args.augment = not demo if args.augment is None else args.augment
    args.image_size = args.image_size or (224 if demo else 448)
    args.data_root = args.data_root or os.path.join("data", {"voc": "voc2007", "coco": "coco2014"}.get(args.data, ""))
    args.out = args.out or os.path.join("runs", f"{args.data}-{args.head}-{args.labels:g}-seed{args.seed}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device; give auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu (or auto)")
    return args


def load_data(args):
    """(train images, train labels, test images, test labels, class names)."""
    if args.data == "demo":
        # the demo set and its CLIP are fixed (seed 0) like a real dataset; --seed varies mask, init and order
        train, train_y = demo_split(args.demo_images, 0, args.image_size)
        test, test_y = demo_split(max(1, args.demo_images // 2), 0, args.image_size, offset=10**6)
        return train, train_y, test, test_y, list(DEMO_CLASSES)
    if args.download:
        (download_voc if args.data == "voc" else download_coco)(args.data_root)
    if args.data == "voc":
        train, train_y, names = load_voc(args.data_root, "trainval", args.voc_difficult)
        test, test_y, _ = load_voc(args.data_root, "test", args.voc_difficult)
    else:
        train, train_y, names = load_coco(args.data_root, "train2014")
        test, test_y, _ = load_coco(args.data_root, "val2014")
    return train, train_y, test, test_y, names


def load_clip(args, calibration_images):
    """(model, description for results.json) — a real checkpoint, or the demo's random miniature CLIP."""
    name = args.clip or "RN101"
    if args.data == "demo" and args.clip is None and not os.path.isfile(os.path.join(args.weights_dir, "RN101.pt")):
        transform = image_transform(args.image_size, train=False)
        model = tiny_clip(torch.stack([transform(im) for im in calibration_images]), seed=0,
                          resolution=args.image_size)
        return model.to(args.device), {"name": "random-tiny", "sha256": None}
    model, sha = clipmodule.load(name, device=args.device, root=args.weights_dir)
    return model, {"name": name, "sha256": sha}


def feature_key(args, clip_info):
    """What stored features depend on, besides the split and view (the cache refuses any mismatch)."""
    return {"clip": clip_info["name"], "clip_sha256": clip_info["sha256"], "data": args.data,
            "image_size": args.image_size,
            "data_root": None if args.data == "demo" else os.path.abspath(args.data_root)}


def lr_factor(epoch, args):
    """Constant warm-up, then cosine decay from the base lr (Dassl's schedule, which the authors train with)."""
    if epoch < args.warmup_epochs:
        return None  # every group at args.warmup_lr
    return 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


def set_lr(optimizer, epoch, args):
    factor = lr_factor(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = args.warmup_lr if factor is None else group["base_lr"] * factor


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.inference_mode()
def evaluate(head, test_set, batch_size, n_classes):
    """Scores (N, C) = softmax(logits)[..., 0] for the whole test split, each image scored exactly once
    (each rank scores its own contiguous shard); the class embeddings are computed once."""
    module = getattr(head, "module", head)  # the head itself under DistributedDataParallel
    module.eval()
    embeddings = module.class_embeddings()
    shard = torch.tensor_split(torch.arange(len(test_set)), distributed.world_size())[distributed.rank()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, shard.tolist()), batch_size=batch_size,
                                         num_workers=test_set.workers)
    scores = [torch.empty(0, n_classes)]
    for features, _, _ in loader:
        logits = module.logits(test_set.to_features(features), embeddings)
        scores.append(torch.softmax(logits.float(), dim=-1)[..., 0].cpu())
    module.train()
    scores = torch.cat(scores)
    return distributed.gather_rows((shard, scores), len(test_set))


def settings_of(args):
    keys = ["head", "data", "labels", "seed", "clip", "image_size", "epochs", "batch_size", "lr_prompt",
            "lr_embedding", "lr_linear", "momentum", "weight_decay", "loss_weight", "warmup_epochs", "warmup_lr",
            "n_ctx", "shared_context", "voc_difficult", "augment", "cache_features", "cache_views", "demo_images"]
    return {k: getattr(args, k) for k in keys}


def say(*text, **kw):
    """print on rank 0 only."""
    if distributed.rank() == 0:
        print(*text, **kw, flush=True)


def run(args):
    rank, world, device = distributed.setup(args.device)
    args.device = str(device)  # under torchrun each rank has its own GPU
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} processes; the global "
                         f"batch is split evenly over them, so give a multiple of {world}")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    state = None
    if args.resume:
        state = load_checkpoint(ckpt_path)
        diff = settings_mismatch(state["settings"], settings_of(args))
        if diff:
            raise CheckpointError(f"cannot resume {ckpt_path}: it was made with different settings ({diff}); "
                                  f"use the same options, or another --out for a new run")
    elif os.path.isfile(ckpt_path):
        raise CheckpointError(f"{args.out} already holds a run; pass --resume to continue it, or another --out")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)

    # data, CLIP and the label mask
    train, train_y, test, test_y, classnames = load_data(args)
    model, clip_info = load_clip(args, train)
    mask_y = mask_labels(train_y, args.labels, args.seed)
    say(f"settings: {json.dumps(settings_of(args))}")
    say(f"data: {args.data}, {len(train)} training images ({(mask_y >= 0).float().mean() * 100:.1f}% of labels "
        f"kept), {len(test)} test images, {len(classnames)} classes; device {device}"
        + (f", {world} processes" if world > 1 else ""))
    if clip_info["name"] == "random-tiny":
        say("NOTE: the CLIP is a randomly initialised miniature model (no weights found): the numbers below "
            "show that the pipeline learns, and say nothing about the paper.")
    else:
        say(f"CLIP: {clip_info['name']} (sha256 {clip_info['sha256'][:12]}...)")

    # the head and its optimizer
    seed_everything(args.seed)
    head = build_head(args.head, model, classnames, n_ctx=args.n_ctx, class_specific=not args.shared_context)
    groups = parameter_groups(head, args.lr_prompt, args.lr_embedding, args.lr_linear)
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay)
    say(f"head: {args.head}, {count_trainable(head):,} trainable parameters "
        "(" + ", ".join(f"{g['name']} lr {g['lr']:g}" for g in groups) + ")")
    history, start_epoch, train_seconds = [], 0, 0.0
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch, train_seconds = state["history"], state["epoch"], state["train_seconds"]
        mask_y = state["mask"]
        say(f"resuming {ckpt_path} after epoch {start_epoch}")
    if rank == 0:
        save_atomic(mask_y, os.path.join(args.out, "mask.pt"))
    trained = head
    if world > 1:  # gradients are averaged over ranks; the loss below is scaled to keep the global-batch sum
        trained = torch.nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)

    # features: the frozen encoder runs once per image and view (cached) or once per batch (in the loop)
    t0 = time.time()
    cache_dir = args.cache_dir if args.cache_features else None
    key = feature_key(args, clip_info)
    encode = dict(model=model, device=device, batch_size=args.batch_size, workers=args.workers, cache_dir=cache_dir)
    train_views = (args.cache_views if args.augment else 1) if args.cache_features else None  # 1: all alike
    train_set = encode_split(ImageDataset(train, mask_y, image_transform(args.image_size, train=args.augment)),
                             views=train_views, key={**key, "split": "train",
                                                     "view": "augmented" if args.augment else "plain"}, **encode)
    # without the cache the test images go through the encoder at evaluation time, each rank its own shard
    test_set = encode_split(ImageDataset(test, test_y, image_transform(args.image_size, train=False)),
                            views=1 if args.cache_features else None,
                            key={**key, "split": "test", "view": "plain"}, **encode)
    if args.cache_features:
        say(f"features: test images x 1 view, training images x {train_views} view(s), cached in "
            f"{args.cache_dir} ({time.time() - t0:.1f}s)")

    # training: for epoch, for batch: features, forward, loss, backward, step
    # the order is a permutation seeded by (seed, epoch); rank r takes every world-th image of it, so the union of
    # the ranks' batches k is the global batch k that one process would see
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    def test_ap():
        return average_precision(evaluate(head, test_set, max(args.batch_size, 100), len(classnames)), test_y)

    ap = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        seed_everything(args.seed * 100_003 + epoch * 1009 + rank)  # order and augmentation: a function of these
        set_lr(optimizer, epoch, args)
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler, num_workers=train_set.workers,
                                             pin_memory=device.type == "cuda")
        total = torch.zeros((), device=device)
        for features, targets, _ in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=rank != 0 or None):
            logits = trained(train_set.to_features(features))
            loss = args.loss_weight * asymmetric_loss(logits, targets.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages gradients; x world makes them those of the global sum
            optimizer.step()
            total += loss.detach()
        mean_loss = distributed.all_sum(total).item() / len(loader)  # per global batch; one sync per epoch
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"the loss became {mean_loss} in epoch {epoch + 1}; the run stops here. The "
                                     f"last good checkpoint is {ckpt_path}; lower the learning rates or "
                                     f"--loss-weight and start a new run")
        train_seconds += time.time() - t0
        record = {"epoch": epoch + 1, "loss": mean_loss, "lr": [g["lr"] for g in optimizer.param_groups],
                  "seconds": time.time() - t0}
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            ap = test_ap()
            record["map"] = 100 * float(np.nanmean(ap))
        history.append(record)
        eta = train_seconds / len(history) * (args.epochs - epoch - 1)
        say(f"epoch {epoch + 1:3d}/{args.epochs}  loss {mean_loss:9.4f}  lr {optimizer.param_groups[0]['lr']:.3g}  "
            f"{record['seconds']:6.1f}s  eta {eta / 60:5.1f} min" + (f"  mAP {record['map']:.2f}" if "map" in record else ""))
        if rank == 0:
            save_atomic({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "history": history, "train_seconds": train_seconds, "mask": mask_y,
                         "settings": settings_of(args)}, ckpt_path)
    if ap is None:  # resumed a run whose training had finished: evaluate its final head
        ap = test_ap()
        history[-1]["map"] = 100 * float(np.nanmean(ap))

    # results of the last epoch
    results = {
        "head": args.head, "data": args.data, "labels": args.labels, "seed": args.seed, "map": history[-1]["map"],
        "per_class_ap": {n: 100 * float(a) for n, a in zip(classnames, ap)},
        "trainable_params": count_trainable(head), "train_seconds": train_seconds, "history": history,
        "clip": clip_info, "settings": settings_of(args), "device": str(device), "processes": world,
        "torch": torch.__version__,
    }
    if rank == 0:
        save_atomic(head.state_dict(), os.path.join(args.out, "head.pt"))
        save_atomic(results, os.path.join(args.out, "results.json"))
    say(f"mAP {results['map']:.2f} (last epoch) -> {os.path.join(args.out, 'results.json')}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, CheckpointError, clipmodule.DownloadError, FloatingPointError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
