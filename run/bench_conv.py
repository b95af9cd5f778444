"""Benchmark: a masked conv-net step against plain Keras, compiled (XLA) and not, on one core, paired.

Per conv model (Conv-2 at batch 60, ResNet-20 at batch 128, CIFAR-10 shapes, random data), these forms of one
training step (SGD with momentum 0.9, sparse softmax cross-entropy on logits):
  fit-xla      Keras' compiled train step (what `fit` runs), jit_compile=True
  fit          the same, jit_compile=False: TensorFlow's graph executor on its oneDNN kernels
  fit-keras-bn the same on the model as a Keras user builds it, with Keras' own BatchNormalization (lthmpi's
               models use models.FusedBatchNorm, TensorFlow's fused kernel, instead); nets with batch norm only
  masked-xla   lthmpi's masked step compiled by XLA, one step per call (parallel.conv_step = "xla"; the
               trainer before issue 22)
  masked       lthmpi's masked step in the oneDNN graph form (parallel.conv_step = "graph"; the only form from
               issue 22 to 33): the step on oneDNN, its optimizer update and re-mask compiled by XLA
The trainer runs the faster of the last two on the host (parallel.conv_step = "auto" times a few steps of
each at start-up: lthmpi/training/step_form.py); the last line per model says which this run found faster.
The target holds the masked step to the fastest plain-Keras form: Keras' step on the net built from Keras'
own layers (for ResNet-20, `fit-keras-bn`); the masked step against Keras' step on lthmpi's model is printed
too. Keras' step is called per batch (`train_on_batch`, the train function `fit` compiles), so that `fit`'s per-call
set-up is not counted against it. The masked forms train 20% of the weights with the backend the trainer picks,
called as the fit loop calls it for a block of steps (`backend.train(t, n, rates)`: the batch order, the
learning rates, the steps); the fit loop's evaluations are timed by run/bench_trainer.py, not here. The pruned
weights are checked to be exactly zero afterwards. All forms run in one process on one core with lthmpi's runtime
(1 thread, op determinism on, as lthmpi trains), interleaved:
every round times --steps steps of each form in turn, so the forms share the box's load (it is shared, and
its speed drifts by up to 2x between minutes); medians over rounds. The FLOP bound is the step's
multiply-adds (x2 for FLOPs, x3 for forward + both gradients) at the core's best rate for one 1024^3 matmul
(oneDNN), measured in the rounds too. Under op determinism Keras turns jit_compile=True off ("Model doesn't
support jit_compile=True"): its two forms are then one and the same step, so it is timed once (timing it twice
and taking the faster median would hold the masked step to the luckier of two samples of one thing); with
determinism off, `fit` with XLA is ~2x slower than without on these nets (DESIGN.md §6; docs/gpu.md has a run
of both). The verdict compares medians and also prints the per-round ratios and a sign test (how often the
masked step was the faster in a round; two-sided p if neither were faster).

    .venv/bin/python run/bench_conv.py [--rounds 8] [--steps 3] [--models conv2,resnet20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

from paired import ratio_summary  # run/, this script's directory

FORMS = {"fit-xla": "keras train step, jit_compile=True", "fit": "keras train step, no XLA (oneDNN)",
         "fit-keras-bn": "  the same, Keras' BatchNormalization",
         "masked-xla": "lthmpi masked, XLA, 1 step/call", "masked": "lthmpi masked, oneDNN graph form"}
BATCH = {"conv2": 60, "resnet20": 128}
SHAPE, CLASSES = (32, 32, 3), 10


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="rounds, each timing every form in turn (default 8)")
    ap.add_argument("--steps", type=int, default=3, help="steps of each form per round (default 3)")
    ap.add_argument("--models", default="conv2,resnet20", help="comma-separated: conv2, resnet20")
    ap.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="core to pin to (default: the last)")
    args = ap.parse_args()
    if args.core not in os.sched_getaffinity(0):
        ap.error(f"--core must be one of {sorted(os.sched_getaffinity(0))}")
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in BATCH for m in models):
        ap.error(f"--models must name some of {', '.join(BATCH)}")
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    os.sched_setaffinity(0, [args.core])
    from lthmpi.runtime import configure_tensorflow

    tf = configure_tensorflow(1)
    from lthmpi.models import FusedBatchNorm
    print(f"one core (core {args.core}) of a shared box, 1 TF thread, op determinism on; {args.rounds} rounds x "
          f"{args.steps} steps of each form, interleaved; ms per training step", flush=True)
    gemm = gemm_timer(tf)
    for m in models:
        steppers = {f: make_stepper(f, m, args.steps * (args.rounds + 1)) for f in FORMS}
        if not steppers["fit-xla"].model.jit_compile:  # Keras turned XLA off: the same step as "fit"
            print(f"\n{m}: Keras turned jit_compile=True off (op determinism), so its compiled form is its "
                  f"uncompiled one, timed once", flush=True)
            del steppers["fit-xla"]
        if not any(isinstance(ly, FusedBatchNorm) for ly in steppers["fit"].model.layers):
            del steppers["fit-keras-bn"]  # no batch norm: the same model as "fit"
        flop = step_flop(steppers["fit"].model, BATCH[m])
        times = {f: [] for f in steppers}
        rates = []
        for _ in range(args.rounds):
            rates.append(gemm())
            for f, step in steppers.items():
                times[f].append(step(args.steps) / args.steps * 1e3)
        for f, step in steppers.items():
            step.check()
        rate = max(rates)
        med = {f: statistics.median(v) for f, v in times.items()}
        bound = flop / rate / 1e9 * 1e3
        print(f"\n{m}, batch {BATCH[m]}: {flop / 1e9:.1f} GFLOP a step; core's best matmul rate {rate:.0f} GFLOP/s "
              f"(rounds {', '.join(f'{r:.0f}' for r in rates)}); FLOP bound {bound:.0f} ms")
        for f in steppers:
            print(f"  {FORMS[f]:38s} {med[f]:7.1f} ms  {med[f] / bound:5.2f} x bound  (rounds "
                  f"{', '.join(f'{x:.0f}' for x in times[f])})", flush=True)
        # The plain-Keras forms: Keras' step on the net as a Keras user builds it (Keras' own layers).
        plain = [f for f in ("fit-xla", "fit-keras-bn") if f in steppers] if "fit-keras-bn" in steppers else \
            [f for f in ("fit-xla", "fit") if f in steppers]
        best_fit = min(plain, key=lambda f: med[f])
        ratio = med["masked"] / med[best_fit]
        print(f"  target: masked <= the fastest plain Keras form ({FORMS[best_fit].strip()}): {ratio:.3f} x its median; "
              f"per round: {ratio_summary(times['masked'], times[best_fit], 'masked')}: "
              f"{'met' if ratio <= 1.0 else 'NOT met'}")
        if best_fit != "fit":  # and against Keras' step on lthmpi's own layers (FusedBatchNorm)
            print(f"  against Keras' step on lthmpi's model ({FORMS['fit']}): {med['masked'] / med['fit']:.3f} x its "
                  f"median; per round: {ratio_summary(times['masked'], times['fit'], 'masked')}")
        quicker = "xla" if med["masked-xla"] < med["masked"] else "graph"
        print(f"  conv_step: the faster form here is {quicker} (XLA / oneDNN graph: "
              f"{med['masked-xla'] / med['masked']:.3f} x its median; per round: "
              f"{ratio_summary(times['masked-xla'], times['masked'], 'xla')})")


def gemm_timer(tf):
    a = tf.random.stateless_normal((1024, 1024), seed=[0, 1])
    f = tf.function(lambda a: tf.matmul(a, a))
    f(a).numpy()

    def rate() -> float:
        return 2 * 1024 ** 3 / min(_timed(lambda: f(a).numpy()) for _ in range(5)) / 1e9

    return rate


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_stepper(form: str, name: str, total_steps: int):
    """A callable: run n steps of `form`, return the seconds they took; .check() after the last; .model."""
    from lthmpi.models import build_model

    batch = BATCH[name]
    data = fake_data(total_steps, batch)
    if form == "fit-keras-bn":
        return keras_stepper(keras_batch_norm(build_model(name, SHAPE, CLASSES, 0)), data, batch, xla=False)
    model = build_model(name, SHAPE, CLASSES, 0)
    if form.startswith("fit"):
        return keras_stepper(model, data, batch, xla=form == "fit-xla")
    return masked_stepper(model, data, batch, total_steps, xla=form == "masked-xla")


def keras_batch_norm(model):
    """The same net with Keras' own BatchNormalization layers where lthmpi's has FusedBatchNorm (same weights)."""
    import keras

    from lthmpi.models import FusedBatchNorm

    def swap(layer):
        if isinstance(layer, FusedBatchNorm):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=swap)
    clone.set_weights(model.get_weights())
    return clone


def fake_data(steps: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    n = batch * (steps + 3)

    def split(k):
        return rng.random((k, *SHAPE), dtype=np.float32), rng.integers(0, CLASSES, k).astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = split(n), split(8), split(8)
    return SimpleNamespace(x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys,
                           input_shape=SHAPE, num_classes=CLASSES)


def step_flop(model, batch: int) -> float:
    """FLOPs of one training step: 2 per multiply-add, x3 for forward, input gradient and weight gradient."""
    import keras

    macs = 0
    for ly in model.layers:
        if isinstance(ly, keras.layers.Conv2D):
            _, h, w, c = ly.output.shape
            macs += h * w * c * ly.kernel.shape[0] * ly.kernel.shape[1] * ly.kernel.shape[2]
        elif isinstance(ly, keras.layers.Dense):
            macs += ly.kernel.shape[0] * ly.kernel.shape[1]
    return 2.0 * 3 * macs * batch


def keras_stepper(model, data, batch: int, xla: bool):
    import keras

    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=xla)
    batches = [(data.x_train[i:i + batch], data.y_train[i:i + batch]) for i in range(0, len(data.x_train) - batch + 1, batch)]
    model.train_on_batch(*batches[0])  # trace and compile
    state = {"i": 1}

    def step(n: int) -> float:
        def run():
            for _ in range(n):
                model.train_on_batch(*batches[state["i"] % len(batches)])
                state["i"] += 1
        return _timed(run)

    step.model, step.check = model, lambda: None
    return step


def masked_stepper(model, data, batch: int, total_steps: int, xla: bool):
    import numpy as np

    from lthmpi.models import prunable_variables
    from lthmpi.pruning import magnitude_masks
    from lthmpi.training import MaskedTrainer

    cfg = SimpleNamespace(batch_size=batch, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0,
                          weight_decay_mode="decoupled", lr_milestones=[], lr_gamma=0.1,
                          eval_every=f"{total_steps + 10}it", precision="float32")
    prunable = prunable_variables(model)
    tr = MaskedTrainer(model, data, cfg, 0, prunable, conv_step="xla" if xla else "graph")  # the two forms of auto
    if tr.fused or tr.conv_step != ("xla" if xla else "graph"):
        raise AssertionError("the trainer no longer runs conv nets one step per call in two forms: update this benchmark")
    tr.set_masks(magnitude_masks({v.path: v.numpy() for v in prunable}, 0.2))
    tr.fit(0, 1)  # trace and compile
    backend = tr.backend()  # what MaskedTrainer.fit trains on, called as lthmpi/training/loop.py calls it
    state = {"t": 1}

    def step(n: int) -> float:
        t0 = state["t"]
        state["t"] += n
        return _timed(lambda: backend.train(t0, n, tr.schedule.rates(t0, n)))

    def check():
        for v, m in tr._masked:
            if np.any(v.numpy()[m.numpy() == 0] != 0):
                raise AssertionError(f"pruned weights of {v.path} are not exactly zero")

    step.model, step.check = model, check
    return step


if __name__ == "__main__":
    main()
