"""Tests of lthmpi/training/ (the masked trainer) with a tiny LeNet-300-100 on the digits, and of the
late reset as lthmpi/experiment.py builds it. One trainer per optimizer is built (and compiled) once."""
from __future__ import annotations

import numpy as np
import pytest

from lthmpi.config import from_dict
from lthmpi.pruning import magnitude_masks
from lthmpi.training import BatchOrder, History

OPTIMIZERS = {
    "adam": {"optimizer": "adam", "lr": 0.003},
    "sgd_momentum_wd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01,
                        "lr_milestones": ["30it", "60it"], "lr_gamma": 0.1},
    "adamw": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05},
    "sgd_l2": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "weight_decay_mode": "l2",
               "lr_milestones": ["30it", "60it"], "lr_gamma": 0.1},
}
DENSE_END = 40  # iterations of dense training before pruning
RETRAIN_END = 80
PER_EPOCH = 38  # 1237 training digits at batch 32


def train_cfg(**train):
    return from_dict({"data": {"dataset": "digits", "validation": 200},
                      "train": {"batch_size": 32, "eval_every": "10it", **train}})


@pytest.fixture(scope="module")
def data(tf_runtime):
    from lthmpi.data import load_dataset

    return load_dataset(train_cfg().data, 0)


class Rig:
    """A model, its trainer, its initial weights, and the state after DENSE_END dense iterations."""

    def __init__(self, data, **train):
        from lthmpi.models import build_model, prunable_variables
        from lthmpi.training import MaskedTrainer

        self.cfg = train_cfg(**train)
        self.model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
        self.trainer = MaskedTrainer(self.model, data, self.cfg.train, 0, prunable_variables(self.model))
        self.prunable = list(self.trainer.prunable_paths)
        self.init = self.trainer.get_weights()
        self.trainer.reset_optimizer(None)
        self.history = self.trainer.fit(0, DENSE_END)
        self.dense = self.trainer.get_weights()
        self.dense_state = self.trainer.get_optimizer_state()
        self.masks = magnitude_masks({p: self.dense[p] for p in self.prunable}, 0.2, "global", {"output": 0.5})

    def moment_keys(self, path):
        """Optimizer slots of a variable (momentum, velocity), by the variable's path."""
        token = path.replace("/", "_")
        return [k for k in self.dense_state if k.endswith(token + "_momentum") or k.endswith(token + "_velocity")]


_RIGS: dict = {}


@pytest.fixture(scope="module")
def rig(data):
    def get(name):
        if name not in _RIGS:
            _RIGS[name] = Rig(data, **OPTIMIZERS[name])
        return _RIGS[name]

    yield get
    _RIGS.clear()


# -- pruned weights stay exactly zero ----------------------------------------------------------------

@pytest.mark.parametrize("state", ["fresh", "restored"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(rig, name, state):
    r = rig(name)
    tr = r.trainer
    if state == "restored":
        # the dense run's moments are non-zero where the mask prunes: they would revive those weights
        for p in r.prunable:
            keys = r.moment_keys(p)
            assert keys, f"no optimizer slot found for {p} in {list(r.dense_state)}"
            assert any(np.count_nonzero(r.dense_state[k][~r.masks[p]]) > 0 for k in keys)
    tr.set_weights(r.dense)
    tr.set_masks(r.masks)
    tr.reset_optimizer(r.dense_state if state == "restored" else None)
    before = tr.get_weights()
    for p in r.prunable:
        assert not before[p][~r.masks[p]].any()  # set_masks zeroes at once
        assert np.array_equal(before[p][r.masks[p]], r.dense[p][r.masks[p]])
    h = tr.fit(DENSE_END, RETRAIN_END)
    assert not h.diverged
    after = tr.get_weights()
    for p in r.prunable:
        pruned, kept = ~r.masks[p], r.masks[p]
        assert np.count_nonzero(after[p][pruned]) == 0, f"{name}: pruned weights of {p} revived"
        changed = np.mean(after[p][kept] != before[p][kept])
        assert changed > 0.5, f"{name}: only {changed:.0%} of the kept weights of {p} moved"
    for p in set(after) - set(r.prunable):  # biases are never masked and do train
        assert not np.array_equal(after[p], before[p]), p
    # the model's own variables agree with what get_weights reports
    for v in r.model.variables:
        assert np.array_equal(v.numpy(), after[v.path])


def test_pruned_weights_stay_zero_whatever_the_optimizer_slots_hold(rig):
    """The optimizer gets unmasked gradients, so its slots at pruned weights hold anything; even inf and
    NaN there must neither revive a pruned weight nor reach a kept one."""
    r = rig("adam")
    tr = r.trainer
    tr.set_weights(r.dense)
    tr.set_masks(r.masks)
    state = {k: a.copy() for k, a in r.dense_state.items()}
    for p in r.prunable:
        momentum, velocity = sorted(r.moment_keys(p))
        state[momentum][~r.masks[p]] = np.nan
        state[velocity][~r.masks[p]] = np.inf
    tr.reset_optimizer(state)
    h = tr.fit(DENSE_END, DENSE_END + 12)
    assert not h.diverged
    after = tr.get_weights()
    for p in r.prunable:
        assert np.all(after[p][~r.masks[p]] == 0), f"pruned weights of {p} revived"
        assert np.all(np.isfinite(after[p][r.masks[p]])), f"kept weights of {p} went non-finite"


def test_fresh_optimizer_is_zero(rig):
    r = rig("adam")
    r.trainer.reset_optimizer(None)
    state = r.trainer.get_optimizer_state()
    assert state and all(not np.any(a) for a in state.values())
    r.trainer.reset_optimizer(r.dense_state)
    for k, a in r.trainer.get_optimizer_state().items():
        assert np.array_equal(a, r.dense_state[k])


def test_optimizer_state_moves_between_trainers(rig, data):
    """The state saved at a reset point by one trainer (the parent's) restores into another one."""
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    r = rig("adam")
    model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
    other = MaskedTrainer(model, data, r.cfg.train, 0, prunable_variables(model))
    assert set(other.get_optimizer_state()) == set(r.dense_state)
    other.reset_optimizer(r.dense_state)
    for k, a in other.get_optimizer_state().items():
        assert np.array_equal(a, r.dense_state[k])


def test_dense_training_learns(rig):
    r = rig("adam")
    evals = r.history.evals
    assert [e["iteration"] for e in evals] == [10, 20, 30, 38, 40]  # every 10 iterations and at the epoch end
    assert evals[-1]["val_accuracy"] > 0.6 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert [e["iteration"] for e in r.history.epochs] == [38, 40]


def _numpy_loss_and_accuracy(w, x, y):
    """LeNet-300-100's forward pass in float64 numpy: the reference for the compiled evaluation."""
    h = x.reshape(len(x), -1).astype(np.float64)
    for name in ("fc1", "fc2"):
        h = np.maximum(h @ w[f"{name}/kernel"] + w[f"{name}/bias"], 0)
    logits = h @ w["output/kernel"] + w["output/bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean(), np.mean(logits.argmax(axis=1) == y)


def test_evaluation_in_chunks_matches_a_plain_forward_pass(rig, data):
    """A Dense net is evaluated `eval_chunk` rows at a time inside one call; whole chunks and the tail
    that is left over must all count, once: 200 validation rows are 3 chunks of 64 and a tail of 8."""
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    r = rig("adam")
    model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
    chunked = MaskedTrainer(model, data, r.cfg.train, 0, prunable_variables(model), eval_chunk=64)
    chunked.set_weights(r.dense)
    r.trainer.set_weights(r.dense)
    for split in ("val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        assert len(x) % 64 and len(x) > 64, "the split must leave whole chunks and a tail"
        loss, acc = chunked.evaluate(split)
        ref_loss, ref_acc = _numpy_loss_and_accuracy(r.dense, x, y)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert acc == ref_acc
        whole = r.trainer.evaluate(split)  # the default chunk is larger than these splits: one piece
        assert whole[0] == pytest.approx(loss, rel=1e-6) and whole[1] == acc


class _Recorder:
    """A one-replica stand-in for a subgroup's reducer: keeps what replica `rank` of `size` contributes."""

    def __init__(self, rank, size):
        self.rank, self.size, self.sums = rank, size, None

    def allreduce_sum(self, buf):
        self.sums = np.array(buf)
        return buf


@pytest.mark.parametrize("size", [2, 3])
def test_data_parallel_replicas_each_evaluate_their_share_once(rig, data, size):
    """Each replica of a subgroup evaluates its own rows and the subgroup sums the totals: the shares add
    up to the whole split exactly once (every replica evaluating all of it would count it `size` times)."""
    r = rig("adam")
    tr = r.trainer
    tr.set_weights(r.dense)
    try:
        for split in ("val", "test"):
            n = len(getattr(data, f"y_{split}"))
            loss, acc = tr.evaluate(split)
            shares = []
            for rank in range(size):
                rec = _Recorder(rank, size)
                tr.set_reducer(rec)
                tr.evaluate(split)
                shares.append(rec.sums)
            tr.set_reducer(None)
            correct = [s[1] for s in shares]
            assert all(c == int(c) and 0 < c < acc * n for c in correct), correct
            assert sum(correct) == round(acc * n)
            assert sum(s[0] for s in shares) == pytest.approx(loss * n, rel=1e-5)
    finally:
        tr.set_reducer(None)

# -- weight decay -------------------------------------------------------------------------------------

def _trained(data, steps, **train):
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
    tr = MaskedTrainer(model, data, train_cfg(**train).train, 0, prunable_variables(model))
    tr.fit(0, steps)
    return tr.get_weights()


def _retrained_from_init(r, steps):
    """A rig's trainer (compiled once for the module) trained `steps` dense iterations from its initial weights
    with a fresh optimizer: what a new trainer of its settings trains (`_trained`), without another compile."""
    tr = r.trainer
    tr.set_weights(r.init)
    tr.set_masks(None)
    tr.reset_optimizer(None)
    tr.fit(0, steps)
    return tr.get_weights()


def test_adamw_without_weight_decay_trains_exactly_as_adam(rig, data):
    """train.weight_decay defaults to 0.0, and that is what results.h5 records: AdamW must not fall back to
    Keras' own default of 0.004. Adam and a decayed AdamW (0.05) are the module's rigs, retrained from their
    initial weights; the AdamW without decay is a trainer of its own (its config is what is tested)."""
    adam = _retrained_from_init(rig("adam"), 12)
    adamw = _trained(data, 12, optimizer="adamw", lr=0.003)
    assert all(np.array_equal(adam[p], adamw[p]) for p in adam)
    decayed = _retrained_from_init(rig("adamw"), 12)  # any decay moves the bits: the comparison would see 0.004
    assert OPTIMIZERS["adamw"]["weight_decay"] and OPTIMIZERS["adamw"]["lr"] == 0.003
    assert not np.array_equal(adam["fc1/kernel"], decayed["fc1/kernel"])


def test_l2_weight_decay_is_coupled_before_momentum(rig, data):
    """weight_decay_mode = "l2": each step adds wd * w to the gradient before momentum sees it (PyTorch's
    SGD weight_decay), checked against a plain eager loop; "decoupled" (Keras) trains something else. Both
    are the module's SGD rigs (the same lr, momentum and decay; their lr milestones come after these steps),
    retrained from their initial weights."""
    import keras
    import tensorflow as tf

    from lthmpi.models import build_model

    steps, wd, lr = 6, 0.01, 0.05
    for name in ("sgd_l2", "sgd_momentum_wd"):
        o = OPTIMIZERS[name]
        assert (o["lr"], o["momentum"], o["weight_decay"]) == (lr, 0.9, wd) and o["lr_milestones"][0] == "30it"
    got = _retrained_from_init(rig("sgd_l2"), steps)
    model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    order = BatchOrder(len(data.x_train), 32, 0)
    for t in range(steps):
        rows = order.block(t, t + 1)[0]
        with tf.GradientTape() as tape:
            logits = model(data.x_train[rows], training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=data.y_train[rows].astype(np.int32),
                                                                                 logits=logits))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients([(g + wd * v, v) for g, v in zip(grads, model.trainable_variables)])
    for v in model.variables:
        assert np.allclose(got[v.path], v.numpy(), rtol=1e-4, atol=1e-6), v.path
    decoupled = _retrained_from_init(rig("sgd_momentum_wd"), steps)
    assert not np.allclose(decoupled["fc1/kernel"], got["fc1/kernel"], rtol=1e-4, atol=1e-6)


# -- learning-rate schedule -------------------------------------------------------------------------

def test_lr_milestones_lower_the_lr(rig):
    r = rig("sgd_momentum_wd")  # lr 0.05, x0.1 at 30it and again at 60it
    tr = r.trainer
    lr = lambda: float(tr.optimizer.learning_rate.numpy())  # noqa: E731
    tr.set_weights(r.init)
    tr.set_masks(None)
    tr.reset_optimizer(None)
    tr.fit(0, 30)  # iterations 0..29: before the first milestone
    assert lr() == pytest.approx(0.05, rel=1e-6)
    tr.fit(30, 31)
    assert lr() == pytest.approx(0.005, rel=1e-6)
    tr.fit(31, 60)
    assert lr() == pytest.approx(0.005, rel=1e-6)
    tr.fit(60, 61)
    assert lr() == pytest.approx(0.0005, rel=1e-6)
    # a late reset past a milestone resumes the schedule there, not at the initial lr
    tr.reset_optimizer(None)
    tr.fit(45, 46)
    assert lr() == pytest.approx(0.005, rel=1e-6)
    tr.fit(5, 6)
    assert lr() == pytest.approx(0.05, rel=1e-6)


def test_lr_drop_shrinks_the_steps(rig):
    """Past a milestone, the same number of SGD steps moves the weights less."""
    r = rig("sgd_momentum_wd")
    tr = r.trainer

    def moved(start):
        tr.set_weights(r.dense)
        tr.set_masks(None)
        tr.reset_optimizer(None)
        tr.fit(start, start + 5)
        after = tr.get_weights()
        return sum(float(np.abs(after[p] - r.dense[p]).sum()) for p in r.prunable)

    assert moved(62) < 0.1 * moved(0)


# -- early stopping -----------------------------------------------------------------------------------

def test_early_stop_iteration_and_accuracy(rig):
    r = rig("adam")
    tr = r.trainer
    start, end = 20, 210

    def reset():
        tr.set_weights(r.dense)
        tr.set_masks(r.masks)
        tr.reset_optimizer(None)

    reset()
    h = tr.fit(start, end)
    its = [e["iteration"] for e in h.evals]
    losses = [e["val_loss"] for e in h.evals]
    assert its == sorted(set(its)) and its[0] > start and its[-1] == end
    best = its[int(np.argmin(losses))]
    assert h.best_iteration == best
    assert h.best_val_loss == min(losses)
    assert h.early_stop_iteration == best - start  # iterations since this run's start
    assert best < end, "the test needs a run whose validation loss is lowest before its end"
    final_weights = tr.get_weights()
    _, acc = tr.evaluate("test")
    assert acc == h.final_accuracy  # fit leaves the final weights in place, not the best ones

    # a second identical run stopped at the best iteration has exactly the early-stop accuracy
    reset()
    h2 = tr.fit(start, best)
    assert h2.evals == h.evals[:len(h2.evals)]  # same run, bit for bit, up to there
    assert h2.final_accuracy == h.early_stop_accuracy
    assert tr.evaluate("test")[1] == h.early_stop_accuracy
    assert not np.array_equal(tr.get_weights()["fc1/kernel"], final_weights["fc1/kernel"])


def test_history_early_stop_iteration():
    assert History(start=50, end=200, best_iteration=120).early_stop_iteration == 70
    assert History(start=0, end=200, best_iteration=200).early_stop_iteration == 200
    assert History(start=50, end=200).early_stop_iteration == -1


# -- batch order ---------------------------------------------------------------------------------------

def test_batch_order_is_deterministic_and_each_epoch_a_permutation():
    a, b, c = BatchOrder(100, 10, 7), BatchOrder(100, 10, 7), BatchOrder(100, 10, 8)
    assert a.per_epoch == 10
    for e in range(3):
        block = a.block(10 * e, 10 * (e + 1))
        assert block.shape == (10, 10) and block.dtype == np.int32
        assert np.array_equal(np.sort(block.ravel()), np.arange(100))  # a permutation of the examples
        assert np.array_equal(block, b.block(10 * e, 10 * (e + 1)))  # same seed, same order
    assert not np.array_equal(a.block(0, 10), a.block(10, 20))  # a new shuffle every epoch
    assert not np.array_equal(a.block(0, 10), c.block(0, 10))  # another seed, another order
    # a block spanning epochs is the concatenation of the epochs' batches; any start gives the same rows
    whole = np.concatenate([a.block(0, 10), a.block(10, 20), a.block(20, 30)])
    assert np.array_equal(a.block(7, 23), whole[7:23])
    assert np.array_equal(BatchOrder(100, 10, 7).block(23, 24), whole[23:24])
    assert a.block(5, 5).shape == (0, 10)


def test_batch_order_drops_the_remainder_without_repeats():
    o = BatchOrder(103, 10, 0)
    assert o.per_epoch == 10
    for e in range(2):
        rows = o.block(10 * e, 10 * (e + 1)).ravel()
        assert len(set(rows.tolist())) == 100 and rows.min() >= 0 and rows.max() < 103


def test_trainer_uses_the_batch_order(rig):
    r = rig("adam")
    order = r.trainer.order
    ref = BatchOrder(1237, 32, 0)
    assert order.per_epoch == PER_EPOCH
    assert np.array_equal(order.block(0, 80), ref.block(0, 80))


# -- late reset ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment(tiny_run):
    from lthmpi.experiment import Experiment
    from lthmpi.store import RunDir

    exp = Experiment(RunDir(tiny_run).load_config(), tiny_run)
    exp.train_parent()  # loads the checkpoints written by the run
    exp.compute_masks()  # loads its masks
    return exp


def test_reset_restores_checkpoint_times_mask(experiment):
    exp = experiment
    assert exp.prunable == ["fc1/kernel", "fc2/kernel", "output/kernel"]
    assert exp.reset_iterations == [0, 10]
    for task in exp.tasks():
        if task.control is not None:
            continue
        k = exp.reset_iterations[task.reset]
        ckpt, mask = exp.checkpoints[k], exp.masks[task.mask]
        weights, used = exp.start_weights(task)
        assert set(weights) == set(ckpt)
        for p, w in weights.items():
            if p in exp.prunable:
                assert np.array_equal(used[p], mask[p])
                assert np.array_equal(w, ckpt[p] * mask[p])
                assert np.count_nonzero(w) == np.count_nonzero(ckpt[p][mask[p]])
            else:
                assert np.array_equal(w, ckpt[p])  # biases keep their values at k
        exp.trainer.set_weights(weights)
        exp.trainer.set_masks(used)
        for v in exp.model.variables:
            assert np.array_equal(v.numpy(), weights[v.path]), v.path  # bit for bit
    # the checkpoints differ between reset points, so the two resets really are different starts
    assert not np.array_equal(exp.checkpoints[0]["fc1/kernel"], exp.checkpoints[10]["fc1/kernel"])


def test_controls_start_weights(experiment):
    from lthmpi.kinds.retraining import Retraining as Task

    exp = experiment
    k = exp.reset_iterations[1]
    mask = exp.masks[0]
    w, m = exp.start_weights(Task(0, 1, "random_mask"))
    for p in exp.prunable:
        assert int(m[p].sum()) == int(mask[p].sum()) and not np.array_equal(m[p], mask[p])
        assert np.array_equal(w[p], exp.checkpoints[k][p] * m[p])
    assert np.array_equal(m["fc1/kernel"], exp.start_weights(Task(0, 1, "random_mask"))[1]["fc1/kernel"])
    w, m = exp.start_weights(Task(0, 1, "random_reinit"))
    for p in exp.prunable:
        assert np.array_equal(m[p], mask[p])  # same mask
        assert not np.any(w[p][~mask[p]])
        assert not np.array_equal(w[p], exp.checkpoints[0][p] * mask[p])  # fresh values
        assert not np.array_equal(w[p], exp.checkpoints[k][p] * mask[p])
