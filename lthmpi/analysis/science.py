"""The science tables: accuracy per mask × reset point, winning tickets, best reset point per sparsity.

Runs are pooled into one grid when they are the same experiment up to the seed (replicates); two runs
with the same seed (e.g. the same work at different rank counts) are one replicate, the first given is
used. With replicates a cell holds one value per seed; tables show the mean ± its 95% Student-t interval
and figures the mean with that band, from 5 seeds on; with 2–4 seeds a t-interval is too wide to say
anything, so the interval shown is the min–max range over the seeds, and the headers say which.

Conventions (documented choices):
- "dense" is the parent's test accuracy measured the same way as the retraining it is compared with:
  the parent's early-stop test accuracy for early-stop columns, its final test accuracy for final ones
  (falling back to the final accuracy where the parent has no early-stop value).
- The controls (random re-initialisation, random mask) are run per mask and reset point. The tables show
  them per (mask, reset point); the figures draw each control as one dashed line, its mean over reset
  points (and replicates) per mask, because the controls barely depend on k and one line per (control, k)
  would bury the tickets.
- Selection is on *validation* accuracy (choosing by test accuracy would report the best of several
  noisy test numbers, an optimistic one), the test accuracy reported beside it: the validation accuracy at
  the early-stop point (lowest validation loss) of each retraining and of the parent. Results without
  validation curves fall back to selecting on test accuracy, and the tables say so.
- A winning ticket for reset point k is the sparsest mask whose mean early-stop validation accuracy is
  ≥ the parent's − tolerance (not necessarily with every denser mask qualifying too); its margin over a
  control is ticket test accuracy − control test accuracy at the same mask and reset point, in percentage points.
- The best reset point at a sparsity is the argmax of the ticket's mean early-stop validation accuracy over
  reset points (first in config order on ties).
- An IMP run (prune.method = "imp") is the same grid with levels in place of masks: mask index i is level
  i + 1, and its fraction left is the same in every chain (exact counts), so "left %" is one number per level.
  Its controls are per level and chain. An IMP run and a one-shot run of the same parent (same data, model,
  training and seeds) are paired (`method_pairs`) and drawn on one figure.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..tables import markdown_table, text_table

VAL = "early_stop_val_accuracy"  # what winning tickets and best reset points are selected on
METRICS = ("early_stop_accuracy", "final_accuracy", "early_stop_iteration", VAL)
TICKET = None  # the control value of a ticket (the subnetwork itself)
T_SEEDS = 5  # from this many seeds on, the interval is the 95% Student-t interval of the mean; below, min–max
DENSE_KEY = {"early_stop_accuracy": "early_stop_accuracy", VAL: VAL}  # the parent's value matched to a metric


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds and its interval (see T_SEEDS); lo = hi = mean for one seed."""
    mean: float
    lo: float
    hi: float
    n: int


def estimate(values) -> Estimate:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if v.size < T_SEEDS:
        return Estimate(mean, float(v.min()), float(v.max()), int(v.size))
    from scipy.stats import t

    half = float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Estimate(mean, mean - half, mean + half, int(v.size))


def interval_name(seeds: int) -> str:
    """How the interval over `seeds` seeds is made, for titles and legends."""
    return "95% t-interval" if seeds >= T_SEEDS else f"min–max (fewer than {T_SEEDS} seeds: no t-interval)"


@dataclass
class Grid:
    """One experiment's measurements, pooled over replicate runs (seeds)."""
    runs: list[str]
    seeds: list[int]
    resets: list[str]  # reset points as the config wrote them, in config order
    controls: list[str]
    masks: list[int]
    remaining: dict[int, float]  # mask -> fraction of prunable weights left (mean over tasks)
    values: dict = field(default_factory=dict)  # (metric, mask, reset, control) -> np.ndarray over replicates
    dense: dict = field(default_factory=dict)  # metric -> np.ndarray over replicates
    diverged: int = 0
    stopped: list = field(default_factory=list)  # IMP: one line per chain stopped by a diverged level (stopped_chains)
    config: dict = field(default_factory=dict)
    method: str = "oneshot"  # oneshot | imp (see the module docstring)

    def label(self, reset: str) -> str:
        return f"k={reset}"

    @property
    def mask_head(self) -> str:
        return "level" if self.method == "imp" else "mask"

    def mask_label(self, mask: int) -> int:
        """How a mask is named in tables: its index, or for IMP its level (1-based)."""
        return mask + 1 if self.method == "imp" else mask

    def cell(self, metric: str, mask: int, reset: str, control=TICKET) -> np.ndarray:
        return self.values.get((metric, mask, reset, control), np.array([]))

    def mean(self, metric: str, mask: int, reset: str, control=TICKET) -> float:
        return _nanmean(self.cell(metric, mask, reset, control))

    def estimate(self, metric: str, mask: int, reset: str, control=TICKET) -> Estimate:
        return estimate(self.cell(metric, mask, reset, control))

    def spread(self, metric: str, mask: int, reset: str, control=TICKET) -> tuple[float, float]:
        """The interval over seeds (see T_SEEDS)."""
        e = self.estimate(metric, mask, reset, control)
        return e.lo, e.hi

    def control_mean(self, metric: str, mask: int, control: str) -> float:
        """A control's mean over reset points and replicates at one mask."""
        vals = [self.cell(metric, mask, r, control) for r in self.resets]
        return _nanmean(np.concatenate(vals) if vals else np.array([]))

    def dense_values(self, metric: str) -> np.ndarray:
        """The parent's accuracies (one per seed) matched to `metric` (see the module docstring): its early-stop
        test accuracy (its final one where it has none), its early-stop validation accuracy, or its final one."""
        key = DENSE_KEY.get(metric, "test_accuracy")
        v = np.asarray(self.dense.get(key, np.array([])), dtype=float)
        if not np.isfinite(v).any() and key == "early_stop_accuracy":
            v = np.asarray(self.dense.get("test_accuracy", np.array([])), dtype=float)
        return v[np.isfinite(v)]

    def dense_value(self, metric: str) -> float:
        return _nanmean(self.dense_values(metric))

    def dense_spread(self, metric: str) -> tuple[float, float]:
        e = estimate(self.dense_values(metric))
        return e.lo, e.hi

    @property
    def selected_on(self) -> str:
        """The metric winning tickets and best reset points are chosen by: validation accuracy where the
        results recorded it, else (results without validation curves) test accuracy at early stop."""
        have = any(np.isfinite(v).any() for k, v in self.values.items() if k[0] == VAL)
        return VAL if have else "early_stop_accuracy"


def _nanmean(v) -> float:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def science_key(res: dict) -> str:
    """Experiments that differ only in seed (and in how they were parallelised) are replicates. Keys left
    at their defaults are filled in first: a run made before a key existed is the same experiment as one
    that writes the key's default (a results file's config lists the keys of its own version)."""
    from ..config import ConfigError, from_dict

    try:
        cfg = from_dict(res["config"]).to_dict()
    except (ConfigError, TypeError, ValueError):  # a key this version no longer knows: compare as written
        cfg = res["config"]
    return json.dumps({k: v for k, v in cfg.items() if k not in ("seed", "parallel")}, sort_keys=True)


def science_groups(results: list[dict]) -> list[list[int]]:
    """Indices of runs pooled into one grid: same experiment up to the seed, one run per seed."""
    groups: dict[str, list[int]] = {}
    seen: dict[str, set] = {}
    for i, r in enumerate(results):
        key = science_key(r)
        seed = r["config"].get("seed")
        if seed in seen.setdefault(key, set()):
            continue
        seen[key].add(seed)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def build_grid(results: list[dict]) -> Grid:
    """Pool replicate runs (see science_groups) into one Grid."""
    if not results:
        raise ValueError("no runs to analyse")
    # stability pairs (lthmpi/kinds/stability.py) are not retrainings of the grid: docs/stability.md
    results = [dict(r, tasks=[t for t in r["tasks"] if t.get("kind") != "stability"]) for r in results]
    cfg = results[0]["config"]
    present_resets = list(dict.fromkeys(t["reset"] for r in results for t in r["tasks"]))
    resets = [p for p in cfg.get("reset", {}).get("points", []) if p in present_resets]
    resets += [p for p in present_resets if p not in resets]
    present_controls = list(dict.fromkeys(t["control"] for r in results for t in r["tasks"] if t["control"]))
    controls = [c for c in cfg.get("reset", {}).get("controls", []) if c in present_controls]
    controls += [c for c in present_controls if c not in controls]
    masks = sorted({t["mask"] for r in results for t in r["tasks"]})

    rem: dict[int, list] = {}
    rem_any: dict[int, list] = {}
    values: dict = {}
    diverged = 0
    for ri, r in enumerate(results):
        for t in r["tasks"]:
            if t["control"] is TICKET:
                rem.setdefault(t["mask"], []).append(_num(t["remaining"]))
            rem_any.setdefault(t["mask"], []).append(_num(t["remaining"]))
            diverged += bool(t.get("diverged"))
            for m in METRICS:
                values.setdefault((m, t["mask"], t["reset"], t["control"]), [math.nan] * len(results))[ri] = _num(t.get(m))
    rem = {m: rem.get(m) or rem_any[m] for m in masks}
    dense = {k: np.array([_num(r["parent"].get(k)) for r in results]) for k in ("early_stop_accuracy", "test_accuracy",
                                                                                  "early_stop_iteration", VAL)}
    return Grid(runs=[r.get("path", "") for r in results], seeds=[r["config"].get("seed") for r in results],
                resets=resets, controls=controls, masks=masks,
                remaining={m: _nanmean(v) for m, v in rem.items()},
                values={k: np.array(v, dtype=float) for k, v in values.items()}, dense=dense, diverged=diverged,
                stopped=stopped_chains(results), config=cfg, method=method_of(cfg))


def stopped_chains(results: list[dict]) -> list[str]:
    """One line per IMP chain stopped by a diverged ticket (kinds/imp.py): the level where it diverged and how many
    later tasks of its chain were recorded as diverged upstream, untrained (their accuracies are NaN)."""
    out = []
    for r in results:
        tasks = r["tasks"]
        for t in tasks:
            if t.get("kind") == "imp" and t.get("diverged") and not t.get("upstream") and t["control"] is TICKET:
                after = sum(1 for u in tasks if u.get("upstream") == t["task_id"])
                level = int(t["mask"]) + 1  # an IMP task's mask column is its level - 1
                out.append(f"seed {r['config'].get('seed')}: the chain of k={t['reset']} diverged at level {level} "
                           f"({t['task_id']}); {after} later task(s) of the chain recorded as diverged upstream, not trained")
    return out


def method_of(config: dict) -> str:
    return config.get("prune", {}).get("method", "oneshot")


def parent_key(results: list[dict]) -> str:
    """What makes two groups of runs share their parent: data, model, training and the seeds."""
    cfg = results[0]["config"]
    return json.dumps({"parent": {k: cfg.get(k) for k in ("data", "model", "train")},
                       "seeds": sorted(r["config"].get("seed") for r in results)}, sort_keys=True)


def method_pairs(results: list[dict], groups: list[list[int]]) -> list[tuple[int, int]]:
    """(IMP group, one-shot group) index pairs whose runs share their parent (first one-shot group for each)."""
    keyed = [(parent_key([results[i] for i in g]), method_of(results[g[0]]["config"])) for g in groups]
    pairs = []
    for a, (key, method) in enumerate(keyed):
        if method == "imp":
            b = next((b for b, (k2, m2) in enumerate(keyed) if k2 == key and m2 == "oneshot"), None)
            if b is not None:
                pairs.append((a, b))
    return pairs


# -- tables (rows of plain values; rendering below) --------------------------------------------------
def accuracy_rows(g: Grid, metric: str = "early_stop_accuracy") -> tuple[list[str], list[list]]:
    """Mask × reset table of `metric`, with each control per reset point after the tickets."""
    head = [g.mask_head, "left %"] + [g.label(r) for r in g.resets]
    head += [f"{c} {g.label(r)}" for c in g.controls for r in g.resets]
    value = g.estimate if len(g.seeds) > 1 else g.mean
    rows = []
    for m in g.masks:
        row = [g.mask_label(m), 100 * g.remaining[m]] + [value(metric, m, r) for r in g.resets]
        row += [value(metric, m, r, c) for c in g.controls for r in g.resets]
        rows.append(row)
    return head, rows


def winning_tickets(g: Grid, tolerance: float = 0.005) -> list[dict]:
    """Per reset point: the sparsest mask whose early-stop accuracy on g.selected_on (validation) is ≥ the
    parent's − tolerance; its test accuracy (`accuracy`, an Estimate over seeds in `test`) and margins on test."""
    sel, metric = g.selected_on, "early_stop_accuracy"
    dense_sel = g.dense_value(sel)
    out = []
    for r in g.resets:
        ok = [m for m in g.masks if math.isfinite(g.mean(sel, m, r)) and math.isfinite(dense_sel)
              and g.mean(sel, m, r) >= dense_sel - tolerance - 1e-12]
        row = dict(reset=r, label=g.label(r), selected_on=sel, dense=g.dense_value(metric), dense_selected=dense_sel,
                   tolerance=tolerance, mask=None, remaining=None, accuracy=None, test=None, selected=None,
                   margin={c: None for c in g.controls})
        if ok:
            m = min(ok, key=lambda m: (g.remaining[m], m))
            acc = g.mean(metric, m, r)
            row.update(mask=m, remaining=g.remaining[m], accuracy=acc, test=g.estimate(metric, m, r),
                       selected=g.estimate(sel, m, r), margin={c: acc - g.mean(metric, m, r, c) for c in g.controls})
        out.append(row)
    return out


def best_reset(g: Grid) -> list[dict]:
    """Per mask: the reset point whose ticket has the highest mean early-stop accuracy on g.selected_on
    (validation), its lead over the next on that metric, and its test accuracy beside it."""
    sel, metric = g.selected_on, "early_stop_accuracy"
    out = []
    for m in g.masks:
        accs = [(g.mean(sel, m, r), i, r) for i, r in enumerate(g.resets)]
        accs = [a for a in accs if math.isfinite(a[0])]
        if not accs:
            out.append(dict(mask=m, remaining=g.remaining[m], reset=None, label=None, accuracy=None, test=None,
                            selected=None, lead=None, selected_on=sel))
            continue
        ranked = sorted(accs, key=lambda a: (-a[0], a[1]))
        best = ranked[0]
        lead = best[0] - ranked[1][0] if len(ranked) > 1 else None
        out.append(dict(mask=m, remaining=g.remaining[m], reset=best[2], label=g.label(best[2]),
                        accuracy=g.mean(metric, m, best[2]), test=g.estimate(metric, m, best[2]),
                        selected=g.estimate(sel, m, best[2]), lead=lead, selected_on=sel))
    return out


def _shown(g: Grid, e: Estimate | None):
    """A table cell: the Estimate with replicates, its mean for one seed."""
    return e if e is None or len(g.seeds) > 1 else e.mean


def selection_words(g: Grid) -> str:
    return ("selected on validation accuracy, test beside it" if g.selected_on == VAL else
            "selected on TEST accuracy: these results hold no validation accuracy")


def winning_rows(g: Grid, tolerance: float) -> tuple[list[str], list[list]]:
    head = ["reset", f"sparsest {g.mask_head}", "left %", "val acc %", "early-stop acc %", "dense val %", "dense %"]
    head += [f"margin vs {c} (pp)" for c in g.controls]
    rows = []
    for w in winning_tickets(g, tolerance):
        val = w["selected"] if w["selected_on"] == VAL else None
        row = [w["label"], None if w["mask"] is None else g.mask_label(w["mask"]),
               None if w["remaining"] is None else 100 * w["remaining"], _shown(g, val), _shown(g, w["test"]),
               g.dense_value(VAL), w["dense"]]
        row += [w["margin"][c] for c in g.controls]
        rows.append(row)
    return head, rows


def comparison_rows(grids: dict, tolerance: float) -> tuple[list[str], list[list]]:
    """IMP vs one-shot of one parent: per method and reset point, the winning ticket (sparsest within
    tolerance of dense) and its margin over each control; `grids` maps a method name to its Grid."""
    controls = list(dict.fromkeys(c for g in grids.values() for c in g.controls))
    head = ["method", "reset", "left %", "val acc %", "early-stop acc %", "dense %"]
    head += [f"margin vs {c} (pp)" for c in controls]
    rows = []
    for name, g in grids.items():
        for w in winning_tickets(g, tolerance):
            val = w["selected"] if w["selected_on"] == VAL else None
            rows.append([name, w["label"], None if w["remaining"] is None else 100 * w["remaining"], _shown(g, val),
                         _shown(g, w["test"]), w["dense"], *(w["margin"].get(c) for c in controls)])
    return head, rows


def best_rows(g: Grid) -> tuple[list[str], list[list]]:
    head = [g.mask_head, "left %", "best reset", "val acc %", "early-stop acc %", "lead over next (pp)"]
    return head, [[g.mask_label(b["mask"]), 100 * b["remaining"], b["label"],
                   _shown(g, b["selected"] if b["selected_on"] == VAL else None), _shown(g, b["test"]), b["lead"]]
                  for b in best_reset(g)]


# -- rendering ---------------------------------------------------------------------------------------
PERCENT_COLUMNS = ("acc", "dense", "margin", "lead")


def _fmt(v, col: str) -> str:
    if isinstance(v, Estimate):
        if not math.isfinite(v.mean):
            return "-"
        if v.n < T_SEEDS:
            return f"{_fmt(v.mean, col)} [{_fmt(v.lo, col)}, {_fmt(v.hi, col)}]"
        return f"{_fmt(v.mean, col)} ± {_fmt(v.hi - v.mean, col)}"
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if col.startswith("left"):
        return f"{v:.2f}"
    if "margin" in col or "lead" in col:
        return f"{100 * v:+.2f}"
    if "iteration" in col:
        return f"{v:.0f}"
    return f"{100 * v:.2f}"  # an accuracy, shown in percent


def render(head: list[str], rows: list[list], markdown: bool = False, value_kind: str = "acc") -> str:
    """A table as aligned plain text, or as a markdown table. Numbers: accuracies and margins in %."""
    cells = [[_fmt(v, head[i] if value_kind == "acc" or i < 2 else value_kind) for i, v in enumerate(r)] for r in rows]
    return markdown_table(head, cells, "---:") if markdown else text_table(head, cells)


def tables(g: Grid, tolerance: float, markdown: bool = False) -> dict[str, str]:
    """All science tables of one grid, rendered, keyed by title."""
    n = len(g.seeds)
    rep = f" (mean of {n} seeds ± {interval_name(n)})" if n >= T_SEEDS else \
        f" (mean of {n} seeds [min, max]: fewer than {T_SEEDS} seeds, no t-interval)" if n > 1 else ""
    dense_es, dense_fin = g.dense_value("early_stop_accuracy"), g.dense_value("final_accuracy")
    out = {}
    h, r = accuracy_rows(g, "early_stop_accuracy")
    out[f"Test accuracy at early stop (%){rep}; dense parent {_fmt(dense_es, 'acc')}%"] = render(h, r, markdown)
    h, r = accuracy_rows(g, "final_accuracy")
    out[f"Final test accuracy (%){rep}; dense parent {_fmt(dense_fin, 'acc')}%"] = render(h, r, markdown)
    h, r = accuracy_rows(g, "early_stop_iteration")
    out[f"Early-stop iteration (iterations since the reset point){rep}"] = render(h, r, markdown, "iteration")
    h, r = winning_rows(g, tolerance)
    what = "validation accuracy" if g.selected_on == VAL else "test accuracy"
    title = (f"Winning tickets: sparsest {g.mask_head} with early-stop {what} >= dense - {100 * tolerance:.2f} pp "
             f"({selection_words(g)}){rep}")
    out[title] = render(h, r, markdown)
    h, r = best_rows(g)
    out[f"Best reset point per sparsity ({selection_words(g)}){rep}"] = render(h, r, markdown)
    return out
