"""Process-wide TensorFlow settings, applied once before TF creates its thread pools.

Threads are fixed per process because TF's results are bitwise reproducible only for a fixed intra-op
thread count; p ranks on c cores each get c // p threads so that they do not oversubscribe the host.
"""
from __future__ import annotations

import os

_configured: dict = {}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def auto_threads(ranks_on_host: int = 1, requested: int = 0) -> int:
    if requested > 0:
        return requested
    return max(1, available_cores() // max(1, ranks_on_host))


def configure_tensorflow(threads: int, deterministic: bool = True):
    """Import TF with `threads` intra-op threads and op determinism; later calls must agree."""
    if _configured:
        if _configured["threads"] != threads:
            raise RuntimeError(f"TensorFlow already configured with {_configured['threads']} threads, not {threads}")
        return _configured["tf"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        tf.random.set_seed(0)  # determinism refuses unseeded random ops; ours all take explicit seeds
    tf.get_logger().setLevel("ERROR")
    _configured.update(threads=threads, tf=tf)
    return tf


def configured_threads() -> int | None:
    return _configured.get("threads")
