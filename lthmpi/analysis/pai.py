"""Pruning at initialization against late-reset tickets (issue 34, docs/pruning.md): one-shot runs of one parent
that differ in prune.criterion, every criterion's tickets and sanity checks on one figure against the weights
remaining (log scale), and a table of where each falls 0.5 pp below dense.

Why a module of its own: the science grids (science.py) are per experiment; this compares experiments that share
their parent (science.parent_key) and differ only in how the mask is chosen.
"""
from __future__ import annotations

import math

import numpy as np

from .science import TICKET, Grid, method_of, parent_key


def criterion_of(g: Grid) -> str:
    return g.config.get("prune", {}).get("criterion", "magnitude")


def criterion_sets(results: list[dict], groups: list[list[int]], grids: dict) -> list[list[int]]:
    """Indices of the one-shot groups (with a grid) sharing one parent, where more than one criterion is present."""
    by_parent: dict[str, list[int]] = {}
    for gi, group in enumerate(groups):
        if gi in grids and method_of(results[group[0]]["config"]) == "oneshot":
            by_parent.setdefault(parent_key([results[i] for i in group]), []).append(gi)
    return [gis for gis in by_parent.values() if len({criterion_of(grids[gi][0]) for gi in gis}) > 1]


def lines(grids: list[Grid], metric: str = "early_stop_accuracy") -> list[dict]:
    """One line per (criterion, reset point) ticket and per (criterion, control), the control averaged over reset
    points: {label, criterion, reset, control, remaining [fractions], value [means]}, masks sparsest last."""
    out = []
    for g in grids:
        c = criterion_of(g)
        x = [g.remaining[m] for m in g.masks]
        for r in g.resets:
            out.append(dict(label=f"{c} ticket {g.label(r)}", criterion=c, reset=r, control="",
                            remaining=x, value=[g.mean(metric, m, r, TICKET) for m in g.masks]))
        for ctl in g.controls:
            out.append(dict(label=f"{c} {ctl}", criterion=c, reset="", control=ctl, remaining=x,
                            value=[g.control_mean(metric, m, ctl) for m in g.masks]))
    return out


def dense_accuracy(grids: list[Grid], metric: str = "early_stop_accuracy") -> float:
    vals = [float(np.nanmean(g.dense[metric])) for g in grids if metric in g.dense and len(g.dense[metric])]
    return float(np.mean(vals)) if vals else math.nan


def falls_below(line: dict, dense: float, tolerance: float) -> tuple[float | None, float | None]:
    """(the sparsest fraction left before the line first falls `tolerance` below dense, the fraction where it
    does); None where the line never falls below, or falls already at its densest mask."""
    order = sorted(range(len(line["remaining"])), key=lambda i: -line["remaining"][i])
    last_ok = None
    for i in order:
        v = line["value"][i]
        if not (v >= dense - tolerance):  # NaN counts as below
            return last_ok, line["remaining"][i]
        last_ok = line["remaining"][i]
    return last_ok, None


def table_rows(grids: list[Grid], tolerance: float) -> tuple[list[str], list[list]]:
    dense = dense_accuracy(grids)
    head = ["line", "left % (last within)", "left % (first below)"]
    rows = []
    for ln in lines(grids):
        ok, below = falls_below(ln, dense, tolerance)
        rows.append([ln["label"], None if ok is None else 100 * ok, None if below is None else 100 * below])
    return head, rows


def figure(grids: list[Grid], path: str, tolerance: float, title: str = "") -> str:
    """Every criterion's tickets (solid, one per reset point) and its checks (dashed), test accuracy at early stop
    against the weights remaining on a log axis; the dense band at ± tolerance."""
    from .plots import _percent_axis, _save, plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    dense = dense_accuracy(grids)
    if math.isfinite(dense):
        ax.axhspan(100 * (dense - tolerance), 100 * (dense + tolerance), color="0.85", label="dense ± tolerance")
    colours = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(criterion_of(g) for g in grids))}
    styles = {"": "-", "random_reinit": "--", "random_mask": ":", "layer_shuffle": ":", "invert": "-."}
    for ln in lines(grids):
        ax.plot([100 * x for x in ln["remaining"]], [100 * v for v in ln["value"]], styles.get(ln["control"], "--"),
                color=colours[ln["criterion"]], marker="o" if not ln["control"] else "x", ms=3, lw=1.2,
                label=ln["label"])
    _percent_axis(ax, [100 * x for g in grids for x in g.remaining.values()])
    ax.set_ylabel("test accuracy at early stop (%)")
    ax.set_title(title or "pruning criteria and their sanity checks vs late-reset tickets")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
