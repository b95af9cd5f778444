"""Benchmark: would a sparse first layer beat the dense GEMM on this CPU? (Not at the grid's densities.)

LeNet-300-100's first layer (784 x 300) at several fractions of weights left, for a training batch (60)
and a validation pass (5000): the dense XLA matmul of the masked kernel (what the trainer does), an XLA
gather/segment-sum over the surviving weights, and TF's `tf.sparse.sparse_dense_matmul`. Milliseconds
per product, one thread; the largest difference from the dense product is printed as a check.

    .venv/bin/python run/bench_sparse_layer.py
"""
from __future__ import annotations

import time

import numpy as np


def per_call_ms(f, *args, reps: int) -> float:
    f(*args)  # trace and compile
    t = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    out.numpy()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    from lthmpi.runtime import configure_tensorflow

    tf = configure_tensorflow(1)
    rng = np.random.default_rng(0)
    n_in, n_out = 784, 300
    kernel = rng.standard_normal((n_in, n_out)).astype(np.float32)
    dense = tf.function(lambda x, w: tf.matmul(x, w), jit_compile=True)
    print(f"first layer {n_in} x {n_out}, one thread: ms per product")
    for left in (0.2, 0.05, 0.023, 0.01):
        mask = rng.random((n_in, n_out)) < left
        masked = tf.constant(kernel * mask)
        out_idx, in_idx = np.nonzero(mask.T)  # sorted by output unit, as segment sums need
        values = tf.constant(kernel.T[mask.T])
        sparse_t = tf.sparse.SparseTensor(np.stack([out_idx, in_idx], 1).astype(np.int64), values, (n_out, n_in))
        rows, segments = tf.constant(in_idx.astype(np.int32)), tf.constant(out_idx.astype(np.int32))

        @tf.function(jit_compile=True)
        def gather_segment_sum(x, values):
            picked = tf.gather(tf.transpose(x), rows) * values[:, None]  # (nnz, batch)
            return tf.transpose(tf.math.unsorted_segment_sum(picked, segments, n_out))

        @tf.function
        def tf_sparse(x):
            return tf.transpose(tf.sparse.sparse_dense_matmul(sparse_t, x, adjoint_b=True))

        for batch in (60, 5000):
            x = tf.constant(rng.random((batch, n_in)).astype(np.float32))
            reps = 200 if batch < 1000 else 20
            d = per_call_ms(dense, x, masked, reps=reps)
            g = per_call_ms(gather_segment_sum, x, values, reps=reps)
            s = per_call_ms(tf_sparse, x, reps=reps)
            err = max(float(tf.reduce_max(tf.abs(f - dense(x, masked))))
                      for f in (gather_segment_sum(x, values), tf_sparse(x)))
            print(f"  {left:6.1%} left, batch {batch:5d}: dense {d:8.3f}   gather/segment-sum {g:8.3f}   "
                  f"tf.sparse {s:8.3f}   (max difference {err:.1e})")


if __name__ == "__main__":
    main()
