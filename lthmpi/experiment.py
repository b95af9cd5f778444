"""One experiment in one process: parent run, masks, the task list, and run_task(task) -> result.

Knows nothing of MPI: a rank is only who calls run_task. Every stage is idempotent: what is complete on
disk is loaded, not recomputed, so a rerun after any interruption resumes where the last one stopped.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import imp
from .config import Config, validate_against_data, validate_against_model
from .pruning import fraction_remaining, magnitude_masks, random_masks
from .results import TaskResult
from .schedule import step_cost
from .store import RunDir, StoreError, hostname, mixed_kernels

log = logging.getLogger("lthmpi")

CONTROL_CODES = {None: 0, "random_reinit": 1, "random_mask": 2}


@dataclass(frozen=True, order=True)
class Task:
    """One retraining: mask index, reset-point index, and control (None = the ticket itself); for IMP the
    level (1 …, 0 = a one-shot task), whose mask index is level - 1 (see imp.py)."""
    mask: int
    reset: int
    control: str | None = None
    level: int = 0

    @property
    def id(self) -> str:
        head = f"l{self.level:02d}" if self.level else f"m{self.mask:03d}"
        return f"{head}_r{self.reset:02d}_{self.control or 'ticket'}"

    def seed(self, base: int) -> list[int]:
        return [base, self.mask, self.reset, CONTROL_CODES[self.control]]


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
        self.checkpoint_iterations = sorted({0, self.total, *self.reset_iterations,
                                             *(s.iterations(per_epoch) for s in stability)})
        self.model = build_model(cfg.model.name, self.data.input_shape, self.data.num_classes, cfg.seed,
                                 cfg.train.precision)
        self.prunable = [v.path for v in prunable_variables(self.model)]
        self.sizes = {v.path: int(np.prod(v.shape)) for v in prunable_variables(self.model)}
        validate_against_model(cfg, self.sizes)
        self.placement = configured_placement() or Placement("cpu")  # threads None: TF set up by the caller
        self.deterministic = configured_deterministic()
        if self.deterministic is None:
            self.deterministic = cfg.train.deterministic
        self.trainer = MaskedTrainer(self.model, self.data, cfg.train, cfg.seed, prunable_variables(self.model),
                                     augment=cfg.data.augment, sparse_below=cfg.parallel.sparse_below)
        self.initial_weights = self.trainer.get_weights()
        self.checkpoints: dict | None = None
        self.optimizer_states: dict = {}
        self.parent_info: dict = {}
        self.masks: list | None = None
        self.remaining: list = []

    def check_rerun(self, allow_mixed: bool = False):
        """Before a rerun trains anything: finished tasks trained with another thread count or other kernels
        are named, and refused unless `allow_mixed` (--allow-mixed-kernels); then only logged."""
        done = {tid: self.run.read_task(tid)[0] for tid in self.run.done_tasks()}
        lines = mixed_kernels(done, self.trainer.threads, self.trainer.kernels_for)
        if lines and not allow_mixed:
            raise StoreError(f"run directory {self.run.path} holds tasks trained otherwise than this run would train "
                             f"the rest ({'; '.join(lines)}): rerun with the parallel.threads and "
                             f"parallel.sparse_below they had, or pass --allow-mixed-kernels to mix them")
        for line in lines:
            log.warning("mixing kernels as allowed: %s", line)

    # -- parent ---------------------------------------------------------------------------------
    def parent_done(self) -> bool:
        return os.path.exists(self.run.parent_path)

    def train_parent(self, progress=None, write: bool = True):
        """Train the dense network, keeping weights and optimizer state at 0, every reset point (and stability
        point) and T.

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

        h = tr.fit(0, self.total, checkpoints=keep, on_checkpoint=save, progress=progress)
        if h.diverged:
            raise RuntimeError("the dense parent run diverged (loss became NaN); lower train.lr")
        attrs = dict(test_accuracy=h.final_accuracy, early_stop_accuracy=h.early_stop_accuracy,
                     early_stop_iteration=h.early_stop_iteration, iterations=self.total,
                     seconds=time.monotonic() - t0, rank=self.rank, host=self.host)
        history = {f"epochs/{k}": [e[k] for e in h.epochs] for k in (h.epochs[0] if h.epochs else {})}
        history.update({f"evals/{k}": [e[k] for e in h.evals] for k in (h.evals[0] if h.evals else {})})
        if not write:
            self.checkpoints, self.optimizer_states, self.parent_info = ckpts, opts, attrs
            return attrs
        self.run.write_checkpoints(ckpts, opts, history, attrs)
        log.info("parent: test accuracy %.4f after %d iterations (%.1f s)", h.final_accuracy, self.total, attrs["seconds"])
        return self.load_parent()

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
        """Masks from the *final* parent weights (never from a reset point's weights); for IMP, every chain's
        first level (the later levels' masks come from the levels before them)."""
        if self.cfg.imp:
            final = self.checkpoints[self.total]
            imp.write_first_masks(self.run, self.cfg, {p: final[p] for p in self.prunable}, len(self.reset_iterations))
            return self.load_masks()
        if os.path.exists(self.run.masks_path):
            return self.load_masks()
        final = self.checkpoints[self.total]
        weights = {p: final[p] for p in self.prunable}
        targets = self.cfg.remaining_fractions()
        masks = [magnitude_masks(weights, r, self.cfg.prune.scope, self.cfg.prune.layer_rates) for r in targets]
        self.run.write_masks(masks, [fraction_remaining(m) for m in masks], targets)
        return self.load_masks()

    def load_masks(self):
        if self.cfg.imp:  # each level reads its own chain's mask when it starts
            self.masks, self.remaining = None, imp.planned_fractions(self.cfg, self.sizes)
            return self.masks
        self.masks, self.remaining = self.run.read_masks()
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

    # -- tasks ----------------------------------------------------------------------------------
    def tasks(self) -> list[Task]:
        if self.cfg.imp:
            return imp.tasks(self.cfg, len(self.reset_iterations), Task)
        controls = [None, *self.cfg.reset.controls]
        return [Task(m, r, c) for m in range(len(self.cfg.remaining_fractions()))
                for r in range(len(self.reset_iterations)) for c in controls]

    def task_iterations(self, task: Task) -> tuple[int, int]:
        k = self.reset_iterations[task.reset]
        return k, (self.total if self.cfg.reset.length == "remaining" else k + self.total)

    def cost(self, task: Task) -> float:
        """Estimated relative cost: iterations to train, times the cost of a step on the kernels its mask
        trains on (every evaluation interval ends in the same evaluations)."""
        start, end = self.task_iterations(task)
        remaining = self.remaining[task.mask] if self.remaining else 1.0
        return float(end - start) * step_cost(self.trainer.kernels_for(remaining), remaining)

    def is_done(self, task: Task) -> bool:
        return os.path.exists(self.run.task_path(task.id))

    def start_weights(self, task: Task) -> tuple[dict, dict]:
        """Weights and mask a retraining starts from (the late reset, or a control)."""
        k = self.reset_iterations[task.reset]
        mask = imp.mask_of(self.run, task) if task.level else self.masks[task.mask]
        weights = dict(self.checkpoints[k])
        if task.control == "random_mask":
            mask = random_masks(mask, task.seed(self.cfg.seed))
        elif task.control == "random_reinit":
            from .models import fresh_init
            fresh = fresh_init(self.model, int(np.random.default_rng(task.seed(self.cfg.seed)).integers(2**31)))
            weights = dict(self.checkpoints[0])
            weights.update({v.path: a for v, a in zip(self.model.trainable_variables, fresh)})
        return {p: (w * mask[p] if p in mask else w) for p, w in weights.items()}, mask

    def run_task(self, task: Task, progress=None, write: bool = True) -> dict:
        """Retrain one subnetwork from its reset point; durable on disk before returning.

        A data-parallel replica other than its subgroup's leader trains in lockstep but writes nothing.
        """
        if write and self.is_done(task):
            return self.run.read_task(task.id)[0]
        start, end = self.task_iterations(task)
        weights, mask = self.start_weights(task)
        tr = self.trainer
        tr.set_weights(weights)
        tr.set_masks(mask)
        restore = self.cfg.reset.optimizer_state == "restore" and task.control != "random_reinit"
        tr.reset_optimizer(self.optimizer_states.get(start) if restore else None)
        t0, m0 = time.time(), time.monotonic()  # wall times say when (across ranks); the monotonic clock how long
        h = tr.fit(start, end, progress=progress)
        t1, seconds = time.time(), time.monotonic() - m0
        result = TaskResult(task_id=task.id, mask=task.mask, remaining=fraction_remaining(mask),
                            target_remaining=self.cfg.remaining_fractions()[task.mask],
                            reset=self.cfg.reset.points[task.reset], reset_iteration=start,
                            control=task.control or "", final_accuracy=h.final_accuracy,
                            early_stop_iteration=h.early_stop_iteration, early_stop_accuracy=h.early_stop_accuracy,
                            best_val_loss=h.best_val_loss, iterations=end - start, diverged=h.diverged,
                            seconds=seconds, start_time=t0, end_time=t1, rank=self.rank, host=self.host,
                            threads=tr.threads, kernels=tr.kernels, device=self.placement.label,
                            precision=self.cfg.train.precision, deterministic=self.deterministic,
                            kind="imp" if task.level else "oneshot")
        attrs = dict(asdict(result), replicas=h.replicas, replicas_identical=h.replicas_identical)
        if task.level:
            attrs.update(level=task.level)
        series = {"evals": _columns(h.evals, ("iteration", "train_loss", "val_loss", "val_accuracy")),
                  "epochs": _columns(h.epochs, ("epoch", "iteration", "train_loss", "val_loss", "val_accuracy",
                                                "test_accuracy"))}
        if write:
            if task.level:  # the next level's mask is on disk before this level counts as done
                imp.write_next_mask(self.run, self.cfg, task, mask, tr.get_weights())
            self.run.write_task(task.id, attrs, series)
        if h.diverged:
            log.warning("task %s diverged (loss became NaN); recorded as diverged", task.id)
        return attrs


def _columns(rows: list, names) -> dict:
    return {n: np.asarray([r[n] for r in rows], dtype=np.float64) for n in names}
