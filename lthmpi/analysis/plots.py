"""The figures (matplotlib, Agg backend): readable in black and white, every series has its own marker,
line style or hatch as well as its colour; axes carry units; legends name reset points as the config
wrote them ("k=0ep", "k=500it")."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from . import scaling as _scaling  # noqa: E402
from .science import Grid, interval_name  # noqa: E402

# Okabe–Ito colours (colour-blind safe), then markers, dashes and hatches so that grey prints still separate.
COLORS = ["#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
HATCHES = ["", "///", "...", "xxx", "\\\\\\", "ooo", "+++", "---", "|||", "**"]
CONTROL_STYLES = {"random_reinit": ("--", "#7f7f7f", "x"), "random_mask": (":", "#7f7f7f", "+")}
PHASE_STYLE = {"startup": ("#cccccc", ""), "parent": ("#0072B2", "///"), "masks": ("#E69F00", "..."),
               "distribution": ("#CC79A7", "xxx"), "training": ("#009E73", "\\\\\\"), "gather": ("#D55E00", "ooo"),
               "other": ("#ffffff", "---")}
DPI = 110


def _style(i: int):
    return COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]


def _control_style(j: int, name: str):
    return CONTROL_STYLES.get(name, (["--", ":", "-."][j % 3], "#7f7f7f", ["x", "+", "1"][j % 3]))


def _percent_axis(ax, remaining_percent):
    """Log-scaled x axis of weights remaining (%), reversed (dense on the left) as in the LTH papers."""
    ax.set_xscale("log")
    lo, hi = min(remaining_percent), max(remaining_percent)
    ticks = [t for t in (100, 70, 50, 30, 20, 10, 7, 5, 3, 2, 1, 0.5, 0.3, 0.2, 0.1, 0.05)
             if lo / 1.3 <= t <= hi * 1.3]
    if len(ticks) < 2:
        ticks = sorted({round(v, 2 if v < 1 else 1) for v in remaining_percent})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlim(hi * 1.15, lo / 1.15)
    ax.set_xlabel("weights remaining (%)  [log scale]")
    ax.grid(True, which="major", alpha=0.3)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _series_panel(ax, g: Grid, metric: str, scale: float = 100.0, variant: int = 0, prefix: str = ""):
    """One curve per reset point (solid), each control dashed/dotted. `variant` 1 draws a second method on
    the same axes (thin dash-dot tickets, open markers, controls in a lighter grey), `prefix` names it."""
    xs = np.array([100 * g.remaining[m] for m in g.masks])
    replicated = len(g.seeds) > 1
    for i, r in enumerate(g.resets):
        color, marker = _style(i + 3 * variant)
        ys = np.array([g.mean(metric, m, r) for m in g.masks]) * scale
        ax.plot(xs, ys, color=color, marker=marker, linestyle="-." if variant else "-", linewidth=1.0 if variant else 1.5,
                markersize=6, label=prefix + g.label(r),
                markerfacecolor="white" if variant or i % 2 else color)
        if replicated:
            lo, hi = np.array([g.spread(metric, m, r) for m in g.masks]).T * scale
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0, hatch=HATCHES[i % len(HATCHES)])
    for j, c in enumerate(g.controls):
        ls, color, marker = _control_style(j, c)
        ys = np.array([g.control_mean(metric, m, c) for m in g.masks]) * scale
        ax.plot(xs, ys, color="#b0b0b0" if variant else color, linestyle=ls, marker=["1", "2"][j % 2] if variant
                else marker, linewidth=1.5, markersize=7, label=f"{prefix}{c} (mean over k)")
    return xs


def _panels(ax, grids: dict, metric: str, scale: float = 100.0):
    """Every grid of `grids` (name -> Grid; one unnamed grid, or IMP and one-shot) on one axes."""
    xs = []
    for variant, (name, g) in enumerate(grids.items()):
        xs += list(_series_panel(ax, g, metric, scale, variant, f"{name} " if name else ""))
    return xs


def accuracy_figure(g: Grid | dict, path: str, tolerance: float, title: str = "") -> str:
    """Test accuracy vs weights remaining: at early stop (left) and at the end of training (right).
    `g` a dict of name -> Grid draws several methods of one parent (IMP and one-shot) on the same axes."""
    grids = g if isinstance(g, dict) else {"": g}
    g = next(iter(grids.values()))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, metric, name in ((axes[0], "early_stop_accuracy", "at early stop (min. validation loss)"),
                             (axes[1], "final_accuracy", "at the end of training")):
        xs = _panels(ax, grids, metric)
        dense = g.dense_value(metric)
        if math.isfinite(dense):
            lo, hi = g.dense_spread(metric)
            ax.axhspan(100 * (lo - tolerance), 100 * (hi + tolerance), color="#bbbbbb", alpha=0.35, hatch="",
                       label=f"dense parent ±{100 * tolerance:g} pp" + (" (widened to its interval over seeds)"
                                                                         if len(g.seeds) > 1 else ""))
            ax.axhline(100 * dense, color="black", linewidth=1.0, linestyle="-.", label="dense parent (mean)")
            ax.annotate(f"dense {100 * dense:.2f}%", (0.01, 100 * dense), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8)
        _percent_axis(ax, xs)
        ax.set_title(f"test accuracy {name}")
        ax.set_ylabel("test accuracy (%)")
    spread = f"; mean of {len(g.seeds)} seeds, band = {interval_name(len(g.seeds))}" if len(g.seeds) > 1 else ""
    what = " vs ".join(grids) if len(grids) > 1 else ("IMP" if g.method == "imp" else "")
    fig.suptitle((title + ": " if title else "") + f"accuracy of {what + ' ' if what else ''}late-reset subnetworks{spread}")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return _save(fig, path)


def early_stop_figure(g: Grid | dict, path: str, title: str = "") -> str:
    """Early-stopping iteration (min. validation loss, iterations since the reset point) vs remaining
    (a dict of name -> Grid: several methods on the same axes)."""
    grids = g if isinstance(g, dict) else {"": g}
    g = next(iter(grids.values()))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = _panels(ax, grids, "early_stop_iteration", scale=1.0)
    dense = g.dense.get("early_stop_iteration", np.array([]))
    dense = dense[np.isfinite(dense)]
    if dense.size:
        ax.axhline(float(dense.mean()), color="black", linestyle="-.", linewidth=1.0,
                   label=f"dense parent ({dense.mean():.0f} it. from init)")
    _percent_axis(ax, xs)
    ax.set_ylabel("early-stop iteration (iterations since reset)")
    spread = f" (mean of {len(g.seeds)} seeds, band = {interval_name(len(g.seeds))})" if len(g.seeds) > 1 else ""
    ax.set_title((title + ": " if title else "") + "early-stopping iteration" + spread)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return _save(fig, path)


def phases_figure(profiles: list[dict], path: str) -> str:
    """Stacked horizontal bars: wall seconds per phase, one bar per run."""
    names = list(dict.fromkeys(p for pr in profiles for p in pr["phases"]))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(profiles)))
    labels = []
    for i, pr in enumerate(profiles):
        left = 0.0
        for name in names:
            v = pr["phases"].get(name, 0.0)
            color, hatch = PHASE_STYLE.get(name, ("#999999", "++"))
            ax.barh(i, v, left=left, color=color, hatch=hatch, edgecolor="black", linewidth=0.6,
                    label=name if i == 0 else None)
            left += v
        ax.text(left, i, f"  {pr['total_seconds']:.1f} s", va="center", fontsize=8)
        labels.append(f"P={pr['ranks']}  {pr['name']}")
    handles = [Patch(facecolor=PHASE_STYLE.get(n, ("#999999", "++"))[0], hatch=PHASE_STYLE.get(n, ("#999999", "++"))[1],
                     edgecolor="black", label=n) for n in names]
    ax.set_yticks(range(len(profiles)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title("phase breakdown per run")
    ax.set_xlim(0, max(pr["total_seconds"] for pr in profiles) * 1.15 or 1)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def label_rows(starts: list[float], widths: list[float]) -> list[int]:
    """Row (0 = lowest) for each left-aligned label, taken in order, so that labels on a row do not overlap."""
    row_ends: list[float] = []
    rows = []
    for x, w in zip(starts, widths):
        row = next((r for r, end in enumerate(row_ends) if x >= end), len(row_ends))
        row_ends[row:row + 1] = [x + w]
        rows.append(row)
    return rows


def timeline_figure(res: dict, pr: dict, tasks: list[dict], resets: list[str], path: str) -> str:
    """Per-rank Gantt chart of the retrainings; hatch and colour by reset point, shade by control."""
    t0 = res["timing"].get("start_time")
    if t0 is None:
        t0 = min((t["start_time"] for t in tasks), default=0.0)
    ranks = sorted({int(t["rank"]) for t in tasks} | set(range(pr["workers"] if pr["workers"] == pr["ranks"] else 0)))
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.45 * max(1, len(ranks))))
    controls = list(dict.fromkeys(t["control"] for t in tasks if t["control"]))
    alpha = {None: 1.0, **{c: a for c, a in zip(controls, (0.55, 0.3, 0.15))}}
    for t in tasks:
        i = resets.index(t["reset"]) if t["reset"] in resets else len(resets)
        color = COLORS[(i + 1) % len(COLORS)]
        ax.barh(int(t["rank"]), t["end_time"] - t["start_time"], left=t["start_time"] - t0, height=0.7,
                color=color, alpha=alpha.get(t["control"], 0.3), hatch=HATCHES[i % len(HATCHES)], edgecolor="black",
                linewidth=0.5)
    # idle time before each task (waiting for it to be handed out, or for its inputs): a thin red bar
    idle = _scaling.idle_before(tasks, _scaling.training_start(res))
    for t in tasks:
        wait = idle.get(t["task_id"], 0.0)
        if wait > 0:
            ax.barh(int(t["rank"]), wait, left=t["start_time"] - t0 - wait, height=0.2, color="#d62728")
    # phase boundaries (phases run one after another from the launch); the parent run shaded
    x_max = max(pr["total_seconds"], max((t["end_time"] - t0 for t in tasks), default=0)) * 1.02 or 1
    at, marks = 0.0, []
    for name, v in pr["phases"].items():
        if name == "other":
            continue
        if name == "parent" and v > 0:
            ax.axvspan(at, at + v, color="#dddddd", hatch="//", alpha=0.5, linewidth=0, zorder=0)
        if v > 0.02 * max(pr["total_seconds"], 1e-9):
            ax.axvline(at, color="black", linestyle=":", linewidth=0.8)
            marks.append((at, f" {name}"))
        at += v
    # A 7-point character spans ~0.45% of the axis (11-inch figure): labels that would overlap go up a row.
    rows = label_rows([x for x, _ in marks], [len(s) * 0.005 * x_max for _, s in marks])
    for (x, label), row in zip(marks, rows):
        ax.text(x, -0.75 - 0.35 * row, label, fontsize=7, va="bottom", ha="left")
    handles = [Patch(facecolor=COLORS[(i + 1) % len(COLORS)], hatch=HATCHES[i % len(HATCHES)], edgecolor="black",
                     label=f"k={r}") for i, r in enumerate(resets)]
    handles += [Patch(facecolor="#555555", alpha=alpha[c], edgecolor="black", label=f"{c or 'ticket'}")
                for c in [None, *controls]]
    if pr["phases"].get("parent"):
        handles.append(Patch(facecolor="#dddddd", hatch="//", alpha=0.5, label="parent run (serial part)"))
    if any(v > 0 for v in idle.values()):
        handles.append(Patch(facecolor="#d62728", label="rank idle before its task"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(ranks)
    ax.set_ylim(max(ranks, default=0) + 0.6, -1.0 - 0.35 * max(rows, default=0))
    ax.set_ylabel("rank" + (" (subgroup leader)" if pr["workers"] != pr["ranks"] else ""))
    ax.set_xlabel("wall time since launch (s)")
    ax.set_xlim(0, x_max)
    earlier = f"; {pr['tasks_from_earlier_run']} tasks from an earlier run not shown" if pr["tasks_from_earlier_run"] else ""
    waits = f"; idle before a task: mean {pr['idle_per_task_mean']:.3f} s, max {pr['idle_per_task_max']:.3f} s" \
        if idle else ""
    ax.set_title(f"{pr['name']}: P={pr['ranks']}, imbalance {pr['imbalance']:.4f} (max/mean rank busy time)"
                 f"{waits}{earlier}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def speedup_figure(s: dict, path: str, title: str = "") -> str:
    """Speed-up (or scaled speed-up) and efficiency vs ranks, with the ideal line and the fitted law."""
    from .scaling import amdahl_speedup, gustafson

    weak = s["kind"] == "weak"
    ps = np.array([r["ranks"] for r in s["rows"]], dtype=float)
    ys = np.array([r["scaled_speedup" if weak else "speedup"] for r in s["rows"]], dtype=float)
    es = np.array([r["efficiency"] for r in s["rows"]], dtype=float)
    p0 = s["reference_ranks"]
    grid = np.linspace(ps.min(), ps.max(), 100)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a1.plot(grid, grid / p0, color="black", linestyle=":", label="ideal")
    a1.plot(ps, ys, color=COLORS[2], marker="o", linestyle="-", label="measured")
    if weak:
        sf = s.get("gustafson_serial_fraction", math.nan)
        if math.isfinite(sf):
            a1.plot(grid, gustafson(sf, grid), color=COLORS[4], linestyle="--", label=f"Gustafson, s = {sf:.3f}")
        a1.set_ylabel("scaled speed-up S_w = (T1/W1)/(T_P/W_P)")
    else:
        f = s.get("amdahl_serial_fraction", math.nan)
        if math.isfinite(f) and p0 == 1:
            a1.plot(grid, amdahl_speedup(f, grid), color=COLORS[4], linestyle="--", label=f"Amdahl fit, f = {f:.3f}")
        a1.set_ylabel(f"speed-up T({p0}) / T(P)")
    for ax in (a1, a2):
        ax.set_xlabel("MPI ranks P")
        ax.set_xticks(ps)
        ax.grid(True, alpha=0.3)
    a2.axhline(1.0, color="black", linestyle=":", label="ideal")
    a2.plot(ps, es, color=COLORS[3], marker="s", linestyle="-", label="measured")
    a2.set_ylabel("weak efficiency S_w·P0/P" if weak else ("efficiency E = S/P" if p0 == 1 else f"efficiency S·{p0}/P"))
    a2.set_ylim(0, max(1.1, float(np.nanmax(es)) * 1.1 if np.isfinite(es).any() else 1.1))
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.suptitle((title + ": " if title else "") + ("weak" if weak else "strong") + " scaling (wall time of the whole run)")
    return _save(fig, path)


def instability_figure(pairs: list[dict], path: str, title: str = "") -> str:
    """Error barrier (pp) against the reset point k, one line per sparsity (dense first, black), the
    stability threshold drawn. k is placed by rank (labels as the config wrote them): k = 0 has no log."""
    from .stability import DENSE, resets, sparsities

    ks = resets(pairs)
    pos = {it: i for i, (it, _) in enumerate(ks)}
    by = {(p["mask"], p["reset_iteration"]): p for p in pairs}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (m, name) in enumerate(sparsities(pairs)):
        color, marker = ("#000000", "o") if m == DENSE else _style(i + 1)
        pts = sorted((pos[it], 100 * by[(m, it)]["barrier"]) for it, _ in ks if (m, it) in by)
        ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, marker=marker, linewidth=1.5,
                linestyle="-" if m == DENSE else ["--", "-.", ":"][i % 3], label=name)
    thresholds = sorted({p["threshold"] for p in pairs})
    for t in thresholds:
        ax.axhline(100 * t, color="#D55E00", linestyle=":", linewidth=1.2, label=f"threshold {100 * t:g}% (stable below)")
    ax.set_xticks(range(len(ks)))
    ax.set_xticklabels([f"k={r}\n({it} it)" for it, r in ks])
    ax.set_xlabel("reset point k (rank order)")
    ax.set_ylabel("error barrier (percentage points)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title((title + ": " if title else "") + "instability (test-error barrier) against k")
    return _save(fig, path)


def interpolation_figure(pairs: list[dict], path: str, title: str = "") -> str:
    """Test error along θ(α) = (1 − α)θ_A + αθ_B: one panel per reset point, one line per sparsity."""
    from .stability import DENSE, resets, sparsities

    ks = resets(pairs)
    by = {(p["mask"], p["reset_iteration"]): p for p in pairs}
    cols = min(4, len(ks))
    rows = (len(ks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for j, (it, r) in enumerate(ks):
        ax = axes[j // cols][j % cols]
        for i, (m, name) in enumerate(sparsities(pairs)):
            p = by.get((m, it))
            if p is None:
                continue
            color, marker = ("#000000", "o") if m == DENSE else _style(i + 1)
            ax.plot(p["alpha"], 100 * np.asarray(p["error"]), color=color, marker=marker, markersize=4, linewidth=1.3,
                    linestyle="-" if m == DENSE else ["--", "-.", ":"][i % 3], label=name)
        ax.set_title(f"k={r}", fontsize=10)
        ax.set_xlabel("interpolation α")
        ax.grid(True, alpha=0.3)
        if j % cols == 0:
            ax.set_ylabel("test error (%)")
    for j in range(len(ks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle((title + ": " if title else "") + "test error along the linear path between copies A and B")
    return _save(fig, path)
