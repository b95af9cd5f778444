"""Image trees (ImageNet's layout) prepared by streaming, on 1 and 3 ranks, into the uint8 prepared file:
the same bytes whatever the number of ranks, the right pixels and statistics, one line for a damaged image
or an empty class, nothing left behind by a failure or a SIGTERM; training from the file on disk gives the
same bits as from memory, a replica reads only its share, and a finished run resumes without work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest
from faultkit import MPIRUN, ROOT, clean_env, done_counts, finish, log_has, wait_for
from PIL import Image

from lthmpi.data import DataError, load_dataset
from lthmpi.data.__main__ import main as data_main
from lthmpi.data.disk_batches import DiskArray
from lthmpi.data.imagefolder import decode, list_images
from lthmpi.data.prepare import decide_in_memory, read_prepared

CLASSES = ("ant", "bee", "cow", "doe")
SIZE = 12
SETS = ["--dataset", "imagefolder", "--image-size", str(SIZE), "--validation", "40", "--normalize", "standardize"]


def make_tree(root, per_class=(60, 10), seed=0):
    """train/ and val/ of CLASSES: JPEGs (RGB and greyscale) and PNGs (RGBA) of mixed sizes, 6x6 to 47x47."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in CLASSES:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(6, 48, 2))
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                mode = ("RGB", "L", "RGBA")[i % 3]
                img.convert(mode).save(os.path.join(d, f"{c}{i:03d}" + (".png" if mode == "RGBA" else ".JPEG")))
    return str(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


def prepare_cli(np_, tree, out, extra=(), env=None):
    cmd = [sys.executable, "-m", "lthmpi.data", "prepare", *SETS, "--dir", tree, "--out", str(out), *extra]
    if np_:
        cmd = [str(MPIRUN), "-np", str(np_), *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=clean_env(env))


def leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def test_prepare_on_1_and_3_ranks_identical_and_right(tree, tmp_path):
    one, three = tmp_path / "p1.h5", tmp_path / "p3.h5"
    assert data_main(["prepare", *SETS, "--dir", tree, "--out", str(one)]) == 0
    r = prepare_cli(3, tree, three)
    assert r.returncode == 0, r.stderr
    assert "decoded by 3 rank(s)" in r.stdout
    with h5py.File(one) as a, h5py.File(three) as b:
        assert set(a) == set(b) == {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}
        for k in a:
            assert np.array_equal(a[k][()], b[k][()]), k
        assert {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}
        assert a["x_train"].dtype == np.uint8 and a["x_train"].shape == (200, SIZE, SIZE, 3)
        assert a["x_val"].shape == (40, SIZE, SIZE, 3) and a["x_test"].shape == (40, SIZE, SIZE, 3)
        assert a["x_train"].chunks is None and a["x_train"].compression is None  # can be memory-mapped
        x_train = a["x_train"][()]
        mean, std = a.attrs["mean"], a.attrs["std"]
        assert np.array_equal(a.attrs["norm_shift"], mean.astype(np.float32))
        assert list(a.attrs["classes"]) == list(CLASSES)
        # the rows are the listed images decoded, in the fixed order: the last 40 training images are validation
        listing = list_images(tree)
        for name, items in (("train", listing.train[:200]), ("val", listing.train[200:]), ("test", listing.test)):
            assert np.array_equal(a["x_" + name][()], np.stack([decode(p, SIZE) for p, _ in items])), name
            assert a["y_" + name][()].tolist() == [lab for _, lab in items], name
        assert len(set(a["y_val"][()].tolist())) > 1  # the held-out images mix the classes
    flat = x_train.reshape(-1, 3).astype(np.float64)
    assert np.allclose(mean, flat.mean(axis=0), rtol=0, atol=1e-9)
    assert np.allclose(std, flat.std(axis=0), rtol=0, atol=1e-9)
    assert leftovers(tmp_path) == []


def test_damaged_image_on_3_ranks_one_line_nothing_written(tree, tmp_path):
    bad = make_tree(tmp_path / "bad", per_class=(20, 4), seed=1)
    victim = os.path.join(bad, "train", "doe", "doe019.JPEG")  # in the last rank's share
    with open(victim, "r+b") as f:
        f.truncate(200)
    out = tmp_path / "out" / "p.h5"
    r = prepare_cli(3, bad, out, extra=["--validation", "8"])
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {victim}: cannot decode this image"), r.stderr
    assert os.listdir(out.parent) == []  # neither the file nor its temporary


def test_empty_class_directory_and_no_tree(tree, tmp_path, capsys):
    bad = make_tree(tmp_path / "bad", per_class=(6, 2))
    os.makedirs(os.path.join(bad, "val", "elk"))
    out = tmp_path / "out.h5"
    assert data_main(["prepare", *SETS, "--validation", "4", "--dir", bad, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {os.path.join(bad, 'val', 'elk')}: class 'elk' is not "
                                              f"among train/'s classes; remove it or add train/elk/")
    os.makedirs(os.path.join(bad, "train", "elk"))
    assert data_main(["prepare", *SETS, "--validation", "4", "--dir", bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {os.path.join(bad, 'train', 'elk')}: class directory holds no images"), err
    assert data_main(["prepare", *SETS, "--dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "train/<class>/*.JPEG" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("np_", [None, 2])
def test_sigterm_during_prepare_leaves_no_file(tree, tmp_path, np_):
    out, log = tmp_path / "p.h5", tmp_path / "stderr"
    cmd = [sys.executable, "-m", "lthmpi.data", "prepare", *SETS, "--dir", tree, "--out", str(out)]
    cmd = [str(MPIRUN), "-np", str(np_), *cmd] if np_ else cmd
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=clean_env({"LTHMPI_FAULT": "wait:0:prepare"}), start_new_session=True)
    wait_for(lambda: "injected fault: waiting in prepare" in log.read_text(), proc, 60, "rank 0 mid-prepare")
    assert any(n.endswith(".tmp") for n in leftovers(tmp_path))  # caught with its temporary file written
    proc.send_signal(signal.SIGTERM)  # to mpirun, which forwards it to every rank
    rc, _, _ = finish(proc, 60)
    assert rc == 128 + signal.SIGTERM, log.read_text()
    assert "interrupted by SIGTERM: nothing written" in log.read_text()
    assert sorted(os.listdir(tmp_path)) == ["stderr"]


def test_read_in_memory_or_mapped_and_verify(tree, tmp_path, capsys):
    out = tmp_path / "p.h5"
    assert data_main(["prepare", *SETS, "--dir", tree, "--out", str(out)]) == 0
    cfg = types.SimpleNamespace(dataset="imagefolder", dir="", subset=0, validation=40, normalize="standardize",
                                image_size=SIZE, prepared=str(out), in_memory=True)
    held = load_dataset(cfg)
    cfg.in_memory = False
    mapped = load_dataset(cfg)
    assert held.in_memory and not mapped.in_memory and isinstance(mapped.x_train, DiskArray)
    assert held.x_train.dtype == mapped.x_train.dtype == np.uint8
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(held, k), getattr(mapped, k)), k
    assert held.input_shape == (SIZE, SIZE, 3) and held.num_classes == len(CLASSES)
    assert np.array_equal(held.norm[1], np.asarray(h5py.File(out).attrs["std"], np.float32))
    cfg.image_size = 16
    with pytest.raises(DataError, match="image_size 12 .config says 16"):
        load_dataset(cfg)
    cfg.prepared, cfg.dir = "", tree
    with pytest.raises(DataError, match="read from its prepared file: run `python -m lthmpi.data prepare"):
        load_dataset(cfg)
    # verify reads the mapped arrays once: a flipped pixel is found, which streaming would not notice
    assert data_main(["verify", str(out)]) == 0
    with h5py.File(out, "r+") as f:
        f["x_train"][7, 3, 3, 1] ^= 0xFF
    assert isinstance(read_prepared(str(out), in_memory=False).x_train, DiskArray)
    capsys.readouterr()
    assert data_main(["verify", str(out)]) == 2
    assert "checksum of x_train does not match" in capsys.readouterr().err
    with pytest.raises(DataError, match="checksum of x_train does not match"):
        read_prepared(str(out), in_memory=True)


def test_auto_in_memory_from_file_size_memory_and_ranks(tmp_path, monkeypatch):
    f = tmp_path / "f.h5"
    f.write_bytes(b"\0" * 1000)
    assert decide_in_memory("auto", str(f), ranks=4, memory=8000)  # 4 copies of 1000 B in half of 8000 B
    assert not decide_in_memory("auto", str(f), ranks=5, memory=8000)
    assert decide_in_memory(True, str(f), ranks=99, memory=1) and not decide_in_memory(False, str(f))
    monkeypatch.setenv("MPI_LOCALNRANKS", "9")  # MPICH says how many ranks share this host
    assert not decide_in_memory("auto", str(f), memory=16000)


# ---------------------------------------------------------------------------------------------------
# training from the prepared file: in memory or from disk, the same bits

def experiment(prepared, in_memory, **over):
    from lthmpi.config import from_dict
    from lthmpi.validation import validate

    cfg = from_dict({"seed": 5,
                     "data": {"dataset": "imagefolder", "image_size": SIZE, "validation": 40,
                              "normalize": "standardize", "prepared": str(prepared), "in_memory": in_memory},
                     "train": {"epochs": 2, "batch_size": 20, "eval_every": "4it", **over.get("train", {})},
                     "model": {"name": over.get("model", "lenet300_100")},
                     "prune": {"remaining": [0.3]},
                     "reset": {"points": ["0ep", "5it"], "controls": []},
                     "parallel": {"threads": 1}, **({"stability": over["stability"]} if "stability" in over else {})})
    validate(cfg)
    return cfg


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def task_results(run_dir):
    out = {}
    for name in sorted(os.listdir(os.path.join(run_dir, "tasks"))):
        with h5py.File(os.path.join(run_dir, "tasks", name)) as f:
            out[name] = {k: v[()] for k, v in f.items() if isinstance(v, h5py.Dataset)}
            skip = ("seconds", "start_time", "end_time", "content_sha256")
            out[name].update({k: v for k, v in f.attrs.items() if k not in skip})
    return out


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "p.h5"
    assert data_main(["prepare", *SETS, "--dir", tree, "--out", str(out)]) == 0
    return out


def test_streamed_run_equals_in_memory_bitwise_and_resumes_without_work(prepared, tmp_path, tf_runtime):
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.experiment import Experiment

    runs = {}
    for in_memory in (True, False):
        cfg = experiment(prepared, in_memory)
        runs[in_memory] = str(tmp_path / f"run_{in_memory}")
        run_serial(cfg, runs[in_memory], threads=1, quiet=True)
    exp = Experiment(experiment(prepared, False), runs[False])
    assert exp.trainer.streamed and exp.trainer.kernels == "dense" and exp.data.x_train.dtype == np.uint8
    with h5py.File(os.path.join(runs[True], "parent.h5")) as a, h5py.File(os.path.join(runs[False], "parent.h5")) as b:
        names = []
        a.visit(names.append)
        weights = [n for n in names if isinstance(a[n], h5py.Dataset)]
        assert len(weights) > 10
        for n in weights:
            assert same(a[n][()], b[n][()]), n
    memory, disk = task_results(runs[True]), task_results(runs[False])
    assert len(memory) == 2 and memory.keys() == disk.keys()
    for task in memory:
        for k in memory[task]:
            assert same(memory[task][k], disk[task][k]), (task, k)
    # rerun from disk: every stage is complete, nothing is trained again
    before = {n: os.stat(os.path.join(runs[False], "tasks", n)).st_mtime_ns for n in disk}
    run_serial(experiment(prepared, False), runs[False], threads=1, quiet=True)
    assert log_has(runs[False], "resuming: 2 of 2 tasks already complete on disk")
    assert {n: os.stat(os.path.join(runs[False], "tasks", n)).st_mtime_ns for n in disk} == before
    assert set(done_counts(runs[False]).values()) == {1}  # each task trained once, over both runs


def test_conv_net_from_disk_equals_in_memory(prepared, tf_runtime):
    """The per-step path (conv nets): a trainer fed one batch a call from disk trains the same weights."""
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    weights = []
    for in_memory in (True, False):
        cfg = experiment(prepared, in_memory, model="conv2")
        data = load_dataset(cfg.data)
        model = build_model("conv2", data.input_shape, data.num_classes, 0)
        trainer = MaskedTrainer(model, data, cfg.train, 0, prunable_variables(model), augment=True)
        assert trainer.streamed is (not in_memory) and not trainer.fused
        h = trainer.fit(0, 8)
        weights.append((trainer.get_weights(), [e["val_loss"] for e in h.evals]))
    assert weights[0][1] == weights[1][1]
    for k in weights[0][0]:
        assert np.array_equal(weights[0][0][k], weights[1][0][k]), k


def test_as_float_normalises_like_the_step(prepared, tf_runtime):
    """Code outside the compiled step (e.g. evaluating an interpolated model by hand) gets the step's floats."""
    import tensorflow as tf

    from lthmpi.data import load_dataset

    data = load_dataset(experiment(prepared, False).data)
    x = data.x_val[:7]
    shift, div = (tf.constant(v, tf.float32) for v in data.norm)
    step = tf.function(lambda x: (tf.cast(x, tf.float32) - shift) / div, jit_compile=True)
    got = data.as_float(x)
    assert got.dtype == np.float32 and same(got, step(tf.constant(x)).numpy())
    assert abs(float(data.as_float(data.x_train[:]).mean())) < 0.05  # standardised with the training statistics


@pytest.mark.parametrize("in_memory", [True, False])
def test_stability_on_uint8_data_ends_at_the_trainers_own_test_errors(prepared, tmp_path, tf_runtime, in_memory):
    """A stability curve on a uint8 prepared file (in memory and from disk) sees the images the training step
    sees: at alpha = 0 its error is exactly copy A's test error as the trainer measured it, and its loss the
    trainer's test loss of A; at alpha = 1 copy B's. (Raw pixels, 0-255, give other errors along the path.)"""
    from lthmpi.experiment import Experiment
    from lthmpi.kinds import stability as kind
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load

    cfg = experiment(prepared, in_memory, stability={"enabled": True, "only": True, "points": ["5it"],
                                                     "masks": "dense", "alphas": 3})
    path = str(tmp_path / "run")
    res = load(run_serial(cfg, path, threads=1, quiet=True))
    (pair,) = res["stability"]
    acc = {t["task_id"]: t["final_accuracy"] for t in res["tasks"]}
    n = len(load_dataset(cfg.data).y_test)
    assert round(pair["error"][0] * n) == round((1 - acc["stab_dense_k00_a"]) * n)
    assert round(pair["error"][-1] * n) == round((1 - acc["stab_dense_k00_b"]) * n)
    exp = Experiment(cfg, path, threads=1)
    assert exp.data.x_test.dtype == np.uint8 and exp.data.in_memory is in_memory
    for end, copy in ((0, 0), (-1, 1)):
        weights, _ = kind.read_endpoint(kind.endpoint_path(exp.run, "stab_dense_k00", copy))
        exp.trainer.set_weights(weights)
        loss, accuracy = exp.trainer.evaluate("test")  # the compiled step's own evaluation
        assert pair["loss"][end] == pytest.approx(loss, rel=1e-5) and round(accuracy * n) == round((1 - pair["error"][end]) * n)
    rows = np.array([7, 2, 5])
    assert same(exp.data.inputs("train")[rows], exp.data.as_float(exp.data.x_train[rows]))


def test_disk_rows_and_batches_ahead(tmp_path):
    """DiskArray reads what numpy indexing reads; DiskBatches gives the batches BatchOrder names, a replica's
    share only, across jumps (new tasks), and raises a read error in the training thread."""
    from lthmpi.data.disk_batches import DiskBatches
    from lthmpi.training import BatchOrder

    x = np.random.default_rng(0).integers(0, 256, (500, 3, 2, 3), dtype=np.uint8)
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        offset = f.create_dataset("x", data=x).id.get_offset()
    a = DiskArray(str(path), offset, x.shape, x.dtype)
    assert len(a) == 500 and a.nbytes == x.nbytes
    for key in (7, -1, slice(10, 20), slice(495, 900), np.array([3, 499, 0, 3]), [5, -2]):
        assert same(a[key], x[key]), key
    with pytest.raises(IndexError):
        a[500]
    order = BatchOrder(500, 24, 3)
    y = np.arange(500) % 7
    for share in ((0, 1), (2, 3)):
        reader = DiskBatches(a, y, order.block, share, ahead=4)
        for t, n in ((0, 5), (5, 5), (10, 1), (40, 30), (3, 2), (3, 2), (400, 3)):  # runs, jumps back and ahead
            xb, yb = reader.block(t, n)
            rows = order.block(t, t + n)[:, share[0]::share[1]]
            assert same(xb, x[rows]) and same(yb, y[rows].astype(np.int32)), (share, t, n)
        reader.close()
    with open(path, "r+b") as f:  # the file shrinks under the reader: the error reaches the caller
        f.truncate(offset + 100 * a.row_bytes)
    reader = DiskBatches(a, y, order.block, ahead=4)
    with pytest.raises(OSError, match="short read"):
        for t in range(40):
            reader.block(t, 1)
    reader.close()


class _Replica:
    """Replica `rank` of a subgroup of `size`, alone in this process: its own gradients count as the sum."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def allreduce_sum(self, buf):
        return np.array(buf)

    def all_equal(self, value):
        return True


def test_data_parallel_replica_reads_its_share_from_disk(prepared, tf_runtime):
    """A data-parallel replica training from disk gathers only its rows of each batch (rank::size), and trains
    the same weights as from memory."""
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    weights = []
    for in_memory in (True, False):
        cfg = experiment(prepared, in_memory)
        data = load_dataset(cfg.data)
        if not in_memory:
            disk, rows = data.x_train, []

            class Counting:  # the DiskArray, counting the rows the reader asks for
                shape, dtype = disk.shape, disk.dtype

                def __len__(self):
                    return len(disk)

                def __getitem__(self, key):
                    rows.append(np.atleast_1d(np.arange(len(disk))[key]))
                    return disk[key]

            data.x_train = Counting()
        model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
        trainer = MaskedTrainer(model, data, cfg.train, 0, prunable_variables(model))
        trainer.set_reducer(_Replica(1, 2))
        trainer.fit(0, 6)
        weights.append(trainer.get_weights())
    reads = rows[1:]  # rows[0]: the one row the reader reads to size its batches; then one read per iteration
    assert len(reads) >= 6
    for t, got in enumerate(reads):  # in order, the steps' own and then a few ahead: rows 1::2 of each batch
        assert same(got, trainer.order.block(t, t + 1)[0, 1::2].astype(got.dtype)), t
    for k in weights[0]:
        assert same(weights[0][k], weights[1][k]), k


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 12 12\n%%EndComments\n"
       b"0 0 moveto 12 12 lineto stroke\nshowpage\n%%EOF\n")


@pytest.mark.parametrize("kind", ["eps", "gif", "bmp"])
def test_other_formats_named_jpeg_are_refused_with_their_path(tmp_path, monkeypatch, capsys, kind):
    """A file named .JPEG that holds EPS (which Pillow would render through Ghostscript), GIF or BMP is not
    decoded: one line names it. Ghostscript is never started (made to fail the test if it were)."""
    from PIL import EpsImagePlugin

    started = []

    def ghostscript(*args, **kwargs):
        started.append(args)
        raise AssertionError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    root = make_tree(tmp_path / "tree", per_class=(6, 2))
    victim = os.path.join(root, "train", "bee", "bee003.JPEG")
    if kind == "eps":
        with open(victim, "wb") as f:
            f.write(EPS)
    else:
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(victim, format=kind.upper())
    with pytest.raises(DataError) as e:
        decode(victim, SIZE)
    assert str(e.value) == (f"{victim}: not a JPEG or PNG image (an image tree holds only those, whatever the "
                            f"file's name); replace or remove the file")
    out = tmp_path / "p.h5"
    assert data_main(["prepare", *SETS, "--validation", "4", "--dir", root, "--out", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"error: {e.value}"] and not out.exists() and started == []
