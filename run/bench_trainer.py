"""Benchmark: seconds per epoch of a masked LeNet-300-100 retraining against plain Keras `fit`.

Same model, data (Fashion-MNIST, 55k training examples), batch 60, one core. The masked trainer
(20% of weights left) also evaluates the 5k validation set every 100 iterations (early stopping) and
the test set at epoch ends, which `fit` does not; it is timed with that evaluation and with validation
once per epoch, on the kernels the engine picks (sparse at 20% left: `parallel.sparse_below`) and, for
comparison, on its dense XLA kernels. `fit` runs as a user would call it (TensorFlow's defaults, Keras' `jit_compile="auto"`,
no op determinism) and, as the strongest Keras baseline, with `jit_compile=True`.

Every variant runs in its own process pinned to the same core (the last one: the first takes the box's
interrupts and shells), so "one core" holds for `fit`'s tf.data threads too. `fit` is at the mercy of
the host (Python and tf.data per step): on this VM it runs ~2.6 s per epoch for stretches of minutes and
~5 s for others, while the masked trainer stays within a few percent; so the variants alternate over
--rounds; the target is judged against `fit`'s fastest run, and the ratios per round and of the medians
are printed too. Then the masked epoch is split into training and evaluation, with the arithmetic each needs.

    .venv/bin/python run/bench_trainer.py [--rounds 3] [--epochs 4] [--threads 1] [--validation 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

VARIANTS = {"fit": "keras fit (no validation)", "fit-xla": "keras fit, jit_compile=True",
            "100it": "masked, eval every 100 it", "100it-dense": "  the same on dense kernels",
            "1ep": "masked, eval once per epoch"}
TARGET = 0.5  # issue 2: masked (eval every 100 it) <= 0.5 x plain fit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="times each variant runs, alternating (default 3)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs timed per run, after one warm-up epoch")
    ap.add_argument("--threads", type=int, default=1, help="TF threads, and cores the runs are pinned to")
    ap.add_argument("--validation", type=int, default=5000,
                    help="validation examples held out of the 60k (default 5000, the config's default)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one run, in a child
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.rounds < 1 or args.epochs < 1:
        ap.error("--rounds and --epochs must be >= 1")
    if not 0 < args.validation < 60000:
        ap.error("--validation must be between 1 and 59999 examples")
    if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        ap.error(f"--threads must be between 1 and the {len(os.sched_getaffinity(0))} cores this process may use")

    runs = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", v, "--epochs", str(args.epochs),
                   "--threads", str(args.threads), "--validation", str(args.validation)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench_trainer: the {v} run failed:\n{out.stderr[-2000:]}")
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1}/{args.rounds}: {VARIANTS[v]:30s} {runs[v][-1]['s']:6.2f} s/epoch", flush=True)

    per = {v: [x["s"] for x in rs] for v, rs in runs.items()}
    med = {v: statistics.median(xs) for v, xs in per.items()}
    print(f"\nLeNet-300-100, fashion_mnist ({args.validation} validation), batch 60, {args.threads} thread(s) "
          f"pinned to cores {pinned_cores(args.threads)}; "
          f"{args.rounds} runs of each, {args.epochs} epochs timed per run (median; range over runs)")
    for v, label in VARIANTS.items():
        ratio = ""
        if not v.startswith("fit"):
            ratio = "   x fit {:.2f}, x fit-xla {:.2f}".format(med[v] / med["fit"], med[v] / med["fit-xla"])
        print(f"  {label:30s} {med[v]:6.2f} s/epoch  ({min(per[v]):.2f} to {max(per[v]):.2f}){ratio}")
    rounds = [a / b for a, b in zip(per["100it"], per["fit"])]
    # The verdict holds the trainer against `fit` at its fastest: a busy host slows `fit` (Python and
    # tf.data every step) twice as much as the trainer, and a slowed `fit` must not make the target "met".
    best = min(per["fit"])
    ratio = med["100it"] / best
    print(f"target (masked, eval every 100 it) <= {TARGET} x plain fit at its fastest run ({best:.2f} s): "
          f"{ratio:.2f} (x the median fit {med['100it'] / med['fit']:.2f}; per round {min(rounds):.2f} to "
          f"{max(rounds):.2f}): {'met' if ratio <= TARGET else 'NOT met'}")
    for v in ("100it", "100it-dense"):
        parts = min(runs[v], key=lambda x: abs(x["s"] - med[v]))["parts"]
        print(breakdown(parts, best, v))


def pinned_cores(threads: int) -> list[int]:
    """The last `threads` cores this process may use: every variant runs on the same ones."""
    return sorted(os.sched_getaffinity(0))[-threads:]


def run_variant(args) -> dict:
    """One timed run of one variant in this process: seconds per epoch (and, masked, where they go)."""
    os.sched_setaffinity(0, pinned_cores(args.threads))
    if args.variant.startswith("fit"):  # plain TensorFlow: its defaults size the thread pools to the pinned cores
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    else:
        from lthmpi.runtime import configure_tensorflow

        configure_tensorflow(args.threads)
    from lthmpi.config import Config
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model

    cfg = Config()  # the default: Fashion-MNIST
    cfg.data.validation = args.validation
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
    if args.variant.startswith("fit"):
        return {"s": time_fit(model, data, args.epochs, xla=args.variant == "fit-xla")}
    return time_masked(model, data, cfg, args.variant, args.epochs)


def time_fit(model, data, epochs: int, xla: bool) -> float:
    import keras

    model.compile(keras.optimizers.Adam(1.2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True if xla else "auto")

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    model.fit(data.x_train, data.y_train, batch_size=60, epochs=epochs + 1, verbose=0, callbacks=[timer],
              shuffle=True)
    return statistics.median(timer.times[1:])


def time_masked(model, data, cfg, eval_every: str, epochs: int) -> dict:
    import numpy as np

    from lthmpi.models import prunable_variables
    from lthmpi.pruning import magnitude_masks
    from lthmpi.training import MaskedTrainer

    tcfg = SimpleNamespace(**{**vars(cfg.train), "eval_every": eval_every.removesuffix("-dense")})
    below = 0.0 if eval_every.endswith("-dense") else cfg.parallel.sparse_below  # the default: sparse kernels at 20%
    tr = MaskedTrainer(model, data, tcfg, 0, prunable_variables(model), sparse_below=below)
    weights = {v.path: v.numpy() for v in prunable_variables(model)}
    tr.set_masks(magnitude_masks(weights, 0.2, "global", {"output": 0.5}))
    tr.fit(0, tr.per_epoch)  # compile and warm up
    t = time.perf_counter()
    h = tr.fit(tr.per_epoch, (epochs + 1) * tr.per_epoch)  # one retraining of several epochs, as a task runs
    s = (time.perf_counter() - t) / epochs
    for v, m in tr._masked:
        if np.any(v.numpy()[m.numpy() == 0] != 0):
            raise AssertionError("pruned weights revived")
    return {"s": s, "parts": where_the_time_goes(tr, h, s, epochs)}


def macs(tr) -> tuple[int, int]:
    """Multiply-adds per example of the Dense kernels, (forward, of which the first layer): every weight
    on dense kernels, the kept ones on sparse kernels."""
    sizes = [int(m.numpy().sum()) if tr.kernels == "sparse" else int(v.shape[0]) * int(v.shape[1])
             for v, m in tr._masked]
    return sum(sizes), sizes[0]


def where_the_time_goes(tr, h, epoch_s: float, epochs: int) -> dict:
    """Split an epoch into training and evaluation, with the arithmetic each needs (the dense floor).

    Training costs forward + weight gradient for every layer + input gradient for all but the first
    (nobody needs the gradient of the images); an evaluation pass costs one forward."""
    fwd, first = macs(tr)
    n = {s: len(getattr(tr.data, f"y_{s}")) for s in ("val", "test")}
    timed = {}
    backend = tr.backend()  # evaluate as the fit loop calls it
    backend.begin()
    for split in ("val", "test"):
        backend.evaluate(split)
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            backend.evaluate(split)
            runs.append(time.perf_counter() - t)
        timed[split] = statistics.median(runs)
    backend.end()
    passes = {"val": len(h.evals) / epochs,
              "test": (len(h.epochs) + 1) / epochs}  # each epoch end, and once at the early-stopping weights
    examples = tr.per_epoch * tr.cfg.batch_size
    return {"examples": examples, "n": n, "passes": passes, "kernels": tr.kernels,
            "seconds": {"train": epoch_s - sum(passes[s] * timed[s] for s in timed),
                        **{s: passes[s] * timed[s] for s in timed}},
            "gflop": {"train": 2 * examples * (3 * fwd - first) / 1e9,
                      **{s: passes[s] * 2 * n[s] * fwd / 1e9 for s in timed}}}


def breakdown(p: dict, fit_s: float, variant: str) -> str:
    g, s = p["gflop"], p["seconds"]
    rate = g["val"] / s["val"]  # one large product per pass: the kernels' best rate
    floor = sum(g.values()) / rate
    how = ("dense arithmetic: the mask zeroes weights, the kernels still multiply them" if p["kernels"] == "dense"
           else "sparse arithmetic: only the kept weights are stored and multiplied")
    return "\n".join([
        f"where an epoch of '{VARIANTS[variant].strip()}' goes ({how}):",
        f"  training steps   {p['examples']:6d} examples  {g['train']:5.1f} GFLOP  {s['train']:5.2f} s  "
        f"({g['train'] / s['train']:4.0f} GFLOP/s, optimizer{' and re-masking' if p['kernels'] == 'dense' else ''} included)",
        f"  validation  {p['passes']['val']:4.1f} x {p['n']['val']:6d} examples  {g['val']:5.1f} GFLOP  "
        f"{s['val']:5.2f} s  ({rate:4.0f} GFLOP/s)",
        f"  test        {p['passes']['test']:4.2f} x {p['n']['test']:6d} examples  {g['test']:5.1f} GFLOP  "
        f"{s['test']:5.2f} s",
        f"  arithmetic alone at the validation pass's rate: {floor:.2f} s/epoch = {floor / fit_s:.2f} x the fastest fit"])


if __name__ == "__main__":
    main()
