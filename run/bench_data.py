"""Data larger than a rank's memory budget: peak memory per rank and input throughput (issue 21). Not a test.

    .venv/bin/python run/bench_data.py [--images 10000] [--size 224] [--ranks 2] [--budget-mb 256]

1. makes a synthetic JPEG tree (smooth random images of mixed sizes around 256x256, 10 classes) in a scratch
   directory, and prepares it at --size with `mpirun -np RANKS python -m lthmpi.data prepare` (timed);
2. under `mpirun -np RANKS`, every rank reads its data-parallel share (rows rank::RANKS) of every batch of 128
   in the training order, for one epoch, four ways: `disk` (DiskArray: pread, what data.in_memory = false
   uses), `mmap` (numpy memory map of the same bytes), `memory` (the whole array loaded into every rank, data.
   in_memory = true) and `window` (one copy per host in an MPI-3 shared-memory window); it prints each rank's peak resident
   memory (VmHWM) and its resident anonymous / file / shared
   memory, against the file's size and the budget; then the same reading plus the step's normalisation and
   the CIFAR augmentation (lthmpi.data.augment), in images per second per core (1 TF thread per rank);
3. times a compiled training step (1 thread, no mask: the masked step costs the same, DESIGN.md §4) of
   LeNet-300-100 (28x28x1, batch 60), ResNet-20 (32x32x3, batch 128) and MobileNetV2 (--size, batch 16) and
   prints the images per second each consumes, next to what the reader delivers;
4. deletes the scratch directory.
The figures in docs/data.md come from this script; the box they were measured on is named there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
MPIRUN = os.path.join(os.path.dirname(PY), "mpirun")
BATCH = 128


def memory() -> dict:
    """This process's peak and current resident memory by kind, MiB (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


def make_tree(root: str, n: int, classes: int = 10, seed: int = 0):
    """n training and n // 20 test JPEGs, smooth (gradients plus low noise, so that they are small on disk)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 20))):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c:02d}"), exist_ok=True)
        for i in range(count):
            h, w = (int(v) for v in rng.integers(224, 320, 2))
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            noise = rng.integers(0, 8, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(np.asarray(img) + noise)
            img.save(os.path.join(root, split, f"c{i % classes:02d}", f"{i:06d}.JPEG"), quality=85)


def array_of(path: str, mode: str):
    """x_train of a prepared file as `mode` reads it."""
    import h5py

    from lthmpi.data.disk_batches import DiskArray

    with h5py.File(path, "r") as f:
        d = f["x_train"]
        offset, shape, dtype = int(d.id.get_offset()), d.shape, d.dtype
        y = f["y_train"][()]
        norm = (f.attrs["norm_shift"], f.attrs["norm_div"])
    if mode == "disk":
        return DiskArray(path, offset, shape, dtype), y, norm
    if mode == "window":  # one copy per host in an MPI shared-memory window, filled by the host's first rank
        from lthmpi.parallel.mpi import node_shared_array

        x, owner, _win, local = node_shared_array(shape, dtype)
        if owner:
            src = DiskArray(path, offset, shape, dtype)
            for start in range(0, shape[0], 256):
                x[start:start + 256] = src[start:start + 256]
        local.Barrier()
        return x, y, norm
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return (np.array(mm) if mode == "memory" else mm), y, norm


def worker(args) -> None:
    """One rank of step 2: read (then read and augment) this rank's share, print one JSON line."""
    from lthmpi.data.disk_batches import DiskBatches
    from lthmpi.training import BatchOrder

    rank, size = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    x, y, norm = array_of(args.file, args.worker)
    order = BatchOrder(len(y), BATCH, 0)
    share = len(order.block(0, 1)[0, rank::size])
    reader = DiskBatches(x, y, order.block, (rank, size))
    out = dict(rank=rank, mode=args.worker, file_mib=os.path.getsize(args.file) / 2**20, share=share)
    t0, t, images = time.perf_counter(), 0, 0
    while t < order.per_epoch:  # one epoch: every batch's share of rows, all over the file
        xb, _ = reader.block(t, 1)
        images += xb.shape[1]
        t += 1
    out["read_per_s"] = images / (time.perf_counter() - t0)
    out["read_memory"] = memory()
    from lthmpi.runtime import configure_tensorflow

    tf = configure_tensorflow(1)
    from lthmpi.data.augment import augment_batch

    shift, div = (tf.constant(v, tf.float32) for v in norm)

    @tf.function(jit_compile=True)
    def prep(xb, t):
        return augment_batch((tf.cast(xb, tf.float32) - shift) / div, tf.stack([tf.constant(0, tf.int64), t]))

    prep(tf.constant(reader.block(t, 1)[0][0]), tf.constant(0, tf.int64))  # compile
    t += 1
    t0, images = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        xb, _ = reader.block(t, 1)
        prep(tf.constant(xb[0]), tf.constant(t, tf.int64)).numpy()
        images += xb.shape[1]
        t += 1
    out["augmented_per_s"] = images / max(1e-9, time.perf_counter() - t0)
    out["memory"] = memory()
    reader.close()
    print("RESULT " + json.dumps(out), flush=True)


def step_need(size: int) -> list:
    """Images per second one core's compiled training step consumes, per model."""
    from lthmpi.runtime import configure_tensorflow

    tf = configure_tensorflow(1)
    import keras

    from lthmpi.models import build_model

    rows = []
    for name, shape, batch in (("lenet300_100", (28, 28, 1), 60), ("resnet20", (32, 32, 3), 128),
                               ("mobilenetv2", (size, size, 3), 16)):
        model = build_model(name, shape, 10 if name != "mobilenetv2" else 1000, 0)
        opt = keras.optimizers.SGD(0.01, momentum=0.9)
        opt.build(model.trainable_variables)
        x = tf.random.uniform((batch, *shape))
        y = tf.zeros((batch,), tf.int32)

        @tf.function(jit_compile=name == "lenet300_100")
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss

        step(x, y).numpy()
        times = []
        for _ in range(5 if name != "mobilenetv2" else 3):
            t0 = time.perf_counter()
            step(x, y).numpy()
            times.append(time.perf_counter() - t0)
        sec = float(np.median(times))
        rows.append(dict(model=name, input=shape, batch=batch, step_s=sec, need_per_s=batch / sec))
    return rows


def decode_rate(tree: str, size: int, n: int = 300) -> float:
    from lthmpi.data.imagefolder import decode, list_images

    paths = [p for p, _ in list_images(tree).train[:n]]
    t0 = time.perf_counter()
    for p in paths:
        decode(p, size)
    return len(paths) / (time.perf_counter() - t0)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000, help="training images of the synthetic tree")
    p.add_argument("--size", type=int, default=224, help="image size of the prepared file")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--budget-mb", type=float, default=256, help="each rank's memory budget the file is held against")
    p.add_argument("--seconds", type=float, default=20, help="reading time per mode and phase")
    p.add_argument("--scratch", default="", help="scratch directory (default: a new one in $TMPDIR)")
    p.add_argument("--modes", default="disk,mmap,memory,window")
    p.add_argument("--worker", choices=("disk", "mmap", "memory", "window"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    scratch = tempfile.mkdtemp(prefix="bench_data_", dir=args.scratch or None)
    try:
        t0 = time.time()
        make_tree(os.path.join(scratch, "tree"), args.images)
        print(f"synthetic JPEG tree: {args.images} training images in {time.time() - t0:.0f} s")
        out = os.path.join(scratch, "prepared.h5")
        t0 = time.time()
        run([MPIRUN, "-np", str(args.ranks), PY, "-m", "lthmpi.data", "prepare", "--dataset", "imagefolder",
             "--dir", os.path.join(scratch, "tree"), "--image-size", str(args.size), "--validation", "0",
             "--out", out])
        sec = time.time() - t0
        size_mib = os.path.getsize(out) / 2**20
        print(f"decoding alone: {decode_rate(os.path.join(scratch, 'tree'), args.size):.0f} images/s on one core "
              f"(Pillow: open, JPEG draft scale, RGB, crop and resize to {args.size}x{args.size})")
        print(f"prepare on {args.ranks} ranks: {sec:.1f} s, {args.images * 1.05 / sec / args.ranks:.0f} images/s per "
              f"rank (decode + resize to {args.size}x{args.size} + write, incl. start-up and checksums); "
              f"file {size_mib:.0f} MiB = {size_mib / args.budget_mb:.1f}x the {args.budget_mb:.0f} MiB budget")
        print(f"\n{'mode':<7}{'rank':>5}{'file MiB':>10}{'peak RSS':>10}{'anon':>8}{'file':>8}{'shmem':>8}"
              f"{'read img/s':>12}{'+aug img/s':>12}{'peak w/ TF':>12}   (MiB; per rank, 1 core each)")
        for mode in args.modes.split(","):
            r = run([MPIRUN, "-np", str(args.ranks), PY, os.path.abspath(__file__), "--worker", mode,
                     "--file", out, "--seconds", str(args.seconds)])
            rows = sorted((json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")),
                          key=lambda d: d["rank"])
            for d in rows:
                m = d["read_memory"]
                print(f"{mode:<7}{d['rank']:>5}{d['file_mib']:>10.0f}{m['VmHWM']:>10.0f}{m['RssAnon']:>8.0f}"
                      f"{m['RssFile']:>8.0f}{m['RssShmem']:>8.0f}{d['read_per_s']:>12.0f}{d['augmented_per_s']:>12.0f}"
                      f"{d['memory']['VmHWM']:>12.0f}")
        print("\nthe training step's need (1 core, compiled, batch as shown; synthetic inputs):")
        for d in step_need(args.size):
            print(f"  {d['model']:<14} input {str(d['input']):<15} batch {d['batch']:>4}: {d['step_s'] * 1000:8.0f} ms "
                  f"a step = {d['need_per_s']:8.0f} images/s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
