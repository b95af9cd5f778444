"""Process-wide TensorFlow settings, applied once before TF creates its thread pools.

Threads are fixed per process because TF's results are bitwise reproducible only for a fixed intra-op
thread count; p ranks on c cores each get c // p threads so that they do not oversubscribe the host.
"""
from __future__ import annotations

import importlib.abc
import os
import subprocess
import sys

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
    except ModuleNotFoundError as e:
        if e.name not in ("tensorflow", "keras"):
            raise
        from .config import ConfigError

        raise ConfigError(f"{e.name} is not installed: run ./run/setup.sh (LTHMPI_DEVICE=gpu for the CUDA build), "
                          f"or pip install 'lthmpi[cpu]' (or 'lthmpi[gpu]')") from None
    finally:
        sys.meta_path.remove(hide)
    return tf


# The filter between TensorFlow's stderr and the user's, run as its own process so that what TF prints just
# before it dies (SIGILL on a CPU without the instructions it was built for, an abort) still gets through: the
# filter reads to the end of the pipe, which comes when the importing process is gone.
_FILTER = r"""
import sys
notices = tuple(sys.argv[1:])
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(n.encode() in line for n in notices):
        out.write(line)
        out.flush()
"""


def import_tensorflow():
    """Import TensorFlow and Keras with TF's start-up notices kept off stderr; anything else it prints stays,
    written as it comes, so that a fatal message reaches the user even if TensorFlow kills the process."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # TF_CPP_MIN_LOG_LEVEL: lthmpi/__init__.py
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to keep clean
        return _load_tensorflow()
    try:
        filt = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, *_START_UP_NOTICES], stdin=subprocess.PIPE,
                                stdout=saved, close_fds=True)
    except OSError:  # cannot start the filter: import as it comes
        os.close(saved)
        return _load_tensorflow()
    _flush_stderr()
    os.dup2(filt.stdin.fileno(), 2)
    try:
        return _load_tensorflow()
    finally:
        _flush_stderr()
        os.dup2(saved, 2)
        os.close(saved)
        filt.stdin.close()
        filt.wait()


def _flush_stderr():
    if sys.stderr:
        sys.stderr.flush()


def configure_tensorflow(threads: int, deterministic: bool = True, device: str = "auto", slot=None):
    """Import TF with `threads` intra-op threads, op determinism, and this rank's device (lthmpi/devices.py:
    `device` is parallel.device, `slot` the rank's NodeSlot); later calls must agree on the threads.

    On a GPU only the rank's own GPU is made visible, and where several ranks share it each gets its share
    of the memory; with device "cpu" any GPU is hidden. This must come before TF initialises its devices."""
    from .devices import NodeSlot, place

    if _configured:
        if _configured["threads"] != threads:
            raise RuntimeError(f"TensorFlow already configured with {_configured['threads']} threads, not {threads}")
        tf = _configured["tf"]
        if device != "auto" and _configured["placement"].kind != device:  # e.g. "gpu" in a CPU-configured process
            place(device, slot or NodeSlot(), len(tf.config.list_physical_devices("GPU")), host=_host(),
                  built_with_cuda=tf.test.is_built_with_cuda())
        return tf
    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    slot = slot or NodeSlot()
    total = gpu_total_mb() if gpus and device != "cpu" and slot.local_size > 1 else None
    placement = place(device, slot, len(gpus), total, host=_host(), built_with_cuda=tf.test.is_built_with_cuda())
    _apply_placement(tf, gpus, placement)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        tf.random.set_seed(0)  # determinism refuses unseeded random ops; ours all take explicit seeds
    tf.get_logger().setLevel("ERROR")
    _configured.update(threads=threads, tf=tf, placement=placement, deterministic=deterministic)
    return tf


def _apply_placement(tf, gpus, placement):
    if placement.kind == "cpu":
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return
    gpu = gpus[placement.gpu]
    tf.config.set_visible_devices([gpu], "GPU")
    if placement.memory_limit_mb is not None:
        tf.config.set_logical_device_configuration(
            gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=placement.memory_limit_mb)])
    elif placement.sharing > 1:  # the GPU's size is unknown: each rank takes memory as it needs it
        tf.config.experimental.set_memory_growth(gpu, True)


def gpu_total_mb() -> int | None:
    """The smallest total memory (MiB) of this node's GPUs, from nvidia-smi; None where it cannot say."""
    import subprocess

    from .devices import parse_gpu_memory

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = parse_gpu_memory(out)
    return min(sizes) if sizes else None


def _host() -> str:
    import socket

    return socket.gethostname()


def configured_threads() -> int | None:
    return _configured.get("threads")


def configured_placement():
    """The Placement this process trains on (lthmpi/devices.py); None before configure_tensorflow."""
    return _configured.get("placement")


def configured_deterministic() -> bool | None:
    return _configured.get("deterministic")
