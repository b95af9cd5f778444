"""MaskedTrainer: one per process, built once and reused for every task. It holds the model, its masks and
its optimizer state (a late reset is an assignment of those, never a new model or a new trace), picks the
backend the current masks train on, and runs the fit loop on it."""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from ..runtime import configure_tensorflow, configured_threads
from ..steps import Step
from . import loop, optimizer as optim, step_form
from .batches import BatchOrder, InMemoryBatches
from .data_parallel import DataParallelBackend
from .dense import CompiledSteps, DenseBackend
from .lr_schedule import StepDecay
from .sparse_backend import SparseBackend, sparse_layout

log = logging.getLogger("lthmpi")
_SAID: set = set()  # reasons the sparse kernels are off, logged once per process

class MaskedTrainer:
    """Trains one model under a mask; weights, masks and optimizer state are swapped in per task.

    Backends (docs/trainer.md): dense XLA steps; data-parallel ones once `set_reducer` gives a subgroup;
    the sparse C kernels for Dense/ReLU nets whose mask keeps at most `sparse_below` of the weights."""

    def __init__(self, model, data, train_cfg, seed: int, prunable, augment: bool = False,
                 eval_chunk: int = 500, sparse_below: float = 0.0, jit: bool | None = None, fused: bool | None = None,
                 batches=None, conv_step: str | None = None):
        """`jit`, `fused` None: as lthmpi/devices.py's kernel_plan says for this net, device and precision (on the
        CPU conv nets run one step per call on oneDNN without XLA; on a GPU every net whole blocks under XLA).
        `conv_step` "graph" | "xla": the form of a CPU conv net's step (training/step_form.py; None: as `jit`
        says, and `choose_conv_step` may time and switch it later); nets it does not apply to ignore it."""
        from ..devices import kernel_plan
        from ..models import has_convolutions
        from ..runtime import configured_placement

        self.threads = configured_threads() or 1
        self.tf = tf = configure_tensorflow(self.threads)
        self.model, self.data, self.cfg, self.seed = model, data, train_cfg, seed
        placement = configured_placement()
        self.precision = getattr(train_cfg, "precision", "float32")
        plan = kernel_plan(placement.kind if placement else "cpu", has_convolutions(model), sparse_below, self.precision)
        fused = plan.fused if fused is None else fused
        jit = plan.jit if jit is None else jit
        self.fused = fused
        # A CPU conv net's step has two forms (graph | xla, training/step_form.py); the evaluation keeps `jit`'s.
        self.step_forms = plan.step_forms and not fused
        step_jit = (conv_step == "xla") if self.step_forms and conv_step in step_form.FORMS else jit
        # A training set left on disk (data.in_memory = false; docs/data.md) is read a few steps ahead by a
        # background thread; uint8 images (data.norm) are normalised inside the compiled steps, in memory or not.
        self.streamed = not getattr(data, "in_memory", True)
        norm = getattr(data, "norm", None)
        if batches is None and self.streamed:
            from ..data.disk_batches import DiskSource

            order = BatchOrder(len(data.x_train), train_cfg.batch_size, seed)
            every = max(1, Step.parse(train_cfg.eval_every).iterations(order.per_epoch))
            batches = DiskSource(data, order, ahead=2 * every, pad=every if fused else 1)
        if batches is None:  # the data live where the steps run: on a GPU, copied there once, not with every call
            with tf.device("/GPU:0" if placement is not None and placement.kind == "gpu" else "/CPU:0"):
                batches = InMemoryBatches(tf, data, train_cfg.batch_size, seed)
        self.batches = batches
        self.order = self.batches.order
        self.per_epoch = self.order.per_epoch
        self.eval_every = max(1, Step.parse(train_cfg.eval_every).iterations(self.per_epoch))
        self.schedule = StepDecay.of(train_cfg, self.per_epoch)
        self.optimizer = optim.make_optimizer(train_cfg)
        self.optimizer.build(model.trainable_variables)
        self.variables = {v.path: v for v in model.variables}
        self.opt_variables = optim.state_variables(self.optimizer)
        self._opt_fresh = {p: v.numpy() for p, v in self.opt_variables.items()}  # zeros, but a loss scale (float16)
        if len(self.variables) != len(model.variables):
            raise ValueError("model variable paths are not unique: give every layer a distinct name")
        prunable_ids = {id(v) for v in prunable}
        self.prunable_paths = [v.path for v in model.variables if id(v) in prunable_ids]
        self._masked = [(v, tf.Variable(tf.ones(v.shape, v.dtype), trainable=False, name="mask"))
                        for v in model.trainable_variables if id(v) in prunable_ids]
        self._mask_of = {id(v): m for v, m in self._masked}
        elems = int(np.prod(data.x_train.shape[1:]))
        eval_batch = max(1, (1 << 25) // max(1, elems * 4))  # 32 MiB of inputs per call (conv nets)
        self.steps = CompiledSteps(tf, model, self.optimizer, self._masked, train_cfg.batch_size, seed,
                                   l2=optim.coupled_weight_decay(train_cfg), augment=augment, jit=jit, fused=fused,
                                   eval_chunk=eval_chunk, norm=norm, step_jit=step_jit)
        self._train_block, self._eval_block = self.steps.train_block, self.steps.eval_block  # for tests of retracing
        self._dense = DenseBackend(self.steps, self.batches, self.eval_every, eval_batch)
        self._eval_batch = eval_batch
        self.reducer = None
        self._parallel: DataParallelBackend | None = None
        # Sparse kernels (lthmpi/sparse.py) for masks that keep at most `sparse_below` of the prunable weights.
        self.sparse_below = plan.sparse_below
        layers, self.sparse_unsupported = sparse_layout(model, self.optimizer, train_cfg, set(self._mask_of), augment)
        if norm is not None or self.streamed:  # the C kernels read float32 rows held in memory
            layers, self.sparse_unsupported = None, "uint8 images or a training set on disk"
        self._sparse = SparseBackend(layers, self._mask_of, self.optimizer, train_cfg, self.batches) if layers else None
        self._sparse_active = False  # the current masks train on the sparse kernels
        self._fitting = None  # the backend of the fit in progress
        self.conv_step_why = ""  # how choose_conv_step came to the form, for the run's log

    # -- the conv step's form --------------------------------------------------------------------------
    @property
    def conv_step(self) -> str:
        """The form of a CPU conv net's step, "graph" or "xla" (recorded with each task); "" where the net has
        one form (Dense-only nets, a GPU)."""
        if not self.step_forms:
            return ""
        return "xla" if self.steps.step_jit else "graph"

    def use_conv_step(self, form: str):
        """Train in `form` ("graph" | "xla"); a net without the two forms ignores it."""
        if self.step_forms and form:
            if form not in step_form.FORMS:
                raise ValueError(f"conv step form {form!r} is unknown ({', '.join(step_form.FORMS)})")
            self.steps.use_step_jit(form == "xla")

    def choose_conv_step(self, setting: str, iterations: int, time_form=None, cache: str | None = None) -> str:
        """Resolve parallel.conv_step = `setting` (auto: the cached choice for this host, model, batch and
        threads, else the faster form timed now; training/step_form.py), train in it and return it ("" for a
        net with one form). `time_form(form)` -> seconds per step replaces the measurement (tests)."""
        if not self.step_forms:
            return ""
        import tensorflow as tf

        from ..runtime import configured_deterministic

        fields = dict(model=self.model.name, input=list(self.data.x_train.shape[1:]), params=self.model.count_params(),
                      batch=self.cfg.batch_size, threads=self.threads, precision=self.precision,
                      deterministic=configured_deterministic(), tensorflow=tf.__version__)
        form, why = step_form.choose(setting, fields, time_form or self.time_conv_step, iterations, cache)
        self.use_conv_step(form)
        self.conv_step_why = why
        log.debug("conv step: %s (%s)", form, why)
        return form

    def time_conv_step(self, form: str, warm: int = step_form.WARM, timed: int = step_form.TIMED) -> float:
        """Seconds per step of `form` on this model, batch and thread count: `warm` steps (the first traces and
        compiles it), then `timed` steps timed, as the fit loop calls them; weights and optimizer state are
        left as they were, and the form as it was."""
        weights, state, was = self.get_weights(), self.get_optimizer_state(), self.conv_step
        backend = self._dense
        try:
            self.use_conv_step(form)
            backend.train(0, warm, self.schedule.rates(0, warm))
            t0 = time.perf_counter()
            backend.train(warm, timed, self.schedule.rates(warm, timed))
            return (time.perf_counter() - t0) / timed
        finally:
            self.use_conv_step(was)
            self.set_weights(weights)
            self.reset_optimizer(state)

    # -- backends ------------------------------------------------------------------------------------
    @property
    def kernels(self) -> str:
        """Which kernels the current masks train on: "sparse" or "dense"."""
        return self.backend().kernels

    def backend(self):
        """The backend the current masks and reducer train on."""
        if self.reducer is not None:
            return self._parallel
        return self._sparse if self._sparse_active else self._dense

    def set_reducer(self, reducer):
        """Train data-parallel with `reducer` (allreduce_sum, all_equal, rank, size) or alone (None)."""
        self.reducer = reducer if reducer is not None and reducer.size > 1 else None
        self._parallel = None if self.reducer is None else DataParallelBackend(
            self.steps, self.batches, self.eval_every, self._eval_batch, self.reducer, self.weights_digest)

    def kernels_for(self, remaining: float) -> str:
        """The kernels that masks keeping this fraction of the prunable weights train on, alone (no subgroup)."""
        if not self.sparse_below or remaining > self.sparse_below:
            return "dense"
        if self._sparse is None:
            if self.sparse_unsupported not in _SAID:
                _SAID.add(self.sparse_unsupported)
                log.info("sparse kernels off (%s): masks keeping <= %g train on the dense kernels",
                         self.sparse_unsupported, self.sparse_below)
            return "dense"
        from .. import sparse

        if sparse.library() is None:
            import warnings

            warnings.warn(f"sparse kernels unavailable ({sparse.library_error()}): training on dense kernels", stacklevel=3)
            self._sparse, self.sparse_unsupported = None, "no sparse kernels on this host"
            return "dense"
        return "sparse"

    # -- state ---------------------------------------------------------------------------------------
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
        d = hashlib.sha256()
        for v in self.model.variables:
            d.update(np.ascontiguousarray(v.numpy()).tobytes())
        return d.hexdigest()

    def get_optimizer_state(self) -> dict:
        return {p: v.numpy() for p, v in self.opt_variables.items()}

    def reset_optimizer(self, state: dict | None = None):
        """A fresh optimizer (zero moments, step 0, the initial loss scale), or the state saved at a reset point."""
        for p, v in self.opt_variables.items():
            v.assign(state[p] if state is not None else self._opt_fresh[p])

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

    def warm_up(self):
        """Trace and compile every step function now (one iteration), leaving weights and optimizer as they were.

        Ranks that wait while rank 0 trains the parent do this meanwhile, so their first task does not
        pay the compilation."""
        weights, state = self.get_weights(), self.get_optimizer_state()
        if self._sparse is not None and self.sparse_below:
            from .. import sparse

            sparse.library()  # compiled on this host's first use, cached for every later process
        self.fit(0, 1)
        self.set_weights(weights)
        self.reset_optimizer(state)

    # -- measuring and training ----------------------------------------------------------------------
    def evaluate(self, split: str) -> tuple[float, float]:
        """Mean loss and accuracy over a split, on the backend of the fit in progress (else the current one's
        TensorFlow side: outside a fit the sparse kernels hold no state)."""
        if self._fitting is not None:
            return self._fitting.evaluate(split)
        return (self._parallel or self._dense).evaluate(split)

    def fit(self, start: int, end: int, checkpoints=(), on_checkpoint=None, progress=None,
            order_seed: int | None = None) -> loop.History:
        """Train iterations [start, end); evaluate every `eval_every` and at epoch ends; early-stop bookkeeping.

        `order_seed` draws the batch order from another seed than the trainer's, for this fit only (copy B of a
        stability pair, docs/stability.md: the same training but for the data order)."""
        if order_seed is not None and order_seed != self.order.seed:
            mine = self.batches.order
            self.batches.set_order(BatchOrder(mine.n, mine.batch, order_seed))
            try:
                return self.fit(start, end, checkpoints, on_checkpoint, progress)
            finally:
                self.batches.set_order(mine)
        self._fitting = self.backend()
        try:
            return loop.fit(self._fitting, self.schedule, start, end, self.eval_every, self.per_epoch, checkpoints,
                            progress=progress, on_checkpoint=on_checkpoint)
        finally:
            self._fitting = None
