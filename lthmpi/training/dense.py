"""The dense backend: XLA-compiled masked steps on TensorFlow's kernels, and the compiled evaluation.

One compiled call runs up to `eval_every` steps, gathering each batch from a (K, B) block of row indices
into the training split passed as an argument (docs/performance.md: a Python call per step costs more than the
step). After every optimizer update the weights are re-masked, so Adam moments, momentum and weight decay
never revive a pruned weight. Conv nets on the CPU take one call per step (XLA:CPU runs a convolution inside a
while loop ~100x slower: Conv-2, batch 60, 31 s against 0.31 s per step; their steps are long enough that the
call costs nothing), in one of two forms (`use_step_jit`, chosen by training/step_form.py): on TensorFlow's
graph executor and oneDNN, where only the optimizer update and re-mask, elementwise work, is compiled by XLA,
as one fused pass per variable instead of one kernel per operation; or wholly under XLA (run/bench_conv.py).
"""
from __future__ import annotations

import functools

import numpy as np


class CompiledSteps:
    """The traced functions of one model, optimizer and set of mask variables, built once per process."""

    def __init__(self, tf, model, optimizer, masked, batch_size: int, seed: int, l2: float = 0.0,
                 augment: bool = False, jit: bool = True, fused: bool = True, eval_chunk: int = 500, norm=None,
                 step_jit: bool | None = None):
        """`jit`: XLA for the blocks and the evaluation; `step_jit` (None = `jit`): XLA for the one-step-a-call
        functions (train_step and the data-parallel halves), which `use_step_jit` switches later (the conv
        step's two forms, training/step_form.py)."""
        self.tf, self.model, self.optimizer, self.masked = tf, model, optimizer, masked
        self.fused, self.eval_chunk = fused, eval_chunk
        self.best = [tf.Variable(v, trainable=False) for v in model.variables]
        trainable = model.trainable_variables
        augment_batch = None
        if augment:
            from ..data.augment import augment_batch
        if norm is not None:  # uint8 images (a prepared image tree): float32 (x - shift) / div, per channel
            shift, div = (tf.constant(v, tf.float32) for v in norm)

            def prep(x):
                return (tf.cast(x, tf.float32) - shift) / div
        else:
            def prep(x):
                return x

        # tf.function without AutoGraph: every branch and loop below is on Python values or an explicit
        # tf.while_loop, and Keras 3's layers and optimizers use ops.cond/ops.while_loop (they run under jax.jit
        # too), so AutoGraph's rewrite of each traced function changes no op. It cost about 1.5 s of CPU in every
        # process that trains (its transpiler parses and recompiles the Python source).
        function = functools.partial(tf.function, autograph=False)

        # Mixed precision: the layers compute in bfloat16/float16 and so give logits in it; the loss, its
        # softmax and the accuracy are taken in float32. With float16 the loss is scaled for the gradients
        # inside the tape (the LossScaleOptimizer unscales them, and skips a step whose gradients overflowed).
        import keras

        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        def xent(y, logits):
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(logits, tf.float32))

        def for_gradients(loss):  # inside the tape
            return optimizer.scale_loss(loss) if scaled else loss

        def loss_fn(y, logits):
            return tf.reduce_mean(xent(y, logits))

        def masked_update(grads, lr):
            """Set the learning rate, take the optimizer step, then re-mask the weights.

            The gradients go to the optimizer unmasked: every optimizer here (Adam, AdamW, SGD with
            momentum and weight decay) updates each weight from its own gradient and slots alone, so a
            kept weight gets the update a masked gradient would give it (the gradient there is the same
            number), and the re-mask holds every pruned weight at exactly zero whatever its slots hold,
            even inf or NaN (a select, not a product: NaN * 0 is NaN). Not masking the gradients
            spares each slot update a pass over the mask (docs/performance.md, "The masked trainer")."""
            optimizer.learning_rate.assign(lr)
            if l2:  # coupled L2 (train.weight_decay_mode = "l2"): before momentum or Adam's moments see it
                k = l2 * optimizer.dynamic_scale if scaled else l2  # float16: the gradients are still loss-scaled
                grads = [g + k * v for g, v in zip(grads, trainable)]
            optimizer.apply_gradients(zip(grads, trainable))
            for v, m in masked:
                v.assign(tf.where(m != 0, v, tf.zeros_like(v)))

        # Without XLA for the step (conv nets on the CPU), the update and re-mask still get it: one fused pass per
        # variable (momentum or moments, weight, mask) instead of an unfused kernel per operation.
        compiled_update = function(masked_update, jit_compile=True)

        def update_for(compiled: bool):
            return masked_update if compiled else compiled_update

        update = update_for(jit)

        def batch(x, y, rows, t):
            xb, yb = prep(tf.gather(x, rows)), tf.gather(y, rows)
            if augment_batch is not None:
                xb = augment_batch(xb, tf.stack([tf.constant(seed, tf.int64), t]))
            return xb, yb

        def one_step(x, y, rows, t, lr, update=update):
            xb, yb = batch(x, y, rows, t)
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
                target = for_gradients(loss)
            update(tape.gradient(target, trainable), lr)
            return loss

        @function(jit_compile=jit)
        def train_block(x, y, idx, lrs, n, start):
            # An explicit while_loop on `i < n`: with `for i in tf.range(n)` XLA takes n as a
            # compile-time constant and recompiles (~0.8 s) for every new length of a partial block.
            def step(i, total):
                return i + 1, total + one_step(x, y, tf.gather(idx, i), start + tf.cast(i, tf.int64), tf.gather(lrs, i))

            _, total = tf.while_loop(lambda i, total: i < n, step, (tf.constant(0, tf.int32), tf.constant(0.0)))
            return total

        def eval_sums(x, y):
            logits = tf.cast(model(prep(x), training=False), tf.float32)
            losses = xent(y, logits)
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y), tf.float32)
            return tf.reduce_sum(losses), tf.reduce_sum(correct)

        chunk = eval_chunk

        @function(jit_compile=jit)
        def eval_block(x, y):
            if not fused:
                return eval_sums(x, y)
            # A Dense net evaluates a whole split in one call, `chunk` rows at a time: XLA's CPU matmul runs
            # 5000x784x300 at ~70 GFLOP/s and 500-row slices of it at ~85 (docs/performance.md).
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

        @function()
        def snapshot():
            for b, v in zip(self.best, model.variables):
                b.assign(v)

        sizes = [int(np.prod(v.shape)) for v in trainable]
        batch_f = float(batch_size)

        def step_functions(compiled: bool):
            """The one-step-a-call functions, with or without XLA for the whole step (traced on first call)."""
            step_update = update_for(compiled)

            @function(jit_compile=compiled)
            def train_step(x, y, rows, t, lr):
                return one_step(x, y, rows, t, lr, step_update)

            # Data-parallel halves: one replica's gradients (summed across the subgroup between the two), then the update.
            @function(jit_compile=compiled)
            def shard_gradients(x, y, rows, t):
                xb, yb = batch(x, y, rows, t)
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(xent(yb, model(xb, training=True))) / batch_f
                    target = for_gradients(loss)
                grads = tape.gradient(target, trainable)
                return tf.concat([tf.reshape(g, [-1]) for g in grads] + [tf.reshape(loss, [1])], axis=0)

            @function(jit_compile=compiled)
            def apply_flat(flat, lr):
                parts = tf.split(flat[:-1], sizes)
                step_update([tf.reshape(g, v.shape) for g, v in zip(parts, trainable)], lr)

            return train_step, shard_gradients, apply_flat

        self._step_functions, self._forms = step_functions, {}
        self.train_block, self.eval_block, self.snapshot = train_block, eval_block, snapshot
        self.use_step_jit(jit if step_jit is None else step_jit)

    def use_step_jit(self, compiled: bool):
        """Train one step a call with XLA for the whole step (True) or on the graph executor (False): the
        functions of each are built once and kept, so switching back costs no second trace."""
        if compiled not in self._forms:
            self._forms[compiled] = self._step_functions(compiled)
        self.train_step, self.shard_gradients, self.apply_flat = self._forms[compiled]
        self.step_jit = compiled


class DenseBackend:
    """Trains on `steps` (CompiledSteps) from `batches` (a batch source); the model's variables are the state."""

    kernels = "dense"

    def __init__(self, steps: CompiledSteps, batches, every: int, eval_batch: int):
        self.steps, self.batches, self.every, self.eval_batch = steps, batches, every, eval_batch
        self.tf = steps.tf

    # -- the fit loop's interface --------------------------------------------------------------------
    def begin(self):
        pass

    def train(self, t: int, n: int, lrs: np.ndarray) -> float:
        """n steps from iteration t at learning rates lrs; the sum of their mean losses."""
        tf, s = self.tf, self.steps
        per_step = getattr(self.batches, "per_step", False) and not s.fused  # from disk: one step's rows a call
        x, y, idx = (None, None, None) if per_step else self.batches.train_feed(t, n)
        if s.fused:  # one call for the block, padded to a fixed shape so that XLA compiles once
            block = np.zeros((self.every, idx.shape[1]), np.int32)
            block[:n] = idx
            rates = np.zeros(self.every, np.float32)
            rates[:n] = lrs
            return float(s.train_block(x, y, tf.constant(block), tf.constant(rates), tf.constant(n, tf.int32),
                                       tf.constant(t, tf.int64)))
        feeds = ((i, self.batches.train_feed(t + i, 1) if per_step else (x, y, idx[i:i + 1])) for i in range(n))
        losses = [s.train_step(xi, yi, tf.constant(rows[0]), tf.constant(t + i, tf.int64), tf.constant(lrs[i]))
                  for i, (xi, yi, rows) in feeds]
        return sum(float(v) for v in losses)

    def evaluate(self, split: str) -> tuple[float, float]:
        """Mean loss and accuracy over a split."""
        x, _ = self.batches.split(split)
        n = int(x.shape[0])
        sums = self.sums(split, 0, n)
        return float(sums[0]) / n, float(sums[1]) / n

    def keep_best(self):
        self.steps.snapshot()

    def best_test_accuracy(self) -> float:
        """Test accuracy of the kept best weights; the current weights are back in place afterwards."""
        variables = self.steps.model.variables
        final = [v.numpy() for v in variables]
        for v, b in zip(variables, self.steps.best):
            v.assign(b)
        _, acc = self.evaluate("test")
        for v, w in zip(variables, final):
            v.assign(w)
        return acc

    def replicas(self) -> tuple[int, bool]:
        return 1, True

    def sync(self):
        pass

    def end(self):
        pass

    # -- helpers ---------------------------------------------------------------------------------------
    def sums(self, split: str, lo: int, hi: int) -> np.ndarray:
        """(loss sum, correct count) over rows [lo, hi) of a split."""
        x, y = self.batches.split(split)
        n, step = int(x.shape[0]), self.eval_batch
        if (self.steps.fused and getattr(self.batches, "whole_splits", True)) or hi - lo <= step:
            # one call: a Dense net slices the split inside it
            pieces = [(lo, hi)] if hi > lo else []
        else:
            pieces = [(i, min(i + step, hi)) for i in range(lo, hi, step)]
        sums = np.zeros(2)
        for a, b in pieces:
            lsum, csum = self.steps.eval_block(*((x, y) if b - a == n else (x[a:b], y[a:b])))  # no copy of a whole split
            sums += (float(lsum), float(csum))
        return sums
