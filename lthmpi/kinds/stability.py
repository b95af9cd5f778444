"""The stability kind (issue 24, docs/stability.md): per reset point k and mask, a pair of trainings from the
parent's weights at k under the mask, identical except for the data order, and an evaluation that joins them.

Tasks of pair P (ids stable across runs; P = stab_<dense|mNNN>_kNN, NN the index in stability.points):
  P_a, P_b   train copy A (the run's data order) / copy B (another order, lthmpi.lmc.order_seed) for
             T − k iterations (T with reset.length = "full"); each writes its final weights to
             RUN_DIR/stability/P_<a|b>.h5 (with the sha256 of the start weights and the order seed), then its
             result file tasks/P_<a|b>.h5: a copy is done when both exist
  P_eval     depends on both: reads the two weight files and writes the curve (alpha, error, loss), the
             barriers and the verdict to tasks/P_eval.h5
The two trainings may run on different ranks; the evaluation runs wherever it is scheduled, from the files.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from .. import lmc as st
from ..fileio import StoreError, atomic_h5, open_h5, read_arrays, write_arrays
from ..lmc import DENSE
from ..parallel.graph import Task
from ..pruning import fraction_remaining
from ..validation import stability_masks
from .retraining import cost, end_iteration, retrain, start_weights

COPIES = ("a", "b")


def pair_id(mask: int | None, point: int, imp: bool = False) -> str:
    """stab_dense_kNN, stab_mNNN_kNN (one-shot mask index) or stab_lNN_kNN (IMP level = mask index + 1)."""
    net = "dense" if mask is None else (f"l{mask + 1:02d}" if imp else f"m{mask:03d}")
    return f"stab_{net}_k{point:02d}"


def endpoint_path(run, pid: str, copy: int) -> str:
    return os.path.join(run.path, "stability", f"{pid}_{COPIES[copy]}.h5")


def weights_digest(weights: dict) -> str:
    """sha256 over every variable (sorted by path): equal digests are bitwise-equal weights."""
    d = hashlib.sha256()
    for p in sorted(weights):
        d.update(p.encode())
        d.update(np.ascontiguousarray(weights[p]).tobytes())
    return d.hexdigest()


def read_endpoint(path: str) -> tuple[dict, dict]:
    """An endpoint's weights (checksums verified) and attributes."""
    with open_h5(path, "stability endpoint", "delete it and its task file to retrain that copy") as f:
        try:
            return read_arrays(f["weights"], f"stability endpoint {path}"), {k: v for k, v in f.attrs.items()}
        except KeyError as e:
            raise StoreError(f"stability endpoint {path} is corrupt ({e}); delete it to retrain that copy") from None


class Stability:
    name = "stability"

    def enabled(self, cfg) -> bool:
        return cfg.stability.enabled

    def points(self, exp) -> list[tuple[int, str, int]]:
        """(index, point as written, iteration k) of the pairs' reset points."""
        steps = exp.cfg.stability_steps()
        return [(i, s.text, s.iterations(exp.iterations_per_epoch)) for i, s in enumerate(steps)]

    def tasks(self, exp, dense_only: bool = False) -> list[Task]:
        """The pairs' tasks. A dense pair's two trainings read only the parent's checkpoint at k (Task.checkpoint):
        idle ranks may train them while the parent still trains (early(); phases.make_parent)."""
        cfg = exp.cfg
        out = []
        n_test = len(exp.data.x_test)
        eval_cost = cfg.stability.alphas * n_test / (3.0 * cfg.train.batch_size)  # forward passes, in steps
        for mask in stability_masks(cfg):
            if dense_only and mask is not None:
                continue
            for i, text, k in self.points(exp):
                pid = pair_id(mask, i, cfg.imp)
                end = end_iteration(exp, k)
                remaining = 1.0 if mask is None else (exp.remaining[mask] if exp.remaining else 1.0)
                spec = dict(pair=pid, mask=mask, point=i, reset=text, k=k, end=end)
                made_by = None if mask is None else exp.mask_made_by(mask, self.chain(exp, spec))
                deps = (made_by,) if made_by else ()  # an IMP level's mask is written by the level before
                trains = [Task(f"{pid}_{c}", self.name, deps=deps, cost=cost(exp, k, remaining), spec=dict(spec, copy=j),
                               checkpoint=k if mask is None else None)
                          for j, c in enumerate(COPIES)]
                out += trains
                if dense_only:
                    continue
                out.append(Task(f"{pid}_eval", self.name, deps=tuple(t.id for t in trains), cost=eval_cost,
                                spec=dict(spec, copy=None)))
        return out

    def early(self, exp) -> list[Task]:
        """The dense pairs' trainings, without the masks (called before they exist)."""
        return self.tasks(exp, dense_only=True)

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        if write and os.path.exists(exp.run.task_path(task.id)):
            return exp.run.read_task(task.id)[0]
        if task.spec["copy"] is None:
            return self.evaluate(exp, task, write)
        return self.train(exp, task, progress, write)

    def level(self, exp, spec: dict) -> dict:
        """The IMP level of the pair's mask (IMP runs only)."""
        return {"level": spec["mask"] + 1} if exp.cfg.imp and spec["mask"] is not None else {}

    # -- the two trainings ------------------------------------------------------------------------------------
    def chain(self, exp, spec: dict) -> int:
        """The reset-point index of the pair's k: in an IMP run, the chain whose level gives its mask."""
        return exp.reset_iterations.index(spec["k"]) if exp.cfg.imp else 0

    def start(self, exp, spec: dict) -> tuple[dict, dict | None]:
        """The weights at k with the pruned ones zeroed, and the mask (None = dense): the same for A and B."""
        mask = None if spec["mask"] is None else exp.mask(spec["mask"], self.chain(exp, spec))
        return start_weights(exp, spec["k"], mask)

    def not_trained(self, exp, task: Task, upstream: str, write: bool, **more) -> dict:
        """A task of a pair whose IMP level has no mask (its chain stopped at the diverged ticket `upstream`), or an
        evaluation of copies that diverged: recorded as diverged, nothing trained or evaluated."""
        spec, curve = task.spec, more.pop("curve", None)
        attrs = dict(task_id=task.id, kind=self.name, mask=DENSE if spec["mask"] is None else spec["mask"],
                     reset=spec["reset"], reset_iteration=spec["k"], iterations=0, threads=0, diverged=True,
                     upstream=upstream, rank=exp.rank, host=exp.host, **self.level(exp, spec), **more)
        if write:
            exp.run.write_task(task.id, attrs, {} if curve is None else {"curve": curve})
        return attrs

    def train(self, exp, task: Task, progress, write: bool) -> dict:
        spec, cfg, tr = task.spec, exp.cfg, exp.trainer
        upstream = "" if spec["mask"] is None else exp.chain_stopped(spec["mask"], self.chain(exp, spec))
        if upstream:
            return self.not_trained(exp, task, upstream, write, control=f"stability_{COPIES[spec['copy']]}")
        weights, mask = self.start(exp, spec)
        seed = st.order_seed(cfg.seed, spec["copy"])
        attrs, _ = retrain(exp, weights, mask, spec["k"], spec["end"], cfg.reset.optimizer_state == "restore",
                           progress, order_seed=seed, task_id=task.id, kind=self.name,
                           mask=DENSE if mask is None else spec["mask"], reset=spec["reset"],
                           control=f"stability_{COPIES[spec['copy']]}")
        attrs.update(order_seed=seed, start_sha256=weights_digest(weights), **self.level(exp, spec))
        if write:
            path = endpoint_path(exp.run, spec["pair"], spec["copy"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_h5(path) as f:
                write_arrays(f.create_group("weights"), tr.get_weights())
                f.attrs.update({k: attrs[k] for k in ("task_id", "order_seed", "start_sha256", "reset_iteration",
                                                      "iterations", "mask")})
            exp.run.write_task(task.id, attrs, {})
        return attrs

    # -- the evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, exp, task: Task, write: bool) -> dict:
        spec, s = task.spec, exp.cfg.stability
        copies = [exp.run.read_task(f"{spec['pair']}_{c}")[0] for c in COPIES]
        if any(c.get("diverged") for c in copies):  # no curve through NaN weights: the pair is diverged, not stable
            upstream = next((str(c.get("upstream", "")) for c in copies if c.get("upstream")), "")
            nan = np.full(s.alphas, np.nan)
            curve = {"alpha": st.alphas(s.alphas), "error": nan, "loss": nan}
            return self.not_trained(exp, task, upstream, write, control="stability_eval", threshold=s.threshold,
                                    bn_reestimate=False, curve=curve,
                                    remaining=1.0 if spec["mask"] is None else exp.remaining[spec["mask"]],
                                    **dict(st.summary(curve, s.threshold), stable=False))
        (wa, aa), (wb, ab) = (read_endpoint(endpoint_path(exp.run, spec["pair"], c)) for c in (0, 1))
        if aa["start_sha256"] != ab["start_sha256"]:
            where = os.path.dirname(endpoint_path(exp.run, spec["pair"], 0))
            raise StoreError(f"stability copies of {spec['pair']} started from different weights; delete "
                             f"{where}/{spec['pair']}_* and tasks/{spec['pair']}_* to retrain them")
        data = exp.data
        batches = (st.bn_batches(len(data.x_train), exp.cfg.train.batch_size, s.bn_batches, exp.cfg.seed)
                   if s.bn_reestimate else None)
        t0, m0 = time.time(), time.monotonic()
        # data.inputs, not data.x_*: uint8 images are normalised as the training step normalises them
        c = st.curve(exp.trainer.model, wa, wb, data.inputs("test"), data.y_test, s.alphas, data.inputs("train"), batches)
        t1, seconds = time.time(), time.monotonic() - m0
        mask = spec["mask"]
        remaining = 1.0 if mask is None else fraction_remaining(self.start(exp, spec)[1])
        bn = bool(batches) and bool(st.batch_norm_layers(exp.trainer.model))
        attrs = dict(task_id=task.id, kind=self.name, mask=DENSE if mask is None else mask, remaining=remaining,
                     reset=spec["reset"], reset_iteration=spec["k"], control="stability_eval", iterations=0,
                     threads=exp.trainer.threads, threshold=s.threshold, bn_reestimate=bn,
                     seconds=seconds, start_time=t0, end_time=t1, rank=exp.rank, host=exp.host,
                     **self.level(exp, spec), **st.summary(c, s.threshold))
        if write:
            exp.run.write_task(task.id, attrs, {"curve": c})
        return attrs


KIND = Stability()
