"""Train and evaluate one head for multi-label recognition with partial labels on a frozen CLIP.

    python run.py --head positive --data voc --labels 0.1          # the paper's VOC2007 setting, 10% labels
    python run.py --head dual --data demo                          # offline demo, about a minute on a CPU

The paper's protocol (PositiveCoOp, Sec. 4), top to bottom: the training labels are masked (each kept with
probability --labels), a frozen CLIP turns every image into dense features, the head turns those into
presence/absence logits, and the asymmetric loss trains the head for 50 epochs with SGD and a cosine schedule;
the mAP of the LAST epoch on the full test split is the result. It goes to --out (default
runs/<data>-<head>-<labels>-seed<seed>/).

The method is the core of clipmlr (clip/, heads.py, aggregation.py, loss.py, metrics.py, data.py). The lines
marked [layer] call what goes beyond the paper: the feature cache, checkpoints and resume, torchrun.
"""
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from clipmlr.augment import EpochSampler, SeededViews
from clipmlr.data import ImageDataset, check_decodable, mask_labels
from clipmlr.heads import build_head, count_trainable, parameter_groups
from clipmlr.loss import asymmetric_loss, loss_weight_rule
from clipmlr.metrics import average_precision, margins_of
from clipmlr import cache, checkpoint, cli, distributed, pipelines  # the layers


def lr_factor(epoch, args):
    """Constant warm-up, then cosine decay from the base lr (Dassl's schedule, which the authors train with)."""
    if epoch < args.warmup_epochs:
        return None  # every group at args.warmup_lr
    return 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


def evaluate(head, test_set, features_of, batch_size, workers):
    """(N, C) logit margins (presence − absence) of the whole test split: the scores every AP ranks by.

    A margin never saturates, unlike an fp32 softmax probability (exactly 1.0 past a margin of ~17), so no two
    confident images tie and the mAP does not depend on the order of the test images. [layer: torchrun] each
    rank scores its own shard and the shards are gathered.
    """
    shard = distributed.shard(len(test_set))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, shard.tolist()), batch_size=batch_size,
                                         num_workers=workers, collate_fn=pipelines.collate)
    margins = margins_of(head, loader, features_of).reshape(len(shard), len(test_set.labels[0]))  # (shard, C)
    return distributed.gather_rows((shard, margins), len(test_set))


def run(args):
    rank, world, device = distributed.setup(args.device)  # [layer: torchrun] one process per GPU, or just one
    args.device = str(device)
    say = print if rank == 0 else lambda *a, **k: None
    if args.batch_size % world:
        raise cli.RunError(f"--batch-size {args.batch_size} is not divisible by the {world} processes; the global "
                           f"batch is split evenly over them, so give a multiple of {world}")
    cli.check_writable(args.out, "--out")  # before anything slow: a bad folder fails at once
    if args.cache_features:
        cli.check_writable(args.cache_dir, "--cache-dir")
    state = checkpoint.resume_state(args.out, cli.settings_of(args), args.resume)  # [layer: resume]
    if args.resume and state is None:
        say(f"no checkpoint in {args.out} yet: starting at epoch 1 (a begun feature cache goes on where it stopped)")

    # data, and the partial labels: each training label kept with probability --labels (Sec. 4), seeded
    train, train_y, test, test_y, classnames = cli.load_data(args, say)
    mask_y = mask_labels(train_y, args.labels, args.seed) if state is None else state["mask"]
    known = (mask_y >= 0).float().mean().item()
    say(f"data: {args.data}, {len(train)} training images ({known * 100:.1f}% of labels known), {len(test)} test "
        f"images, {len(classnames)} classes; device {device}" + (f", {world} processes" if world > 1 else "")
        + f"; {cli.plural(args.workers, 'loader worker')}, --pipeline {args.pipeline}")
    if known == 0:
        raise cli.RunError(f"no training label is known (--labels {args.labels:g} of {mask_y.numel()} labels); "
                           f"give a larger --labels")
    loss_weight = loss_weight_rule(known) if args.loss_weight is None else args.loss_weight  # 0.03 at 50% of labels
    no_ap = [n for n, has in zip(classnames, (test_y == 1).any(dim=0).tolist()) if not has]
    if no_ap:
        say(f"note: {len(no_ap)} class(es) have no known positive test label, so no AP (null), left out of the mAP: "
            f"{', '.join(no_ap[:10])}{' ...' if len(no_ap) > 10 else ''}")

    # the frozen CLIP: images (B, 3, S, S) -> dense features (B, L, D), one per grid position + the mean token
    model, clip_info = cli.load_clip(args, say)
    say(f"CLIP: {clip_info['name']} (sha256 {clip_info['sha256'][:12]}...)")
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format  # faster convs
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.visual.to(memory_format=memory_format)

    def encode(images):  # no graph through the frozen encoder; bf16 on CUDA, features back in fp32
        # (with --pipeline device, `images` is a RawBatch of file bytes: .to() decodes and augments on the device)
        with torch.no_grad(), autocast:
            return model.encode_dense(images.to(device, non_blocking=True, memory_format=memory_format)).float()

    # the head, and SGD with one learning rate per kind of parameter (context vectors, embeddings, projector)
    torch.manual_seed(args.seed)  # the head's initialisation; the data order and augmentations seed themselves
    head = build_head(args.head, model, classnames, n_ctx=args.n_ctx, class_specific=not args.shared_context,
                      absence_weights=args.absence_weights, residual=not args.no_residual)
    groups = parameter_groups(head, args.lr_prompt, args.lr_embedding, args.lr_linear)
    optimizer = torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    say(f"head: {args.head}, {count_trainable(head):,} trainable parameters ("
        + ", ".join(f"{g['name']} lr {g['lr']:g}" for g in groups) + f"), loss weight {loss_weight:.4g}")
    history, start_epoch, train_seconds = [], 0, 0.0
    if state is not None:  # [layer: resume]
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch, train_seconds = state["history"], state["epoch"], state["train_seconds"]
        say(f"resuming {args.out} after epoch {start_epoch}")
    trained = head
    if world > 1:  # [layer: torchrun] gradients averaged over ranks; the loss is scaled below to keep the sum
        trained = torch.nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)

    # the images: decoded, resized to S x S, augmented for training (Cutout + RandAugment: augment.image_transform)
    # [layer: input pipeline] on PIL images in the workers (the authors'), on tensors there, or on the device
    train_set = ImageDataset(train, mask_y, pipelines.image_pipeline(args.image_size, args.augment, args.randaugment,
                                                                     args.pipeline))
    test_set = ImageDataset(test, test_y, pipelines.image_pipeline(args.image_size, False, pipeline=args.pipeline))
    workers = args.workers
    # every image must decode now, not fail in epoch 37 (a cache's build decodes them all, but nvJPEG less strictly)
    if isinstance(train[0], str) and (not args.cache_features or args.pipeline == "device"):
        paths = list(train) + list(test)
        say(f"checking that all {len(paths)} images decode ({args.workers} workers" + (f" x {world} processes)" if world > 1 else ")"))
        check_decodable([paths[i] for i in distributed.shard(len(paths))], args.workers)  # [torchrun] a share each
    if args.cache_features:  # [layer: cache] every image encoded once (training images in V augmented views)
        views = args.cache_views if args.augment else 1
        key = cli.feature_key(args, clip_info, model)
        say(f"encoding the features: test images x 1, training images x {views} view(s), cached in {args.cache_dir}")
        build = dict(encode=encode, batch_size=args.batch_size, workers=args.workers, cache_dir=args.cache_dir)
        build["pin_memory"] = device.type == "cuda"  # as the training loader
        test_set = cache.encode_split(test_set, 1, key={**key, "split": "test", "view": "plain"}, **build)  # short
        train_set = cache.encode_split(train_set, views, seed=args.seed if args.augment else 0, key={
            **key, "split": "train", "view": "augmented" if args.augment else "plain"}, **build)
        workers = 0  # reading stored arrays needs no worker processes

    def features_of(batch):  # a batch of images -> the frozen CLIP's features; with the cache, already those
        return batch.to(device, non_blocking=True).float() if args.cache_features else encode(batch)

    # every input has passed its checks: now (and only now) the run's folder is written
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        checkpoint.remove_stale(args.out)  # [layer: resume] temporary files of a run killed while writing
        checkpoint.save_atomic(mask_y, os.path.join(args.out, "mask.pt"))
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    # training: for epoch, for batch: images -> features -> head -> loss -> step
    # the order is a permutation seeded by (seed, epoch); [layer: torchrun] rank r takes every world-th image of
    # it, so the union of the ranks' batches k is the global batch k that one process would see. Image i's
    # augmentation in epoch e is seeded by (seed, e, i) alone (SeededViews): the same whatever the workers or
    # ranks, and the same as the feature cache's view e; so the workers persist from epoch to epoch.
    order = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    if not args.cache_features:
        train_set, order = SeededViews(train_set, args.epochs, args.seed), EpochSampler(order, len(train_set))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size // world, sampler=order,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda", collate_fn=pipelines.collate)
    ap = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        factor = lr_factor(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = args.warmup_lr if factor is None else group["base_lr"] * factor
        order.set_epoch(epoch)
        if args.cache_features:
            train_set.set_epoch(epoch)  # [layer: cache] view epoch mod V
        total = torch.zeros((), device=device)
        for batch, targets, _ in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=rank != 0 or None):
            features = features_of(batch)  # (B, L, D)
            logits = trained(features)  # (B, C, 2): presence, absence
            loss = loss_weight * asymmetric_loss(logits, targets.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()  # [layer: torchrun] DDP averages gradients; x world makes them the sum's
            optimizer.step()
            total += loss.detach()
        mean_loss = distributed.all_sum(total).item() / len(loader)  # per global batch; one sync per epoch
        if not math.isfinite(mean_loss):
            raise cli.RunError(f"the loss became {mean_loss} in epoch {epoch + 1}; the run stops here. The last "
                               f"good checkpoint is {ckpt_path}; lower the learning rates or --loss-weight and "
                               f"start a new run")
        train_seconds += time.time() - t0
        record = {"epoch": epoch + 1, "loss": mean_loss, "lr": [g["lr"] for g in optimizer.param_groups],
                  "seconds": time.time() - t0}
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            ap = average_precision(evaluate(head, test_set, features_of, max(args.batch_size, 100), workers), test_y)
            record["map"] = 100 * float(np.nanmean(ap))
        history.append(record)
        eta = train_seconds / len(history) * (args.epochs - epoch - 1)
        say(f"epoch {epoch + 1:3d}/{args.epochs}  loss {mean_loss:9.4f}  lr {optimizer.param_groups[0]['lr']:.3g}  "
            f"{record['seconds']:6.1f}s  eta {eta / 60:5.1f} min" + (f"  mAP {record['map']:.2f}" if "map" in record else ""))
        if rank == 0:  # [layer: resume] every epoch, so a killed run loses at most one
            checkpoint.save_atomic({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                    "epoch": epoch + 1, "history": history, "train_seconds": train_seconds,
                                    "mask": mask_y, "settings": cli.settings_of(args)}, ckpt_path)
    if ap is None:  # resumed a run whose training had finished: evaluate its final head
        ap = average_precision(evaluate(head, test_set, features_of, max(args.batch_size, 100), workers), test_y)
        history[-1]["map"] = 100 * float(np.nanmean(ap))

    # the result: the last epoch's mAP; a class with no positive test label has no AP (null) and is left out
    results = {
        "head": args.head, "data": args.data, "labels": args.labels, "seed": args.seed, "map": history[-1]["map"],
        "per_class_ap": {n: None if np.isnan(a) else 100 * float(a) for n, a in zip(classnames, ap)},
        "trainable_params": count_trainable(head), "train_seconds": train_seconds, "history": history,
        "clip": clip_info, "settings": cli.settings_of(args), "loss_weight": loss_weight, "device": str(device),
        "data_root": os.path.abspath(args.data_root), "cache_dir": os.path.abspath(args.cache_dir),
        "clip_path": os.path.abspath(args.clip) if args.clip and os.path.isfile(args.clip) else None,
        "weights_dir": os.path.abspath(args.weights_dir),
        "processes": world, "torch": torch.__version__,
    }
    evaluated = [h for h in history if "map" in h]
    if len(evaluated) > 1:  # the authors keep their best epoch on the test set: for comparison with their tables
        best = max(evaluated, key=lambda h: h["map"])
        results["best_epoch_selected_on_test"] = {**best, "note": "chosen on the test set: not the result (map)"}
    if rank == 0:  # head.pt describes itself: `python -m clipmlr.predict` rebuilds the head from it alone
        checkpoint.save_atomic({"state_dict": head.state_dict(), "head": args.head, "classnames": classnames,
                                "n_ctx": args.n_ctx, "shared_context": args.shared_context,
                                "absence_weights": args.absence_weights, "residual": not args.no_residual,
                                "image_size": args.image_size,
                                "clip": {**clip_info, "identity": cli.clip_identity(clip_info, model)}},
                               os.path.join(args.out, "head.pt"))
        checkpoint.save_atomic(results, os.path.join(args.out, "results.json"))
    say(f"mAP {results['map']:.2f} (last epoch) -> {os.path.join(args.out, 'results.json')}")
    return results


def main(argv=None):
    args = cli.parse_args(argv, prog="run.py")
    try:
        run(args)
    except cli.ERRORS as e:  # the user's to fix: one line; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
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
