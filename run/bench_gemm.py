"""Benchmark: how fast one core multiplies the matrices LeNet-300-100's first layer needs.

The masked trainer's time is mostly these products (docs/performance.md, "The masked trainer"), so their rate on this
core is the floor any trainer stands on. XLA's CPU matmul (what the compiled step runs) is timed inside a
compiled loop, each product depending on the last so XLA cannot hoist it; numpy's BLAS is timed alongside
as a second opinion. Shapes: a training batch's forward product (60 x 784 x 300), its weight gradient
(784 x 60 x 300), and a 5000-example validation pass whole and in 500-row slices (what the trainer does).

    .venv/bin/python run/bench_gemm.py [--core N]
"""
from __future__ import annotations

import argparse
import os
import time

SHAPES = [("training batch forward", 60, 784, 300, 400), ("training batch weight gradient", 784, 60, 300, 400),
          ("validation in 500-row slices", 500, 784, 300, 40), ("validation whole", 5000, 784, 300, 4)]


def best_of(f, runs: int = 9) -> float:
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="core to pin to (default: the last)")
    args = ap.parse_args()
    if args.core not in os.sched_getaffinity(0):
        ap.error(f"--core must be one of {sorted(os.sched_getaffinity(0))}")
    os.sched_setaffinity(0, [args.core])  # before numpy loads: BLAS threads inherit the one core
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import numpy as np

    from lthmpi.runtime import configure_tensorflow

    tf = configure_tensorflow(1)
    rng = np.random.default_rng(0)
    print(f"one thread on core {args.core}; GFLOP/s = 2 m k n / best of 9 runs")
    for label, m, k, n, reps in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)

        @tf.function(jit_compile=True)
        def chained(a, b, reps=reps):
            def body(i, a):  # the next product depends on this one: XLA must run every one of them
                return i + 1, a + 1e-30 * tf.matmul(a, b)[:, :1]

            return tf.while_loop(lambda i, a: i < reps, body, (0, a))[1]

        ta, tb = tf.constant(a), tf.constant(b)
        xla = best_of(lambda: chained(ta, tb).numpy()) / reps
        blas = best_of(lambda: a @ b)
        flop = 2 * m * k * n
        print(f"  {label:32s} {m:5d} x {k:3d} x {n:3d}: XLA {xla * 1e6:8.0f} us ({flop / xla / 1e9:3.0f} GFLOP/s)"
              f"   numpy {blas * 1e6:8.0f} us ({flop / blas / 1e9:3.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
