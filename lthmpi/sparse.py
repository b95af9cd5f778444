"""Sparse kernels for masked ReLU MLPs: the low end of the pruning grid, where dense products multiply zeros.

Only the kept weights are stored (so pruned ones are exactly zero by construction) and every product
runs over them alone (sparse_mlp.c says how). The C source is compiled once per host and CPU with the
system's C compiler into a cache directory (LTHMPI_CACHE_DIR, else $XDG_CACHE_HOME/lthmpi or
~/.cache/lthmpi), as a JIT would, so that `-march=native` is always right for the node it runs on;
where no compiler works the trainer keeps its dense XLA path and says so once. GCC and clang both build it
(CC picks the compiler); the cache key covers everything that changes the binary (source, compiler and its
version, flags, CPU). At load the C side reports its struct sizes, tile and layer limit, and a library that
disagrees with the ctypes mirrors below is refused rather than trusted. Every call's shapes, row indices and
labels are checked here first; the C side checks them again and returns a distinct code, named in ERRORS.
LTHMPI_SPARSE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer (for the tests; the
process must preload the sanitizer runtime).

Usable without TensorFlow: the network comes in as numpy arrays and goes back out as numpy arrays.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

TILE = 64  # batch columns per tile in sparse_mlp.c
BLOCK = 128  # input rows per block: a tile of them is 32 KiB, one L1 data cache
MAX_LAYERS = 16
SLOTS = ("kernel_m", "kernel_v", "bias_m", "bias_v")  # optimizer slots: Adam's m and v (SGD: m, its momentum)
ABI_VERSION = 2  # sparse_mlp.c's ABI_VERSION
ERRORS = {1: ("EBATCH", "a batch is empty or wider than a tile"), 2: ("ELAYERS", "not 1 to 16 layers"),
          3: ("ENOMEM", "no memory for the activations"), 4: ("ELD", "evaluation columns not padded to whole tiles"),
          5: ("EINDEX", "a row index outside the training set"), 6: ("ELABEL", "a label outside the classes"),
          7: ("ESHAPE", "layer sizes that do not chain")}
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_mlp.c")

_F32 = ctypes.POINTER(ctypes.c_float)
_I32 = ctypes.POINTER(ctypes.c_int32)


class _Layer(ctypes.Structure):
    _fields_ = [("nin", ctypes.c_int64), ("nout", ctypes.c_int64), ("nblocks", ctypes.c_int64),
                ("ptr", _I32), ("rows", _I32), ("w", _F32), ("b", _F32),
                ("mw", _F32), ("vw", _F32), ("mb", _F32), ("vb", _F32), ("gw", _F32), ("gb", _F32),
                ("relu", ctypes.c_int64)]


class _Net(ctypes.Structure):
    _fields_ = [("nlayers", ctypes.c_int64), ("layer", _Layer * MAX_LAYERS)]


class _Opt(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("beta1", ctypes.c_float), ("beta2", ctypes.c_float),
                ("eps", ctypes.c_float), ("momentum", ctypes.c_float), ("weight_decay", ctypes.c_float),
                ("l2", ctypes.c_float), ("iterations", ctypes.c_int64)]


class SparseError(RuntimeError):
    """The C kernels refused a call: the message names the code and what it means."""


log = logging.getLogger("lthmpi")


_library: ctypes.CDLL | None = None
_library_error: str | None = None


def cache_dir() -> str:
    if os.environ.get("LTHMPI_CACHE_DIR"):
        return os.environ["LTHMPI_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lthmpi")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (nodes of a cluster may differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None (see `library_error()`) if they cannot be built."""
    global _library, _library_error
    if _library is not None or _library_error is not None:
        return _library
    try:
        _library = _load(_build())
    except (OSError, RuntimeError) as e:
        _library_error = str(e)
        log.warning("sparse kernels off: %s; masks keeping few weights train on the dense kernels", _library_error)
    return _library


def library_error() -> str | None:
    return _library_error


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.lru_cache(maxsize=8)
def compiler_version(cc: str) -> str:
    """`cc --version`'s first line: a compiler upgrade must not reuse the old binary."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def flag_sets() -> list[list[str]]:
    """The compiler flags to try, best first (-march=native: the host's vector width, where the compiler knows it)."""
    common = ["-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared"]
    if os.environ.get("LTHMPI_SPARSE_SANITIZE") == "1":
        return [["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                 "-fno-sanitize-recover=undefined", *common]]
    return [["-O3", "-march=native", *common], ["-O3", *common]]


def cache_key(source: bytes, cc: str, flags: list[str]) -> str:
    """What changes the binary: source, compiler and its version, flags, machine and CPU."""
    parts = [source, cc.encode(), compiler_version(cc).encode(), " ".join(flags).encode(),
             platform.machine().encode(), _cpu_identity().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build() -> str:
    with open(SOURCE, "rb") as f:
        source = f.read()
    cc = compiler()
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    directory = cache_dir()
    candidates = [(flags, os.path.join(directory, f"sparse_mlp-{cache_key(source, cc, flags)}.so")) for flags in flag_sets()]
    for _, target in candidates:
        if os.path.exists(target):
            return target
    os.makedirs(directory, exist_ok=True)
    errors = []
    for flags, target in candidates:
        fd, tmp = tempfile.mkstemp(prefix=".sparse_mlp-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            out = subprocess.run([cc, *flags, SOURCE, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                os.replace(tmp, target)  # atomic: ranks that compile at once all end with a whole file
                return target
            errors.append(out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"])
        except (OSError, subprocess.SubprocessError) as e:
            errors.append([str(e)])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not compile {os.path.basename(SOURCE)}: {errors[-1][0]}")


def abi_mismatch(reported) -> str | None:
    """What the C side reports (lth_abi) against what this module's ctypes mirrors assume; None if they agree."""
    expected = [ABI_VERSION, TILE, MAX_LAYERS, ctypes.sizeof(_Layer), ctypes.sizeof(_Net), ctypes.sizeof(_Opt),
                _Opt.iterations.offset]
    names = ["ABI version", "TILE", "MAX_LAYERS", "sizeof(Layer)", "sizeof(Net)", "sizeof(Opt)", "offsetof(Opt, iterations)"]
    wrong = [f"{n} {int(r)} (expected {e})" for n, r, e in zip(names, reported, expected) if int(r) != e]
    return ", ".join(wrong) or None


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    if not hasattr(lib, "lth_abi"):
        raise RuntimeError(f"{path} reports no ABI (an older build): delete it to rebuild")
    lib.lth_abi.restype = ctypes.c_int
    lib.lth_abi.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    reported = (ctypes.c_int64 * 7)()
    lib.lth_abi(reported)
    wrong = abi_mismatch(list(reported))
    if wrong:
        raise RuntimeError(f"{path} does not match lthmpi/sparse.py: {wrong}")
    lib.lth_train.restype = ctypes.c_int
    lib.lth_train.argtypes = [ctypes.POINTER(_Net), ctypes.POINTER(_Opt), _F32, _I32, ctypes.c_int64, _I32,
                              ctypes.c_int64, ctypes.c_int64, _F32, ctypes.POINTER(ctypes.c_double)]
    lib.lth_evaluate.restype = ctypes.c_int
    lib.lth_evaluate.argtypes = [ctypes.POINTER(_Net), _F32, ctypes.c_int64, _I32, ctypes.c_int64,
                                 ctypes.POINTER(ctypes.c_double)]
    return lib


def _check(code: int, call: str):
    if code == 0:
        return
    name, what = ERRORS.get(code, ("E?", "an unknown error"))
    if name == "ENOMEM":
        raise MemoryError(f"sparse kernels ({call}): {what}")
    raise SparseError(f"sparse kernels ({call}) refused the call: LTH_{name}, {what}")


def _p(a: np.ndarray, kind):
    return a.ctypes.data_as(kind)


class SparseMLP:
    """A masked Dense/ReLU net held as its kept weights (blocked CSC) with Adam or SGD slots.

    `kernels` and `masks` are (inputs, outputs) arrays per layer, `biases` their biases; every layer
    but the last is followed by a ReLU. Optimizer state goes in and out as a dict of SLOTS, each a list of
    per-layer dense arrays (only their kept entries are used), and "iterations", the step count.
    """

    def __init__(self, kernels, biases, masks, optimizer: str, momentum: float = 0.0, weight_decay: float = 0.0,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-7, l2: float = 0.0):
        """weight_decay: decoupled (Keras: w -= lr * wd * w); l2: coupled (PyTorch: g += l2 * w, before the
        optimizer's slots see the gradient)."""
        lib = library()
        if lib is None:
            raise RuntimeError(f"sparse kernels unavailable: {_library_error}")
        if not 1 <= len(kernels) <= MAX_LAYERS:
            raise ValueError(f"a sparse MLP has 1 to {MAX_LAYERS} layers, got {len(kernels)}")
        for i, (k, b, m) in enumerate(zip(kernels, biases, masks)):
            if np.ndim(k) != 2 or np.shape(m) != np.shape(k) or np.shape(b) != (np.shape(k)[1],):
                raise ValueError(f"sparse layer {i}: kernel {np.shape(k)}, mask {np.shape(m)} and bias {np.shape(b)} "
                                 f"do not fit (kernel (inputs, outputs), mask the same, bias (outputs,))")
            if i and np.shape(k)[0] != np.shape(kernels[i - 1])[1]:
                raise ValueError(f"sparse layer {i} takes {np.shape(k)[0]} inputs, layer {i - 1} gives "
                                 f"{np.shape(kernels[i - 1])[1]}")
        self.lib = lib
        self.layers = []
        for kernel, mask in zip(kernels, masks):
            nin, nout = kernel.shape
            keep = np.asarray(mask) != 0
            nblocks = -(-nin // BLOCK)
            # Blocked CSC order: by input block, then output unit, then input row.
            r, c = np.nonzero(keep)
            order = np.lexsort((r, c, r // BLOCK))
            rows, cols = r[order].astype(np.int32), c[order]
            counts = np.bincount((rows // BLOCK).astype(np.int64) * nout + cols, minlength=nblocks * nout)
            ptr = np.zeros(nblocks * nout + 1, np.int32)
            np.cumsum(counts, out=ptr[1:])
            self.layers.append(dict(nin=nin, nout=nout, nblocks=nblocks, rows=rows, cols=cols.astype(np.int32),
                                    ptr=ptr, shape=(nin, nout)))
        self._opt = _Opt(kind=0 if optimizer in ("adam", "adamw") else 1, beta1=beta1, beta2=beta2, eps=eps,
                         momentum=momentum, weight_decay=weight_decay, l2=l2, iterations=0)
        self.set_weights(kernels, biases)
        self.reset_slots()

    # -- state -----------------------------------------------------------------------------------
    def _bind(self):
        net = _Net(nlayers=len(self.layers))
        for i, ly in enumerate(self.layers):
            net.layer[i] = _Layer(nin=ly["nin"], nout=ly["nout"], nblocks=ly["nblocks"],
                                  ptr=_p(ly["ptr"], _I32), rows=_p(ly["rows"], _I32), w=_p(ly["w"], _F32),
                                  b=_p(ly["b"], _F32), mw=_p(ly["kernel_m"], _F32), vw=_p(ly["kernel_v"], _F32),
                                  mb=_p(ly["bias_m"], _F32), vb=_p(ly["bias_v"], _F32), gw=_p(ly["gw"], _F32),
                                  gb=_p(ly["gb"], _F32), relu=int(i < len(self.layers) - 1))
        self._net = net

    def set_weights(self, kernels, biases):
        for ly, k, b in zip(self.layers, kernels, biases):
            ly["w"] = np.ascontiguousarray(np.asarray(k, np.float32)[ly["rows"], ly["cols"]])
            ly["b"] = np.array(b, np.float32)
            ly["gw"], ly["gb"] = np.zeros_like(ly["w"]), np.zeros_like(ly["b"])
        if all("kernel_m" in ly for ly in self.layers):
            self._bind()

    def reset_slots(self, slots: dict | None = None):
        """Zero optimizer state (a fresh optimizer), or the kept entries of a saved one."""
        for i, ly in enumerate(self.layers):
            for key in SLOTS:
                kernel = key.startswith("kernel")
                given = slots.get(key) if slots is not None else None
                if given is not None and given[i] is not None:
                    src = np.asarray(given[i], np.float32)
                    ly[key] = np.ascontiguousarray(src[ly["rows"], ly["cols"]] if kernel else src)
                else:
                    ly[key] = np.zeros_like(ly["w"] if kernel else ly["b"])
        self._opt.iterations = int(slots.get("iterations", 0)) if slots is not None else 0
        self._bind()

    def kernels(self) -> list[np.ndarray]:
        """Dense kernels, zero where pruned."""
        out = []
        for ly in self.layers:
            k = np.zeros(ly["shape"], np.float32)
            k[ly["rows"], ly["cols"]] = ly["w"]
            out.append(k)
        return out

    def biases(self) -> list[np.ndarray]:
        return [ly["b"].copy() for ly in self.layers]

    def slots(self, like: dict | None = None) -> dict:
        """The optimizer state as dense arrays: the kept entries written into `like`'s (or zeros)."""
        out = {"iterations": self._opt.iterations}
        for key in SLOTS:
            arrs = []
            for i, ly in enumerate(self.layers):
                if key.startswith("kernel"):
                    base = like[key][i] if like is not None and like.get(key) is not None else None
                    a = np.array(base, np.float32) if base is not None else np.zeros(ly["shape"], np.float32)
                    a[ly["rows"], ly["cols"]] = ly[key]
                else:
                    a = ly[key].copy()
                arrs.append(a)
            out[key] = arrs
        return out

    def snapshot(self) -> list:
        return [(ly["w"].copy(), ly["b"].copy()) for ly in self.layers]

    def restore(self, snap: list):
        for ly, (w, b) in zip(self.layers, snap):
            ly["w"][:], ly["b"][:] = w, b

    # -- compute ---------------------------------------------------------------------------------
    def train(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray, lr: np.ndarray) -> float:
        """Steps over the batches idx (steps, batch) of x (examples, features) at learning rates lr (steps,):
        the sum of the steps' mean losses."""
        _check_arrays(x, y)
        if idx.ndim != 2 or lr.shape != (idx.shape[0],):
            raise ValueError(f"sparse kernels take a (steps, batch) index block and one rate per step, got "
                             f"{idx.shape} and {lr.shape}")
        n, batch = idx.shape
        if not 1 <= batch <= TILE:
            raise ValueError(f"sparse kernels take batches of 1 to {TILE}, got {batch}")
        self._check_inputs(x.shape[1] if x.ndim == 2 else -1, len(y), "training set")
        if x.shape[0] != len(y):
            raise ValueError(f"sparse kernels: {x.shape[0]} training rows but {len(y)} labels")
        if idx.size and (idx.min() < 0 or idx.max() >= len(y)):
            raise ValueError(f"sparse kernels: row indices {idx.min()}..{idx.max()} outside the {len(y)} training rows")
        self._check_labels(y[idx.ravel()] if idx.size else y[:0])
        idx = np.ascontiguousarray(idx, np.int32)
        lr = np.ascontiguousarray(lr, np.float32)
        loss = ctypes.c_double()
        _check(self.lib.lth_train(ctypes.byref(self._net), ctypes.byref(self._opt), _p(x, _F32), _p(y, _I32),
                                  len(y), _p(idx, _I32), n, batch, _p(lr, _F32), ctypes.byref(loss)), "train")
        return loss.value

    def evaluate(self, xt: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(sum of losses, number correct) over the len(y) examples of xt, made by feature_major()."""
        _check_arrays(xt, y)
        if xt.ndim != 2 or xt.shape[1] % TILE or xt.shape[1] < len(y):
            raise ValueError(f"sparse kernels evaluate (features, columns) made by feature_major(): columns a "
                             f"multiple of {TILE} and at least the {len(y)} labels, got {xt.shape}")
        self._check_inputs(xt.shape[0], len(y), "evaluation split")
        self._check_labels(y)
        out = (ctypes.c_double * 2)()
        _check(self.lib.lth_evaluate(ctypes.byref(self._net), _p(xt, _F32), xt.shape[1], _p(y, _I32), len(y), out),
               "evaluate")
        return out[0], out[1]

    def _check_inputs(self, features: int, n: int, what: str):
        if features != self.layers[0]["nin"]:
            raise ValueError(f"sparse kernels: the {what} has {features} features per example, the first layer "
                             f"takes {self.layers[0]['nin']}")

    def _check_labels(self, y: np.ndarray):
        classes = self.layers[-1]["nout"]
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"sparse kernels: labels {y.min()}..{y.max()} outside the {classes} classes")


def _check_arrays(x: np.ndarray, y: np.ndarray):
    """The C side reads raw memory: anything but C-ordered float32 features and int32 labels would be garbage."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or y.dtype != np.int32 or not y.flags.c_contiguous:
        raise TypeError("sparse kernels need C-contiguous float32 features and int32 labels (see flat())")


def feature_major(x: np.ndarray) -> np.ndarray:
    """Examples (rows of features) as evaluate() reads them: transposed, padded to whole tiles of columns."""
    n = x.shape[0]
    xt = np.zeros((x.shape[1], -(-n // TILE) * TILE), np.float32)
    xt[:, :n] = x.T
    return xt


def flat(x: np.ndarray) -> np.ndarray:
    """Examples as rows of float32 features, as Keras' Flatten sees them (C order), without a copy if possible."""
    return np.ascontiguousarray(x.reshape(x.shape[0], -1), np.float32)


if __name__ == "__main__":  # `python -m lthmpi.sparse`: build the kernels now and say where they are
    lib = library()
    print(lib._name if lib is not None else f"sparse kernels unavailable: {_library_error}",
          file=sys.stderr if lib is None else sys.stdout)
    sys.exit(0 if lib is not None else 1)
