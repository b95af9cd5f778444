#!/usr/bin/env python3
"""An independent check of one stability pair of an lthmpi run, written without lthmpi (plain TensorFlow/Keras,
numpy, h5py), so that a bug in lthmpi's trainer or in its interpolation cannot hide in both numbers.

From the run directory it reads only the config (config.toml), the parent's checkpoint at k (parent.h5) and the
mask (masks.h5); the data are read again from the raw IDX files. It then

  1. re-implements the data lthmpi trains on: the last `data.validation` training examples held out, the first
     `data.subset` of the rest kept, pixels / 255 (normalize = "scale");
  2. re-implements the batch orders: iteration t of a copy trains on batch t mod E of the permutation
     numpy.random.default_rng([seed, t // E]).permutation(n) (E = n // batch, the last n mod batch rows dropped);
     copy A's seed is the run's, copy B's numpy.random.SeedSequence([seed, 0x53544142, 1]).generate_state(1)[0]
     & 0x7FFFFFFF;
  3. trains both copies from θ_k ⊙ m for T − k iterations with a fresh Keras Adam (or SGD), re-masking the weights
     after every update (pruned weights stay exactly zero), in plain eager-compiled TensorFlow (not XLA);
  4. evaluates the test error along θ(α) = (1 − α) θ_A + α θ_B (float64, stored as float32) and the barrier
     max_α err(α) − (err(0) + err(1)) / 2;

and prints its curve next to the run's own (tasks/<pair>_eval.h5). Float rounding differs from lthmpi's XLA steps,
so the copies are not bitwise the run's: what must agree is the shape of the curve and the verdict.

    python analysis/independent_barrier.py RUN_DIR --pair stab_dense_k02 [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import re
import sys
import time
import tomllib

import h5py
import numpy as np


def read_idx(path: str) -> np.ndarray:
    raw = gzip.open(path, "rb").read() if path.endswith(".gz") else open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(directory: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        if os.path.exists(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    sys.exit(f"independent_barrier: {name}[.gz] not in {directory}")


def load_data(cfg: dict, directory: str):
    """(x_train, y_train, x_test, y_test) as lthmpi prepares Fashion-MNIST / MNIST with normalize = "scale"."""
    d = cfg.get("data", {})
    if d.get("normalize", "scale") != "scale":
        sys.exit("independent_barrier: only data.normalize = \"scale\" is re-implemented")
    xs = [read_idx(find(directory, f)) for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")]
    ys = [read_idx(find(directory, f)) for f in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")]
    n, validation, subset = len(xs[0]), int(d.get("validation", 0)), int(d.get("subset", 0))
    end = subset or (n - validation)
    scale = lambda x: (x[..., None].astype(np.float32) / np.float32(255.0))  # noqa: E731
    return scale(xs[0][:end]), ys[0][:end].astype(np.int32), scale(xs[1]), ys[1].astype(np.int32)


def iterations(step: str, per_epoch: int) -> int:
    value, unit = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ep|it)\s*", step).groups()
    return int(value) if unit == "it" else int(math.floor(float(value) * per_epoch + 1e-9))


def order_seed(base: int, copy: int) -> int:
    if copy == 0:
        return base
    return int(np.random.SeedSequence([base, 0x5354_4142, copy]).generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


def batch_rows(seed: int, n: int, batch: int, t: int) -> np.ndarray:
    per_epoch = n // batch
    epoch, j = divmod(t, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[j * batch:(j + 1) * batch]


def lenet(shape, classes: int):
    import keras

    inputs = keras.Input(shape=shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(300, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(100, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="output")(x))


def read_group(path: str, group: str) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f[group].visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def train_copy(model, start: dict, mask: dict, x, y, seed: int, k: int, end: int, cfg: dict) -> dict:
    import keras
    import tensorflow as tf

    t = cfg["train"]
    for v in model.variables:
        v.assign(start[v.path])
    if t.get("optimizer", "adam") == "adam":
        opt = keras.optimizers.Adam(learning_rate=t["lr"])
    else:
        opt = keras.optimizers.SGD(learning_rate=t["lr"], momentum=t.get("momentum", 0.0))
    masked = [(v, tf.constant(mask[v.path].astype(np.float32))) for v in model.trainable_variables if v.path in mask]

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        for v, m in masked:
            v.assign(tf.where(m != 0, v, tf.zeros_like(v)))
        return loss

    for it in range(k, end):
        rows = batch_rows(seed, len(x), t["batch_size"], it)
        step(tf.constant(x[rows]), tf.constant(y[rows]))
    return {v.path: v.numpy() for v in model.variables}


def errors_along(model, a: dict, b: dict, x, y, n_alphas: int) -> list[float]:
    out = []
    for alpha in np.linspace(0.0, 1.0, n_alphas):
        for v in model.variables:
            v.assign(((1 - alpha) * a[v.path].astype(np.float64) + alpha * b[v.path].astype(np.float64)).astype(np.float32))
        logits = np.concatenate([np.asarray(model(x[i:i + 1000], training=False)) for i in range(0, len(x), 1000)])
        out.append(float(np.mean(logits.argmax(1) != y)))
    return out


def barrier(e) -> float:
    return float(max(e) - (e[0] + e[-1]) / 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--pair", required=True, help="stab_<dense|mNNN>_kNN (one-shot runs)")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args(argv)
    with open(os.path.join(args.run_dir, "config.toml"), "rb") as f:
        cfg = tomllib.load(f)
    if cfg["model"]["name"] != "lenet300_100" or cfg.get("prune", {}).get("method", "oneshot") != "oneshot":
        sys.exit("independent_barrier: re-implemented for LeNet-300-100 in one-shot runs only")
    net, point = re.fullmatch(r"stab_(dense|m\d{3})_k(\d{2})", args.pair).groups()
    x, y, x_test, y_test = load_data(cfg, args.data_dir)
    per_epoch = len(x) // cfg["train"]["batch_size"]
    t = cfg["train"]
    total = int(t["iterations"]) if t.get("iterations") else int(t["epochs"]) * per_epoch
    s = cfg["stability"]
    points = s.get("points") or cfg["reset"]["points"]
    k = iterations(points[int(point)], per_epoch)
    start = read_group(os.path.join(args.run_dir, "parent.h5"), f"checkpoints/{k}/weights")
    mask = {} if net == "dense" else read_group(os.path.join(args.run_dir, "masks.h5"), f"masks/{int(net[1:])}")
    start = {p: (w * mask[p] if p in mask else w) for p, w in start.items()}
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # a shared box: one core, as the run had
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = lenet(x.shape[1:], 10)
    if sorted(v.path for v in model.variables) != sorted(start):
        sys.exit("independent_barrier: the checkpoint's variables are not this LeNet's")
    t0 = time.monotonic()
    seed = int(cfg.get("seed", 0))
    ends = [train_copy(model, start, mask, x, y, order_seed(seed, c), k, total, cfg) for c in (0, 1)]
    mine = errors_along(model, ends[0], ends[1], x_test, y_test, int(s.get("alphas", 11)))
    with h5py.File(os.path.join(args.run_dir, "tasks", f"{args.pair}_eval.h5"), "r") as f:
        theirs = [float(e) for e in f["curve/error"][()]]
    print(f"{args.run_dir}: pair {args.pair} ({'dense' if net == 'dense' else 'mask ' + str(int(net[1:]))}, "
          f"k = {points[int(point)]} = iteration {k}, T = {total}, seed {seed}); independent retraining "
          f"{time.monotonic() - t0:.0f} s")
    print("alpha        " + " ".join(f"{a:6.2f}" for a in np.linspace(0, 1, len(mine))))
    print("independent  " + " ".join(f"{100 * e:6.2f}" for e in mine) + f"   barrier {100 * barrier(mine):.2f} pp")
    print("lthmpi       " + " ".join(f"{100 * e:6.2f}" for e in theirs) + f"   barrier {100 * barrier(theirs):.2f} pp")
    thr = float(s.get("threshold", 0.02))
    print(f"verdict: independent {'stable' if barrier(mine) < thr else 'unstable'}, lthmpi "
          f"{'stable' if barrier(theirs) < thr else 'unstable'} (threshold {100 * thr:g} pp); largest difference "
          f"along the path {100 * max(abs(a - b) for a, b in zip(mine, theirs)):.2f} pp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
