"""The offline demo: a generated multi-label image set and a randomly initialised miniature CLIP.

Each image is a noisy background with one to three coloured shapes; its labels say which shapes are present.
Everything is a function of the index and the seed, so the set is the same on every machine and in every
worker. With the random CLIP the numbers only show that the pipeline learns; they say nothing about the paper.
"""
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .clip.model import CLIP

DEMO_CLASSES = ["circle", "square", "triangle", "cross", "ring", "bar"]
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 60, 220), (40, 220, 230)]


def draw_shape(draw, kind, cx, cy, r, colour):
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        w = max(2, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, r // 4))
    elif kind == "bar":
        draw.rectangle((cx - r, cy - max(2, r // 5), cx + r, cy + max(2, r // 5)), fill=colour)


def demo_image(index, seed=0, size=224):
    """(PIL image, (C,) labels) of demo image `index`: one to three distinct shapes on a noisy background."""
    rng = random.Random(seed * 1_000_003 + index)
    background = tuple(rng.randint(60, 160) for _ in range(3))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(128, 40, (size, size, 1)).clip(0, 255)
    image = Image.fromarray(noise.astype(np.uint8).repeat(3, axis=2))  # grey noise, seeded (not PIL's own RNG)
    image = Image.blend(image, Image.new("RGB", (size, size), background), 0.7)
    draw = ImageDraw.Draw(image)
    kinds = rng.sample(range(len(DEMO_CLASSES)), rng.randint(1, 3))
    labels = torch.zeros(len(DEMO_CLASSES), dtype=torch.long)
    for k in kinds:
        r = rng.randint(size // 10, size // 5)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        colour = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLOURS[k])  # a hue per class
        draw_shape(draw, DEMO_CLASSES[k], cx, cy, r, colour)
        labels[k] = 1
    return image.filter(ImageFilter.SMOOTH), labels


def demo_split(n, seed=0, size=224, offset=0):
    """`n` generated (images, (n, C) labels); test images use another `offset` so no image is shared."""
    pairs = [demo_image(offset + i, seed, size) for i in range(n)]
    return [p[0] for p in pairs], torch.stack([p[1] for p in pairs])


def tiny_clip(calibration_images=None, seed=0, resolution=224):
    """A randomly initialised miniature CLIP (~3.5 M parameters, most in the token table) in eval mode.

    A random ResNet's activations drift in scale and share one dominant direction, which leaves nothing for
    a head to learn from. So the demo model's BatchNorm statistics are set from `calibration_images`
    (B, 3, S, S) — each channel then has zero mean and unit variance on the demo data — and the output
    projection is centred so the dense features have mean zero. This is an initialisation, not training.
    """
    with torch.random.fork_rng(devices=[]):  # the process's random state is left as it was
        torch.manual_seed(seed)
        model = CLIP(embed_dim=64, image_resolution=resolution, vision_layers=[1, 1, 1, 1], vision_width=16,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=2)
    pool = model.visual.attnpool
    with torch.no_grad():
        for m in model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)  # OpenAI zero-inits each block's bn3; a random model needs them on
                m.momentum = None  # running statistics become the plain average over the calibration batches
        pool.positional_embedding.mul_(0.1)
        if calibration_images is not None:
            model.visual.train()
            for batch in calibration_images.split(64):
                model.visual.trunk(batch)
            model.visual.eval()
            dense = torch.cat([model.encode_dense(batch) for batch in calibration_images.split(64)])
            pool.c_proj.bias.sub_(dense.mean(dim=(0, 1)))  # centre the features: no shared direction
    return model.eval().requires_grad_(False)
