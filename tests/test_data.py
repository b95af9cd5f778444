"""Tests of lthmpi.data: readers on small files written here in the real formats, split, subset,
normalisation, the prepared HDF5 file, and the XLA-compatible augmentation."""
from __future__ import annotations

import gzip
import os
import pickle
import shlex
import struct
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest

from lthmpi.data import DATASETS, KNOWN_SHAPES, DataError, Dataset, load_dataset
from lthmpi.data import readers
from lthmpi.data.__main__ import main as data_main
from lthmpi.data.prepare import read_prepared

FASHION = "/usr/share/datasets/fashion-mnist"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**kw):
    base = dict(dataset="mnist", dir="", subset=0, validation=0, normalize="scale", prepared="")
    base.update(kw)
    return types.SimpleNamespace(**base)


# ---------------------------------------------------------------------------------------------------
# writers of the real formats

def write_idx(path, array, magic=None, gz=False, cut=0, extra=b""):
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.tobytes() + extra
    if cut:
        raw = raw[:-cut]
    if gz:
        path = str(path) + ".gz"
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)
    return str(path)


def make_idx(directory, n_train=30, n_test=10, gz=False, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = dict(
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, classes, n_train, dtype=np.uint8),
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, classes, n_test, dtype=np.uint8))
    paths = {}
    for key, name in zip(("x_train", "y_train", "x_test", "y_test"), readers.IDX_FILES):
        paths[key] = write_idx(os.path.join(directory, name), arrays[key], gz=gz)
    return arrays, paths


def make_cifar(directory, per_batch=4, protocol=pickle.HIGHEST_PROTOCOL, str_keys=False, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name in readers.CIFAR_TRAIN + (readers.CIFAR_TEST,):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        k = (lambda s: s) if str_keys else (lambda s: s.encode())
        batch = {k("batch_label"): b"batch", k("data"): data, k("labels"): labels,
                 k("filenames"): [b"f%d.png" % i for i in range(per_batch)]}
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        out[name] = (data, labels)
    return out


def write_cifar_batch(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_npz(path, x_train=None, y_train=None, x_test=None, y_test=None, seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = dict(
        x_train=rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8) if x_train is None else x_train,
        y_train=rng.integers(0, 4, 40) if y_train is None else y_train,
        x_test=rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8) if x_test is None else x_test,
        y_test=rng.integers(0, 4, 12) if y_test is None else y_test)
    arrays["y_train"][0] = 3  # make num_classes = 4 certain
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------------------------------------------
# IDX

@pytest.mark.parametrize("gz", [False, True])
def test_idx_values_split_and_scale(tmp_path, gz):
    a, _ = make_idx(tmp_path, gz=gz)
    ds = load_dataset(cfg(dir=str(tmp_path), validation=5), seed=0)
    assert isinstance(ds, Dataset) and ds.name == "mnist" and ds.num_classes == 10
    assert ds.input_shape == (28, 28, 1) == KNOWN_SHAPES["mnist"][0]
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 4
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert y.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0], a["x_train"][:25].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_val[..., 0], a["x_train"][25:].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test[..., 0], a["x_test"].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train, a["y_train"][:25])
    np.testing.assert_array_equal(ds.y_val, a["y_train"][25:])
    np.testing.assert_array_equal(ds.y_test, a["y_test"])


def test_subset_takes_first_examples_after_split(tmp_path):
    a, _ = make_idx(tmp_path)
    ds = load_dataset(cfg(dir=str(tmp_path), validation=8, subset=10), seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (10, 8, 10)
    np.testing.assert_array_equal(ds.y_train, a["y_train"][:10])
    np.testing.assert_array_equal(ds.y_val, a["y_train"][22:])  # still the last 8 of all 30


def test_split_limits(tmp_path):
    make_idx(tmp_path)
    with pytest.raises(DataError, match="validation = 30 must be smaller than the 30 .*--set data.validation=3$"):
        load_dataset(cfg(dir=str(tmp_path), validation=30), seed=0)
    with pytest.raises(DataError, match="subset = 26 is more than the 25 .*at most 25 "):
        load_dataset(cfg(dir=str(tmp_path), validation=5, subset=26), seed=0)
    ds = load_dataset(cfg(dir=str(tmp_path), validation=29), seed=0)
    assert len(ds.y_train) == 1
    for bad in (dict(validation=-1), dict(subset=-2), dict(subset=1.5), dict(normalize="minmax")):
        with pytest.raises(DataError, match="data\\."):
            load_dataset(cfg(dir=str(tmp_path), **bad), seed=0)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    _, p = make_idx(tmp_path, gz=gz)
    name = readers.IDX_FILES[0] + (".gz" if gz else "")
    os.remove(p["x_train"])
    a = np.zeros((30, 28, 28), np.uint8)
    path = write_idx(tmp_path / readers.IDX_FILES[0], a, gz=gz, cut=100)
    assert path.endswith(name)
    with pytest.raises(DataError, match=f"{name}: truncated"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_truncated_gzip_stream(tmp_path):
    _, p = make_idx(tmp_path, gz=True)
    raw = open(p["x_test"], "rb").read()
    with open(p["x_test"], "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_trailing_bytes(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / readers.IDX_FILES[3], np.zeros(10, np.uint8), extra=b"\0")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: has trailing bytes"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_wrong_magic(tmp_path):
    make_idx(tmp_path)
    # labels written where images belong: a 1-D file has magic 0x801, not 0x803
    write_idx(tmp_path / readers.IDX_FILES[0], np.zeros(30, np.uint8))
    with pytest.raises(DataError, match="train-images-idx3-ubyte: magic number 0x00000801"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)
    write_idx(tmp_path / readers.IDX_FILES[0], np.zeros((30, 28, 28), np.uint8), magic=0x0D03)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: magic number 0x00000d03"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_label_out_of_range(tmp_path):
    a, _ = make_idx(tmp_path)
    y = a["y_test"].copy()
    y[3] = 10
    write_idx(tmp_path / readers.IDX_FILES[3], y)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: label 10 is out of range 0..9"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_label_count_mismatch(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / readers.IDX_FILES[1], np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 29 labels but .*train-images"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_wrong_image_size_for_dataset(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / readers.IDX_FILES[0], np.zeros((30, 27, 28), np.uint8))
    write_idx(tmp_path / readers.IDX_FILES[2], np.zeros((10, 27, 28), np.uint8))
    with pytest.raises(DataError, match="but mnist has \\(28, 28, 1\\)"):
        load_dataset(cfg(dir=str(tmp_path)), seed=0)


def test_idx_prefers_plain_file_and_mixes(tmp_path):
    a, p = make_idx(tmp_path, gz=True)
    os.remove(p["y_test"])
    write_idx(tmp_path / readers.IDX_FILES[3], a["y_test"])  # one uncompressed file among .gz
    ds = load_dataset(cfg(dataset="fashion_mnist", dir=str(tmp_path)), seed=0)
    np.testing.assert_array_equal(ds.y_test, a["y_test"])


# ---------------------------------------------------------------------------------------------------
# missing data and the data directory

def test_missing_dataset_names_files_and_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LTHMPI_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(cfg(dataset="mnist", dir=str(empty)), seed=0)
    msg = str(e.value)
    assert "\n" not in msg and str(empty) in msg
    for name in readers.IDX_FILES:
        assert name in msg
    assert "download" in msg and "data.dir" in msg
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset(cfg(dataset="fashion_mnist", dir=str(tmp_path / "nowhere")), seed=0)
    assert str(tmp_path / "nowhere") in str(e.value) and "LTHMPI_DATA_DIR" in str(e.value)
    with pytest.raises(DataError, match="no data directory for mnist.*train-images-idx3-ubyte"):
        load_dataset(cfg(dataset="mnist"), seed=0)
    with pytest.raises(DataError, match="data_batch_1.*test_batch.*cifar-10-python.tar.gz"):
        load_dataset(cfg(dataset="cifar10", dir=str(empty)), seed=0)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    a, _ = make_idx(tmp_path / "mnist")
    monkeypatch.setenv("LTHMPI_DATA_DIR", str(tmp_path))  # a root holding mnist/
    np.testing.assert_array_equal(load_dataset(cfg(), seed=0).y_test, a["y_test"])
    monkeypatch.setenv("LTHMPI_DATA_DIR", str(tmp_path / "mnist"))  # the dataset's own directory
    np.testing.assert_array_equal(load_dataset(cfg(), seed=0).y_test, a["y_test"])


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'svhn'.*digits"):
        load_dataset(cfg(dataset="svhn"), seed=0)
    with pytest.raises(DataError, match="imagenet.*no reader"):
        load_dataset(cfg(dataset="imagenet"), seed=0)
    assert set(DATASETS) == {"fashion_mnist", "mnist", "cifar10", "npz", "digits", "imagefolder"}
    assert KNOWN_SHAPES["cifar10"] == ((32, 32, 3), 10)
    assert KNOWN_SHAPES["imagenet"] == ((224, 224, 3), 1000)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10

@pytest.mark.parametrize("protocol,str_keys,sub", [(pickle.HIGHEST_PROTOCOL, False, False),
                                                   (2, False, True), (4, True, False)])
def test_cifar_values_and_layout(tmp_path, protocol, str_keys, sub):
    d = tmp_path / "cifar-10-batches-py" if sub else tmp_path
    written = make_cifar(d, protocol=protocol, str_keys=str_keys)
    ds = load_dataset(cfg(dataset="cifar10", dir=str(tmp_path), validation=4), seed=0)
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (16, 4, 4)
    data = np.concatenate([written[n][0] for n in readers.CIFAR_TRAIN])
    labels = sum((written[n][1] for n in readers.CIFAR_TRAIN), [])
    np.testing.assert_array_equal(ds.y_train, labels[:16])
    np.testing.assert_array_equal(ds.y_val, labels[16:])
    np.testing.assert_array_equal(ds.y_test, written["test_batch"][1])
    # pixel (row r, column c, channel ch) of image n is data[n, ch * 1024 + r * 32 + c]
    for n, r, c, ch in [(0, 0, 0, 0), (3, 5, 17, 1), (15, 31, 31, 2), (7, 30, 1, 0)]:
        assert ds.x_train[n, r, c, ch] == np.float32(data[n, ch * 1024 + r * 32 + c]) / 255
    t = written["test_batch"][0]
    assert ds.x_test[2, 9, 4, 2] == np.float32(t[2, 2 * 1024 + 9 * 32 + 4]) / 255


def py2_batch(data, labels):
    """The bytes Python 2's cPickle (protocol 2) writes for {'data': uint8 array, 'labels': list},
    as in the real CIFAR-10 download: py2 strings, numpy.core.multiarray._reconstruct."""
    def s(b):  # a Python 2 str: SHORT_BINSTRING / BINSTRING
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(n):
        return b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n)

    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b")
           + b"\x87R(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
           + b"(" + i(3) + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb"
           + b"\x89" + s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(i(int(v)) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"batch") + s(b"data") + arr + s(b"labels") + lab
            + b"u.")


def test_cifar_python2_pickles(tmp_path):
    rng = np.random.default_rng(5)
    written = {}
    for name in readers.CIFAR_TRAIN + (readers.CIFAR_TEST,):
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 3)]
        (tmp_path / name).write_bytes(py2_batch(data, labels))
        written[name] = (data, labels)
    ds = load_dataset(cfg(dataset="cifar10", dir=str(tmp_path), validation=3), seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (12, 3, 3)
    np.testing.assert_array_equal(ds.y_val, written["data_batch_5"][1])
    t = written["test_batch"][0]
    expect = t.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
    np.testing.assert_array_equal(ds.x_test, expect)


def test_cifar_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe"

    class Evil:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(self.target))}",))

    # the payload is real: plain pickle would run it
    pickle.loads(pickle.dumps(Evil(probe)))
    assert probe.exists()

    make_cifar(tmp_path)
    write_cifar_batch(tmp_path / "data_batch_3",
                      {b"data": Evil(marker), b"labels": [0] * 4})
    with pytest.raises(DataError, match="data_batch_3: refusing to unpickle (posix|nt|os).system"):
        load_dataset(cfg(dataset="cifar10", dir=str(tmp_path)), seed=0)
    assert not marker.exists()
    for protocol in (0, 2):
        write_cifar_batch(tmp_path / "data_batch_3", Evil(marker), protocol=protocol)
        with pytest.raises(DataError, match="refusing to unpickle"):
            load_dataset(cfg(dataset="cifar10", dir=str(tmp_path)), seed=0)
        assert not marker.exists()


@pytest.mark.parametrize("batch,match", [
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "label 10 is out of range"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, "4 images but 3 labels"),
    ({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, "shape \\(N, 3072\\)"),
    ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8 array"),
    ({b"data": np.zeros((4, 3072), np.uint8)}, "needs 'data' and 'labels'"),
    ([1, 2, 3], "a CIFAR-10 batch is a dict"),
])
def test_cifar_bad_batches(tmp_path, batch, match):
    make_cifar(tmp_path)
    write_cifar_batch(tmp_path / "test_batch", batch)
    with pytest.raises(DataError, match="test_batch: .*" + match):
        load_dataset(cfg(dataset="cifar10", dir=str(tmp_path)), seed=0)


def test_cifar_truncated_pickle(tmp_path):
    make_cifar(tmp_path)
    p = tmp_path / "data_batch_5"
    raw = p.read_bytes()
    p.write_bytes(raw[:-50])
    with pytest.raises(DataError, match="data_batch_5: not a readable CIFAR-10 batch"):
        load_dataset(cfg(dataset="cifar10", dir=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------------
# npz

def test_npz_values_and_num_classes(tmp_path):
    a = make_npz(tmp_path / "d.npz")
    for where in (tmp_path / "d.npz", tmp_path):  # the file itself, or a directory holding one
        ds = load_dataset(cfg(dataset="npz", dir=str(where), validation=10), seed=0)
        assert ds.input_shape == (6, 5, 3) and ds.num_classes == 4
        np.testing.assert_array_equal(ds.x_train, a["x_train"][:30].astype(np.float32) / 255)
        np.testing.assert_array_equal(ds.y_val, a["y_train"][30:])
        np.testing.assert_array_equal(ds.x_test, a["x_test"].astype(np.float32) / 255)


def test_npz_three_dim_float_images(tmp_path):
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.random((20, 4, 4), np.float32), rng.random((5, 4, 4), np.float32)
    make_npz(tmp_path / "f.npz", x_train=x_tr, x_test=x_te,
             y_train=rng.integers(0, 3, 20).reshape(20, 1), y_test=rng.integers(0, 3, 5))
    ds = load_dataset(cfg(dataset="npz", dir=str(tmp_path / "f.npz")), seed=0)
    assert ds.input_shape == (4, 4, 1) and ds.num_classes == 4 and ds.y_train.shape == (20,)
    np.testing.assert_array_equal(ds.x_train[..., 0], x_tr)  # float data is not rescaled


@pytest.mark.parametrize("change,match", [
    (dict(x_train=np.full((40, 6, 5, 3), np.nan, np.float32)), "x_train: images contain NaN or Inf"),
    (dict(x_test=np.full((12, 6, 5, 3), np.inf)), "x_test: images contain NaN or Inf"),
    (dict(x_train=np.zeros((40, 30), np.uint8)), "x_train: images must have shape"),
    (dict(x_test=np.zeros((12, 5, 6, 3), np.uint8)), "train images are \\(6, 5, 3\\) but test"),
    (dict(y_train=np.zeros(39, np.int64)), "train: 40 images but 39 labels"),
    (dict(y_test=-np.ones(12, np.int64)), "y_test: label -1 is out of range"),
    (dict(y_test=np.zeros(12, np.float32)), "y_test: labels must be integers"),
    (dict(x_train=np.zeros((40, 6, 5, 3), np.int32)), "images must be uint8 or float"),
])
def test_npz_bad_arrays(tmp_path, change, match):
    make_npz(tmp_path / "bad.npz", **change)
    with pytest.raises(DataError, match="bad.npz.*" + match):
        load_dataset(cfg(dataset="npz", dir=str(tmp_path / "bad.npz")), seed=0)


def test_npz_missing_key_and_pickled_objects(tmp_path):
    np.savez(tmp_path / "a.npz", x_train=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(DataError, match="a.npz: missing arrays y_train, x_test, y_test"):
        load_dataset(cfg(dataset="npz", dir=str(tmp_path / "a.npz")), seed=0)
    obj = np.empty(12, dtype=object)
    make_npz(tmp_path / "b.npz", y_test=obj)
    with pytest.raises(DataError, match="b.npz: not a readable .npz"):
        load_dataset(cfg(dataset="npz", dir=str(tmp_path / "b.npz")), seed=0)
    with pytest.raises(DataError, match="several .npz files"):
        load_dataset(cfg(dataset="npz", dir=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------------
# digits and normalisation

def test_digits_split_and_scale():
    ds = load_dataset(cfg(dataset="digits", validation=137), seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (1300, 137, 360)
    assert ds.input_shape == KNOWN_SHAPES["digits"][0] and ds.num_classes == 10
    from sklearn.datasets import load_digits
    d = load_digits()
    np.testing.assert_array_equal(ds.x_test[..., 0], d.images[-360:].astype(np.float32) / 16)
    np.testing.assert_array_equal(ds.y_val, d.target[1300:1437])
    assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0


def test_standardize_uses_training_part_only(tmp_path):
    rng = np.random.default_rng(3)
    x_tr = rng.integers(0, 100, (40, 6, 5, 3), dtype=np.uint8)
    x_tr[..., 2] = 7  # a constant channel: std 0 must not divide by zero
    x_tr[30:] = 250  # the validation part is very different: it must not enter the statistics
    x_te = rng.integers(150, 256, (12, 6, 5, 3), dtype=np.uint8)
    make_npz(tmp_path / "s.npz", x_train=x_tr, x_test=x_te)
    ds = load_dataset(cfg(dataset="npz", dir=str(tmp_path / "s.npz"), validation=10, subset=25,
                          normalize="standardize"), seed=0)
    part = x_tr[:25].astype(np.float64)
    mean, std = part.mean(axis=(0, 1, 2)), part.std(axis=(0, 1, 2))
    std[2] = 1.0
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train[..., :2].std(axis=(0, 1, 2)), 1, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, (x_te - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_val, (x_tr[30:] - mean) / std, rtol=1e-5, atol=1e-5)
    assert ds.x_test.mean() > 1  # test data is not centred by its own statistics


# ---------------------------------------------------------------------------------------------------
# the prepared HDF5 file

@pytest.mark.parametrize("normalize", ["scale", "standardize"])
def test_prepared_round_trip_equals_raw(tmp_path, normalize):
    make_idx(tmp_path / "raw", gz=True)
    out = tmp_path / "prep" / "mnist.h5"
    rc = data_main(["prepare", "--dataset", "mnist", "--dir", str(tmp_path / "raw"),
                    "--subset", "20", "--validation", "6", "--normalize", normalize,
                    "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert [p for p in os.listdir(out.parent) if p != "mnist.h5"] == []  # no temp file left
    c = cfg(dir=str(tmp_path / "raw"), subset=20, validation=6, normalize=normalize)
    raw = load_dataset(c, seed=0)
    c.prepared = str(out)
    c.dir = str(tmp_path / "elsewhere")  # not read when the prepared file is used
    prep = load_dataset(c, seed=0)
    assert prep.name == raw.name and prep.num_classes == raw.num_classes
    for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        a, b = getattr(raw, key), getattr(prep, key)
        assert a.dtype == b.dtype and a.shape == b.shape and b.flags.c_contiguous
        assert a.tobytes() == b.tobytes(), key
    with h5py.File(out, "r") as f:
        assert f["x_train"].chunks is None and f["x_train"].compression is None
        assert f.attrs["dataset"] == "mnist" and f.attrs["validation"] == 6
        assert f.attrs["subset"] == 20 and f.attrs["normalize"] == normalize
        assert f.attrs["num_classes"] == 10 and f.attrs["format_version"] == 1
        assert len(f.attrs["sha256_x_train"]) == 64


def test_prepared_with_other_settings_is_refused(tmp_path):
    make_idx(tmp_path / "raw")
    out = str(tmp_path / "p.h5")
    assert data_main(["prepare", "--dataset", "mnist", "--dir", str(tmp_path / "raw"),
                      "--validation", "5", "--out", out]) == 0
    with pytest.raises(DataError, match="other settings: validation 5 \\(config says 6\\)"):
        load_dataset(cfg(prepared=out, validation=6), seed=0)
    with pytest.raises(DataError, match="dataset 'mnist' \\(config says 'fashion_mnist'\\)"):
        load_dataset(cfg(dataset="fashion_mnist", prepared=out, validation=5), seed=0)
    with pytest.raises(DataError, match="normalize 'scale'"):
        load_dataset(cfg(prepared=out, validation=5, normalize="standardize"), seed=0)
    assert len(load_dataset(cfg(prepared=out, validation=5), seed=0).y_val) == 5


def test_prepared_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist: make it with `python -m lthmpi.data prepare"):
        load_dataset(cfg(dataset="digits", prepared=str(tmp_path / "no.h5")), seed=0)


def test_prepared_bit_flip_and_truncation_detected(tmp_path):
    out = str(tmp_path / "d.h5")
    assert data_main(["prepare", "--dataset", "digits", "--validation", "100", "--out", out]) == 0
    good = open(out, "rb").read()
    with h5py.File(out, "r") as f:
        offset = f["x_val"].id.get_offset() + 1234  # a byte inside x_val's contiguous data
    flipped = bytearray(good)
    flipped[offset] ^= 0x10
    open(out, "wb").write(bytes(flipped))
    with pytest.raises(DataError, match="d.h5 is corrupt: checksum of x_val does not match"):
        load_dataset(cfg(dataset="digits", validation=100, prepared=out), seed=0)
    open(out, "wb").write(good[: len(good) // 2])
    with pytest.raises(DataError, match="d.h5 is corrupt"):
        load_dataset(cfg(dataset="digits", validation=100, prepared=out), seed=0)
    open(out, "wb").write(good)
    assert len(read_prepared(out).y_val) == 100


def test_prepare_failure_leaves_old_file_and_no_temp(tmp_path):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"old contents")
    bad = tmp_path / "bad.npz"
    make_npz(bad, y_test=-np.ones(12, np.int64))
    rc = data_main(["prepare", "--dataset", "npz", "--dir", str(bad), "--out", str(out)])
    assert rc == 2 and out.read_bytes() == b"old contents"
    # a failure while writing: an array h5py cannot store
    from lthmpi.data.prepare import write_prepared
    ds = load_dataset(cfg(dataset="digits", validation=10), seed=0)
    ds.y_test = np.array([object()] * 3, dtype=object)
    with pytest.raises(TypeError):
        write_prepared(ds, {"dataset": "digits"}, str(out))
    assert out.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "keep.h5"]


def test_cli_help_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "lthmpi.data", "prepare", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--validation" in r.stdout and "--out" in r.stdout


# ---------------------------------------------------------------------------------------------------
# augmentation

def test_augment_under_xla_deterministic_and_a_crop():
    import tensorflow as tf
    from lthmpi.data.augment import augment_batch

    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), np.float32) + 1  # > 0, so the zero border is recognisable
    step = tf.function(lambda x, s: augment_batch(x, s), jit_compile=True)
    s1, s2 = tf.constant([7, 1], tf.int64), tf.constant([7, 2], tf.int64)
    xt = tf.constant(x)
    a, b, c = step(xt, s1).numpy(), step(xt, s1).numpy(), step(xt, s2).numpy()
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert "HloModule" in step.experimental_get_compiler_ir(xt, s1)(stage="hlo")
    # each output image is a 32x32 window of the zero-padded image, maybe mirrored
    padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
    seen = set()
    for i in range(len(x)):
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                if np.array_equal(a[i], (lambda w: w[:, ::-1] if f else w)(
                    padded[i, dy:dy + 32, dx:dx + 32]))]
        assert hits, f"image {i} is not a crop of its padded input"
        seen.add(hits[0])
    assert len(seen) > 4  # offsets and flips differ between the images of one batch
    c32 = step(xt, tf.constant([7, 1], tf.int32)).numpy()  # an int32 seed is accepted too
    assert c32.shape == x.shape


# ---------------------------------------------------------------------------------------------------
# the real Fashion-MNIST files (Debian's dataset-fashion-mnist), where installed

@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"{FASHION} not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("LTHMPI_DATA_DIR", raising=False)
    raw = readers.read_raw("fashion_mnist")
    assert raw.x_train.shape == (60000, 28, 28, 1) and raw.x_test.shape == (10000, 28, 28, 1)
    assert raw.y_train[:5].tolist() == [9, 0, 0, 3, 0]  # the official first labels
    assert np.bincount(raw.y_test).tolist() == [1000] * 10
    ds = load_dataset(cfg(dataset="fashion_mnist", subset=1000, validation=5000), seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (1000, 5000, 10000)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_prepare_defaults_agree_with_the_config():
    """A file made by `python -m lthmpi.data prepare` with its defaults must be usable by the default config:
    the same validation split and normalisation."""
    from lthmpi.config import DataConfig
    from lthmpi.data.__main__ import _parser

    args = _parser().parse_args(["prepare", "--dataset", "digits", "--out", "x.h5"])
    assert (args.validation, args.normalize, args.subset) == (DataConfig().validation, DataConfig().normalize,
                                                              DataConfig().subset)
