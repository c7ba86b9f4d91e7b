"""Downloading VOC2007 and COCO2014 (a layer: the method reads datasets that are already on disk).

torchvision does the work: it fetches each archive, checks its md5 and unpacks it. What is already there is
not fetched again. A failure (no network, a damaged archive) is one DataError saying what to do, and a folder
this download created is removed again, so nothing empty is left behind.
"""
import os
import shutil

from torchvision.datasets.utils import download_and_extract_archive

from .clip.load import outermost_missing
from .data import DataError, find_voc

COCO_BASE_URL = "http://images.cocodataset.org"
COCO_URLS = {  # archive -> md5, as published by cocodataset.org
    "zips/train2014.zip": "0da8c0bd3d6becc4dcb32757491aca88",
    "zips/val2014.zip": "a3d79f5ed8d289b7a7554ce06a5782b3",
    "annotations/annotations_trainval2014.zip": "0a379cfc70b0e71301e0f377548639bd",
}


def fetch(what, root, get):
    """Runs a download, turning a network or checksum failure into one clear DataError."""
    created = outermost_missing(root)
    try:
        get()
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError on bad md5
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(f"could not download {what} into {os.path.abspath(root)} "
                        f"({getattr(e, 'reason', e)}). Without network, download it on another machine, "
                        f"unpack it there (see README.md, 'Data') and pass --data-root") from None


def download_voc(root):
    """VOC2007 trainval and test through torchvision, which verifies the archives' md5;
    skips what is there."""
    from torchvision.datasets import VOCDetection
    for split in ("trainval", "test"):
        voc = find_voc(root)
        if voc and os.path.isfile(os.path.join(voc, "ImageSets", "Main", f"{split}.txt")):
            continue
        fetch(f"VOC2007 {split}", root,
              lambda: VOCDetection(root, year="2007", image_set=split, download=True))


def download_coco(root):
    """train2014, val2014 and the 2014 annotations (about 19 GB), md5-checked by torchvision."""
    for archive, md5 in COCO_URLS.items():
        unpacked = {"zips/train2014.zip": "train2014",
                    "zips/val2014.zip": "val2014"}.get(archive, "annotations")
        if os.path.isdir(os.path.join(root, unpacked)):
            continue
        url = f"{COCO_BASE_URL}/{archive}"
        fetch(url, root, lambda: download_and_extract_archive(url, root, md5=md5, remove_finished=True))
