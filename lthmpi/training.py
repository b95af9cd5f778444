"""The masked trainer: the hot path of every experiment.

One trainer per process is built once and reused for every task: a late reset is an assignment of
weights, masks and optimizer state, never a new model or a new trace. The data stay in memory and are
passed as arguments to one XLA-compiled call that runs up to `eval_every` steps, gathering each batch
from a (K, B) block of the epoch's shuffled indices (DESIGN.md §6: a Python call per step costs more
than the step). Inside the call the weights are re-masked after every optimizer update, so Adam moments,
momentum and weight decay can never revive a pruned weight.

Dense/ReLU nets whose mask keeps at most `sparse_below` of the prunable weights train instead on the
sparse kernels of lthmpi/sparse.py, which store and multiply the kept weights only; the Keras model and
optimizer get the weights and slots back at the end of the fit (and before a checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .runtime import configure_tensorflow, configured_threads
from .steps import Step


@dataclass
class History:
    """What one training run measured; iterations are global (counted from the parent's start)."""
    start: int
    end: int
    evals: list = field(default_factory=list)  # dicts: iteration, train_loss, val_loss, val_accuracy
    epochs: list = field(default_factory=list)  # dicts: epoch, iteration, train_loss, val_loss, val_accuracy, test_accuracy
    best_iteration: int = -1
    best_val_loss: float = math.inf
    early_stop_accuracy: float = math.nan
    final_accuracy: float = math.nan
    diverged: bool = False
    replicas: int = 1  # data-parallel replicas that trained it
    replicas_identical: bool = True  # their trainable weights agreed bit for bit at the end

    @property
    def early_stop_iteration(self) -> int:
        """Iterations trained (since this run's start) when the validation loss was lowest."""
        return self.best_iteration - self.start if self.best_iteration >= 0 else -1


class BatchOrder:
    """Deterministic per-epoch shuffles: the batches of iteration t depend only on (seed, t)."""

    def __init__(self, n_train: int, batch_size: int, seed: int):
        self.n, self.batch, self.seed = n_train, batch_size, seed
        self.per_epoch = n_train // batch_size
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            perm = np.random.default_rng([self.seed, e]).permutation(self.n)
            self._cache[e] = perm[: self.per_epoch * self.batch].reshape(self.per_epoch, self.batch).astype(np.int32)
        return self._cache[e]

    def block(self, start: int, stop: int) -> np.ndarray:
        """Indices of iterations [start, stop) as a (stop - start, batch) array."""
        parts, t = [], start
        while t < stop:
            e, j = divmod(t, self.per_epoch)
            take = min(stop - t, self.per_epoch - j)
            parts.append(self._epoch(e)[j: j + take])
            t += take
        return np.concatenate(parts) if parts else np.zeros((0, self.batch), np.int32)


def make_optimizer(train_cfg):
    """The Keras optimizer of the config. Weight decay goes to Keras (decoupled: w -= lr * wd * w, after the
    update) only in the "decoupled" mode; in "l2" the trainer adds wd * w to the gradients itself (PyTorch's
    coupled form, before momentum or Adam's moments). AdamW with weight decay 0 is Adam, exactly."""
    import keras

    # A fixed name: Keras would name a process's second Adam "adam_1", and the optimizer state saved
    # at a reset point (keyed by variable path) would no longer restore into another trainer.
    kw = dict(learning_rate=train_cfg.lr, name=train_cfg.optimizer)
    decoupled = train_cfg.weight_decay if getattr(train_cfg, "weight_decay_mode", "decoupled") == "decoupled" else 0.0
    if decoupled:
        kw["weight_decay"] = decoupled
    if train_cfg.optimizer == "adamw" and decoupled:
        return keras.optimizers.AdamW(**kw)
    if train_cfg.optimizer in ("adam", "adamw"):
        return keras.optimizers.Adam(**kw)
    if train_cfg.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=train_cfg.momentum, **kw)
    raise ValueError(f"unknown optimizer {train_cfg.optimizer!r}")


def coupled_weight_decay(train_cfg) -> float:
    """The L2 coefficient the trainer adds to the gradients (g += wd * w): train.weight_decay in mode "l2"."""
    return float(train_cfg.weight_decay) if getattr(train_cfg, "weight_decay_mode", "decoupled") == "l2" else 0.0


class MaskedTrainer:
    """Trains one model under a mask; weights, masks and optimizer state are swapped in per task."""

    def __init__(self, model, data, train_cfg, seed: int, prunable, augment: bool = False, jit: bool = True,
                 eval_chunk: int = 500, sparse_below: float = 0.0):
        self.threads = configured_threads() or 1
        self.tf = tf = configure_tensorflow(self.threads)
        self.model, self.data, self.cfg, self.seed = model, data, train_cfg, seed
        self.order = BatchOrder(len(data.x_train), train_cfg.batch_size, seed)
        self.per_epoch = self.order.per_epoch
        self.eval_every = max(1, Step.parse(train_cfg.eval_every).iterations(self.per_epoch))
        self.milestones = sorted(Step.parse(m).iterations(self.per_epoch) for m in train_cfg.lr_milestones)
        self.optimizer = make_optimizer(train_cfg)
        self.optimizer.build(model.trainable_variables)
        self.variables = {v.path: v for v in model.variables}
        self.opt_variables = {v.path: v for v in self.optimizer.variables if "learning_rate" not in v.path}
        if len(self.variables) != len(model.variables):
            raise ValueError("model variable paths are not unique: give every layer a distinct name")
        prunable_ids = {id(v) for v in prunable}
        self.prunable_paths = [v.path for v in model.variables if id(v) in prunable_ids]
        self._masked = [(v, tf.Variable(tf.ones(v.shape, v.dtype), trainable=False, name="mask"))
                        for v in model.trainable_variables if id(v) in prunable_ids]
        self._mask_of = {id(v): m for v, m in self._masked}
        self._best = [tf.Variable(v, trainable=False) for v in model.variables]
        self._x = {s: tf.convert_to_tensor(getattr(data, f"x_{s}")) for s in ("train", "val", "test")}
        self._y = {s: tf.convert_to_tensor(getattr(data, f"y_{s}").astype(np.int32)) for s in ("train", "val", "test")}
        elems = int(np.prod(data.x_train.shape[1:]))
        self.eval_batch = max(1, (1 << 25) // max(1, elems * 4))  # 32 MiB of inputs per call (conv nets)
        self.eval_chunk = eval_chunk  # rows per matmul inside one evaluation call (Dense nets)
        self.reducer = None
        # XLA:CPU runs a convolution inside a while loop ~100x slower than in a compiled step of its own
        # (Conv-2, batch 60: 31 s against 0.31 s per step), so conv nets take one compiled call per step;
        # their steps are long enough that the call costs nothing. Dense-only nets run whole blocks.
        from .models import has_convolutions

        self.fused = not has_convolutions(model)
        self._build(jit, augment)
        # Sparse kernels (lthmpi/sparse.py) for masks that keep at most `sparse_below` of the prunable weights.
        self.sparse_below = sparse_below
        self._sparse_layers, self.sparse_unsupported = self._sparse_layout(augment)
        self._sparse_active = False  # the current masks train on the sparse kernels
        self._engine = self._engine_best = None  # the SparseMLP of the fit in progress, its best weights
        self._flat_data: dict = {}

    # -- compiled functions --------------------------------------------------------------------
    def _build(self, jit: bool, augment: bool):
        tf, model, opt = self.tf, self.model, self.optimizer
        trainable = model.trainable_variables
        masked = self._masked
        milestones = tf.constant(self.milestones or [2**62], tf.int64)
        base_lr, gamma = float(self.cfg.lr), float(self.cfg.lr_gamma)
        seed = self.seed
        l2 = coupled_weight_decay(self.cfg)
        augment_batch = None
        if augment:
            from .data.augment import augment_batch

        def loss_fn(y, logits):
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

        def masked_update(grads, t):
            """The learning rate of iteration t, then the optimizer step, then re-mask the weights.

            The gradients go to the optimizer unmasked: every optimizer here (Adam, AdamW, SGD with
            momentum and weight decay) updates each weight from its own gradient and slots alone, so a
            kept weight gets the update a masked gradient would give it (the gradient there is the same
            number), and the re-mask holds every pruned weight at exactly zero whatever its slots hold,
            even inf or NaN (a select, not a product: NaN * 0 is NaN). Not masking the gradients
            spares each slot update a pass over the mask (docs/performance.md, "The masked trainer")."""
            drops = tf.reduce_sum(tf.cast(t >= milestones, tf.float32))
            opt.learning_rate.assign(base_lr * tf.pow(gamma, drops))
            if l2:  # coupled L2 (train.weight_decay_mode = "l2"): before momentum or Adam's moments see it
                grads = [g + l2 * v for g, v in zip(grads, trainable)]
            opt.apply_gradients(zip(grads, trainable))
            for v, m in masked:
                v.assign(tf.where(m != 0, v, tf.zeros_like(v)))

        def one_step(x, y, rows, t):
            xb, yb = tf.gather(x, rows), tf.gather(y, rows)
            if augment_batch is not None:
                xb = augment_batch(xb, tf.stack([tf.constant(seed, tf.int64), t]))
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            masked_update(tape.gradient(loss, trainable), t)
            return loss

        @tf.function(jit_compile=jit)
        def train_block(x, y, idx, n, start):
            # An explicit while_loop on `i < n`: with `for i in tf.range(n)` XLA takes n as a
            # compile-time constant and recompiles (~0.8 s) for every new length of a partial block.
            def step(i, total):
                return i + 1, total + one_step(x, y, tf.gather(idx, i), start + tf.cast(i, tf.int64))

            _, total = tf.while_loop(lambda i, total: i < n, step, (tf.constant(0, tf.int32), tf.constant(0.0)))
            return total

        @tf.function(jit_compile=jit)
        def train_step(x, y, rows, t):
            return one_step(x, y, rows, t)

        def eval_sums(x, y):
            logits = model(x, training=False)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y), tf.float32)
            return tf.reduce_sum(losses), tf.reduce_sum(correct)

        chunk = self.eval_chunk

        @tf.function(jit_compile=jit)
        def eval_block(x, y):
            if not self.fused:
                return eval_sums(x, y)
            # A Dense net evaluates a whole split in one call, `chunk` rows at a time: XLA's CPU matmul
            # runs 5000x784x300 at ~70 GFLOP/s and 500-row slices of it at ~85 (docs/performance.md, "The masked trainer").
            n = int(x.shape[0])
            full = n // chunk
            zeros = [0] * (len(x.shape) - 1)
            loss = correct = tf.constant(0.0)

            def body(i, loss, correct):
                rows = tf.slice(x, tf.stack([i * chunk, *zeros]), [chunk, *x.shape[1:]])
                dl, dc = eval_sums(rows, tf.slice(y, tf.reshape(i * chunk, [1]), [chunk]))
                return i + 1, loss + dl, correct + dc

            if full:
                _, loss, correct = tf.while_loop(lambda i, *_: i < full, body, (tf.constant(0), loss, correct))
            if full * chunk < n:
                dl, dc = eval_sums(x[full * chunk:], y[full * chunk:])
                loss, correct = loss + dl, correct + dc
            return loss, correct

        @tf.function
        def snapshot():
            for b, v in zip(self._best, model.variables):
                b.assign(v)

        self._train_block, self._train_step = train_block, train_step
        self._eval_block, self._snapshot = eval_block, snapshot

        # Data-parallel path: one step per call, gradients summed across the subgroup between the two halves.
        sizes = [int(np.prod(v.shape)) for v in trainable]
        batch = float(self.cfg.batch_size)

        @tf.function(jit_compile=jit)
        def shard_gradients(x, y, rows, t):
            xb, yb = tf.gather(x, rows), tf.gather(y, rows)
            if augment_batch is not None:
                xb = augment_batch(xb, tf.stack([tf.constant(seed, tf.int64), t]))
            with tf.GradientTape() as tape:
                logits = model(xb, training=True)
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)) / batch
            grads = tape.gradient(loss, trainable)
            return tf.concat([tf.reshape(g, [-1]) for g in grads] + [tf.reshape(loss, [1])], axis=0)

        @tf.function(jit_compile=jit)
        def apply_flat(flat, t):
            parts = tf.split(flat[:-1], sizes)
            masked_update([tf.reshape(g, v.shape) for g, v in zip(parts, trainable)], t)

        self._shard_gradients, self._apply_flat = shard_gradients, apply_flat

    def _sparse_layout(self, augment: bool):
        """The Dense layers and their optimizer slots when the sparse kernels can train this net, else a reason."""
        import keras

        model, opt = self.model, self.optimizer
        if augment:
            return None, "data augmentation"
        if self.cfg.batch_size > 64:
            return None, "batches of more than 64"
        if self.cfg.optimizer not in ("adam", "adamw", "sgd"):
            return None, f"optimizer {self.cfg.optimizer}"
        if getattr(opt, "nesterov", False) or getattr(opt, "amsgrad", False):
            return None, "Nesterov momentum or AMSGrad"
        dense = [ly for ly in model.layers if not isinstance(ly, (keras.layers.InputLayer, keras.layers.Flatten))]
        if not dense or not all(type(ly) is keras.layers.Dense and ly.use_bias for ly in dense):
            return None, "layers other than Flatten and Dense"
        acts = [getattr(ly.activation, "__name__", "") for ly in dense]
        if any(a != "relu" for a in acts[:-1]) or acts[-1] != "linear":
            return None, "activations other than ReLU and linear logits"
        masked = {id(v) for v, _ in self._masked}
        if len(model.variables) != 2 * len(dense) or any(id(ly.kernel) not in masked or id(ly.bias) in masked for ly in dense):
            return None, "variables other than pruned Dense kernels and their biases"
        slots = {v.path: v for v in opt.variables}
        layers = []
        for ly in dense:
            entry = {"layer": ly}
            for part in ("kernel", "bias"):
                stem = f"{opt.name}/{getattr(ly, part).path.replace('/', '_')}"
                names = {"m": f"{stem}_momentum", "v": f"{stem}_velocity"}
                need = ("m", "v") if self.cfg.optimizer != "sgd" else (("m",) if self.cfg.momentum else ())
                if any(names[k] not in slots for k in need):
                    return None, f"optimizer slots not found for {getattr(ly, part).path}"
                entry[part] = {k: slots.get(names[k]) for k in ("m", "v")}
            layers.append(entry)
        return layers, None

    def _sparse_engine(self):
        """The current weights, masks and optimizer state as a SparseMLP."""
        from . import sparse

        kernels = [ly["layer"].kernel.numpy() for ly in self._sparse_layers]
        biases = [ly["layer"].bias.numpy() for ly in self._sparse_layers]
        masks = [self._mask_of[id(ly["layer"].kernel)].numpy() for ly in self._sparse_layers]
        opt = self.optimizer
        hyper = ({"momentum": float(opt.momentum)} if self.cfg.optimizer == "sgd" else
                 {"beta1": float(opt.beta_1), "beta2": float(opt.beta_2), "eps": float(opt.epsilon)})
        engine = sparse.SparseMLP(kernels, biases, masks, self.cfg.optimizer,
                                  weight_decay=float(opt.weight_decay or 0.0), l2=coupled_weight_decay(self.cfg), **hyper)
        engine.reset_slots(self._slot_arrays())
        return engine

    def _slot_arrays(self) -> dict:
        """The Keras optimizer's state as SparseMLP takes it: sparse.SLOTS ("kernel_m", ...) and "iterations"."""
        from .sparse import SLOTS

        out = {"iterations": int(self.optimizer.iterations.numpy())}
        for key in SLOTS:
            part, k = key.split("_")
            out[key] = [ly[part][k].numpy() if ly[part][k] is not None else None for ly in self._sparse_layers]
        return out

    def _sync_from_engine(self):
        """Write the engine's weights and optimizer state back into the Keras model and optimizer."""
        e = self._engine
        for ly, k, b in zip(self._sparse_layers, e.kernels(), e.biases()):
            ly["layer"].kernel.assign(k)
            ly["layer"].bias.assign(b)
        slots = e.slots(self._slot_arrays())
        for key, arrays in slots.items():
            if key == "iterations":
                continue
            part, k = key.split("_")
            for ly, a in zip(self._sparse_layers, arrays):
                if ly[part][k] is not None:
                    ly[part][k].assign(a)
        self.optimizer.iterations.assign(slots["iterations"])

    @property
    def kernels(self) -> str:
        """Which kernels the current masks train on: "sparse" or "dense"."""
        return "sparse" if self._sparse_active and self.reducer is None else "dense"

    def set_reducer(self, reducer):
        """Train data-parallel with `reducer` (allreduce_sum, rank, size) or alone (None)."""
        self.reducer = reducer if reducer is not None and reducer.size > 1 else None

    def _train_steps_parallel(self, t: int, n: int) -> float:
        """n steps from iteration t, this replica taking rows rank::size of each global batch."""
        tf, red = self.tf, self.reducer
        block = self.order.block(t, t + n)
        total = 0.0
        for i in range(n):
            rows = tf.constant(block[i, red.rank::red.size])
            step = tf.constant(t + i, tf.int64)
            flat = self._shard_gradients(self._x["train"], self._y["train"], rows, step).numpy()
            summed = red.allreduce_sum(flat)
            self._apply_flat(tf.constant(summed), step)
            total += float(summed[-1])
        self._average_statistics()
        return total

    def _average_statistics(self):
        """Average the non-trainable statistics (batch-norm moving mean and variance) over the subgroup.

        Each replica normalises with its own shard's batch statistics, so their moving averages drift
        apart; the update is linear, so averaging them once per block equals averaging every step. Every
        replica then evaluates, and early-stops, on the same model."""
        stats = [v for v in self.model.non_trainable_variables if "float" in str(v.dtype)]
        if not stats:
            return
        flat = np.concatenate([np.ravel(v.numpy()) for v in stats]).astype(np.float32)
        mean = self.reducer.allreduce_sum(flat) / np.float32(self.reducer.size)
        offset = 0
        for v in stats:
            n = int(np.prod(v.shape))
            v.assign(mean[offset:offset + n].reshape(v.shape))
            offset += n

    # -- state ---------------------------------------------------------------------------------
    def get_weights(self) -> dict:
        return {p: v.numpy() for p, v in self.variables.items()}

    def set_weights(self, weights: dict):
        missing = set(self.variables) - set(weights)
        if missing:
            raise ValueError(f"checkpoint lacks variables {sorted(missing)[:3]}")
        for p, v in self.variables.items():
            if tuple(weights[p].shape) != tuple(v.shape):
                raise ValueError(f"checkpoint variable {p} has shape {weights[p].shape}, the model needs {tuple(v.shape)}")
            v.assign(weights[p])

    def weights_digest(self) -> str:
        """sha256 of all model variables: replicas in a subgroup must agree on it."""
        import hashlib

        d = hashlib.sha256()
        for v in self.model.variables:
            d.update(np.ascontiguousarray(v.numpy()).tobytes())
        return d.hexdigest()

    def get_optimizer_state(self) -> dict:
        return {p: v.numpy() for p, v in self.opt_variables.items()}

    def reset_optimizer(self, state: dict | None = None):
        """A fresh optimizer (zero moments, step 0), or the state saved at a reset point."""
        for p, v in self.opt_variables.items():
            v.assign(state[p] if state is not None else np.zeros(v.shape, v.dtype.name if hasattr(v.dtype, "name") else v.dtype))

    def set_masks(self, masks: dict | None):
        """Masks by variable path (None = dense); the masked weights are zeroed at once."""
        for v, m in self._masked:
            if masks is None:
                m.assign(np.ones(v.shape, np.float32))
            else:
                if v.path not in masks:
                    raise ValueError(f"mask lacks variable {v.path}")
                if tuple(masks[v.path].shape) != tuple(v.shape):
                    raise ValueError(f"mask for {v.path} has shape {masks[v.path].shape}, the model needs {tuple(v.shape)}")
                m.assign(masks[v.path].astype(np.float32))
                v.assign(v * m)
        self._sparse_active = self._use_sparse(masks)

    def _use_sparse(self, masks: dict | None) -> bool:
        if masks is None:
            return False
        kept = sum(int(np.count_nonzero(masks[v.path])) for v, _ in self._masked)
        return self.kernels_for(kept / max(1, sum(int(np.prod(v.shape)) for v, _ in self._masked))) == "sparse"

    def kernels_for(self, remaining: float) -> str:
        """The kernels that masks keeping this fraction of the prunable weights train on, alone (no subgroup)."""
        if self._sparse_layers is None or not self.sparse_below or remaining > self.sparse_below:
            return "dense"
        from . import sparse

        if sparse.library() is None:
            import warnings

            warnings.warn(f"sparse kernels unavailable ({sparse.library_error()}): training on dense kernels", stacklevel=3)
            self._sparse_layers, self.sparse_unsupported = None, "no sparse kernels on this host"
            return "dense"
        return "sparse"

    def warm_up(self):
        """Trace and compile every step function now (one iteration), leaving weights and optimizer as they were.

        Ranks that wait while rank 0 trains the parent do this meanwhile, so their first task does not
        pay the compilation."""
        weights, state = self.get_weights(), self.get_optimizer_state()
        if self._sparse_layers is not None and self.sparse_below:
            from . import sparse

            sparse.library()  # compiled on this host's first use, cached for every later process
        self.fit(0, 1)
        self.set_weights(weights)
        self.reset_optimizer(state)

    # -- measuring ------------------------------------------------------------------------------
    def evaluate(self, split: str) -> tuple[float, float]:
        """Mean loss and accuracy over a split.

        Data-parallel replicas each evaluate their own share of the rows and sum the totals over the
        subgroup, so evaluation scales with the subgroup as training does; every replica gets the same
        sums, and so takes the same early-stopping decisions."""
        if self._engine is not None:
            xt, ys = self._flat(split)
            lsum, csum = self._engine.evaluate(xt, ys)
            return lsum / len(ys), csum / len(ys)
        x, y = self._x[split], self._y[split]
        n, step = int(x.shape[0]), self.eval_batch
        lo, hi = 0, n
        if self.reducer is not None:
            lo, hi = n * self.reducer.rank // self.reducer.size, n * (self.reducer.rank + 1) // self.reducer.size
        if self.fused or hi - lo <= step:  # one call: a Dense net slices the split inside it
            pieces = [(lo, hi)] if hi > lo else []
        else:
            pieces = [(i, min(i + step, hi)) for i in range(lo, hi, step)]
        sums = np.zeros(2)
        for a, b in pieces:
            lsum, csum = self._eval_block(*((x, y) if b - a == n else (x[a:b], y[a:b])))  # no copy of a whole split
            sums += (float(lsum), float(csum))
        if self.reducer is not None:
            sums = self.reducer.allreduce_sum(sums)
        return float(sums[0]) / n, float(sums[1]) / n

    def _flat(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split as the sparse kernels read it, made once per trainer: the training set as float32 rows of
        features (a view where possible), the evaluation splits feature-major; int32 labels."""
        if split not in self._flat_data:
            from .sparse import feature_major, flat

            x = flat(getattr(self.data, f"x_{split}"))
            self._flat_data[split] = (x if split == "train" else feature_major(x),
                                      np.ascontiguousarray(getattr(self.data, f"y_{split}"), np.int32))
        return self._flat_data[split]

    def _learning_rates(self, t: int, n: int) -> np.ndarray:
        """The learning rate of iterations t .. t + n - 1, as masked_update computes it."""
        steps = np.arange(t, t + n)
        drops = np.searchsorted(np.asarray(self.milestones, np.int64), steps, side="right").astype(np.float32)
        return (np.float32(self.cfg.lr) * np.power(np.float32(self.cfg.lr_gamma), drops)).astype(np.float32)

    # -- training -------------------------------------------------------------------------------
    def fit(self, start: int, end: int, checkpoints=(), on_checkpoint=None, progress=None) -> History:
        """Train iterations [start, end); evaluate every `eval_every` and at epoch ends; early-stop bookkeeping."""
        if self.kernels == "sparse":
            self._engine = self._sparse_engine()
            try:
                return self._fit(start, end, checkpoints, on_checkpoint, progress)
            finally:
                self._engine = self._engine_best = None
        return self._fit(start, end, checkpoints, on_checkpoint, progress)

    def _fit(self, start: int, end: int, checkpoints, on_checkpoint, progress) -> History:
        tf, engine = self.tf, self._engine
        h = History(start=start, end=end)
        ckpts = {c for c in checkpoints if start <= c <= end}
        if start in ckpts and on_checkpoint:
            on_checkpoint(start)
        if engine is not None:
            x_train, y_train = self._flat("train")
        every, per_epoch = self.eval_every, self.per_epoch
        bounds = set(range((start // every + 1) * every, end, every))
        bounds |= set(range((start // per_epoch + 1) * per_epoch, end, per_epoch))
        bounds |= {c for c in ckpts if c > start} | {end}
        t, epoch_loss, epoch_n, seg_loss, seg_n = start, 0.0, 0, 0.0, 0
        for b in sorted(bounds):
            while t < b:
                n = min(b - t, every)
                if engine is not None:
                    loss = engine.train(x_train, y_train, self.order.block(t, t + n), self._learning_rates(t, n))
                elif self.reducer is not None:
                    loss = self._train_steps_parallel(t, n)
                elif self.fused:
                    block = np.zeros((every, self.cfg.batch_size), np.int32)
                    block[:n] = self.order.block(t, t + n)
                    loss = float(self._train_block(self._x["train"], self._y["train"], tf.constant(block),
                                                   tf.constant(n, tf.int32), tf.constant(t, tf.int64)))
                else:
                    block = self.order.block(t, t + n)
                    losses = [self._train_step(self._x["train"], self._y["train"], tf.constant(block[i]),
                                               tf.constant(t + i, tf.int64)) for i in range(n)]
                    loss = sum(float(v) for v in losses)
                t += n
                seg_loss += loss
                seg_n += n
                if progress:
                    progress(n)
            if not math.isfinite(seg_loss):
                h.diverged = True
                break
            epoch_loss, epoch_n = epoch_loss + seg_loss, epoch_n + seg_n
            val_loss, val_acc = self.evaluate("val")
            h.evals.append(dict(iteration=b, train_loss=seg_loss / max(1, seg_n), val_loss=val_loss, val_accuracy=val_acc))
            seg_loss, seg_n = 0.0, 0
            if not math.isfinite(val_loss):
                h.diverged = True
                break
            if val_loss < h.best_val_loss:
                h.best_val_loss, h.best_iteration = val_loss, b
                if engine is not None:
                    self._engine_best = engine.snapshot()
                else:
                    self._snapshot()
            if b % per_epoch == 0 or b == end:
                _, test_acc = self.evaluate("test")
                h.epochs.append(dict(epoch=b / per_epoch, iteration=b, train_loss=epoch_loss / max(1, epoch_n),
                                     val_loss=val_loss, val_accuracy=val_acc, test_accuracy=test_acc))
                epoch_loss, epoch_n = 0.0, 0
            if b in ckpts and on_checkpoint:
                if engine is not None:
                    self._sync_from_engine()
                on_checkpoint(b)
        last = h.epochs[-1] if h.epochs else None
        if last is not None and last["iteration"] == end and not h.diverged:
            h.final_accuracy = last["test_accuracy"]  # measured at the last boundary already
        else:
            _, h.final_accuracy = self.evaluate("test")
        if self.reducer is not None:
            h.replicas = self.reducer.size
            h.replicas_identical = self.reducer.all_equal(self.weights_digest())
        if engine is not None:
            if h.best_iteration >= 0:
                final = engine.snapshot()
                engine.restore(self._engine_best)
                _, h.early_stop_accuracy = self.evaluate("test")
                engine.restore(final)
            self._sync_from_engine()
            return h
        if h.best_iteration >= 0:
            final = [v.numpy() for v in self.model.variables]
            for v, b in zip(self.model.variables, self._best):
                v.assign(b)
            _, h.early_stop_accuracy = self.evaluate("test")
            for v, w in zip(self.model.variables, final):
                v.assign(w)
        return h
