"""Readers for the raw dataset files: IDX (MNIST, Fashion-MNIST), CIFAR-10 python batches, npz, digits.

The machines this runs on have no network, so `keras.datasets.*.load_data()` cannot be used: the
engine reads the standard file formats from a data directory instead. Every reader checks what it
reads (magic numbers, exact file lengths, shapes, dtypes, label ranges, NaN/Inf) and fails with one
`DataError` line that names the file and the problem, because a silently wrong dataset would spoil a
whole lottery-ticket experiment that takes hours to run.

A reader returns `RawData`: the official train and test parts, unsplit and unnormalised, in NHWC
layout and in the file's own dtype (uint8 stays uint8 until normalisation, to keep memory low).
Splitting and normalisation live in `prepare.py`.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


class DataError(ValueError):
    """A dataset problem, with a one-line message saying what is wrong and how to fix it."""


class DataMissing(DataError):
    """The dataset's files are not there (as opposed to there but wrong): the message then says how
    to get them."""


@dataclass
class RawData:
    """The official train/test parts of a dataset as read from disk, before split and normalisation."""

    x_train: np.ndarray  # (N, H, W, C), uint8 or float
    y_train: np.ndarray  # (N,), int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float  # what "scale" normalisation divides by (255 for uint8 images, 16 for digits)
    source: str  # where it was read from, for messages and provenance


# ---------------------------------------------------------------------------------------------------
# shared checks

def _check_labels(y: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Labels must be integers in [0, num_classes); returned as int64."""
    if y.ndim == 2 and y.shape[1] == 1:  # keras-style (N, 1) labels
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be a 1-D array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{where}: label {bad} is out of range 0..{num_classes - 1}")
    return y.astype(np.int64, copy=False)


def _check_images(x: np.ndarray, where: str) -> np.ndarray:
    """Images must be (N,H,W) or (N,H,W,C), uint8 or finite float; returned as NHWC."""
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or min(x.shape[1:]) < 1:
        raise DataError(f"{where}: images must have shape (N,H,W) or (N,H,W,C), got {x.shape}")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or Inf values")
    return x


def _check_pair(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError(f"{where}: contains no examples")


def _check_same_image_shape(train: np.ndarray, test: np.ndarray, where: str) -> None:
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{where}: train images are {train.shape[1:]} but test images are "
                        f"{test.shape[1:]}")


# ---------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 dims (images) or 1 dim (labels)


def _find(directory: str, name: str) -> Optional[str]:
    """`name` or `name.gz` in `directory` (the uncompressed file wins), or None."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is damaged, download it again") from None


def read_idx_file(path: str, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes with `ndim` dimensions (3 for images, 1 for labels)."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: {len(raw)} bytes is shorter than the IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path}: magic number 0x{magic:08x} is not 0x{_IDX_MAGIC[ndim]:08x} "
                        f"(IDX unsigned bytes, {ndim}-D); is this the right file?")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, but its header {dims} needs {expected}")
    if ndim == 3 and min(dims[1:]) < 1:
        raise DataError(f"{path}: image dimensions {dims[1:]} are empty")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_dir(directory: str, num_classes: int = 10) -> RawData:
    """The four IDX files of MNIST or Fashion-MNIST in `directory`, gzipped or not."""
    paths = [_find(directory, name) for name in IDX_FILES]
    missing = [name for name, p in zip(IDX_FILES, paths) if p is None]
    if missing:
        raise DataMissing(f"missing {', '.join(n + '[.gz]' for n in missing)} in {directory}")
    arrays = []
    for (img_path, lab_path) in ((paths[0], paths[1]), (paths[2], paths[3])):
        x = read_idx_file(img_path, 3)[..., np.newaxis]
        y = read_idx_file(lab_path, 1)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{lab_path}: {y.shape[0]} labels but {img_path} has {x.shape[0]} images")
        if x.shape[0] == 0:
            raise DataError(f"{img_path}: contains no images")
        arrays += [x, _check_labels(y, num_classes, lab_path)]
    _check_same_image_shape(arrays[0], arrays[2], directory)
    return RawData(arrays[0], arrays[1], arrays[2], arrays[3], num_classes, 255.0, directory)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 python batches

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"

# What a real CIFAR batch pickle needs, and nothing more. `_reconstruct`/`ndarray`/`dtype` rebuild
# arrays pickled with protocols 0-4, `_frombuffer` with protocol 5, `_codecs.encode` carries bytes in
# protocol 2 pickles written by Python 3. All of them only construct data; none can run code.
_SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (os.system & co.)."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(f"{self._path}: refusing to unpickle {module}.{name}: not a CIFAR-10 batch "
                        f"(only numpy arrays, lists and dicts are allowed)")


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    return None


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ((N,32,32,3) uint8, (N,) int64), checked."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # any unpickling failure means a damaged or foreign file
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a CIFAR-10 batch is a dict, got {type(obj).__name__}")
    data, labels = _key(obj, "data"), _key(obj, "labels")
    if data is None or labels is None:
        raise DataError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels' entries")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {dtype} {shape}")
    try:
        y = np.asarray(labels)
    except Exception:
        raise DataError(f"{path}: 'labels' is not a list of integers") from None
    y = _check_labels(y, 10, path)
    _check_pair(data, y, path)
    # rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image in row order
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def read_cifar_dir(directory: str) -> RawData:
    """CIFAR-10's five training batches and test batch, in `directory` or its cifar-10-batches-py."""
    for d in (directory, os.path.join(directory, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(d, n)) for n in CIFAR_TRAIN + (CIFAR_TEST,)):
            break
    else:
        missing = [n for n in CIFAR_TRAIN + (CIFAR_TEST,)
                   if not os.path.isfile(os.path.join(directory, n))]
        raise DataMissing(f"missing {', '.join(missing)} in {directory} "
                        f"(or in {os.path.join(directory, 'cifar-10-batches-py')})")
    parts = [read_cifar_batch(os.path.join(d, n)) for n in CIFAR_TRAIN]
    x_test, y_test = read_cifar_batch(os.path.join(d, CIFAR_TEST))
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return RawData(x_train, y_train, x_test, y_test, 10, 255.0, d)


# ---------------------------------------------------------------------------------------------------
# npz

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_path(path: str) -> str:
    """`path` itself if it is a file, else the only .npz file in that directory."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".npz"))
        if len(found) == 1:
            return os.path.join(path, found[0])
        if len(found) > 1:
            raise DataError(f"{path} holds several .npz files ({', '.join(found)}): "
                            f"point data.dir at one of them")
    raise DataMissing(f"no .npz file at {path}: point data.dir at a .npz holding "
                    f"{', '.join(NPZ_KEYS)}, or at a directory with exactly one such file")


def read_npz(path: str) -> RawData:
    """An .npz file with x_train, y_train, x_test, y_test (no pickled objects)."""
    path = _npz_path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)} "
                                f"(has {', '.join(z.files) or 'none'})")
            arrays = {k: z[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except Exception as e:  # zip damage, object arrays (pickles), not an npz at all
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    x_train = _check_images(arrays["x_train"], f"{path} x_train")
    x_test = _check_images(arrays["x_test"], f"{path} x_test")
    _check_same_image_shape(x_train, x_test, path)
    ys = []
    for split, x in (("train", x_train), ("test", x_test)):
        y = _check_labels(arrays[f"y_{split}"], np.iinfo(np.int32).max, f"{path} y_{split}")
        _check_pair(x, y, f"{path} {split}")
        ys.append(y)
    num_classes = int(max(ys[0].max(), ys[1].max())) + 1
    if num_classes < 2:
        raise DataError(f"{path}: all labels are 0; a classifier needs at least 2 classes")
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    return RawData(x_train, ys[0], x_test, ys[1], num_classes, scale, path)


# ---------------------------------------------------------------------------------------------------
# scikit-learn digits (bundled, offline, tiny: for fast tests)

DIGITS_TEST = 360


def read_digits(_directory: str = "") -> RawData:
    """scikit-learn's 1797 8x8 digits; there is no official split, so the last 360 are the test set.

    Read from the file scikit-learn ships, as its `load_digits` reads it, without importing scikit-learn:
    that import pulls in SciPy, about 2 s of CPU in every process that loads the digits."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset ships with scikit-learn, which is not installed: "
                        "pip install scikit-learn (or run ./run/setup.sh)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    try:
        table = np.loadtxt(path, delimiter=",")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: scikit-learn's digits file is unreadable ({e}): reinstall scikit-learn") from None
    if table.shape != (1797, 65):
        raise DataError(f"{path}: expected 1797 rows of 64 pixels and a label, found shape {table.shape}: "
                        f"reinstall scikit-learn")
    x = table[:, :-1].astype(np.uint8).reshape(-1, 8, 8, 1)  # values 0..16
    y = _check_labels(table[:, -1].astype(int), 10, path)
    n = x.shape[0] - DIGITS_TEST
    return RawData(x[:n], y[:n], x[n:], y[n:], 10, 16.0, "sklearn.datasets.load_digits")


# ---------------------------------------------------------------------------------------------------
# image trees (ImageNet's layout): listed and decoded in imagefolder.py, prepared in stream_prepare.py

def read_imagefolder(directory: str) -> RawData:
    """Image trees are too large to read into memory: they are only ever prepared (streamed) to a file."""
    raise DataError(f"{directory}: an imagefolder dataset is read from its prepared file: run `python -m "
                    f"lthmpi.data prepare --dataset imagefolder --dir {directory} --image-size N --out FILE.h5` "
                    f"(under mpirun to decode in parallel) and set data.prepared = FILE.h5")


# ---------------------------------------------------------------------------------------------------
# registry

@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one dataset, and what to tell the user when it is missing."""

    reader: Callable[[str], RawData]
    subdir: str  # its directory under $LTHMPI_DATA_DIR
    system_dir: str  # where a system package puts it ("" = nowhere)
    files: str  # what is looked for, for the missing-data message
    how_to_get: str  # how to get it, for the missing-data message
    needs_dir: bool = True


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        read_idx_dir, "fashion-mnist", "/usr/share/datasets/fashion-mnist",
        ", ".join(n + "[.gz]" for n in IDX_FILES),
        "install them with `apt-get install dataset-fashion-mnist`, or set data.dir or "
        "LTHMPI_DATA_DIR (to them or to a directory holding fashion-mnist/)"),
    "mnist": DatasetSpec(
        read_idx_dir, "mnist", "",
        ", ".join(n + "[.gz]" for n in IDX_FILES),
        "download them from https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of "
        "yann.lecun.com/exdb/mnist) and set data.dir to their directory, or LTHMPI_DATA_DIR "
        "to it or to a directory holding mnist/"),
    "cifar10": DatasetSpec(
        read_cifar_dir, "cifar10", "",
        ", ".join(CIFAR_TRAIN + (CIFAR_TEST,)),
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpack it and set "
        "data.dir to cifar-10-batches-py or its parent, or LTHMPI_DATA_DIR to it or to a "
        "directory holding cifar10/"),
    "npz": DatasetSpec(
        read_npz, "npz", "",
        "a .npz file with " + ", ".join(NPZ_KEYS),
        "set data.dir to the .npz file (or a directory holding exactly one), or LTHMPI_DATA_DIR "
        "to it or to a directory holding npz/"),
    "digits": DatasetSpec(read_digits, "", "", "", "", needs_dir=False),
    "imagefolder": DatasetSpec(
        read_imagefolder, "imagefolder", "", "train/<class>/*.JPEG and val/<class>/*.JPEG",
        "set data.dir to the directory holding train/ and val/ (ImageNet's layout), or LTHMPI_DATA_DIR "
        "to it or to a directory holding imagefolder/"),
}

# Shapes and class counts known without reading any file (models can be built before data is read).
KNOWN_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "fashion_mnist": ((28, 28, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "digits": ((8, 8, 1), 10),
    "imagenet": ((224, 224, 3), 1000),
}


def resolve_dir(name: str, directory: str) -> str:
    """The directory (or file) to read `name` from: data.dir; else $LTHMPI_DATA_DIR/<subdir> if that
    exists (one root for several datasets), else $LTHMPI_DATA_DIR itself; else the system location.
    Raises DataError, saying how to get the data, when there is none."""
    spec = DATASETS[name]
    if directory:
        return directory
    root = os.environ.get("LTHMPI_DATA_DIR", "")
    if root:
        sub = os.path.join(root, spec.subdir)
        return sub if os.path.exists(sub) else root
    if spec.system_dir:
        return spec.system_dir
    raise DataMissing(f"no data directory for {name}: looked for {spec.files}; {spec.how_to_get}")


def read_raw(name: str, directory: str = "") -> RawData:
    """Read dataset `name` from `directory` (see `resolve_dir`), with a helpful missing-data error."""
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        extra = (" (its shape is known, but it has no reader: convert it to npz, or for a directory tree "
                 "of images use imagefolder)") if name in KNOWN_SHAPES else ""
        raise DataError(f"unknown dataset {name!r}{extra}; known datasets: {known}")
    spec = DATASETS[name]
    if not spec.needs_dir:
        raw = spec.reader(directory)
    else:
        where = resolve_dir(name, directory)
        if not os.path.exists(where):
            raise DataMissing(f"{name} not found: {where} does not exist; looked for {spec.files}; "
                              f"{spec.how_to_get}")
        try:
            raw = spec.reader(where)
        except DataMissing as e:
            raise DataMissing(f"{name} not found: {e}; {spec.how_to_get}") from None
    if name in KNOWN_SHAPES:  # models may have been built from KNOWN_SHAPES before reading
        shape, classes = KNOWN_SHAPES[name]
        if raw.x_train.shape[1:] != shape or raw.num_classes != classes:
            raise DataError(f"{raw.source}: images are {raw.x_train.shape[1:]} with "
                            f"{raw.num_classes} classes, but {name} has {shape} with {classes}; "
                            f"is data.dir pointing at the right dataset?")
    return raw
