"""Ticket transfer (Morcos et al., "One ticket to win them all", NeurIPS 2019): a source run's one-shot masks and
its weights at one reset point, retrained on this run's dataset.

Why copied, not referenced: the masks phase copies the source's masks, its start weights and its identity (path,
config hash, git commit, reset point) into this run's masks.h5, so this run stays complete if the source moves
and its provenance says where its ticket came from. Only the same model on the same input shape can take the
ticket; anything else is refused in one line that says what differs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from .config import ConfigError
from .fileio import StoreError, attr_value, open_h5, read_arrays
from .steps import Step
from .store import RunDir


@dataclass
class Source:
    """Where a transferred ticket came from, and the weights every retraining starts from."""
    weights: dict
    provenance: dict


def _source_iteration(path: str, src_cfg, text: str, parent_attrs: dict) -> int:
    step = Step.parse(text)
    if step.unit == "it" or step.value == 0:
        return int(step.value)
    if src_cfg.train.iterations:
        raise ConfigError(f"prune.masks_from_reset {text!r}: the source run {path} counts its training in iterations; "
                          f"give the reset point in iterations (e.g. \"500it\")")
    return step.iterations(int(parent_attrs["iterations"]) // src_cfg.train.epochs)


def _commit(src: RunDir) -> str:
    """The source's git commit, from its merged results' provenance ("" when it was never merged)."""
    if not os.path.exists(src.results_path):
        return ""
    with h5py.File(src.results_path, "r") as f:
        return str(attr_value(f["provenance"].attrs.get("git_commit", ""))) if "provenance" in f else ""


def check(exp) -> tuple:
    """Refuse, in one line, a source whose model, input shape, fractions or reset point do not fit this run (before
    this run trains its parent); returns what write_masks copies."""
    cfg, path = exp.cfg, exp.cfg.prune.masks_from
    src = RunDir(path)
    try:
        src_cfg = src.load_config()
    except StoreError as e:
        raise ConfigError(f"prune.masks_from: {e}") from None
    if src_cfg.imp or not os.path.exists(src.masks_path) or not os.path.exists(src.parent_path):
        raise ConfigError(f"prune.masks_from {path}: not a finished one-shot run (it needs parent.h5 and masks.h5)")
    if src_cfg.model.name != cfg.model.name:
        raise ConfigError(f"prune.masks_from {path}: its model is {src_cfg.model.name}, this run's is {cfg.model.name}; "
                          f"a ticket transfers between datasets of the same model")
    masks, remaining = src.read_masks()
    checkpoints, _, parent_attrs = src.read_checkpoints()
    k = _source_iteration(path, src_cfg, cfg.prune.masks_from_reset, parent_attrs)
    if k not in checkpoints:
        raise ConfigError(f"prune.masks_from_reset {cfg.prune.masks_from_reset!r} (iteration {k}) is not a checkpoint "
                          f"of {path}: choose one of its reset.points {src_cfg.reset.points}")
    weights = checkpoints[k]
    for v in exp.model.variables:
        got = weights.get(v.path)
        if got is None or tuple(got.shape) != tuple(v.shape):
            raise ConfigError(f"prune.masks_from {path}: {v.path} is {None if got is None else tuple(got.shape)} there "
                              f"and {tuple(v.shape)} here ({src_cfg.data.dataset} vs {cfg.data.dataset}, input shape "
                              f"{exp.data.input_shape} here): a ticket needs the same model and input shape")
    targets = cfg.remaining_fractions()
    if src_cfg.remaining_fractions() != targets:
        raise ConfigError(f"prune.masks_from {path} has masks at {src_cfg.remaining_fractions()}: set prune.remaining "
                          f"to those (prune.quantiles = [])")
    scores, _ = src.read_mask_extras()
    if "invert" in cfg.reset.controls and scores is None:
        raise ConfigError(f"reset.controls 'invert' needs the source's scores, but {path} kept none (it had no invert "
                          f"control): remove invert")
    prov = dict(source_run=os.path.abspath(path), source_hash=src_cfg.hash(), source_commit=_commit(src),
                source_dataset=src_cfg.data.dataset, source_reset=cfg.prune.masks_from_reset, source_iteration=k)
    return masks, remaining, weights, scores, prov


def write_masks(exp) -> None:
    """Copy the source run's masks, its weights at prune.masks_from_reset and its identity (provenance) into this
    run's masks.h5."""
    cfg = exp.cfg
    masks, remaining, weights, scores, prov = check(exp)
    targets = cfg.remaining_fractions()
    exp.run.write_masks(masks, remaining, targets, scores if "invert" in cfg.reset.controls else None, prov,
                        {"transfer_weights": weights})


def load(exp, attrs: dict) -> Source:
    """The transferred start weights and provenance, as write_masks stored them in this run's masks.h5."""
    with open_h5(exp.run.masks_path, "mask file") as f:
        if "transfer_weights" not in f:
            raise StoreError(f"mask file {exp.run.masks_path} lacks the transferred weights; delete it to copy them "
                             f"again from prune.masks_from")
        weights = read_arrays(f["transfer_weights"], f"mask file {exp.run.masks_path}")
    return Source({p: np.asarray(w) for p, w in weights.items()},
                  {k: v for k, v in attrs.items() if k.startswith("source_")})
