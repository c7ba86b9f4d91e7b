"""NUS-WIDE (Chua et al., CIVR 2009) from its official release: 81 concepts on Flickr images (a layer: the
paper uses VOC2007 and COCO2014).

The release is several archives; unpacked into one folder ROOT they give

    ROOT/Concepts81.txt              the 81 concepts, one per line; class order = file order
                                     (NUS-WIDE.zip unpacks it as ROOT/ConceptsList/Concepts81.txt)
    ROOT/ImageList/TrainImagelist.txt    161,789 lines, one Windows path each: actor\\0001_2124494179.jpg
    ROOT/ImageList/TestImagelist.txt     107,859 lines
    ROOT/TrainTestLabels/Labels_<concept>_Train.txt   one 0/1 per line: line i labels image i of the list
    ROOT/TrainTestLabels/Labels_<concept>_Test.txt    (NUS-WIDE.zip: ROOT/Groundtruth/TrainTestLabels/)
    ROOT/Flickr/<folder>/<file>      the images (sent on request, not in the public archives)

Both places of the concept file and of the label folder are accepted; Groundtruth/AllLabels/ (one file per
concept over all 269,648 images) is not read. Lines may end in CRLF and carry spaces; a list line that starts
with an absolute prefix (C:\\ImageData\\Flickr\\actor\\...) keeps only what follows Flickr\\.

The lists do not say two things: some listed images are not on disk (dead Flickr links, partial mirrors), and
about a fifth have no positive among the 81 concepts. Missing images are counted among all listed ones and
left out; `load_nuswide_splits` refuses them unless allowed (the CLI's --nuswide-skip-missing). Of the images
on disk, those without a positive are dropped, as the common protocol does (reported: 125,449 train / 83,898
test of the complete release). So listed = missing + no_label + kept. Labels: 1 present, 0 absent, no
unknowns. Shape key: N images, C = 81 concepts.
"""
import os

import numpy as np
import torch

from .data import DataError

SPLITS = {"train": ("TrainImagelist.txt", "Train"), "test": ("TestImagelist.txt", "Test")}
NUM_CONCEPTS = 81
NESTED = ("NUS-WIDE", "NUSWIDE", "nuswide", "nus-wide", "nus_wide")  # folder names the release is unpacked as


def find_nuswide(root):
    """The NUS-WIDE folder (the one holding ImageList/): `root` or root/NUS-WIDE (and spellings), or None."""
    for d in (root, *(os.path.join(root, n) for n in NESTED)):
        if os.path.isdir(os.path.join(d, "ImageList")):
            return d
    return None


def first_existing(*paths):
    """The first of `paths` that exists, else the first (for the error to name)."""
    return next((p for p in paths if os.path.exists(p)), paths[0])


def read_lines(path, what):
    """The stripped lines of a text file (LF or CRLF; trailing blank lines dropped). An inner blank line is an
    error: line i must stay entry i."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: it holds {what}; unpack the NUS-WIDE archives into one folder "
                        f"(layout in clipmlr/nuswide.py)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # the release's lists are ASCII; one odd byte should not stop a run
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path} is empty, but should hold {what}; unpack the archive again")
    if "" in lines:
        raise DataError(f"{path}, line {lines.index('') + 1} is empty: each line holds one entry; "
                        f"remove the blank line or unpack the archive again")
    return lines


def read_concepts(path):
    """The 81 concept names of Concepts81.txt, in file order."""
    names = read_lines(path, "the 81 concept names")
    if len(names) != NUM_CONCEPTS:
        raise DataError(f"{path} lists {len(names)} concepts, but NUS-WIDE has {NUM_CONCEPTS}; use the "
                        f"release's Concepts81.txt (ConceptsList.zip)")
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise DataError(f"{path}, line {i + 1}: the concept {name!r} is listed again (first on line "
                            f"{names.index(name) + 1})")
    return names


def read_image_list(path):
    """(folder, file) of every image of an image list, in list order."""
    images = []
    for number, line in enumerate(read_lines(path, "one image path per line"), start=1):
        parts = [p for p in line.replace("\\", "/").split("/") if p]
        if "Flickr" in parts:  # an absolute path: keep what follows the last Flickr\
            parts = parts[len(parts) - parts[::-1].index("Flickr"):]
        if len(parts) != 2:
            raise DataError(f"{path}, line {number}: {line!r} is not <folder>\\<file> "
                            f"(as actor\\0001_2124494179.jpg)")
        images.append((parts[0], parts[1]))
    return images


def read_label_column(path, count, listing):
    """(N,) uint8 of 0/1 from one Labels_<concept>_<Split>.txt; DataError names the first bad line."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: each of the 81 concepts has a Labels_<concept>_Train.txt and a "
                        f"_Test.txt in TrainTestLabels/; unpack Groundtruth.zip again")
    with open(path, "rb") as f:
        data = f.read()
    # Fast path: without spaces, tabs and CRs a well-formed file is exactly b"v\nv\n...v" with v in {0, 1}.
    body = np.frombuffer(data.translate(None, b" \t\r").rstrip(b"\n"), dtype=np.uint8)
    values = body[0::2] - ord("0")  # a byte below "0" wraps around to > 1
    if len(body) == 2 * count - 1 and (body[1::2] == ord("\n")).all() and (values <= 1).all():
        return values
    lines = data.split(b"\n")  # slow path, only to name the first bad line
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        value = line.strip()
        if value not in (b"0", b"1"):
            problem = f"{value.decode('latin-1')!r} is not 0 or 1" if value else "the line is empty"
            raise DataError(f"{path}, line {number}: {problem}; the file is corrupt: unpack Groundtruth.zip "
                            f"again")
    state = "truncated" if len(lines) < count else "longer than the list"
    raise DataError(f"{path} has {len(lines)} lines, but {listing} lists {count} images (line i labels image "
                    f"i): the file is {state} or from another release; unpack Groundtruth.zip again")


def on_disk(flickr, images):
    """(N,) bool, image i exists: one directory listing per Flickr subfolder (fast on network disks)."""
    found = {}
    for folder in {folder for folder, _ in images}:
        try:
            with os.scandir(os.path.join(flickr, folder)) as entries:
                found[folder] = {e.name for e in entries}
        except (FileNotFoundError, NotADirectoryError):
            found[folder] = set()
    return np.array([name in found[folder] for folder, name in images], dtype=bool)


def load_nuswide(root, split):
    """(image paths, (N, 81) labels, concept names, counts) of the official "train" or "test" split.

    Every file is checked before any image is looked for. counts = {"listed", "missing", "no_label", "kept"}:
    missing among all listed images (left out), no_label (no positive concept) among those on disk, kept =
    listed − missing − no_label.
    """
    return read_split(root, split)[:4]


def load_nuswide_splits(root, allow_missing=False, say=print):
    """(train paths, train labels, test paths, test labels, concept names), as run.py reads NUS-WIDE: both
    splits' counts said, then, if any listed image is missing, one DataError naming both counts, the first
    missing image and the flag, unless `allow_missing` (which trains and tests on the present images)."""
    train, train_y, names, counts, first = read_split(root, "train")
    test, test_y, _, test_counts, test_first = read_split(root, "test")
    for split, c in (("training", counts), ("test", test_counts)):
        say(f"NUS-WIDE {split} images: {c['listed']} listed, {c['missing']} missing, {c['no_label']} "
            f"without a positive concept (dropped), {c['kept']} used")
    if (first or test_first) and not allow_missing:
        raise DataError(f"{counts['missing']} of {counts['listed']} train images and "
                        f"{test_counts['missing']} of {test_counts['listed']} test images listed in "
                        f"NUS-WIDE's ImageList/ are not on disk, the first: {first or test_first}; restore "
                        f"them, or pass "
                        f"--nuswide-skip-missing to leave them out")
    return train, train_y, test, test_y, names


def read_split(root, split):
    """`load_nuswide`'s four values and the first listed image that is not on disk (None if none is)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    base = find_nuswide(root)
    if base is None:
        raise DataError(f"no NUS-WIDE in {os.path.abspath(root)} (looked for ImageList/ there and in "
                        f"NUS-WIDE/); pass --data-root to the folder holding ImageList/, TrainTestLabels/, "
                        f"Concepts81.txt and Flickr/")
    list_name, suffix = SPLITS[split]
    names = read_concepts(first_existing(os.path.join(base, "Concepts81.txt"),
                                         os.path.join(base, "ConceptsList", "Concepts81.txt")))
    listing = os.path.join(base, "ImageList", list_name)
    images = read_image_list(listing)
    label_dir = first_existing(os.path.join(base, "TrainTestLabels"),
                               os.path.join(base, "Groundtruth", "TrainTestLabels"))
    labels = np.empty((len(images), NUM_CONCEPTS), dtype=np.uint8)  # (N, C), column c from concept c's file
    for c, name in enumerate(names):
        column = os.path.join(label_dir, f"Labels_{name}_{suffix}.txt")
        labels[:, c] = read_label_column(column, len(images), listing)

    flickr = os.path.join(base, "Flickr")
    if not os.path.isdir(flickr):
        raise DataError(f"no Flickr/ folder in {base}: the images come apart from the labels (on request "
                        f"from NUS); unpack them there as Flickr/<folder>/<file>")
    present = on_disk(flickr, images)
    missing = int((~present).sum())
    first = os.path.join(flickr, *images[int(np.argmin(present))]) if missing else None
    labelled = labels.any(axis=1)
    keep = present & labelled
    counts = {"listed": len(images), "missing": missing, "no_label": int((present & ~labelled).sum()),
              "kept": int(keep.sum())}
    if not counts["kept"]:
        raise DataError(f"none of the {len(images)} {split} images of {listing} is both on disk and "
                        f"labelled with a concept; check that Flickr/ holds the images")
    paths = [os.path.join(flickr, folder, name) for (folder, name), k in zip(images, keep) if k]
    return paths, torch.from_numpy(labels[keep]).long(), names, counts, first
