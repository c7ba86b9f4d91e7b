"""The paper's image transforms: a plain resize, and for training Cutout + RandAugment (Sec. 4); and how their
randomness is seeded: image i's augmentation in epoch (or cached view) e is seeded by (the run's seed, e, i)
alone (SeededViews), whatever the worker processes, threads or ranks that compute it.

Training images are augmented as DualCoOp and PositiveCoOp do: Cutout (one square of half the side, random
colour), then RandAugment. The authors' RandAugment is the `randaugment` package (1.0.2), whose policy differs
from torchvision's; it is rebuilt here from torchvision's operations (no extra dependency) and is the default;
torchvision's own is the alternative (`randaugment="torchvision"`, run.py's --randaugment).
"""
import contextlib
import math
import random
import threading

import numpy as np

import torch
from PIL import ImageDraw
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2


from .clip import MEAN, STD  # CLIP's preprocessing statistics


class Cutout:
    """Paints one square of half the image side, at a random centre, in a random colour (DualCoOp's
    CutoutPIL)."""

    def __init__(self, factor=0.5):
        self.factor = factor

    def __call__(self, image):
        """A PIL image, or a uint8 (3, H, W) tensor: the same random draws, the same square and colour."""
        w, h = TF.get_image_size(image)
        side_w, side_h = int(w * self.factor), int(h * self.factor)
        x, y = random.randint(0, w - 1), random.randint(0, h - 1)
        box = (max(0, x - side_w // 2), max(0, y - side_h // 2),
               min(w, x + side_w // 2), min(h, y + side_h // 2))
        colour = tuple(random.randint(0, 255) for _ in range(3))
        if isinstance(image, torch.Tensor):  # PIL's rectangle includes its far edges
            image = image.clone()
            # a number per channel: no copy to a GPU, which would wait
            for channel, value in enumerate(colour):
                image[channel, box[1]:box[3] + 1, box[0]:box[2] + 1] = value
            return image
        image = image.copy()
        ImageDraw.Draw(image).rectangle(box, fill=colour)
        return image


# the authors' RandAugment policy: the `randaugment` package (1.0.2) that DualCoOp and PositiveCoOp train with
AUTHORS_OPS = ("Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize", "ShearX", "TranslateX",
               "TranslateY", "ShearY", "Rotate", "Equalize", "Contrast", "Color", "Solarize", "Brightness")
AUTHORS_SCALES = {  # operation -> (value at level 0, value at level 9): the package's 10-point linear scales
    "ShearX": (0.0, 0.3), "ShearY": (0.0, 0.3),
    "TranslateX": (0.0, 150 / 331), "TranslateY": (0.0, 150 / 331),
    "Rotate": (0.0, 30.0), "Color": (0.0, 0.9), "Contrast": (0.0, 0.9), "Sharpness": (0.0, 0.9),
    "Brightness": (0.0, 0.9), "Posterize": (8, 4), "Solarize": (256.0, 0.0), "Cutout": (0, 20),
}
GREY, CUTOUT_FILL = 128, (125, 122, 113)  # the package's fill of uncovered corners, and of its Cutout square


def authors_magnitude(op, level):
    """The value of operation `op` at `level` (1..9) on the package's scale;
    None for an operation without one."""
    if op not in AUTHORS_SCALES:
        return None
    low, high = AUTHORS_SCALES[op]
    value = low + (high - low) * level / 9
    return int(round(value)) if op in ("Posterize", "Cutout") else value


def apply_authors_op(image, op, level):
    """One operation of the authors' policy on a PIL image (or a uint8 (3, H, W) tensor: shears then bilinear,
    not bicubic), with torchvision's functions; the sign of shears, translations and enhancements is drawn at
    random, as the package does."""
    v = authors_magnitude(op, level)
    sign = 1 if torch.randint(2, ()).item() else -1
    width, height = TF.get_image_size(image)
    if op in ("ShearX", "ShearY"):  # the package's affine (1, s, 0, 0, 1, 0) is a shear of atan(s) degrees
        angle = math.degrees(math.atan(sign * v))
        smooth = (T.InterpolationMode.BILINEAR if isinstance(image, torch.Tensor)
                  else T.InterpolationMode.BICUBIC)
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0], fill=GREY,
                         shear=[angle, 0.0] if op == "ShearX" else [0.0, angle], interpolation=smooth)
    # in whole pixels (the package shifts by the fraction, nearest sampling)
    if op in ("TranslateX", "TranslateY"):
        shift = [int(sign * v * width), 0] if op == "TranslateX" else [0, int(sign * v * height)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=GREY)
    if op == "Rotate":
        return TF.rotate(image, v, fill=GREY)  # counter-clockwise, no random sign (as the package)
    if op in ("Color", "Contrast", "Sharpness", "Brightness"):
        adjust = {"Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
                  "Sharpness": TF.adjust_sharpness, "Brightness": TF.adjust_brightness}[op]
        return adjust(image, 1 + sign * v)
    if op == "Posterize":
        return TF.posterize(image, v)
    if op == "Solarize":
        # 256: none inverted
        return TF.solarize(image, min(v, 255.0) if isinstance(image, torch.Tensor) else v)
    if op == "Cutout":  # a square of side 2·(v // 2) around a random centre
        half = v // 2
        y, x = torch.randint(height, ()).item(), torch.randint(width, ()).item()
        box = (max(0, x - half), max(0, y - half), min(width, x + half), min(height, y + half))
        if isinstance(image, torch.Tensor):
            image = image.clone()
            for channel, value in enumerate(CUTOUT_FILL):
                image[channel, box[1]:box[3], box[0]:box[2]] = value
            return image
        image = image.copy()
        if box[2] > box[0] and box[3] > box[1]:
            ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=CUTOUT_FILL)
        return image
    # transforms.v2's kernels: the same as v1's on PIL images; on tensors v2's equalize has no branch on the
    # data, where v1's waits for the GPU three times an image
    return {"Invert": F2.invert, "AutoContrast": F2.autocontrast, "Equalize": F2.equalize}[op](image)


class AuthorsRandAugment:
    """The RandAugment policy the authors train with (the `randaugment` package, 1.0.2), from torchvision's
    operations: two (operation, level) pairs drawn uniformly, with replacement, from 15 operations × levels
    1..9, each applied with probability 0.5. torchvision's `RandAugment` instead always applies 2 of 14
    operations at one fixed magnitude (9 of 31 by default): a different, stronger policy.
    Draws from torch's RNG."""

    def __call__(self, image):
        pairs = len(AUTHORS_OPS) * 9  # (operation, level) pairs; the package draws one of pairs² policies
        policy = torch.randint(pairs * pairs, ()).item()
        applied = torch.rand(2).tolist()
        for pair, p in zip(divmod(policy, pairs), applied):
            op, level = AUTHORS_OPS[pair // 9], 1 + pair % 9
            if p < 0.5:
                image = apply_authors_op(image, op, level)
        return image

    def __repr__(self):
        return "AuthorsRandAugment(2 of 15 operations, each p=0.5, levels 1-9: the randaugment 1.0.2 policy)"


RANDAUGMENT = {"authors": AuthorsRandAugment, "torchvision": T.RandAugment}


def image_transform(size, train, randaugment="authors"):
    """The paper's transform of a PIL image: a plain resize to size × size; for training Cutout, then
    RandAugment: the authors' policy by default, or torchvision's (`randaugment="torchvision"`). The same
    steps on uint8 tensors in the workers or on the training device are in pipelines.py (a layer)."""
    steps = [T.Resize((size, size))]  # bilinear, as the reference code
    augment = [Cutout(0.5), RANDAUGMENT[randaugment]()] if train else []
    return T.Compose(steps + augment + [T.ToTensor(), T.Normalize(MEAN, STD)])


class SeededViews(torch.utils.data.Dataset):
    """Item j = view j // N of item j % N of `dataset`, its random augmentation seeded by (seed, j) alone.

    View e is epoch e of training with the encoder in the loop, and view e of the feature cache: the same
    augmentation of the same image either way, whatever the worker processes, their number or the ranks; and
    another one under another `seed` (run.py's --seed), so that runs with other seeds see other augmentations.
    """

    def __init__(self, dataset, views, seed=0):
        self.dataset, self.views, self.seed = dataset, views, seed

    def __len__(self):
        return self.views * len(self.dataset)

    def __getitem__(self, j):
        # Cutout draws from `random`, RandAugment from torch's generator: both seeded for this item alone
        with seeded(item_seed(self.seed, j)):
            return self.dataset[j % len(self.dataset)]


def item_seed(seed, j):
    """The seed of item j in a run seeded with `seed`: both numbers mixed (NumPy's SeedSequence) into 32 bits,
    since torch's generator keeps only the low 32 bits of a seed (seed + 2**32 would draw what seed draws)."""
    if seed < 0 or j < 0:
        raise ValueError(f"seeds are non-negative integers, got seed {seed} and item {j}")
    return int(np.random.SeedSequence([seed, j]).generate_state(1)[0])


# the global generators are shared by the threads of a process (the pin-memory one)
SEEDING = threading.RLock()
_ACTIVE = threading.local()  # the seed of the `seeded` block a thread is in


@contextlib.contextmanager
def seeded(seed):
    """Python's and torch's CPU random state seeded with `seed` inside, restored on exit: no global state
    leaks. (Only the CPU generator: torch.manual_seed would also reseed, and leave reseeded, every GPU's.) One
    thread at a time: the DataLoader's pin-memory thread augments (the device pipeline) while the main thread
    reads items."""
    with SEEDING:
        state, outer = random.getstate(), getattr(_ACTIVE, "seed", None)
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                torch.default_generator.manual_seed(seed)
                _ACTIVE.seed = seed
                yield
        finally:
            random.setstate(state)
            _ACTIVE.seed = outer


def active_seed():
    """The seed of the `seeded` block this thread is in (SeededViews' item seed), or None outside one."""
    return getattr(_ACTIVE, "seed", None)


class EpochSampler(torch.utils.data.Sampler):
    """`sampler`'s image indices i (0..N-1) as SeededViews items epoch·N + i: the order of `sampler`, the
    augmentations of epoch `epoch`. One sampler for all epochs, so worker processes can persist."""

    def __init__(self, sampler, n):
        self.sampler, self.n, self.epoch = sampler, n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return (self.epoch * self.n + i for i in self.sampler)

    def __len__(self):
        return len(self.sampler)
