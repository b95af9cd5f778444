"""Exercise the sparse kernels without TensorFlow, for builds by other compilers and under sanitizers.

    python tests/sparse_check.py OUT.npz

Builds the kernels as the environment says (CC, LTHMPI_CACHE_DIR, LTHMPI_SPARSE_SANITIZE), trains a small
masked MLP with Adam, SGD with momentum and SGD with coupled L2, evaluates it, and writes the weights and
sums to OUT.npz for test_sparse.py to compare between builds; then makes every call the Python boundary
must refuse, and calls the C side directly with each bad input it must refuse by its own code. Exit 0 only
if all of that held; a sanitizer finding aborts the process.
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np

from lthmpi import sparse


def net(optimizer, **hyper):
    rng = np.random.default_rng(0)
    sizes = [70, 40, 30, 10]  # 70 inputs: one whole row block of 128 is not filled, as in real nets
    kernels = [rng.standard_normal((a, b)).astype(np.float32) * 0.3 for a, b in zip(sizes, sizes[1:])]
    biases = [rng.standard_normal(b).astype(np.float32) * 0.1 for b in sizes[1:]]
    masks = [rng.random(k.shape) < 0.3 for k in kernels]
    return sparse.SparseMLP(kernels, biases, masks, optimizer, **hyper)


def main(out: str) -> int:
    if sparse.library() is None:
        print(f"sparse kernels unavailable: {sparse.library_error()}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 70)).astype(np.float32)
    y = rng.integers(0, 10, 300).astype(np.int32)
    idx = rng.integers(0, 300, (20, 7)).astype(np.int32)  # batches of 7: a tile padded with zero columns
    lr = np.full(20, 0.01, np.float32)
    xt = sparse.feature_major(x)
    results = {}
    for name, opt, hyper in (("adam", "adam", {}), ("sgd", "sgd", {"momentum": 0.9, "weight_decay": 0.01}),
                             ("sgd_l2", "sgd", {"momentum": 0.9, "l2": 0.01})):
        m = net(opt, **hyper)
        results[f"{name}_loss"] = np.float64(m.train(x, y, idx, lr))
        results[f"{name}_eval"] = np.asarray(m.evaluate(xt, y))
        for i, k in enumerate(m.kernels()):
            results[f"{name}_kernel{i}"] = k
    np.savez(out, **results)

    m = net("adam")
    bad = {"row index": (x, y, np.full((2, 7), 300, np.int32), lr[:2]),
           "label": (x, np.full(300, 10, np.int32), idx[:2], lr[:2]),
           "features": (np.ascontiguousarray(x[:, :60]), y, idx[:2], lr[:2]),
           "batch": (x, y, np.zeros((2, 65), np.int32), lr[:2]),
           "rates": (x, y, idx[:2], lr[:3])}
    for what, args in bad.items():
        try:
            m.train(*args)
        except ValueError as e:
            print(f"refused ({what}): {e}")
        else:
            raise AssertionError(f"a bad {what} was not refused")
    # The C side's own checks, reached past the Python ones: each a distinct code.
    lib, F32, I32 = m.lib, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
    loss = ctypes.c_double()

    def c_train(xs, ys, rows, batch):
        rows = np.ascontiguousarray(rows, np.int32)
        return lib.lth_train(ctypes.byref(m._net), ctypes.byref(m._opt), xs.ctypes.data_as(F32), ys.ctypes.data_as(I32),
                             len(ys), rows.ctypes.data_as(I32), rows.size // batch, batch,
                             lr.ctypes.data_as(F32), ctypes.byref(loss))

    codes = {"EINDEX": c_train(x, y, np.array([0, 300]), 2), "ELABEL": c_train(x, np.full(300, 10, np.int32), idx[:1], 7),
             "EBATCH": c_train(x, y, np.zeros(65), 65)}
    out2 = (ctypes.c_double * 2)()
    codes["ELD"] = lib.lth_evaluate(ctypes.byref(m._net), xt.ctypes.data_as(F32), 100, y.ctypes.data_as(I32), 300, out2)
    names = {name: code for code, (name, _) in sparse.ERRORS.items()}
    for name, got in codes.items():
        assert got == names[name], f"C returned {got} for {name}, expected {names[name]}"
        print(f"C refused with LTH_{name} ({got})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
