"""The offline demo: generated multi-label scenes with captions, the demo's pretrained miniature CLIP, and a
random miniature CLIP for tests.

Each scene is a noisy background with one to four shapes among twelve, each in a colour drawn independently of
its shape; its labels say which shapes are present, its caption names some of them and never an absent one.
pretrain.py pretrains the demo's miniature CLIP contrastively on such captioned scenes (seed 1); the demo's
training and test images are other scenes (seed 0). Everything is a function of the index and the seed, so the
set is the same on every machine and in every worker.
"""
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .clip.model import CLIP

DEMO_CLIP = "demo"  # --clip demo: the miniature CLIP pretrained on these scenes (pretrain.py), for any data
MINIATURE_NOTE = ("the miniature pretrained on generated scenes: the paper's questions in miniature, "
                  "not its numbers")
# twelve shapes, colour drawn independently of the shape, captions that name only what is present
SCENE_CLASSES = ["circle", "square", "triangle", "cross", "ring", "bar", "star", "diamond", "hexagon",
                 "arrow", "crescent", "dot"]
GROUPS = [("star", "crescent", "dot"), ("arrow", "bar", "square"),
          ("circle", "triangle", "hexagon", "diamond"), ("ring", "cross")]
# drawn independently of the shape: colour tells nothing
PALETTE = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 60, 220), (40, 220, 230),
           (250, 140, 30), (245, 245, 245), (30, 30, 30)]
CAPTIONS = ["a photo of {}.", "a picture of {}.", "an image of {}.", "{}.", "a drawing of {}."]
SMALL = ("dot",)  # always small; a star is small half the time


def polygon(cx, cy, r, n, start=-90.0, inner=None):
    """The n corners of a regular polygon (a star with `inner` radius between them) around (cx, cy)."""
    k = 2 * n if inner else n
    radius = [r * (inner if inner and i % 2 else 1.0) for i in range(k)]
    angle = [math.radians(start + 360.0 * i / k) for i in range(k)]
    return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radius, angle)]


def draw_scene_shape(draw, kind, cx, cy, r, colour):
    if kind in ("circle", "dot"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=colour)
    elif kind == "triangle":
        draw.polygon(polygon(cx, cy, r, 3), fill=colour)
    elif kind == "cross":
        w = max(1, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(1, r // 4))
    elif kind == "bar":
        draw.rectangle((cx - r, cy - max(1, r // 4), cx + r, cy + max(1, r // 4)), fill=colour)
    elif kind == "star":
        draw.polygon(polygon(cx, cy, r, 5, inner=0.45), fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)], fill=colour)
    elif kind == "hexagon":
        draw.polygon(polygon(cx, cy, r, 6, start=0), fill=colour)
    elif kind == "arrow":
        h = max(1, r // 5)
        draw.rectangle((cx - r, cy - h, cx + 0.3 * r, cy + h), fill=colour)
        draw.polygon([(cx + 0.2 * r, cy - 0.55 * r), (cx + r, cy), (cx + 0.2 * r, cy + 0.55 * r)],
                     fill=colour)
    elif kind == "crescent":  # an outer arc, then an inner one back
        arc = [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)))
               for a in range(40, 321, 10)]
        bite = [(cx + 0.45 * r + 0.75 * r * math.cos(math.radians(a)),
                 cy + 0.75 * r * math.sin(math.radians(a)))
                for a in range(300, 59, -10)]
        draw.polygon(arc + bite, fill=colour)


def with_article(name):
    """'a circle', 'an arrow'."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def scene(index, seed=0, size=224):
    """(PIL image, (12,) labels over SCENE_CLASSES, caption) of scene `index`: one to four distinct shapes,
    some that tend to appear together and some small, each in a colour drawn independently of its shape, on a
    noisy background. The caption names only shapes that are present, and leaves each out with probability 1/4
    (web captions are incomplete); it never says what is absent."""
    rng = random.Random(seed * 1_000_003 + index)
    background = tuple(rng.randint(60, 170) for _ in range(3))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(128, 40, (size, size, 1)).clip(0, 255)
    # grey noise, seeded (not PIL's own RNG)
    image = Image.fromarray(noise.astype(np.uint8).repeat(3, axis=2))
    image = Image.blend(image, Image.new("RGB", (size, size), background), 0.7)
    draw = ImageDraw.Draw(image)
    kinds = [rng.randrange(len(SCENE_CLASSES))]
    group = next(g for g in GROUPS if SCENE_CLASSES[kinds[0]] in g)
    for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 2, 3])):
        k = (SCENE_CLASSES.index(rng.choice(group)) if rng.random() < 0.5
             else rng.randrange(len(SCENE_CLASSES)))
        if k not in kinds:
            kinds.append(k)
    labels = torch.zeros(len(SCENE_CLASSES), dtype=torch.long)
    for k in kinds:
        small = SCENE_CLASSES[k] in SMALL or (SCENE_CLASSES[k] == "star" and rng.random() < 0.5)
        r = (rng.randint(max(2, size // 40), max(3, size // 22)) if small
             else rng.randint(size // 12, size // 6))
        cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
        colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rng.choice(PALETTE))
        draw_scene_shape(draw, SCENE_CLASSES[k], cx, cy, r, colour)
        labels[k] = 1
    named = [k for k in kinds if rng.random() < 0.75] or [rng.choice(kinds)]
    rng.shuffle(named)
    words = [with_article(SCENE_CLASSES[k]) for k in named]
    listing = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return image.filter(ImageFilter.SMOOTH), labels, rng.choice(CAPTIONS).format(listing)


DEMO_CLASSES = SCENE_CLASSES  # the demo's images are scenes too (seed 0; the pretraining scenes are seed 1)


def demo_image(index, seed=0, size=224):
    """(PIL image, (C,) labels) of demo scene `index` (its caption left out)."""
    return scene(index, seed, size)[:2]


def demo_split(n, seed=0, size=224, offset=0):
    """`n` generated (images, (n, C) labels); test images use another `offset` so no image is shared."""
    pairs = [demo_image(offset + i, seed, size) for i in range(n)]
    return [p[0] for p in pairs], torch.stack([p[1] for p in pairs])


def demo_clip_path():
    """Where the demo's miniature CLIP is shipped: weights/demo-clip.pt beside the clipmlr package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                        "demo-clip.pt")


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
                # OpenAI zero-inits each block's bn3; a random model needs them on
                torch.nn.init.ones_(m.weight)
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
