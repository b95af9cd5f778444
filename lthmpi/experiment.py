"""One experiment in one process: data, model, trainer, the parent run and the masks.

What runs on them, the retrainings and evaluations, is the experiment kinds' (lthmpi/kinds/). Knows nothing of
MPI: a rank is only who builds it. Every stage is idempotent: what is complete on disk is loaded, not
recomputed, so a rerun after any interruption resumes where the last one stopped.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from .config import Config
from .steps import Step
from . import criteria, transfer
from .kinds import imp, registry
from .pruning import fraction_remaining, magnitude_masks
from .store import RunDir, StoreError, hostname, mixed_kernels, task_conv_step
from .validation import validate_against_data, validate_against_model

log = logging.getLogger("lthmpi")


class Experiment:
    """Data, model and trainer are built once; parent, masks and tasks are loaded or computed on demand."""

    def __init__(self, cfg: Config, run_dir: str, rank: int = 0, threads: int | None = None, slot=None):
        """With `threads`, TensorFlow is configured (and imported) only after the data are read and checked
        against the config, so that a data or config error is reported in a second, not after TF's import;
        `slot` (a devices.NodeSlot) says where this rank sits on its node, for its GPU."""
        from .data import load_dataset

        self.cfg, self.rank, self.host = cfg, rank, hostname()
        self.run = RunDir(run_dir)
        self.data = load_dataset(cfg.data, cfg.seed)
        per_epoch = len(self.data.x_train) // cfg.train.batch_size
        self.total = validate_against_data(cfg, per_epoch, len(self.data.x_train))
        if threads is not None:
            from .runtime import configure_tensorflow

            configure_tensorflow(threads, cfg.train.deterministic, cfg.parallel.device, slot)
        from .devices import Placement
        from .models import build_model, prunable_variables
        from .runtime import configured_deterministic, configured_placement
        from .training import MaskedTrainer

        self.iterations_per_epoch = per_epoch
        self.reset_iterations = [s.iterations(per_epoch) for s in cfg.reset_steps()]
        stability = cfg.stability_steps() if cfg.stability.enabled else []
        self.score_iteration = Step.parse(cfg.prune.score_at).iterations(per_epoch)
        self.checkpoint_iterations = sorted({0, self.total, self.score_iteration, *self.reset_iterations,
                                             *(s.iterations(per_epoch) for s in stability)})
        self.model = build_model(cfg.model.name, self.data.input_shape, self.data.num_classes, cfg.seed,
                                 cfg.train.precision)
        self.prunable = [v.path for v in prunable_variables(self.model)]
        self.sizes = {v.path: int(np.prod(v.shape)) for v in prunable_variables(self.model)}
        validate_against_model(cfg, self.sizes)
        if cfg.prune.masks_from and not os.path.exists(self.run.masks_path):
            transfer.check(self)  # a source that does not fit is refused before the parent trains
        self.placement = configured_placement() or Placement("cpu")  # threads None: TF set up by the caller
        self.deterministic = configured_deterministic()
        if self.deterministic is None:
            self.deterministic = cfg.train.deterministic
        conv_step = cfg.parallel.conv_step  # auto: the rule's form until choose_conv_step (the run's start-up)
        self.trainer = MaskedTrainer(self.model, self.data, cfg.train, cfg.seed, prunable_variables(self.model),
                                     augment=cfg.data.augment, sparse_below=cfg.parallel.sparse_below,
                                     conv_step=None if conv_step == "auto" else conv_step)
        self.initial_weights = self.trainer.get_weights()
        self.checkpoints: dict | None = None
        self.optimizer_states: dict = {}
        self.parent_info: dict = {}
        self.masks: list | None = None
        self.remaining: list = []
        self.scores: dict | None = None  # the criterion's scores (for the invert control), when the masks file has them
        self.transfer = None  # kinds/transfer.Source when prune.masks_from names a run
        self._finished: dict | None = None  # finished_tasks(), read once at start-up
        self.conv_step_note = ""  # how choose_conv_step / settle_conv_step came to the form

    def finished_tasks(self) -> dict:
        """Task id -> attrs of every task already on disk, read once (start-up asks twice)."""
        if self._finished is None:
            self._finished = {tid: self.run.read_task(tid)[0] for tid in self.run.done_tasks()}
        return self._finished

    def choose_conv_step(self) -> str:
        """The form of a CPU conv net's step for this run (parallel.conv_step), set on the trainer and returned
        ("" for a net with one form). auto keeps the form that the finished tasks on disk all trained in, so
        that resuming a run never mixes forms; otherwise the cached or timed faster one (training/step_form.py)."""
        tr, setting = self.trainer, self.cfg.parallel.conv_step
        if not tr.step_forms:
            return ""
        if setting == "auto":
            recorded = self.run.recorded_conv_step()
            forms = {recorded} if recorded else {task_conv_step(a) for a in self.finished_tasks().values()
                                                 if int(a.get("iterations", 1)) != 0 and int(a.get("threads", 1))}
            forms -= {""}
            if len(forms) == 1 and forms <= {"graph", "xla"}:
                (form,) = forms
                tr.use_conv_step(form)
                self.conv_step_note = (f"the form recorded in {self.run.conv_step_path}" if recorded
                                       else f"the form of the finished tasks in {self.run.path}")
                return form
        form = tr.choose_conv_step(setting, self.total)
        self.conv_step_note = tr.conv_step_why
        return form

    def settle_conv_step(self) -> str:
        """Once the run directory exists: record this run's conv step form there unless one is (write-once);
        with auto, train in the recorded one (a job-array shard that chose at the same time as another)."""
        tr = self.trainer
        if not tr.conv_step:
            return ""
        form = self.run.record_conv_step(tr.conv_step)
        if form != tr.conv_step and self.cfg.parallel.conv_step == "auto":
            self.conv_step_note = f"not {tr.conv_step}: {form} was recorded first in {self.run.conv_step_path}"
            tr.use_conv_step(form)
        return tr.conv_step

    def conv_step_line(self) -> str:
        """The log line of the conv step's form and how it was chosen ("" for a net with one form)."""
        form = self.trainer.conv_step
        return f"conv step: {form} ({self.conv_step_note or 'parallel.conv_step = ' + repr(form)})" if form else ""

    def check_rerun(self, allow_mixed: bool = False):
        """Before a rerun trains anything: finished tasks trained with another thread count, other kernels or
        another form of the conv step are named, and refused unless `allow_mixed` (--allow-mixed-kernels);
        then only logged."""
        done = self.finished_tasks()
        lines = mixed_kernels(done, self.trainer.threads, self.trainer.kernels_for, self.trainer.conv_step)
        if lines and not allow_mixed:
            raise StoreError(f"run directory {self.run.path} holds tasks trained otherwise than this run would train "
                             f"the rest ({'; '.join(lines)}): rerun with the parallel.threads, "
                             f"parallel.sparse_below and parallel.conv_step they had, or pass "
                             f"--allow-mixed-kernels to mix them")
        for line in lines:
            log.warning("mixing kernels as allowed: %s", line)

    # -- parent ---------------------------------------------------------------------------------
    def parent_done(self) -> bool:
        return os.path.exists(self.run.parent_path)

    def train_parent(self, progress=None, write: bool = True, early=()):
        """Train the dense network, keeping weights and optimizer state at 0, every reset point (and stability
        point) and T. The checkpoints at the iterations `early` are also written each to a file of its own as
        soon as they are reached (RunDir.write_checkpoint), for the ranks that train tasks needing only them.

        With `write` False (a data-parallel replica that is not rank 0) the checkpoints stay in memory.
        """
        if self.parent_done():
            return self.load_parent()
        t0 = time.monotonic()  # a duration: immune to the wall clock being set
        tr = self.trainer
        tr.set_weights(self.initial_weights)
        tr.set_masks(None)
        tr.reset_optimizer(None)
        keep = set(self.checkpoint_iterations)
        ckpts, opts = {}, {}

        def save(it):
            ckpts[it] = tr.get_weights()
            opts[it] = tr.get_optimizer_state()
            if write and it in early:
                self.run.write_checkpoint(it, ckpts[it], opts[it])

        h = tr.fit(0, self.total, checkpoints=keep, on_checkpoint=save, progress=progress)
        if h.diverged:
            raise RuntimeError("the dense parent run diverged (loss became NaN); lower train.lr")
        attrs = dict(test_accuracy=h.final_accuracy, early_stop_accuracy=h.early_stop_accuracy,
                     early_stop_iteration=h.early_stop_iteration, iterations=self.total,
                     seconds=time.monotonic() - t0, end_time=time.time(), rank=self.rank, host=self.host)
        history = {f"epochs/{k}": [e[k] for e in h.epochs] for k in (h.epochs[0] if h.epochs else {})}
        history.update({f"evals/{k}": [e[k] for e in h.evals] for k in (h.evals[0] if h.evals else {})})
        if not write:
            self.checkpoints, self.optimizer_states, self.parent_info = ckpts, opts, attrs
            return attrs
        self.run.write_checkpoints(ckpts, opts, history, attrs)
        log.info("parent: test accuracy %.4f after %d iterations (%.1f s)", h.final_accuracy, self.total, attrs["seconds"])
        return self.load_parent()

    def load_checkpoint(self, it: int):
        """One parent checkpoint from its own file (written while the parent trains), before parent.h5 exists."""
        weights, state = self.run.read_checkpoint(it)
        self.checkpoints = {**(self.checkpoints or {}), it: weights}
        if state:
            self.optimizer_states = {**self.optimizer_states, it: state}

    def load_parent(self):
        self.checkpoints, self.optimizer_states, self.parent_info = self.run.read_checkpoints()
        needed = set(self.checkpoint_iterations)
        missing = needed - set(self.checkpoints)
        if missing:
            raise StoreError(f"parent checkpoint file {self.run.parent_path} lacks checkpoints at iterations "
                             f"{sorted(missing)}; delete it to retrain the parent")
        model = {v.path: tuple(v.shape) for v in self.model.variables}
        for it in sorted(needed):
            for p, shape in model.items():
                got = self.checkpoints[it].get(p)
                if got is None or tuple(got.shape) != shape:
                    found = "missing" if got is None else f"shape {tuple(got.shape)}"
                    raise StoreError(f"parent checkpoint file {self.run.parent_path} does not match the model "
                                     f"({p} at iteration {it}: {found}, the model needs {shape}); "
                                     f"delete it to retrain the parent")
        return self.parent_info

    # -- masks ----------------------------------------------------------------------------------
    def compute_masks(self):
        """Masks from the *final* parent weights (never from a reset point's weights) by magnitude, or by
        prune.criterion at the weights at prune.score_at (pruning at initialization: θ_0), or a source run's
        (prune.masks_from); for IMP, every chain's first level (the later levels' masks come from the levels
        before them)."""
        if self.cfg.imp:
            final = self.checkpoints[self.total]
            imp.write_first_masks(self.run, self.cfg, {p: final[p] for p in self.prunable}, len(self.reset_iterations))
            return self.load_masks()
        if os.path.exists(self.run.masks_path):
            return self.load_masks()
        if self.cfg.prune.masks_from:
            transfer.write_masks(self)
            return self.load_masks()
        p = self.cfg.prune
        targets = self.cfg.remaining_fractions()
        keep_scores = "invert" in self.cfg.reset.controls
        if p.criterion == "magnitude":
            final = self.checkpoints[self.total]
            weights = {q: final[q] for q in self.prunable}
            masks = [magnitude_masks(weights, r, p.scope, p.layer_rates) for r in targets]
            scores = criteria.magnitude_scores(weights) if keep_scores else None
            self.run.write_masks(masks, [fraction_remaining(m) for m in masks], targets, scores)
            return self.load_masks()
        masks, scores = self._criterion_masks(targets)
        self.run.write_masks(masks, [fraction_remaining(m) for m in masks], targets,
                             scores if keep_scores else None, {"criterion": p.criterion, "score_at": p.score_at})
        log.info("masks by %s at %s", p.criterion, p.score_at)
        return self.load_masks()

    def _criterion_masks(self, targets: list) -> tuple[list, dict]:
        """Scores of prune.criterion at the weights at prune.score_at (single-shot, once for every fraction;
        synflow: iterative per fraction, its single-shot scores kept for invert), and the masks cut from them."""
        p, cfg = self.cfg.prune, self.cfg
        self.trainer.set_weights(self.checkpoints[self.score_iteration])
        batches = None
        if p.criterion in criteria.DATA_CRITERIA:
            x, y = self.data.x_train, self.data.y_train
            rows = np.random.default_rng([cfg.seed, 34]).permutation(len(x))[: p.score_batches * cfg.train.batch_size]
            batches = [(self.data.as_float(x[np.sort(idx)]), np.asarray(y[np.sort(idx)]))
                       for idx in np.split(rows, p.score_batches)]
        scores = criteria.scores(p.criterion, self.model, batches=batches, seed=[cfg.seed, 34])
        if p.criterion == "synflow":
            masks = [criteria.synflow_masks(self.model, r, p.scope, p.layer_rates, p.synflow_iterations)
                     for r in targets]
        else:
            masks = [criteria.masks_from_scores(scores, r, p.scope, p.layer_rates) for r in targets]
        return masks, scores

    def load_masks(self):
        if self.cfg.imp:  # each level reads its own chain's mask when it starts
            self.masks, self.remaining = None, imp.planned_fractions(self.cfg, self.sizes)
            return self.masks
        self.masks, self.remaining = self.run.read_masks()
        self.scores, attrs = self.run.read_mask_extras()
        if self.cfg.prune.masks_from:
            self.transfer = transfer.load(self, attrs)
        if len(self.masks) != len(self.cfg.remaining_fractions()):
            raise StoreError(f"mask file {self.run.masks_path} holds {len(self.masks)} masks, the config asks for "
                             f"{len(self.cfg.remaining_fractions())}; delete it to recompute the masks")
        shapes = {v.path: tuple(v.shape) for v in self.model.variables}
        for i, m in enumerate(self.masks):
            for p in self.prunable:
                if p not in m or tuple(m[p].shape) != shapes[p]:
                    found = "missing" if p not in m else f"shape {tuple(m[p].shape)}"
                    raise StoreError(f"mask file {self.run.masks_path} does not match the model (mask {i}, {p}: "
                                     f"{found}, the model needs {shapes[p]}); delete it to recompute the masks")
        return self.masks

    def mask(self, index: int, reset: int) -> dict:
        """Mask `index` (one-shot), or IMP level index + 1 of chain `reset` as the level before wrote it."""
        return imp.mask_of(self.run, imp.ticket(index + 1, reset)) if self.cfg.imp else self.masks[index]

    def chain_stopped(self, index: int, reset: int) -> str:
        """IMP: the diverged ticket that stopped chain `reset` before level index + 1 made its mask ("" when the
        mask exists or will; always "" for one-shot)."""
        return imp.stopped_at(self.run, imp.ticket(index + 1, reset)) if self.cfg.imp else ""

    def mask_made_by(self, index: int, reset: int) -> str | None:
        """The id of the task that writes mask `index` of chain `reset` (IMP levels above 1), None when the masks
        phase made it."""
        dep = imp.depends_on(imp.ticket(index + 1, reset)) if self.cfg.imp else None
        return dep.id if dep else None

    # -- one process (tests, notebooks): the retrainings of this run's prune.method, in order ------------
    def _grid(self):
        return registry()[self.cfg.prune.method]  # kinds/oneshot.py or kinds/imp.py

    def tasks(self) -> list:
        return self._grid().specs(self)

    def start_weights(self, spec) -> tuple[dict, dict]:
        return self._grid().start(self, spec)

    def run_task(self, spec, progress=None, write: bool = True) -> dict:
        return self._grid().run_spec(self, spec, progress, write)
