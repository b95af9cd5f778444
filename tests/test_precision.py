"""Mixed precision (train.precision) on CPU: the layers compute in bfloat16 or float16 while weights, optimizer
slots, masks, checkpoints and resets stay float32; pruned weights are exactly zero after every step in every
precision; float16 trains with a loss scale; a bfloat16 experiment runs end to end on digits."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def trainer(precision: str, model_name: str = "lenet300_100", **train):
    from lthmpi.config import from_dict
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    cfg = from_dict({"data": {"dataset": "digits", "validation": 200},
                     "train": {"batch_size": 32, "eval_every": "3it", "precision": precision, **train}})
    data = load_dataset(cfg.data, 0)
    model = build_model(model_name, data.input_shape, data.num_classes, 0, precision)
    return MaskedTrainer(model, data, cfg.train, 0, prunable_variables(model), sparse_below=1.0)


def masks_of(tr, remaining=0.2):
    from lthmpi.pruning import magnitude_masks

    w = tr.get_weights()
    return magnitude_masks({p: w[p] for p in tr.prunable_paths}, remaining)


def assert_float32_state(tr):
    assert all(v.dtype == "float32" for v in tr.get_weights().values())
    state = tr.get_optimizer_state()
    assert all(np.asarray(v).dtype in (np.float32, np.int64) for v in state.values()), \
        {k: np.asarray(v).dtype for k, v in state.items()}
    assert all(m.dtype == "float32" for _, m in tr._masked)


@pytest.mark.parametrize("precision, model_name", [(p, "lenet300_100") for p in PRECISIONS] +
                         [("mixed_bfloat16", "conv2")])
def test_pruned_weights_stay_exactly_zero_after_every_step(tf_runtime, precision, model_name):
    """SGD with momentum and weight decay: both would revive a pruned weight unless it is re-masked in the step."""
    tr = trainer(precision, model_name, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)
    low = tr.model.layers[-1].compute_dtype
    assert low == {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[precision]
    assert tr.kernels == "dense" and (tr.sparse_below == 0.0) == (precision != "float32")
    masks = masks_of(tr)
    tr.set_masks(masks)
    assert tr.kernels == ("sparse" if precision == "float32" and model_name == "lenet300_100" else "dense")
    for t in range(6):  # one step per fit: checked after every step
        h = tr.fit(t, t + 1)
        assert not h.diverged
        w = tr.get_weights()
        for p, m in masks.items():
            assert np.all(w[p][m == 0] == 0), (p, t)
            assert np.count_nonzero(w[p][m != 0]) > 0.99 * np.count_nonzero(m)  # the kept ones do train
    assert all(np.array_equal(m.numpy(), masks[v.path].astype(np.float32)) for v, m in tr._masked)  # masks exact
    assert_float32_state(tr)


def test_float16_trains_with_a_loss_scale_that_a_fresh_optimizer_restores(tf_runtime):
    import keras

    tr = trainer("mixed_float16", optimizer="adam", lr=3e-3)
    opt = tr.optimizer
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    tr.set_masks(masks_of(tr, 0.5))
    tr.fit(0, 10)
    scale = float(opt.dynamic_scale.numpy())
    assert scale > 0 and int(opt.iterations.numpy()) > 0
    state = tr.get_optimizer_state()  # saved at a reset point: the scale travels with it
    tr.reset_optimizer(None)
    assert float(opt.dynamic_scale.numpy()) == opt.initial_scale and int(opt.iterations.numpy()) == 0
    tr.reset_optimizer(state)
    assert float(opt.dynamic_scale.numpy()) == scale
    assert_float32_state(tr)


def test_the_same_seed_builds_the_same_float32_weights_in_every_precision(tf_runtime):
    from lthmpi.models import build_model

    import keras

    built = [build_model("conv2", (8, 8, 1), 10, 3, p) for p in PRECISIONS]
    assert keras.config.dtype_policy().name == "float32"  # the process-wide policy is put back
    for a, b in zip(built[0].variables, built[1].variables + built[2].variables):
        assert b.dtype == "float32"
    ref = [v.numpy() for v in built[0].variables]
    for m in built[1:]:
        assert all(np.array_equal(x, v.numpy()) for x, v in zip(ref, m.variables))


def test_a_bfloat16_experiment_runs_end_to_end_on_digits(tmp_path, tf_runtime):
    """The tiny experiment in mixed_bfloat16: parent checkpoints float32, every task recorded as bfloat16 and
    learning (well above the 10% of chance), the precision part of the run's identity."""
    import h5py

    from lthmpi.config import from_dict
    from lthmpi.validation import validate
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load
    from lthmpi.store import RunDir

    cfg = from_dict({**TINY, "train": {**TINY["train"], "precision": "mixed_bfloat16"},
                     "prune": {"remaining": [0.3]}, "reset": {"points": ["10it"], "controls": []}})
    validate(cfg)
    assert cfg.hash() != from_dict(TINY).hash()
    res = load(run_serial(cfg, str(tmp_path / "run"), threads=1, quiet=True))
    assert [t["precision"] for t in res["tasks"]] == ["mixed_bfloat16"]
    assert all(t["device"] == "cpu" and t["final_accuracy"] > 0.5 for t in res["tasks"])
    with h5py.File(RunDir(str(tmp_path / "run")).parent_path, "r") as f:
        dtypes = {"weights": set(), "optimizer": set()}
        f.visititems(lambda name, obj: dtypes[name.split("/")[2]].add((obj.dtype.name, name.endswith("/iteration")))
                     if isinstance(obj, h5py.Dataset) and name.startswith("checkpoints/") else None)
    assert dtypes["weights"] == {("float32", False)}, dtypes  # weights float32
    assert dtypes["optimizer"] == {("float32", False), ("int64", True)}, dtypes  # slots float32, a step counter
