"""Benchmark: seconds per epoch of a masked LeNet-300-100 retraining against plain Keras `fit`.

Same model, data (Fashion-MNIST, 55k training examples), batch 60, one TF thread, in one process.
The masked trainer also evaluates the 5k validation set every 100 iterations (early stopping), which
`fit` does not; it is timed both with that evaluation and without it.

    .venv/bin/python run/bench_trainer.py [--epochs 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4, help="epochs timed per variant (after one warm-up epoch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="fashion_mnist")
    args = ap.parse_args()

    from lthmpi.runtime import configure_tensorflow
    configure_tensorflow(args.threads)
    import keras
    import numpy as np

    from lthmpi.config import Config
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.pruning import magnitude_masks
    from lthmpi.training import MaskedTrainer

    cfg = Config()
    cfg.data.dataset = args.dataset
    data = load_dataset(cfg.data, cfg.seed)
    epochs = args.epochs + 1

    # the masked trainer, 20% of weights left
    results, breakdown = {}, None
    for label, eval_every in (("masked, eval every 100 it", "100it"), ("masked, eval once per epoch", "1ep")):
        tcfg = SimpleNamespace(**{**vars(cfg.train), "eval_every": eval_every})
        model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
        tr = MaskedTrainer(model, data, tcfg, 0, prunable_variables(model))
        weights = {v.path: v.numpy() for v in prunable_variables(model)}
        tr.set_masks(magnitude_masks(weights, 0.2, "global", {"output": 0.5}))
        tr.fit(0, tr.per_epoch)  # compile and warm up
        t = time.perf_counter()
        h = tr.fit(tr.per_epoch, epochs * tr.per_epoch)  # one retraining of several epochs, as a task runs
        results[label] = (time.perf_counter() - t) / (epochs - 1)
        if breakdown is None:
            breakdown = where_the_time_goes(tr, h, results[label], epochs - 1)
        zero = all(np.all(v.numpy()[~m.astype(bool)] == 0) for v, m in
                   ((v, tr._masked[i][1].numpy()) for i, (v, _) in enumerate(tr._masked)))
        assert zero, "pruned weights revived"

    # plain Keras fit, last: its tf.data pipeline keeps threads alive that would slow what follows
    model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
    model.compile(keras.optimizers.Adam(1.2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    model.fit(data.x_train, data.y_train, batch_size=60, epochs=epochs, verbose=0, callbacks=[timer], shuffle=True)
    fit_times = timer.times[1:]
    fit_s = statistics.median(fit_times)

    print(f"LeNet-300-100, {args.dataset}, {len(data.x_train)} training examples, batch 60, "
          f"{args.threads} thread(s), {args.epochs} epochs timed (fit: median epoch)")
    print(f"  keras fit (no validation)      {fit_s:6.2f} s/epoch   (epochs {min(fit_times):.2f} to "
          f"{max(fit_times):.2f} s; jit_compile={model.jit_compile})")
    for label, s in results.items():
        print(f"  {label:30s} {s:6.2f} s/epoch   ratio to fit {s / fit_s:.2f}")
    lines, floor = breakdown
    print("\n".join(lines))
    print(f"  arithmetic alone at the validation pass's rate: {floor:.2f} s/epoch = {floor / fit_s:.2f} x fit")


def dense_macs(model) -> tuple[int, int]:
    """Multiply-adds per example of the Dense kernels: (forward, of which the first layer)."""
    kernels = [v for v in model.trainable_variables if len(v.shape) == 2]
    sizes = [int(v.shape[0]) * int(v.shape[1]) for v in kernels]
    return sum(sizes), sizes[0]


def where_the_time_goes(tr, h, epoch_s: float, epochs: int) -> tuple[list[str], float]:
    """Split an epoch into training and evaluation, with the arithmetic each needs (the dense floor).

    Training costs forward + weight gradient for every layer + input gradient for all but the first
    (nobody needs the gradient of the images); an evaluation pass costs one forward."""
    fwd, first = dense_macs(tr.model)
    n_val, n_test = (int(tr._x[s].shape[0]) for s in ("val", "test"))
    per_epoch_examples = tr.per_epoch * tr.cfg.batch_size
    timed = {}
    for split in ("val", "test"):
        tr.evaluate(split)
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            tr.evaluate(split)
            runs.append(time.perf_counter() - t)
        timed[split] = statistics.median(runs)
    val_passes = len(h.evals) / epochs
    test_passes = (len(h.epochs) + 1) / epochs  # each epoch end, and once at the early-stopping weights
    eval_s = val_passes * timed["val"] + test_passes * timed["test"]
    train_s = epoch_s - eval_s
    gflop = {"train": 2 * per_epoch_examples * (3 * fwd - first) / 1e9,
             "val": val_passes * 2 * n_val * fwd / 1e9, "test": test_passes * 2 * n_test * fwd / 1e9}
    rate = gflop["val"] / (val_passes * timed["val"])  # one large GEMM per pass: this core's dense rate
    floor = sum(gflop.values()) / rate
    lines = ["where an epoch of 'masked, eval every 100 it' goes (dense arithmetic: the mask zeroes weights, "
             "the kernels still multiply them):",
             f"  training steps   {per_epoch_examples:6d} examples  {gflop['train']:5.1f} GFLOP  {train_s:5.2f} s  "
             f"({gflop['train'] / train_s:4.0f} GFLOP/s, optimizer and re-masking included)",
             f"  validation  {val_passes:4.1f} x {n_val:6d} examples  {gflop['val']:5.1f} GFLOP  "
             f"{val_passes * timed['val']:5.2f} s  ({rate:4.0f} GFLOP/s)",
             f"  test        {test_passes:4.2f} x {n_test:6d} examples  {gflop['test']:5.1f} GFLOP  "
             f"{test_passes * timed['test']:5.2f} s"]
    return lines, floor


if __name__ == "__main__":
    main()
