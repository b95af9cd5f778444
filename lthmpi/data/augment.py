"""The standard CIFAR augmentation (random crop from 4-pixel zero padding, random horizontal flip).

Written with TensorFlow's stateless random ops so that it is a pure function of the images and a
seed tensor: it can run inside the trainer's `tf.function(jit_compile=True)` step, and a retraining
can be repeated bit for bit from its seed (the step passes e.g. (run seed, iteration) as the seed, so
no Python value changes between calls and XLA does not recompile).
"""
from __future__ import annotations

import tensorflow as tf


def augment_batch(x, seed, pad: int = 4, flip: bool = True):
    """Randomly crop each image of `x` (B,H,W,C) back to H×W from a `pad`-pixel zero border and flip
    it left-right with probability 1/2. `seed` is a shape-(2,) int32/int64 tensor; the same seed
    gives the same output. Each image gets its own offsets and flip."""
    x = tf.convert_to_tensor(x)
    seed = tf.convert_to_tensor(seed)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    shape = tf.shape(x)
    b, h, w = shape[0], x.shape[1], x.shape[2]
    if pad > 0:
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = tf.random.stateless_uniform(tf.stack([b, 2]), crop_seed, minval=0,
                                              maxval=2 * pad + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(h)[tf.newaxis, :]  # (B, H)
        cols = offsets[:, 1:] + tf.range(w)[tf.newaxis, :]  # (B, W)
        x = tf.gather(padded, rows, axis=1, batch_dims=1)  # (B, H, W + 2 pad, C)
        x = tf.gather(x, cols, axis=2, batch_dims=1)  # (B, H, W, C)
    if flip:
        coin = tf.random.stateless_uniform(tf.stack([b]), flip_seed) < 0.5
        x = tf.where(coin[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(x, axis=[2]), x)
    return x
