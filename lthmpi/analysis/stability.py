"""Stability tables: the error barrier per sparsity × reset point, the earliest stable k per sparsity and
whether the tickets reset there match the dense network (Frankle et al. 2020's central claim, checked on
the run's own one-shot grid where one exists), and the rows of --json / --csv.

Conventions (docs/stability.md): a pair is stable when its barrier is below its threshold. The earliest
stable k of a sparsity is the earliest reset point from which every later measured point is stable too
("stable from k on"; a stable k followed by an unstable one does not count). A ticket matches the dense
network when its early-stop test accuracy is ≥ the parent's early-stop accuracy − tolerance (the winning-
ticket rule of science.py).
"""
from __future__ import annotations

import csv
import math

from ..lmc import DENSE


def pairs(res: dict) -> list[dict]:
    """A run's stability pairs, ordered dense first, then by fraction remaining (descending), then by k."""
    return sorted(res.get("stability", []), key=lambda p: (p["mask"] != DENSE, -p["remaining"], p["mask"],
                                                           p["reset_iteration"]))


def label(p: dict) -> str:
    return "dense" if p["mask"] == DENSE else f"{100 * p['remaining']:.3g}% left"


def sparsities(ps: list[dict]) -> list[tuple[int, str]]:
    """(mask, label) in table order, dense first."""
    return list(dict.fromkeys((p["mask"], label(p)) for p in ps))


def resets(ps: list[dict]) -> list[tuple[int, str]]:
    """(reset iteration, reset point as written) in training order."""
    return sorted(dict.fromkeys((p["reset_iteration"], p["reset"]) for p in ps))


def barrier_rows(ps: list[dict]) -> tuple[list[str], list[list]]:
    """Barrier (percentage points) per sparsity (rows) and reset point (columns); '*' marks a stable pair."""
    ks = resets(ps)
    by = {(p["mask"], p["reset_iteration"]): p for p in ps}
    head = ["network"] + [f"k={r}" for _, r in ks]
    rows = []
    for m, name in sparsities(ps):
        row = [name]
        for it, _ in ks:
            p = by.get((m, it))
            row.append("-" if p is None else f"{100 * p['barrier']:.2f}" + ("*" if p["stable"] else ""))
        rows.append(row)
    return head, rows


def seed_rows(results: list[dict]) -> tuple[list[str], list[list]]:
    """The barrier (pp) per sparsity and reset point over the runs of one experiment that differ in seed: mean
    and interval (science.estimate: 95% t from 5 seeds, min–max below), and in how many seeds the pair is stable."""
    from .science import estimate, interval_name

    ps = [p for r in results for p in pairs(r)]
    ks = resets(ps)
    head = ["network"] + [f"k={r} ({interval_name(len(results)).split(' (')[0]})" for _, r in ks]
    rows = []
    for m, name in sparsities(ps):
        row = [name]
        for it, _ in ks:
            got = [p for p in ps if p["mask"] == m and p["reset_iteration"] == it]
            e = estimate([100 * p["barrier"] for p in got])
            if not got:
                row.append("-")
                continue
            interval = f"± {e.hi - e.mean:.2f}" if e.n >= 5 else f"[{e.lo:.2f}, {e.hi:.2f}]"
            row.append(f"{e.mean:.2f} {interval}, stable in {sum(bool(p['stable']) for p in got)}/{len(got)}")
        rows.append(row)
    return head, rows


def earliest_stable(ps: list[dict], res: dict | None = None, tolerance: float = 0.005) -> list[dict]:
    """Per sparsity: the earliest k from which it stays stable, and whether the run's ticket at that k
    matches the dense accuracy (None where the run has no such ticket)."""
    tickets = {}
    for t in (res or {}).get("tasks", []):
        if t.get("control") is None:
            tickets[(t["mask"], t["reset_iteration"])] = t
    dense = _num((res or {}).get("parent", {}).get("early_stop_accuracy"))
    if not math.isfinite(dense):
        dense = _num((res or {}).get("parent", {}).get("test_accuracy"))
    out = []
    for m, name in sparsities(ps):
        mine = sorted((p for p in ps if p["mask"] == m), key=lambda p: p["reset_iteration"])
        first = None
        for i, p in enumerate(mine):
            if all(q["stable"] for q in mine[i:]):
                first = p
                break
        row = dict(mask=None if m == DENSE else m, network=name, remaining=mine[0]["remaining"],
                   reset=first["reset"] if first else None, reset_iteration=first["reset_iteration"] if first else None,
                   barrier=first["barrier"] if first else None, threshold=mine[0]["threshold"], ticket_accuracy=None,
                   dense_accuracy=dense if math.isfinite(dense) else None, matches_dense=None)
        t = tickets.get((m, first["reset_iteration"])) if first and m != DENSE else None
        if t is not None and math.isfinite(_num(t.get("early_stop_accuracy"))) and math.isfinite(dense):
            acc = _num(t["early_stop_accuracy"])
            row.update(ticket_accuracy=acc, matches_dense=bool(acc >= dense - tolerance - 1e-12))
        out.append(row)
    return out


def earliest_rows(ps: list[dict], res: dict, tolerance: float) -> tuple[list[str], list[list]]:
    head = ["network", "earliest stable k", "barrier (pp)", "ticket early-stop acc %", "dense %",
            f"matches dense (-{100 * tolerance:g} pp)"]
    rows = []
    for r in earliest_stable(ps, res, tolerance):
        rows.append([r["network"], r["reset"] or "never", _pp(r["barrier"]), _pp(r["ticket_accuracy"]),
                     _pp(r["dense_accuracy"]),
                     "dense" if r["mask"] is None else ("-" if r["matches_dense"] is None else
                                                        ("yes" if r["matches_dense"] else "no"))])
    return head, rows


def earliest_seed_rows(results: list[dict], tolerance: float = 0.005) -> tuple[list[str], list[list]]:
    """Per sparsity (or IMP level) over the seeds of one experiment: each seed's earliest stable k, and whether
    that seed's ticket reset there matches that seed's dense network (its early-stop accuracy minus the dense
    one, pp). Frankle et al.'s claim, seed by seed: one seed's verdict is within the noise of the others'."""
    per = [{r["network"]: r for r in earliest_stable(pairs(res), res, tolerance)} for res in results]
    seeds = [res["config"].get("seed") for res in results]
    head = ["network", "earliest stable k (seed: k)", f"ticket there vs dense (seed: matches -{100 * tolerance:g} pp?, "
                                                      "acc − dense pp)"]
    rows = []
    for name in dict.fromkeys(n for p in per for n in p):
        ks, verdicts = [], []
        for seed, p in zip(seeds, per):
            r = p.get(name)
            ks.append(f"{seed}: {(r or {}).get('reset') or 'never'}")
            if r is None or r["mask"] is None or r["matches_dense"] is None:
                verdicts.append(f"{seed}: -")
            else:
                diff = 100 * (r["ticket_accuracy"] - r["dense_accuracy"])
                verdicts.append(f"{seed}: {'yes' if r['matches_dense'] else 'no'} ({diff:+.2f})")
        rows.append([name, "; ".join(ks), "dense" if name == "dense" else "; ".join(verdicts)])
    return head, rows


def summary(res: dict, tolerance: float = 0.005) -> list[dict]:
    """The --json rows: every pair with its whole curve, barrier and verdict."""
    keys = ("pair", "mask", "remaining", "reset", "reset_iteration", "barrier", "loss_barrier", "stable",
            "threshold", "error_a", "error_b", "bn_reestimate", "alpha", "error", "loss")
    return [{k: (None if k == "mask" and p[k] == DENSE else p.get(k)) for k in keys} for p in pairs(res)]


def write_csv(results: list[dict], path: str) -> int:
    """One row per (pair, α) of every run: the curve point and its pair's barrier. Returns the row count."""
    cols = ["run", "mask", "remaining", "reset", "reset_iteration", "alpha", "error", "loss", "barrier",
            "loss_barrier", "stable", "threshold"]
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            for p in pairs(r):
                for a, e, lo in zip(p["alpha"], p["error"], p["loss"]):
                    w.writerow([r["path"], "dense" if p["mask"] == DENSE else p["mask"], p["remaining"], p["reset"],
                                p["reset_iteration"], a, e, lo, p["barrier"], p["loss_barrier"], int(p["stable"]),
                                p["threshold"]])
                    n += 1
    return n


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _pp(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"
