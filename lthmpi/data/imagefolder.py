"""The ImageNet directory layout: `train/<class>/*.JPEG` and `val/<class>/*.JPEG`, any image size.

Too large to read into memory (ImageNet is ~190 GB as uint8 at 224x224), so there is no in-memory reader:
`python -m lthmpi.data prepare --dataset imagefolder` streams the images into a prepared HDF5 file
(`lthmpi.data.stream_prepare`) and training reads that. This module only lists the tree and decodes one
image; both fail with one line naming the directory or the file.

Classes are the sorted names of train/'s subdirectories (label = position). The training images are taken
in one fixed pseudo-random order (sorted paths permuted with a constant seed), so that the validation
examples held out at the end and the subset kept at the start mix all classes, and the order never depends
on the run's seed or the number of ranks that prepare. val/ is the test set (ImageNet's labelled
validation set is what papers report), in sorted order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .readers import DataError, DataMissing

EXTENSIONS = (".jpeg", ".jpg", ".png")
FORMATS = ("JPEG", "PNG")  # what Pillow may decode a file of the tree as, whatever it detects in it (never, e.g.,
                           # EPS through Ghostscript because a file named .jpg holds PostScript)
ORDER_SEED = 20210401  # the fixed permutation of the training images; never the run's seed


@dataclass
class ImageList:
    """Every image of a tree, in the order the prepared arrays hold them."""
    classes: list  # class names, sorted; label = index
    train: list  # (path, label) in the fixed order
    test: list  # (path, label), sorted


def _images_in(directory: str) -> list:
    """The image files of one class directory, sorted; hidden files and other extensions are skipped."""
    try:
        names = sorted(n for n in os.listdir(directory)
                       if not n.startswith(".") and n.lower().endswith(EXTENSIONS))
    except OSError as e:
        raise DataError(f"{directory}: cannot list it ({e.strerror})") from None
    files = [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]
    if not files:
        raise DataError(f"{directory}: class directory holds no images ({', '.join(EXTENSIONS)}): "
                        f"add its images or remove the directory")
    return files


def _classes(split_dir: str) -> list:
    try:
        return sorted(n for n in os.listdir(split_dir)
                      if not n.startswith(".") and os.path.isdir(os.path.join(split_dir, n)))
    except OSError as e:
        raise DataError(f"{split_dir}: cannot list it ({e.strerror})") from None


def list_images(root: str) -> ImageList:
    """List `root`/train and `root`/val; refuse empty class directories and val classes not in train."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataMissing(f"{d} does not exist: an imagefolder dataset needs train/<class>/*.JPEG "
                              f"and val/<class>/*.JPEG under data.dir")
    classes = _classes(train_dir)
    if len(classes) < 2:
        raise DataError(f"{train_dir}: found {len(classes)} class directories; a classifier needs at least 2")
    label = {c: i for i, c in enumerate(classes)}
    train = [(p, label[c]) for c in classes for p in _images_in(os.path.join(train_dir, c))]
    test = []
    for c in _classes(val_dir):
        if c not in label:
            raise DataError(f"{os.path.join(val_dir, c)}: class {c!r} is not among train/'s classes; "
                            f"remove it or add train/{c}/")
        test += [(p, label[c]) for p in _images_in(os.path.join(val_dir, c))]
    if not test:
        raise DataError(f"{val_dir}: holds no class directories; the test set would be empty")
    perm = np.random.default_rng(ORDER_SEED).permutation(len(train))
    return ImageList(classes, [train[i] for i in perm], test)


def decode(path: str, size: int) -> np.ndarray:
    """One image as (size, size, 3) uint8 RGB: the largest centred square of the image's aspect ratio,
    resized bilinearly (Pillow's ImageOps.fit). JPEGs are decoded at the smallest DCT scale still at least
    `size` (Image.draft), which makes decoding large photos several times faster. Only JPEG and PNG are
    decoded (FORMATS, whatever the file's name); any other content, and any decoder error, is a DataError
    that names the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path, formats=FORMATS) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")  # loads the whole image: a truncated file fails here
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a {' or '.join(FORMATS)} image (an image tree holds only those, whatever the "
                        f"file's name); replace or remove the file") from None
    except Exception as e:  # any decoder's error, named with its file
        raise DataError(f"{path}: cannot decode this image ({type(e).__name__}: {e}); "
                        f"replace or remove the file") from None
