"""Process-wide TensorFlow settings, applied once before TF creates its thread pools.

Threads are fixed per process because TF's results are bitwise reproducible only for a fixed intra-op
thread count; p ranks on c cores each get c // p threads so that they do not oversubscribe the host.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
import tempfile

_configured: dict = {}

# What TensorFlow's C++ side prints on stderr while it loads. TF >= 2.16 logs some of it through absl
# before TF_CPP_MIN_LOG_LEVEL is read (the oneDNN notice, on by default on Intel CPUs with AVX-512), so
# on those machines every one-line error would come out five lines long.
_START_UP_NOTICES = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                     "cpu_feature_guard.cc", "To enable the following instructions:")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def auto_threads(ranks_on_host: int = 1, requested: int = 0) -> int:
    if requested > 0:
        return requested
    return max(1, available_cores() // max(1, ranks_on_host))


class _HideOptionalImports(importlib.abc.MetaPathFinder):
    """Keras (and TF's legacy Keras) import scikit-learn, SciPy and matplotlib.pyplot whenever they are
    installed, for sklearn wrappers, sparse inputs and image galleries that lthmpi never uses: about 1 s
    of every rank's start-up on a 2-core box. Both take an ImportError for 'not installed'. The modules
    are hidden only while TF and Keras load; afterwards they import as usual (digits uses scikit-learn,
    plots matplotlib)."""

    HIDDEN = ("sklearn", "scipy", "matplotlib")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.HIDDEN:
            raise ModuleNotFoundError(f"{name} is hidden while Keras loads", name=name)
        return None


def _load_tensorflow():
    hide = _HideOptionalImports()
    sys.meta_path.insert(0, hide)
    try:
        import keras  # noqa: F401
        import tensorflow as tf
    finally:
        sys.meta_path.remove(hide)
    return tf


def import_tensorflow():
    """Import TensorFlow and Keras with TF's start-up notices kept off stderr; anything else it prints stays."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # TF_CPP_MIN_LOG_LEVEL: lthmpi/__init__.py
    try:
        buf = tempfile.TemporaryFile()
    except OSError:  # no temporary directory: import as it comes
        return _load_tensorflow()
    with buf:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to keep clean
            return _load_tensorflow()
        _flush_stderr()
        os.dup2(buf.fileno(), 2)
        try:
            return _load_tensorflow()
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            kept = "".join(ln for ln in buf.read().decode(errors="replace").splitlines(keepends=True)
                           if not any(n in ln for n in _START_UP_NOTICES))
            if kept and sys.stderr:
                sys.stderr.write(kept)
                _flush_stderr()


def _flush_stderr():
    if sys.stderr:
        sys.stderr.flush()


def configure_tensorflow(threads: int, deterministic: bool = True):
    """Import TF with `threads` intra-op threads and op determinism; later calls must agree."""
    if _configured:
        if _configured["threads"] != threads:
            raise RuntimeError(f"TensorFlow already configured with {_configured['threads']} threads, not {threads}")
        return _configured["tf"]
    tf = import_tensorflow()
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
