"""Datasets (VOC2007, COCO2014), partial-label masking, and the paper's image transforms.

A dataset here is a list of image paths with a (N, C) label matrix: 1 present, 0 absent, −1 unknown.
Annotation files are read and checked up front, and `check_decodable` decodes every image once, so a broken
file is reported by name before any training starts. The images' transforms are in augment.py; downloads are
a layer (clipmlr/download.py).

Protocol (PositiveCoOp paper Sec. 4, following DualCoOp): VOC2007 trains on trainval and tests on test;
COCO2014 trains on train2014 and tests on val2014. (Your own images, beyond the paper, are a layer:
clipmlr/folder.py.) Shape key: N images, C classes.
"""
import json
import os
import xml.etree.ElementTree as ET

import torch
from PIL import Image
from tqdm import tqdm

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


class DataError(Exception):
    """A dataset that is missing or malformed; the message names the file and what to do.

    A DataLoader worker's error comes back to the main process as DataError("Caught DataError in DataLoader
    worker process 0. Original Traceback ...: <message>"): only the message itself is kept, one line.
    """

    def __init__(self, message):
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


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
                        f"Annotations/ and JPEGImages/); pass --download to fetch it, or --data-root to "
                        f"point at it")
    listing = os.path.join(voc, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(listing):
        raise DataError(f"{listing} is missing: the VOC2007 {split} split is not there; pass --download to "
                        f"fetch it")
    with open(listing) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DataError(f"{listing} lists no images")
    paths = [os.path.join(voc, "JPEGImages", f"{i}.jpg") for i in ids]
    labels = torch.stack([read_voc_annotation(os.path.join(voc, "Annotations", f"{i}.xml"), difficult)
                          for i in ids])
    return check_images(paths), labels, list(VOC_CLASSES)


# --------------------------------------------------------------------------------------------------- COCO2014

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
                raise DataError(f"{ann}: annotation {a.get('id')} names image {a['image_id']}, not in its "
                                f"images")
            present.setdefault(a["image_id"], set()).add(index[a["category_id"]])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann} is not valid JSON ({e}); delete it and download the annotations "
                        f"again") from None
    except (KeyError, TypeError) as e:
        raise DataError(f"{ann} is not a COCO instances file (missing or malformed field {e})") from None
    ids = sorted(present)  # images with at least one object, as the reference code keeps
    labels = torch.zeros(len(ids), len(categories), dtype=torch.long)
    for row, i in enumerate(ids):
        labels[row, list(present[i])] = 1
    paths = [os.path.join(root, split, files[i]) for i in ids]
    return check_images(paths), labels, [c["name"] for c in categories]


def check_images(paths):
    """`paths` if every file exists (cheap: run on every listing); that they decode is `check_decodable`'s
    job."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} listed images are missing, e.g. {missing[0]}; "
                        f"the dataset is incomplete: pass --download or restore the files")
    return paths


def read_image(path, draft=False):
    """The RGB image at `path`; DataError naming the file when it does not decode (truncated, empty, not an
    image). `draft` decodes a JPEG at 1/8 scale, ~5x faster: every byte is still read, so truncation shows."""
    try:
        with Image.open(path) as f:
            if draft:
                f.draft("RGB", (f.width // 8, f.height // 8))
            return f.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read the image {path}: {e}") from None


class Decodes(torch.utils.data.Dataset):
    """Item i = '' if image i decodes, else the error naming it (errors are collected, not raised, in
    workers)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            read_image(self.paths[i], draft=True)
            return ""
        except DataError as e:
            return str(e)


def check_decodable(paths, workers=0, total=None, gather=None):
    """Decodes every image once, in `workers` processes; DataError naming the unreadable ones.

    A header check is not enough (a truncated JPEG has a valid header); only a decode proves an image
    readable. Where a pass reads every image anyway (the feature cache build), that pass is the check instead.
    Under torchrun each process checks its share `paths` of `total` images, and `gather(list)` gives every
    process's unreadable ones, so that every process raises the same error, naming them all.
    """
    loader = torch.utils.data.DataLoader(Decodes(paths), batch_size=64, num_workers=workers, collate_fn=list,
                                         generator=torch.Generator())  # draws nothing from the process's RNG
    bad = [e for batch in tqdm(loader, desc="decoding", unit="batch", disable=None, leave=False)
           for e in batch if e]
    bad = bad if gather is None else gather(bad)
    if bad:
        raise DataError(f"{len(bad)} of {total or len(paths)} images do not decode; the first: {bad[0]}. "
                        f"Restore or replace them (for VOC/COCO: from the archive, or --download again into "
                        f"an empty --data-root)")


class ImageDataset(torch.utils.data.Dataset):
    """(image (3, S, S), labels (C,), index) for every listed image."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]  # a path, or a PIL image (the demo's)
        if isinstance(image, str) and not getattr(self.transform, "reads_paths", False):
            image = read_image(image)
        return self.transform(image), self.labels[i], i
