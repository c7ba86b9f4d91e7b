"""Pretraining the demo's miniature CLIP (a layer beside the demo): the paper's premise, built small.

    python -m clipmlr.pretrain    # weights/demo-clip.pt, its sha256 printed; minutes on a CPU

CLIP learned from web captions, which say what is in an image and almost never what is absent; so "not a photo
of a {}" stays close to "a photo of a {}" in its text space, and a negative prompt gets little guidance from
the text encoder (PositiveCoOp, Sec. 1 and 5.2). The miniature is pretrained the same way, on generated scenes
(demo.scene) whose captions name some of the shapes present and never one that is absent: the project's own
CLIP class and tokenizer, the symmetric contrastive loss of Radford et al. (2021) with its temperature clipped
at 100, AdamW with a one-cycle schedule. The scenes it sees are never the demo's training or test images
(another seed). It is deterministic at a given number of CPU threads (each step's scenes are a function of the
step alone, the initialisation of the seed). The checkpoint is a plain state dict in OpenAI's key names and
fp16, which clip.load reads like any other (`python run.py --clip weights/demo-clip.pt ...`).

Status: the command works and is tested (deterministic, the loss falls), but the miniature it makes is not yet
the demo's CLIP: its image-text geometry does not yet match the real CLIP's where the heads depend on it (see
README.md, "The demo's pretrained CLIP: work in progress").
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import image_transform
from .checkpoint import save_atomic
from .clip import CLIP, tokenize
from .clip.load import sha256_of
from .demo import scene as demo_scene

# the miniature: a [1, 1, 1, 1] ResNet of width 16 and a 2-layer text transformer of width 64 (one head, which
# build_model infers as width / 64), embedding dim 64; BPE vocabulary and context as OpenAI's
MINIATURE = dict(embed_dim=64, vision_layers=[1, 1, 1, 1], vision_width=16, context_length=77,
                 vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
PRETRAIN_SEED = 1  # the scenes' seed: the demo's own images use seed 0
TEMPERATURE = 100.0  # exp(logit_scale): the released CLIPs' value


def scene_batch(step, batch_size, size):
    """(B, 3, S, S) images, normalised as every image is (augment.image_transform), and their B captions:
    pretraining step `step`'s scenes."""
    transform = image_transform(size, train=False)
    scenes = [demo_scene(step * batch_size + i, PRETRAIN_SEED, size) for i in range(batch_size)]
    return torch.stack([transform(image) for image, _, _ in scenes]), [caption for _, _, caption in scenes]


def contrastive_loss(model, images, ids):
    """Radford et al. (2021), Fig. 3: cross-entropy over the B x B scaled cosines, both ways, averaged."""
    image = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
    text = F.normalize(model.encode_text(ids), dim=-1)  # (B, D)
    # (B, B); OpenAI clips the scale at 100
    logits = model.logit_scale.exp().clamp(max=100) * image @ text.t()
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def initial_model(size=96, seed=0):
    """The miniature CLIP before pretraining: OpenAI's initialisation, seeded
    (the process's random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(image_resolution=size, **MINIATURE)


def pretrain(steps=600, batch_size=128, size=96, lr=2e-3, seed=0, progress=True):
    """(the miniature CLIP in eval mode, the loss of every step), trained from seed `seed`."""
    model = initial_model(size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="pretraining the demo CLIP", disable=not progress or None):
        images, captions = scene_batch(step, batch_size, size)
        loss = contrastive_loss(model, images, tokenize(captions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model.eval(), losses


def save_openai_format(model, path):
    """The state dict in OpenAI's key names, floating-point tensors in fp16 (as OpenAI ships them);
    its sha256."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_atomic(state, path)
    return sha256_of(path)


def main(argv=None):
    from .cli import Parser
    p = Parser(prog="python -m clipmlr.pretrain", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("weights", "demo-clip.pt"), help="the checkpoint to write")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (each on new scenes)")
    p.add_argument("--batch-size", type=int, default=128, help="scenes (and captions) per step")
    p.add_argument("--image-size", type=int, default=96, help="pretraining resolution in pixels")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads (the result is exact at a given count)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.image_size < 32 or args.image_size % 32:
        p.error(f"--image-size {args.image_size}: give a multiple of 32 "
                f"(the image encoder downsamples by 32)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr {args.lr} must be a finite number > 0")
    torch.set_num_threads(args.threads)
    print(f"pretraining the demo's miniature CLIP: {args.steps} steps of {args.batch_size} scenes at "
          f"{args.image_size} px, {args.threads} threads")
    model, losses = pretrain(args.steps, args.batch_size, args.image_size, args.lr, args.seed)
    sha = save_openai_format(model, args.out)
    print(f"contrastive loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} (last 20 steps); "
          f"{args.out} sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
