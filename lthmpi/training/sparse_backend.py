"""The sparse backend: masked Dense/ReLU nets on the C kernels of lthmpi/sparse.py, which store and multiply
only the kept weights. At `begin` the model's weights and the Keras optimizer's slots go in; at `sync` they
come back out (before a checkpoint and at the end of the fit), so the dense path can go on from them."""
from __future__ import annotations

import numpy as np

from . import optimizer as optim


def sparse_layout(model, opt, train_cfg, masked_ids: set, augment: bool):
    """The Dense layers and their optimizer slots when the sparse kernels can train this net, else (None, why)."""
    import keras

    if augment:
        return None, "data augmentation"
    if train_cfg.batch_size > 64:
        return None, "batches of more than 64"
    if train_cfg.optimizer not in ("adam", "adamw", "sgd"):
        return None, f"optimizer {train_cfg.optimizer}"
    if getattr(opt, "nesterov", False) or getattr(opt, "amsgrad", False):
        return None, "Nesterov momentum or AMSGrad"
    dense = [ly for ly in model.layers if not isinstance(ly, (keras.layers.InputLayer, keras.layers.Flatten))]
    if not dense or not all(type(ly) is keras.layers.Dense and ly.use_bias for ly in dense):
        return None, "layers other than Flatten and Dense"
    if len(model.variables) != 2 * len(dense) or any(id(ly.kernel) not in masked_ids or id(ly.bias) in masked_ids
                                                      for ly in dense):
        return None, "variables other than pruned Dense kernels and their biases"
    layers = []
    need = optim.slots_needed(train_cfg)
    for ly in dense:
        entry = {"layer": ly}
        for part in ("kernel", "bias"):
            entry[part] = optim.slot_variables(opt, getattr(ly, part))
            if any(entry[part][k] is None for k in need):
                return None, f"optimizer slots not found for {getattr(ly, part).path}"
        layers.append(entry)
    return layers, None


class SparseBackend:
    """Trains the net of `layers` (sparse_layout) under `mask_of` (id(kernel) -> mask variable) in C."""

    kernels = "sparse"

    def __init__(self, layers, mask_of, optimizer, train_cfg, batches):
        self.layers, self.mask_of, self.optimizer, self.cfg, self.batches = layers, mask_of, optimizer, train_cfg, batches
        self.engine = self.best = None
        self._flat: dict = {}

    def begin(self):
        """The current weights, masks and optimizer state as a SparseMLP."""
        from .. import sparse

        kernels = [ly["layer"].kernel.numpy() for ly in self.layers]
        biases = [ly["layer"].bias.numpy() for ly in self.layers]
        masks = [self.mask_of[id(ly["layer"].kernel)].numpy() for ly in self.layers]
        self.engine = sparse.SparseMLP(kernels, biases, masks, self.cfg.optimizer,
                                       **optim.hyperparameters(self.optimizer, self.cfg))
        self.engine.reset_slots(self._slot_arrays())

    def train(self, t: int, n: int, lrs: np.ndarray) -> float:
        x, y = self.flat("train")
        return self.engine.train(x, y, self.batches.order.block(t, t + n), lrs)

    def evaluate(self, split: str) -> tuple[float, float]:
        xt, ys = self.flat(split)
        lsum, csum = self.engine.evaluate(xt, ys)
        return lsum / len(ys), csum / len(ys)

    def keep_best(self):
        self.best = self.engine.snapshot()

    def best_test_accuracy(self) -> float:
        final = self.engine.snapshot()
        self.engine.restore(self.best)
        _, acc = self.evaluate("test")
        self.engine.restore(final)
        return acc

    def replicas(self) -> tuple[int, bool]:
        return 1, True

    def sync(self):
        """Write the engine's weights and optimizer state back into the Keras model and optimizer."""
        e = self.engine
        for ly, k, b in zip(self.layers, e.kernels(), e.biases()):
            ly["layer"].kernel.assign(k)
            ly["layer"].bias.assign(b)
        slots = e.slots(self._slot_arrays())
        for key, arrays in slots.items():
            if key == "iterations":
                continue
            part, k = key.split("_")
            for ly, a in zip(self.layers, arrays):
                if ly[part][k] is not None:
                    ly[part][k].assign(a)
        self.optimizer.iterations.assign(slots["iterations"])

    def end(self):
        self.engine = self.best = None

    def _slot_arrays(self) -> dict:
        """The Keras optimizer's state as SparseMLP takes it: sparse.SLOTS ("kernel_m", ...) and "iterations"."""
        from ..sparse import SLOTS

        out = {"iterations": int(self.optimizer.iterations.numpy())}
        for key in SLOTS:
            part, k = key.split("_")
            out[key] = [ly[part][k].numpy() if ly[part][k] is not None else None for ly in self.layers]
        return out

    def flat(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split as the sparse kernels read it, made once per trainer: the training set as float32 rows of
        features (a view where possible), the evaluation splits feature-major; int32 labels."""
        if split not in self._flat:
            from ..sparse import feature_major, flat

            x, y = self.batches.numpy(split)
            x = flat(x)
            self._flat[split] = (x if split == "train" else feature_major(x), np.ascontiguousarray(y, np.int32))
        return self._flat[split]
