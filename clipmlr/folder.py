"""Your own partially labelled images (a layer: the paper uses VOC2007 and COCO2014): a folder with two CSVs.

    DIR/train.csv, DIR/test.csv     header: image,<class 1>,<class 2>,...
                                    rows:   <path relative to DIR>,<cell per class>  (1, 0, -1 or empty)

Cells: 1 present, 0 absent, -1 or empty unknown. Unknown training cells are real partial labels, kept as −1
(run.py masks more only if --labels asks). Unknown test cells are left out of their class's AP.
"""
import csv
import os

import torch

from .data import DataError


def load_folder(root, split, classnames=None):
    """(image paths, (N, C) labels, class names) from root/<split>.csv: your own partially labelled images.

    The header is `image,<class 1>,<class 2>,...`; each row an image path relative to `root`, then one cell
    per class: 1 present, 0 absent, -1 or empty unknown. Unknown labels stay −1 (real partial labels).
    `classnames`, when given (the training split's), must be the header's. Every error names the file, row
    and column.
    """
    path = os.path.join(root, f"{split}.csv")
    if not os.path.isfile(path):
        raise DataError(f"no {split}.csv in {os.path.abspath(root)}: --data folder reads train.csv and "
                        f"test.csv there (header image,<class>,...; cells 1 present, 0 absent, -1 or empty "
                        f"unknown); see README.md")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)  # rows numbered as the file's lines, blank lines skipped
            rows = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it again as UTF-8 CSV") from None
    if (not rows or len(rows[0][1]) < 2 or rows[0][1][0].strip() != "image"
            or not all(c.strip() for c in rows[0][1][1:])):
        raise DataError(f"{path}, row {rows[0][0] if rows else 1}: the header must be "
                        f"image,<class 1>,<class 2>,... with every class named; "
                        f"got {rows[0][1] if rows else 'an empty file'}")
    (_, header), rows = rows[0], rows[1:]
    names = [c.strip() for c in header[1:]]
    if len(set(names)) != len(names):
        raise DataError(f"{path}, row 1: a class is named twice in the header {names}")
    if classnames is not None and names != list(classnames):
        raise DataError(f"{path}, row 1: the classes {names} are not train.csv's {list(classnames)} "
                        f"(same names, same order)")
    images, labels, seen = [], [], {}
    # x.0: as pandas writes floats
    values = {"1": 1, "0": 0, "-1": -1, "": -1, "1.0": 1, "0.0": 0, "-1.0": -1}
    for number, row in rows:
        if len(row) != len(names) + 1:
            raise DataError(f"{path}, row {number}: {len(row)} cells, but the header has {len(names) + 1}")
        image = row[0].strip()
        if image in seen:
            raise DataError(f"{path}, row {number}: the image {image} is listed again "
                            f"(first in row {seen[image]})")
        if not image or not os.path.isfile(os.path.join(root, image)):
            raise DataError(f"{path}, row {number}, column 1: "
                            + (f"no image {os.path.join(root, image)}" if image
                               else "the image path is empty")
                            + "; fix the path (relative to the CSV's folder)")
        seen[image] = number
        for column, (name, cell) in enumerate(zip(names, row[1:]), start=2):
            if cell.strip() not in values:
                raise DataError(f"{path}, row {number}, column {column} ({name}): {cell!r} is not 1, 0, -1 "
                                f"or empty")
        images.append(os.path.join(root, image))
        labels.append([values[cell.strip()] for cell in row[1:]])
    if not images:
        raise DataError(f"{path} lists no images, only its header")
    labels = torch.tensor(labels, dtype=torch.long)
    unknown = [n for n, known in zip(names, (labels >= 0).any(dim=0).tolist()) if not known]
    # training: a class never labelled cannot be learned (a test class: no AP)
    if unknown and classnames is None:
        raise DataError(f"{path}: the class(es) {unknown} have no known label in any row; label some images "
                        f"or remove the column")
    if classnames is not None and not (labels == 1).any():
        raise DataError(f"{path}: no class has a known positive (a 1) in any row, so no AP can be computed; "
                        f"label the test images")
    return images, labels, names
