"""From raw files to the training-ready `Dataset`, and its prepared HDF5 form.

Preparing means: hold the validation set out of the official training set (its last examples, so the
split is the same on every rank without communication), keep the first `subset` training examples,
normalise with statistics of the training part only (the test set must not leak into training), and
convert to contiguous float32 NHWC / int32, the layout the compiled training step reads fastest.

Decoding and checking raw files costs seconds per rank; with 20 ranks on 2 cores that adds up. A
prepared HDF5 file holds the finished arrays once, with the settings that made them and a sha256 of
every array, so each rank loads it quickly and a damaged file is detected instead of trained on. It is
written whole or not at all (temp file, fsync, rename), as everything the engine stores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..config import NORMALIZATIONS
from ..fileio import attr_value, commit, remove_quietly, sha256, sha256_rows, temp_path
from .readers import DataError, RawData, read_raw

FORMAT_VERSION = 1  # float32 images, normalised when prepared
UINT8_FORMAT = 2  # uint8 images with the statistics to normalise them in the training step (stream_prepare)
ARRAYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
SETTINGS = ("dataset", "subset", "validation", "normalize")


@dataclass
class Dataset:
    """Training-ready data: NHWC images, int32 labels in [0, num_classes). Images are float32, or uint8 with
    `norm` set (an image tree prepared by stream_prepare), which the training step normalises on the fly."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    norm: tuple | None = None  # (shift, div) float32 per channel: x is uint8, the step computes (x - shift) / div
    in_memory: bool = True  # False: the x arrays stay in the prepared file (batches.DiskArray), read by row

    def as_float(self, x) -> np.ndarray:
        """Images of this dataset (rows of an x array) as the model takes them: float32, normalised as the
        training step does it for uint8 data. For code outside the compiled step (evaluation by hand)."""
        if self.norm is None:
            return np.asarray(x)
        shift, div = self.norm
        return (np.asarray(x).astype(np.float32) - shift) / div

    def inputs(self, split: str):
        """The images of a split ("train", "val", "test") as the model takes them, for every forward pass outside
        the compiled training step (stability curves, batch-norm re-estimation, evaluation by hand): float data
        as they are, uint8 data normalised row by row as they are indexed (ModelInputs), never all at once."""
        x = getattr(self, f"x_{split}")
        return x if self.norm is None else ModelInputs(x, self)

    @property
    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self.x_train.shape[1:])


class ModelInputs:
    """A uint8 x array (in memory or a DiskArray) seen through Dataset.as_float: indexing it (an int, a slice, an
    array of rows) gives float32 rows normalised as the training step normalises them. Raw pixels (0-255) fed
    to a network trained on normalised ones give near-chance error at every point of a stability curve."""

    def __init__(self, x, data: Dataset):
        self.x, self.data = x, data
        self.shape, self.dtype = tuple(x.shape), np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key) -> np.ndarray:
        return self.data.as_float(self.x[key])


# ---------------------------------------------------------------------------------------------------
# settings

def settings_of(cfg) -> dict:
    """The settings that decide the prepared arrays, read from a config section, checked."""
    s = {
        "dataset": str(getattr(cfg, "dataset", "")),
        "subset": getattr(cfg, "subset", 0),
        "validation": getattr(cfg, "validation", 0),
        "normalize": str(getattr(cfg, "normalize", "scale")),
    }
    for key in ("subset", "validation"):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"data.{key} must be a whole number >= 0, got {v!r}")
        s[key] = int(v)
    if s["dataset"] == "imagefolder":
        size = getattr(cfg, "image_size", 0)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise DataError(f"data.image_size must be a whole number >= 1 (e.g. 224), got {size!r}")
        s["image_size"] = int(size)
    if s["normalize"] not in NORMALIZATIONS:
        raise DataError(f"data.normalize must be one of {', '.join(NORMALIZATIONS)}, "
                        f"got {s['normalize']!r}")
    return s


# ---------------------------------------------------------------------------------------------------
# split and normalise

def held_out_bounds(n: int, validation: int, subset: int, what: str, flag: str = "--set data.validation=") -> tuple[int, int]:
    """(end, keep): train on rows [:end], validate on rows [keep:]. The last `validation` of the `n` training
    examples are held out, then the first `subset` of the rest are kept (0 = all); `what` names them in errors."""
    if validation >= n:
        raise DataError(f"data.validation = {validation} must be smaller than the {n} {what}: "
                        f"set a smaller one, e.g. {flag}{max(1, n // 10)}")
    keep = n - validation
    if subset > keep:
        raise DataError(f"data.subset = {subset} is more than the {keep} {what} left after holding out "
                        f"{validation} for validation: set data.subset to at most {keep} (0 = all)")
    return (subset or keep), keep


def split(raw: RawData, validation: int, subset: int, name: str):
    """(x_train, y_train, x_val, y_val) as views, no copies (see held_out_bounds)."""
    end, keep = held_out_bounds(raw.x_train.shape[0], validation, subset, f"training examples of {name}")
    return raw.x_train[:end], raw.y_train[:end], raw.x_train[keep:], raw.y_train[keep:]


def _standardizer(x_train: np.ndarray):
    """Per-channel mean and std of the training images (float64, for accuracy over 60k images)."""
    c = x_train.shape[-1]
    mean = np.zeros(c)
    sq = np.zeros(c)
    for start in range(0, x_train.shape[0], 4096):  # chunks: no float64 copy of the whole set
        chunk = x_train[start:start + 4096].reshape(-1, c).astype(np.float64)
        mean += chunk.sum(axis=0)
        sq += (chunk * chunk).sum(axis=0)
    count = x_train.shape[0] * int(np.prod(x_train.shape[1:-1]))
    mean /= count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    std[std == 0] = 1.0  # a constant channel carries no information; leave it centred
    return mean, std


def normalize(arrays: list, how: str, scale: float, x_train: np.ndarray) -> list:
    """Normalise images to contiguous float32: "scale" divides by the data's full range
    (255 for uint8), "standardize" uses per-channel mean/std of `x_train` only."""
    if how == "scale":
        shift, div = np.zeros(1), np.array([scale])
    else:
        shift, div = _standardizer(x_train)
    shift, div = shift.astype(np.float32), div.astype(np.float32)
    out = []
    for x in arrays:
        y = np.empty(x.shape, np.float32)  # in place, chunk by chunk of memory: no float64 copies
        y[...] = x
        y -= shift
        y /= div
        out.append(y)
    return out


def build(raw: RawData, settings: dict) -> Dataset:
    """The Dataset that `settings` make of `raw`."""
    x_tr, y_tr, x_val, y_val = split(raw, settings["validation"], settings["subset"],
                                     settings["dataset"])
    xs = normalize([x_tr, x_val, raw.x_test], settings["normalize"], raw.scale, x_tr)
    ys = [np.ascontiguousarray(y, dtype=np.int32) for y in (y_tr, y_val, raw.y_test)]
    return Dataset(settings["dataset"], xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], raw.num_classes)


# ---------------------------------------------------------------------------------------------------
# the prepared HDF5 file

def write_prepared(ds: Dataset, settings: dict, path: str, source: str = "") -> None:
    """Write `ds` to `path` atomically: a temp file in the same directory, fsync, rename."""
    import h5py

    tmp = temp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in settings.items():
                f.attrs[key] = value
            f.attrs["num_classes"] = int(ds.num_classes)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["source"] = source
            for name in ARRAYS:
                a = np.ascontiguousarray(getattr(ds, name))
                f.create_dataset(name, data=a)  # contiguous: no chunks, no compression
                f.attrs["sha256_" + name] = sha256(a)
            f.flush()
        commit(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def _on_disk(path: str, d):
    """HDF5 dataset `d` (contiguous, uncompressed) of the file at `path`, left on disk and read by row
    (batches.DiskArray): ranks on one host share its pages through the page cache, and rows not read take
    no memory at all."""
    from .disk_batches import DiskArray

    if d.shape[0] == 0:
        return np.zeros(d.shape, d.dtype)
    offset = d.id.get_offset()
    if d.chunks is not None or d.compression is not None or offset is None:
        raise DataError(f"prepared file {path}: {d.name} is chunked or compressed, so it cannot be read from "
                        f"disk in place: prepare it again with python -m lthmpi.data prepare")
    return DiskArray(path, offset, d.shape, d.dtype)


def read_prepared(path: str, expect: dict | None = None, in_memory: bool = True) -> Dataset:
    """Load a prepared file, verifying its format, checksums and (if given) its settings. With `in_memory`
    False the images stay on disk (batches.DiskArray); their checksums are then not verified (that would read
    the whole file on every rank): `python -m lthmpi.data verify FILE` does it once."""
    import h5py

    if not os.path.isfile(path):
        raise DataError(f"prepared file {path} does not exist: make it with `python -m lthmpi.data "
                        f"prepare --dataset NAME ... --out {path}` or unset data.prepared")
    corrupt = f"prepared file {path} is corrupt"
    try:
        with h5py.File(path, "r") as f:
            version = attr_value(f.attrs["format_version"])
            if version not in (FORMAT_VERSION, UINT8_FORMAT):
                raise DataError(f"prepared file {path} has format version {version}, this engine "
                                f"reads {FORMAT_VERSION} and {UINT8_FORMAT}: prepare it again")
            keys = SETTINGS + (("image_size",) if "image_size" in f.attrs else ())
            recorded = {k: attr_value(f.attrs[k]) for k in keys}
            if expect is not None:
                diff = [f"{k} {recorded.get(k)!r} (config says {expect.get(k)!r})"
                        for k in sorted(set(keys) | set(expect)) if recorded.get(k) != expect.get(k)]
                if diff:
                    raise DataError(f"prepared file {path} was made with other settings: "
                                    f"{'; '.join(diff)}; prepare it again or fix the config")
            arrays = {}
            for name in ARRAYS:
                if name.startswith("x") and not in_memory:
                    arrays[name] = _on_disk(path, f[name])
                    continue
                a = f[name][()]
                if sha256(a) != attr_value(f.attrs["sha256_" + name]):
                    raise DataError(f"{corrupt}: checksum of {name} does not match; prepare it again")
                arrays[name] = a
            num_classes = int(attr_value(f.attrs["num_classes"]))
            norm = None
            if version == UINT8_FORMAT:
                norm = tuple(np.asarray(f.attrs[k], np.float32) for k in ("norm_shift", "norm_div"))
    except DataError:
        raise
    except Exception as e:  # truncated or damaged HDF5, missing datasets or attributes
        raise DataError(f"{corrupt}: {type(e).__name__}: {e}; prepare it again") from None
    x_dtype = np.uint8 if version == UINT8_FORMAT else np.float32
    for name in ARRAYS:
        a = arrays[name]
        want = (x_dtype, 4) if name.startswith("x") else (np.int32, 1)
        if a.dtype != want[0] or a.ndim != want[1]:
            raise DataError(f"{corrupt}: {name} is {a.dtype} with {a.ndim} dims; prepare it again")
    for part in ("train", "val", "test"):
        x, y = arrays["x_" + part], arrays["y_" + part]
        if x.shape[0] != y.shape[0] or (y.size and (y.min() < 0 or y.max() >= num_classes)):
            raise DataError(f"{corrupt}: {part} images and labels do not match; prepare it again")
    return Dataset(recorded["dataset"], num_classes=num_classes, norm=norm, in_memory=in_memory, **arrays)


def verify_prepared(path: str) -> Dataset:
    """Read every array of a prepared file once and check its checksum (what streaming skips)."""
    import h5py

    ds = read_prepared(path, in_memory=False)
    with h5py.File(path, "r") as f:
        for name in ("x_train", "x_val", "x_test"):
            if sha256_rows(getattr(ds, name)) != attr_value(f.attrs["sha256_" + name]):
                raise DataError(f"prepared file {path} is corrupt: checksum of {name} does not match; "
                                f"prepare it again")
    return ds


# ---------------------------------------------------------------------------------------------------
# entry points

def prepare(cfg, out: str):
    """Read the raw files that `cfg` names, build the Dataset and write it to `out`. (An image tree is
    streamed instead, by stream_prepare.prepare_images: `python -m lthmpi.data prepare` picks which.)"""
    settings = settings_of(cfg)
    raw = read_raw(settings["dataset"], str(getattr(cfg, "dir", "") or ""))
    ds = build(raw, settings)
    write_prepared(ds, settings, out, source=raw.source)
    return ds


def host_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit where lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


MEMORY_SHARE = 0.5  # "auto" loads a prepared file when every rank's copy fits in this share of the host


def decide_in_memory(setting, path: str, ranks: int | None = None, memory: int | None = None) -> bool:
    """data.in_memory: true/false as given; "auto" loads the prepared file into every rank when the ranks on
    this host together fit in MEMORY_SHARE of its memory, and else reads batches from disk."""
    if setting is True or setting is False:
        return setting
    from ..parallel.launcher import ranks_on_this_host

    need = os.path.getsize(path) * (ranks or ranks_on_this_host())
    return need <= MEMORY_SHARE * (memory or host_memory())


def load_dataset(cfg, seed: int = 0) -> Dataset:
    """The Dataset `cfg` describes: from its prepared file if `cfg.prepared` is set (in memory, or left on
    disk, see `decide_in_memory`), else from the raw files. `seed` is accepted for future use; the split
    itself is deterministic."""
    del seed
    settings = settings_of(cfg)
    prepared = str(getattr(cfg, "prepared", "") or "")
    if prepared:
        if not os.path.isfile(prepared):
            return read_prepared(prepared)  # says how to make it
        in_memory = decide_in_memory(getattr(cfg, "in_memory", "auto"), prepared)
        return read_prepared(prepared, expect=settings, in_memory=in_memory)
    raw = read_raw(settings["dataset"], str(getattr(cfg, "dir", "") or ""))
    return build(raw, settings)
