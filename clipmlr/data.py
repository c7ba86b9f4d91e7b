"""Datasets (VOC2007, COCO2014), partial-label masking, and the paper's image transforms.

A dataset here is a list of image paths with a (N, C) label matrix: 1 present, 0 absent, −1 unknown. Annotation
files are read and checked up front, so a broken file is reported by name before any training starts.

Protocol (PositiveCoOp paper Sec. 4, following DualCoOp): VOC2007 trains on trainval and tests on test; COCO2014
trains on train2014 and tests on val2014. Shape key: N images, C classes.
"""
import json
import os
import random
import xml.etree.ElementTree as ET

import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T
from torchvision.datasets.utils import download_and_extract_archive

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's preprocessing statistics
STD = (0.26862954, 0.26130258, 0.27577711)

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
COCO_BASE_URL = "http://images.cocodataset.org"
COCO_URLS = {  # archive -> md5, as published by cocodataset.org
    "zips/train2014.zip": "0da8c0bd3d6becc4dcb32757491aca88",
    "zips/val2014.zip": "a3d79f5ed8d289b7a7554ce06a5782b3",
    "annotations/annotations_trainval2014.zip": "0a379cfc70b0e71301e0f377548639bd",
}


class DataError(Exception):
    """A dataset that is missing or malformed; the message names the file and what to do."""


def mask_labels(targets, ratio, seed):
    """Keeps each (image, class) label with probability `ratio` and sets the rest to −1 (unknown).

    (N, C) -> (N, C). The mask depends on (shape, ratio, seed) alone, so every head sees the same labels.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"the fraction of labels kept must be in (0, 1], got {ratio}")
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(targets.shape, generator=generator) < ratio
    return torch.where(keep, targets, torch.full_like(targets, -1))


# ---------------------------------------------------------------------------------------------------- VOC2007

def find_voc(root):
    """The VOC2007 folder (with JPEGImages/, Annotations/, ImageSets/Main/) under `root`, or None."""
    for d in (os.path.join(root, "VOCdevkit", "VOC2007"), os.path.join(root, "VOC2007"), root):
        if os.path.isdir(os.path.join(d, "Annotations")) and os.path.isdir(os.path.join(d, "JPEGImages")):
            return d
    return None


def fetch(what, root, get):
    """Runs a download, turning a network or checksum failure into one clear DataError."""
    try:
        get()
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError on bad md5
        raise DataError(f"could not download {what} into {os.path.abspath(root)} ({getattr(e, 'reason', e)}). "
                        f"Without network, download it on another machine, unpack it there (see README.md, "
                        f"'Data') and pass --data-root") from None


def download_voc(root):
    """VOC2007 trainval and test through torchvision, which verifies the archives' md5; skips what is there."""
    from torchvision.datasets import VOCDetection
    for split in ("trainval", "test"):
        voc = find_voc(root)
        if voc and os.path.isfile(os.path.join(voc, "ImageSets", "Main", f"{split}.txt")):
            continue
        fetch(f"VOC2007 {split}", root, lambda: VOCDetection(root, year="2007", image_set=split, download=True))


def read_voc_annotation(path, difficult="absent"):
    """Class indices present in one VOC XML file; `difficult` objects count as absent, unknown or present."""
    try:
        objects = ET.parse(path).getroot().findall("object")
    except (ET.ParseError, OSError) as e:
        raise DataError(f"cannot read the annotation {path}: {e}") from None
    present, uncertain = set(), set()
    for obj in objects:
        name = obj.findtext("name")
        if name is None:
            raise DataError(f"{path}: an <object> has no <name> tag")
        if name.strip() not in VOC_CLASSES:
            raise DataError(f"{path}: unknown class {name!r}; VOC2007 classes are {VOC_CLASSES}")
        is_difficult = obj.findtext("difficult", "0").strip() == "1"
        target = uncertain if is_difficult and difficult != "present" else present
        target.add(VOC_CLASSES.index(name.strip()))
    labels = torch.zeros(len(VOC_CLASSES), dtype=torch.long)
    if difficult == "unknown":
        labels[list(uncertain)] = -1
    labels[list(present)] = 1
    return labels


def load_voc(root, split, difficult="absent"):
    """(image paths, (N, 20) labels, class names) of a VOC2007 split ("trainval" or "test")."""
    voc = find_voc(root)
    if voc is None:
        raise DataError(f"no VOC2007 found in {os.path.abspath(root)} (looked for VOCdevkit/VOC2007/ with "
                        f"Annotations/ and JPEGImages/); pass --download to fetch it, or --data-root to point at it")
    listing = os.path.join(voc, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(listing):
        raise DataError(f"{listing} is missing: the VOC2007 {split} split is not there; pass --download to fetch it")
    with open(listing) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DataError(f"{listing} lists no images")
    paths = [os.path.join(voc, "JPEGImages", f"{i}.jpg") for i in ids]
    labels = torch.stack([read_voc_annotation(os.path.join(voc, "Annotations", f"{i}.xml"), difficult)
                          for i in ids])
    return check_images(paths), labels, list(VOC_CLASSES)


# ---------------------------------------------------------------------------------------------------- COCO2014

def download_coco(root):
    """train2014, val2014 and the 2014 annotations (about 19 GB), md5-checked by torchvision."""
    for archive, md5 in COCO_URLS.items():
        unpacked = {"zips/train2014.zip": "train2014", "zips/val2014.zip": "val2014"}.get(archive, "annotations")
        if os.path.isdir(os.path.join(root, unpacked)):
            continue
        url = f"{COCO_BASE_URL}/{archive}"
        fetch(url, root, lambda: download_and_extract_archive(url, root, md5=md5, remove_finished=True))


def load_coco(root, split):
    """(image paths, (N, 80) labels, class names) of train2014 or val2014; images without objects dropped."""
    ann = os.path.join(root, "annotations", f"instances_{split}.json")
    if not os.path.isfile(ann):
        raise DataError(f"no COCO annotations at {os.path.abspath(ann)}; pass --download to fetch COCO2014, "
                        f"or --data-root to the folder holding train2014/, val2014/ and annotations/")
    try:
        with open(ann) as f:
            coco = json.load(f)
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(categories)}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        present = {}
        for a in coco["annotations"]:
            if a["category_id"] not in index:
                raise DataError(f"{ann}: annotation {a.get('id')} has category id {a['category_id']}, "
                                f"which is not among the file's categories")
            if a["image_id"] not in files:
                raise DataError(f"{ann}: annotation {a.get('id')} names image {a['image_id']}, not in its images")
            present.setdefault(a["image_id"], set()).add(index[a["category_id"]])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann} is not valid JSON ({e}); delete it and download the annotations again") from None
    except (KeyError, TypeError) as e:
        raise DataError(f"{ann} is not a COCO instances file (missing or malformed field {e})") from None
    ids = sorted(present)  # images with at least one object, as the reference code keeps
    labels = torch.zeros(len(ids), len(categories), dtype=torch.long)
    for row, i in enumerate(ids):
        labels[row, list(present[i])] = 1
    paths = [os.path.join(root, split, files[i]) for i in ids]
    return check_images(paths), labels, [c["name"] for c in categories]


def check_images(paths):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} listed images are missing, e.g. {missing[0]}; "
                        f"the dataset is incomplete: pass --download or restore the files")
    return paths


# ---------------------------------------------------------------------------------------------------- transforms

class Cutout:
    """Paints one square of half the image side, at a random centre, in a random colour (DualCoOp's CutoutPIL)."""

    def __init__(self, factor=0.5):
        self.factor = factor

    def __call__(self, image):
        w, h = image.size
        side_w, side_h = int(w * self.factor), int(h * self.factor)
        x, y = random.randint(0, w - 1), random.randint(0, h - 1)
        box = (max(0, x - side_w // 2), max(0, y - side_h // 2), min(w, x + side_w // 2), min(h, y + side_h // 2))
        image = image.copy()
        ImageDraw.Draw(image).rectangle(box, fill=tuple(random.randint(0, 255) for _ in range(3)))
        return image


def image_transform(size, train):
    """Plain resize to size × size; for training Cutout then RandAugment (torchvision's) first."""
    steps = [T.Resize((size, size))]  # bilinear, as the reference code
    if train:
        steps += [Cutout(0.5), T.RandAugment()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


class ImageDataset(torch.utils.data.Dataset):
    """(image (3, S, S), labels (C,), index) for every listed image."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        if isinstance(image, str):
            try:
                with Image.open(image) as f:
                    image = f.convert("RGB")
            except (OSError, ValueError) as e:  # truncated, empty or not an image
                raise DataError(f"cannot read the image {image}: {e}") from None
        return self.transform(image), self.labels[i], i
