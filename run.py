"""Train and evaluate one head for multi-label recognition with partial labels on a frozen CLIP.

    python run.py --head positive --data voc --labels 0.1          # the paper's VOC2007 setting, 10% labels
    python run.py --head dual --data demo                          # offline demo, about a minute on a CPU

The paper's protocol (PositiveCoOp, Sec. 4), as `run` reads top to bottom: the training labels are masked
(each kept with probability --labels); a frozen CLIP turns every image into dense features; the head turns
those into presence/absence logits; the asymmetric loss trains the head for 50 epochs with SGD, a constant
warm-up and a cosine schedule (`train_one_epoch`); the mAP of the LAST epoch on the full test split is the
result (`evaluate`, which also reports precision, recall and F1 in ML-GCN's and ASL's conventions). It goes to
--out (default runs/<data>-<head>-<labels>-seed<seed>/).

The method is the core of clipmlr (clip/, heads.py, aggregation.py, loss.py, metrics.py, data.py, augment.py).
The lines marked [layer] call what goes beyond the paper: the feature cache, checkpoints and resume, torchrun,
the input pipelines, and the command line (cli).
"""
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from clipmlr.augment import EpochSampler, SeededViews
from clipmlr.data import check_decodable, mask_labels
from clipmlr.heads import build_head, count_trainable, frozen_encoder, parameter_groups
from clipmlr.loss import asymmetric_loss, loss_weight_rule
from clipmlr.metrics import ap_by_class, format_metrics, margins_of, scores_of_margins
from clipmlr import checkpoint, cli, distributed, pipelines  # the layers


def run(args):
    rank, world, device = start(args)  # [layer: torchrun] one process per GPU, or just one
    say = print if rank == 0 else lambda *a, **k: None
    state = checkpoint.resume_state(args.out, cli.settings_of(args), args.resume)  # [layer: resume]

    # the data, and the partial labels: each training label kept with probability --labels (Sec. 4), seeded
    train, train_y, test, test_y, classnames = cli.load_data(args, say)  # [layer: cli]
    mask_y = mask_labels(train_y, args.labels, args.seed) if state is None else state["mask"]
    loss_weight = describe_data(args, mask_y, test_y, classnames, len(train), device, world, say)

    # the frozen CLIP: images (B, 3, S, S) -> dense features (B, L, D), one per grid position + the mean token
    model, clip_info = cli.load_clip(args, say)  # [layer: cli]
    say(f"CLIP: {clip_info['name']} (sha256 {clip_info['sha256'][:12]}...)")
    encode = frozen_encoder(model, device)  # model.encode_dense, no graph; bf16 on CUDA

    # the head, and SGD with one learning rate per kind of parameter (context vectors, embeddings, projector)
    head, optimizer = head_and_optimizer(args, model, classnames, loss_weight, say)
    history, start_epoch, train_seconds = restore(state, head, optimizer, args, say)  # [layer: resume]
    trained = distributed.wrap(head, device)  # [layer: torchrun] DDP: gradients averaged over the ranks

    # the images: decoded, resized to S x S, augmented for training (Cutout + RandAugment), or their cached
    # features; every input has passed its checks once they are ready: only then is --out written
    loader, test_loader, shard, features_of = image_loaders(args, train, mask_y, test, test_y, encode,
                                                           clip_info, model, rank, world, say)
    ckpt_path = start_run_folder(args, mask_y, rank)  # [layer: resume] --out, its mask.pt

    # training: for epoch, for batch: images -> features -> head -> loss -> step; the test mAP at the end
    scores = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        set_learning_rates(optimizer, epoch, args)
        loader.sampler.set_epoch(epoch)  # this epoch's order and augmentations (augment.EpochSampler)
        mean_loss = train_one_epoch(trained, loader, features_of, optimizer, loss_weight, device, world,
                                    desc=f"epoch {epoch + 1}", quiet=rank != 0)
        if not math.isfinite(mean_loss):
            kept = f"its last good checkpoint: {ckpt_path}" if os.path.isfile(ckpt_path) else "no checkpoint"
            raise cli.RunError(f"the loss became {mean_loss} in epoch {epoch + 1}; the run stops here "
                               f"({kept}); lower the learning rates or --loss-weight and start a new run")
        train_seconds += time.time() - t0
        history.append({"epoch": epoch + 1, "loss": mean_loss, "seconds": time.time() - t0,
                        "lr": [g["lr"] for g in optimizer.param_groups]})
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            scores = evaluate(head, test_loader, shard, features_of, test_y, args.threshold, args.top_k)
            history[-1]["map"] = scores["map"]
        say(progress_line(history[-1], args.epochs, train_seconds / len(history) * (args.epochs - epoch - 1)))
        if rank == 0:  # [layer: resume] every epoch, so a killed run loses at most one
            checkpoint.save_atomic({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                    "epoch": epoch + 1, "history": history, "train_seconds": train_seconds,
                                    "mask": mask_y, "settings": cli.settings_of(args)}, ckpt_path)
    if scores is None:  # resumed a run whose training had finished: evaluate its final head
        scores = evaluate(head, test_loader, shard, features_of, test_y, args.threshold, args.top_k)
        history[-1]["map"] = scores["map"]
    return save_run(args, head, classnames, scores, history, train_seconds, loss_weight, clip_info, model,
                    world, say)


def start(args):
    """(rank, world size, device), after the checks that need nothing loaded: a bad folder fails at once."""
    rank, world, device = distributed.setup(args.device)  # [layer: torchrun]
    args.device = str(device)
    if args.batch_size % world:
        raise cli.RunError(f"--batch-size {args.batch_size} is not divisible by the {world} processes; the "
                           f"global batch is split evenly over them, so give a multiple of {world}")
    cli.check_writable(args.out, "--out")  # [layer: cli]
    if args.cache_features:
        cli.check_writable(args.cache_dir, "--cache-dir")
    return rank, world, device


def describe_data(args, mask_y, test_y, classnames, n_train, device, world, say):
    """Says what the run trains on; returns the loss weight (--loss-weight, or the known fraction's rule)."""
    known = (mask_y >= 0).float().mean().item()
    say(f"data: {args.data}, {n_train} training images ({known * 100:.1f}% of labels known), {len(test_y)} "
        f"test images, {len(classnames)} classes; device {device}"
        + (f", {world} processes" if world > 1 else "")
        + f"; {cli.plural(args.workers, 'loader worker')}, --pipeline {args.pipeline}")
    if known == 0:
        raise cli.RunError(f"no training label is known (--labels {args.labels:g} of {mask_y.numel()} "
                           f"labels); give a larger --labels")
    no_ap = [n for n, has in zip(classnames, (test_y == 1).any(dim=0).tolist()) if not has]
    if len(no_ap) == len(classnames):  # not after 50 epochs
        raise cli.RunError(f"no test image of --data {args.data} has a known positive label, so no AP can be "
                           f"computed" + (" (VOC objects marked difficult count as absent: try "
                                          "--voc-difficult present)" if args.data == "voc" else ""))
    if no_ap:
        say(f"note: {len(no_ap)} class(es) have no known positive test label, so no AP (null), left out of "
            f"the mAP: {', '.join(no_ap[:10])}{' ...' if len(no_ap) > 10 else ''}")
    return loss_weight_rule(known) if args.loss_weight is None else args.loss_weight  # 0.03 at 50% of labels


def head_and_optimizer(args, model, classnames, loss_weight, say):
    """The head (initialised under --seed) and SGD over its parameter groups, each with its learning rate."""
    torch.manual_seed(args.seed)  # the head's initialisation; data order and augmentations seed themselves
    head = build_head(args.head, model, classnames, n_ctx=args.n_ctx, class_specific=not args.shared_context,
                      absence_weights=args.absence_weights, residual=not args.no_residual)
    groups = parameter_groups(head, args.lr_prompt, args.lr_embedding, args.lr_linear)
    optimizer = torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    say(f"head: {args.head}, {count_trainable(head):,} trainable parameters ("
        + ", ".join(f"{g['name']} lr {g['lr']:g}" for g in groups) + f"), loss weight {loss_weight:.4g}")
    return head, optimizer


def restore(state, head, optimizer, args, say):
    """(history, epochs done, training seconds) of the run to continue: its checkpoint's, or a fresh start."""
    if state is None:
        if args.resume:
            say(f"no checkpoint in {args.out} yet: starting at epoch 1 (a begun feature cache goes on where "
                f"it stopped)")
        return [], 0, 0.0
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    say(f"resuming {args.out} after epoch {state['epoch']}")
    return state["history"], state["epoch"], state["train_seconds"]


def image_loaders(args, train, mask_y, test, test_y, encode, clip_info, model, rank, world, say):
    """(training loader, test loader, test shard, features_of): the images through the input pipeline, or with
    --cache-features their features encoded once (training images in V augmented views) and read back.

    The training order is a permutation seeded by (seed, epoch); [layer: torchrun] rank r takes every world-th
    image of it, so the union of the ranks' batches k is the global batch k one process would see. Image i's
    augmentation in epoch e is seeded by (seed, e, i) alone (SeededViews): the same whatever the workers or
    ranks, and the same as the feature cache's view e; so the workers persist from epoch to epoch.
    """
    if isinstance(train[0], str) and (not args.cache_features or args.pipeline == "device"):
        # every image must decode now, not fail in epoch 37 (a cache's build decodes them all; nvJPEG less so)
        paths = list(train) + list(test)
        say(f"checking that all {len(paths)} images decode ({args.workers} workers"
            + (f" x {world} processes)" if world > 1 else ")"))
        # [layer: torchrun] each rank a share; every rank raises the same error, naming all the bad ones
        check_decodable([paths[i] for i in distributed.shard(len(paths))], args.workers, len(paths),
                        distributed.gather_lists)
    key = cli.feature_key(args, clip_info, model)  # [layer: cache] None without --cache-features
    if args.cache_features:  # [layer: cache]
        views = args.cache_views if args.augment else 1
        say(f"encoding the features: test images x 1, training images x {views} view(s), cached in "
            f"{args.cache_dir}")
    test_loader, shard, features_of = cli.test_split(args, test, test_y, encode, key,  # [layer: cli]
                                                     max(args.batch_size, 100))
    train_set = cli.split_set(args, train, mask_y, True, encode, key)  # [layer: cli]
    order = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, seed=args.seed)
    if not args.cache_features:
        train_set = SeededViews(train_set, args.epochs, args.seed)
    workers = 0 if args.cache_features else args.workers  # reading stored arrays needs no worker processes
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size // world, num_workers=workers,
                                         sampler=EpochSampler(order, len(order.dataset)),
                                         persistent_workers=workers > 0,
                                         pin_memory=args.device.startswith("cuda"),
                                         collate_fn=pipelines.collate)  # [layer: input pipeline]
    return loader, test_loader, shard, features_of


def start_run_folder(args, mask_y, rank):
    """Creates --out (rank 0), clears what a killed write left, saves the label mask; the checkpoint path."""
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        checkpoint.remove_stale(args.out)  # [layer: resume] temporary files of a run killed while writing
        checkpoint.save_atomic(mask_y, os.path.join(args.out, "mask.pt"))
    return os.path.join(args.out, "checkpoint.pt")


def set_learning_rates(optimizer, epoch, args):
    """A constant warm-up (every group at --warmup-lr), then cosine decay from each group's base lr over
    --epochs: Dassl's ConstantWarmupScheduler around CosineAnnealingLR, which the authors train with."""
    for group in optimizer.param_groups:
        if epoch < args.warmup_epochs:
            group["lr"] = args.warmup_lr
        else:
            progress = (epoch - args.warmup_epochs) / args.epochs
            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def train_one_epoch(head, loader, features_of, optimizer, loss_weight, device, world=1, desc="epoch",
                    quiet=False):
    """One pass over the training set; the mean loss per global batch (one host sync, at the end)."""
    total = torch.zeros((), device=device)
    for batch, targets, _ in tqdm(loader, desc=desc, leave=False, disable=quiet or None):
        features = features_of(batch)  # (B, L, D): the frozen CLIP's encode_dense of the images, or cached
        logits = head(features)  # (B, C, 2): presence, absence
        loss = loss_weight * asymmetric_loss(logits, targets.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        (loss * world).backward()  # [layer: torchrun] DDP averages gradients; x world makes them the sum's
        optimizer.step()
        total += loss.detach()
    return distributed.all_sum(total).item() / len(loader)  # [layer: torchrun] the sum over ranks


def evaluate(head, test_loader, shard, features_of, test_y, threshold=0.5, top_k=3):
    """{"map": mAP in percent, "ap": (C,) APs, "metrics": precision/recall/F1} of the whole test split, from
    the logit margins (presence − absence). The mAP is the paper's metric; the metrics are
    metrics.threshold_metrics in ML-GCN's and ASL's conventions, at the probability `threshold` and `top_k`.

    A margin never saturates, unlike an fp32 softmax probability (exactly 1.0 past a margin of ~17), so no two
    confident images tie and the mAP does not depend on the order of the test images. [layer: torchrun] each
    rank scores its own shard and the shards are gathered.
    """
    margins = margins_of(head, test_loader, features_of).reshape(len(shard), test_y.shape[1])  # (shard, C)
    margins = distributed.gather_rows((shard, margins), len(test_y))  # (N, C) [layer: torchrun]
    return scores_of_margins(margins, test_y, threshold, top_k)


def progress_line(record, epochs, eta):
    line = (f"epoch {record['epoch']:3d}/{epochs}  loss {record['loss']:9.4f}  lr {record['lr'][0]:.3g}  "
            f"{record['seconds']:6.1f}s  eta {eta / 60:5.1f} min")
    return line + (f"  mAP {record['map']:.2f}" if "map" in record else "")


def save_run(args, head, classnames, scores, history, train_seconds, loss_weight, clip_info, model, world,
             say):
    """Writes results.json (the last epoch's mAP, per-class APs, threshold metrics, history, settings) and
    head.pt, a head that describes itself (`python -m clipmlr.predict` rebuilds it from that file alone)."""
    results = {
        "head": args.head, "data": args.data, "labels": args.labels, "seed": args.seed,
        "map": history[-1]["map"],  # the last epoch's
        "per_class_ap": ap_by_class(classnames, scores["ap"]),  # null for a class with no positive test label
        "metrics": scores["metrics"],  # CP, CR, CF1, OP, OR, OF1 in ML-GCN's and ASL's conventions
        "trainable_params": count_trainable(head), "train_seconds": train_seconds, "history": history,
        "clip": clip_info, "settings": cli.settings_of(args), "loss_weight": loss_weight,
        "device": args.device,
        "data_root": os.path.abspath(args.data_root), "cache_dir": os.path.abspath(args.cache_dir),
        "clip_path": os.path.abspath(args.clip) if args.clip and os.path.isfile(args.clip) else None,
        "weights_dir": os.path.abspath(args.weights_dir), "processes": world, "torch": torch.__version__,
    }
    evaluated = [h for h in history if "map" in h]
    if len(evaluated) > 1:  # the authors keep their best epoch on the test set: to compare with their tables
        best = max(evaluated, key=lambda h: h["map"])
        results["best_epoch_selected_on_test"] = {**best,
                                                  "note": "chosen on the test set: not the result (map)"}
    if distributed.rank() == 0:  # [layer: checkpoint] atomic writes
        checkpoint.save_atomic({"state_dict": head.state_dict(), "head": args.head, "classnames": classnames,
                                "n_ctx": args.n_ctx, "shared_context": args.shared_context,
                                "absence_weights": args.absence_weights, "residual": not args.no_residual,
                                "image_size": args.image_size,
                                "clip": {**clip_info, "identity": cli.clip_identity(clip_info, model)}},
                               os.path.join(args.out, "head.pt"))
        checkpoint.save_atomic(results, os.path.join(args.out, "results.json"))
    say(format_metrics(scores["metrics"]))
    say(f"mAP {results['map']:.2f} (last epoch) -> {os.path.join(args.out, 'results.json')}")
    return results


def main(argv=None):
    args = cli.parse_args(argv, prog="run.py")
    try:
        run(args)
    except Exception as e:
        if not cli.is_user_error(e):  # a bug: it keeps its traceback
            raise
        print(f"error: {e}", file=sys.stderr)  # the user's to fix: one line
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; the same command plus --resume continues from the last finished epoch in "
              f"{args.out} (or from the start, keeping any feature cache already built)", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
