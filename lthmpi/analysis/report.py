"""Everything the analysis produces for a set of runs: figures, terminal tables and report.md."""
from __future__ import annotations

import json
import math
import os

from ..tables import markdown_table as _md_table
from ..tables import text_table as _text_table
from . import pai, plots, scaling, scaling_summary, science, stability


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def scaling_rows(per_run: list[dict]) -> tuple[list[str], list[list]]:
    """One row per run: ranks, wall time, training phase, imbalance, and speed-up figures where a series exists."""
    head = ["run", "P", "threads", "workers", "total s", "training s", "imbalance", "S(P)", "E(P)", "Karp-Flatt e"]
    rows = []
    for pr in per_run:
        s = pr.get("series")
        row = next((r for r in (s or {}).get("rows", []) if r["run"] == pr["run"]), None)
        sp = (row.get("scaled_speedup") if s and s["kind"] == "weak" else row.get("speedup")) if row else None
        base = next((b for b in (s or {}).get("baselines", []) if b["run"] == pr["run"]), None)
        if base:
            sp = base["speedup"]
        rows.append([pr["name"], pr["ranks"], pr.get("threads") or "-", pr["workers"], _f(pr["total_seconds"], ".2f"),
                     _f(pr["phases"].get("training"), ".2f"), _f(pr["imbalance"], ".4f"), _f(sp),
                     _f(row["efficiency"] if row else None),
                     _f(row.get("karp_flatt", row.get("gustafson_serial_fraction")) if row else None)])
    if any(pr.get("series") and pr["series"]["kind"] == "weak" for pr in per_run):
        head[7], head[9] = "scaled S_w(P)", "Gustafson s(P)"
    return head, rows


def fits(per_run: list[dict]) -> list[str]:
    """One line per distinct scaling series: the fitted serial fraction."""
    seen, out = set(), []
    for pr in per_run:
        s = pr.get("series")
        if not s or id(s) in seen:
            continue
        seen.add(id(s))
        ps = ", ".join(str(r["ranks"]) for r in s["rows"])
        if s["kind"] == "weak":
            out.append(f"weak scaling over P = {ps}: Gustafson serial fraction s = {_f(s['gustafson_serial_fraction'])}")
        else:
            out.append(f"strong scaling over P = {ps} (reference P = {s['reference_ranks']}): Amdahl serial fraction "
                       f"f = {_f(s['amdahl_serial_fraction'])}, fitted T(1) = {_f(s['amdahl_t1_seconds'], '.2f')} s")
        if s.get("repeats"):
            out.append(f"  (slower repeats at the same P left out: {', '.join(s['repeats'])})")
        for b in s.get("baselines", []):
            best = min(s["rows"], key=lambda r: r["seconds"])
            verdict = "faster" if best["seconds"] < b["seconds"] else "slower"
            what = "oversubscribed" if b.get("oversubscribed") else "baseline"
            out.append(f"  {what} {b['name']} ({b['ranks']} ranks x {b['threads']} threads): {_f(b['seconds'], '.2f')} s, "
                       f"S = {_f(b['speedup'])} vs T(1); P = {best['ranks']} is {verdict} "
                       f"({_f(b['seconds'] / best['seconds'], '.2f')}x)")
    return out


def _comparison(imp_grid: tuple, oneshot_grid: tuple, out: str, suffix: str, tolerance: float, md, text, files):
    """IMP and one-shot of the same parent on one figure, and their winning tickets side by side."""
    grids = {"IMP": imp_grid[0], "one-shot": oneshot_grid[0]}
    title = f"{imp_grid[1]} vs {oneshot_grid[1]}"
    acc = plots.accuracy_figure(grids, os.path.join(out, f"accuracy_imp_vs_oneshot{suffix}.png"), tolerance, title)
    es = plots.early_stop_figure(grids, os.path.join(out, f"early_stop_imp_vs_oneshot{suffix}.png"), title)
    head, rows = science.comparison_rows(grids, tolerance)
    name = (f"Winning tickets, IMP vs one-shot: sparsest with early-stop accuracy >= dense - {100 * tolerance:.2f} pp "
            f"({science.selection_words(grids['IMP'])})")
    md += [f"## IMP vs one-shot: {title}", "", "Same parent (data, model, training, seeds). IMP: solid lines, filled "
           "markers; one-shot: dash-dot lines, open markers; controls dashed/dotted (one-shot's in lighter grey).", "",
           f"![IMP vs one-shot accuracy]({os.path.basename(acc)})", "",
           f"![IMP vs one-shot early-stop iteration]({os.path.basename(es)})", "",
           f"### {name}", "", science.render(head, rows, markdown=True), ""]
    text += [f"== IMP vs one-shot: {title} ==", name, science.render(head, rows), ""]
    return md, text, files + [acc, es]


def _criteria(gis: list[int], grids: dict, out: str, suffix: str, tolerance: float, md, text, files):
    """Pruning criteria of one parent (docs/pruning.md): one figure and where each line falls below dense."""
    gs = [grids[gi][0] for gi in gis]
    names = ", ".join(pai.criterion_of(g) for g in gs)
    fig = pai.figure(gs, os.path.join(out, f"criteria{suffix}.png"), tolerance, f"criteria: {names}")
    head, rows = pai.table_rows(gs, tolerance)
    name = (f"Where each criterion's tickets and checks fall {100 * tolerance:.2f} pp below dense (early-stop test "
            f"accuracy, mean over seeds; controls averaged over reset points)")
    md += [f"## Pruning criteria: {names}", "", f"![criteria]({os.path.basename(fig)})", "", f"### {name}", "",
           science.render(head, rows, markdown=True, value_kind="left"), ""]
    text += [f"== Pruning criteria: {names} ==", name, science.render(head, rows, value_kind="left"), ""]
    return md, text, files + [fig]


def analyse(results: list[dict], out: str, tolerance: float = 0.005, weak: bool = False, command: str = "") -> dict:
    """Write the figures and report.md into `out`; return the terminal text and the files written."""
    os.makedirs(out, exist_ok=True)
    files, text, md = [], [], []
    md += ["# lthmpi analysis", "", "Produced by:", "", "```", command or "python -m lthmpi.analysis", "```", ""]

    # -- runs ---------------------------------------------------------------------------------------
    per_run = scaling_summary(results, weak)
    md += ["## Runs", ""]
    md.append(_md_table(["run", "P", "seed", "hosts", "tasks", "wall s", "git commit"],
                        [[pr["name"], pr["ranks"], r["config"].get("seed"), ", ".join(map(str, pr["hosts"])), pr["tasks"],
                          _f(pr["total_seconds"], ".2f"), str(r["provenance"].get("git_commit", "?"))[:12]]
                         for r, pr in zip(results, per_run)]))
    md.append("")

    # -- science ------------------------------------------------------------------------------------
    groups = science.science_groups(results)
    grids: dict[int, tuple] = {}  # group index -> (Grid, title)
    for gi, group in enumerate(groups):
        sub = [results[i] for i in group]
        if not any(t.get("kind") != "stability" for r in sub for t in r["tasks"]):  # stability pairs alone: no grid
            text.append(f"{per_run[group[0]]['name']}: no retrainings (one-shot or IMP) in the results, no science tables")
            continue
        g = science.build_grid(sub)
        suffix = "" if len(groups) == 1 else f"_{gi + 1}"
        names = [per_run[i]["name"] for i in group]
        title = names[0] if len(names) == 1 else f"{names[0]} + {len(names) - 1} replicate(s)"
        grids[gi] = (g, title)
        head = f"## Science: {title}" if len(groups) > 1 else "## Science"
        seeds = ", ".join(str(s) for s in g.seeds)
        md += [head, "", f"Runs: {', '.join(names)} (seeds {seeds}). Dataset `{g.config.get('data', {}).get('dataset')}`, "
               f"model `{g.config.get('model', {}).get('name')}`, {len(g.masks)} {g.mask_head}s × {len(g.resets)} reset points"
               f" × (ticket + {len(g.controls)} controls). Diverged retrainings: {g.diverged}.", ""]
        acc = plots.accuracy_figure(g, os.path.join(out, f"accuracy{suffix}.png"), tolerance, title)
        es = plots.early_stop_figure(g, os.path.join(out, f"early_stop{suffix}.png"), title)
        files += [acc, es]
        md += [f"![test accuracy vs weights remaining]({os.path.basename(acc)})", "",
               f"![early-stop iteration vs weights remaining]({os.path.basename(es)})", ""]
        if g.method == "imp":
            p = g.config.get("prune", {})
            md += [f"IMP: {p.get('levels')} levels pruning {100 * p.get('imp_rate', 0):g}% of the surviving weights each "
                   f"(x the layer multipliers {p.get('layer_rates')}, scope {p.get('scope')}); one chain per reset point, "
                   "each level rewound to its reset point's weights. Level l's controls use level l's mask.", ""]
        md += ["Controls are drawn as one dashed/dotted line each, their mean over reset points; the tables give "
               "them per reset point. The grey band is the dense parent's test accuracy ± the tolerance "
               f"({100 * tolerance:g} percentage points)" + (", widened to its interval over seeds" if len(g.seeds) > 1 else "")
               + ". Early-stop iterations count from the reset point."
               + (f" Curves are the mean of {len(g.seeds)} seeds, bands their {science.interval_name(len(g.seeds))}."
                  if len(g.seeds) > 1 else " One seed: no interval; differences of a few tenths of a point are noise.")
               + " Winning tickets and best reset points are " + science.selection_words(g) + ".", ""]
        if g.stopped:
            md += ["**Diverged IMP chains** (loss or weights not finite; no mask cut from them):", "",
                   *[f"- {line}" for line in g.stopped], ""]
        text.append(f"== {title} ==")
        text += [f"diverged IMP chain: {line}" for line in g.stopped]
        for name, table in science.tables(g, tolerance).items():
            if "Final" in name or "iteration" in name:
                continue  # kept for report.md: the terminal shows the key tables only
            text += [name, table, ""]
        for name, table in science.tables(g, tolerance, markdown=True).items():
            md += [f"### {name}", "", table, ""]

    pairs = [(a, b) for a, b in science.method_pairs(results, groups) if a in grids and b in grids]
    for n, (a, b) in enumerate(pairs):
        md, text, files = _comparison(grids[a], grids[b], out, "" if len(pairs) == 1 else f"_{n + 1}", tolerance,
                                      md, text, files)

    for n, gis in enumerate(pai.criterion_sets(results, groups, grids)):
        md, text, files = _criteria(gis, grids, out, "" if n == 0 else f"_{n + 1}", tolerance, md, text, files)

    # -- stability ----------------------------------------------------------------------------------
    for i, r in enumerate(results):
        ps = stability.pairs(r)
        if not ps:
            continue
        suffix = "" if len(results) == 1 else f"_{i + 1}"
        name = per_run[i]["name"]
        inst = plots.instability_figure(ps, os.path.join(out, f"instability{suffix}.png"), name)
        curves = plots.interpolation_figure(ps, os.path.join(out, f"interpolation{suffix}.png"), name)
        files += [inst, curves]
        bh, br = stability.barrier_rows(ps)
        eh, er = stability.earliest_rows(ps, r, tolerance)
        bn = "re-estimated at each α" if any(p.get("bn_reestimate") for p in ps) else "interpolated with the weights"
        md += [f"## Stability (linear mode connectivity): {name}", "",
               f"{len(ps)} pairs, {len(ps[0]['alpha'])} values of α; batch-norm statistics {bn}. Barrier = max over α "
               "of the test error minus the mean of the two ends' errors; * = stable (below the threshold). "
               "Earliest stable k: the first reset point from which every later one is stable too.", "",
               f"![instability against k]({os.path.basename(inst)})", "",
               f"![interpolation curves]({os.path.basename(curves)})", "",
               "### Error barrier (percentage points)", "", _md_table(bh, br), "",
               "### Earliest stable reset point per sparsity", "", _md_table(eh, er), ""]
        text += [f"Stability: {name} (error barrier, pp; * = stable)", _text_table(bh, br), "",
                 "Earliest stable reset point", _text_table(eh, er), ""]

    for group in groups:
        runs = [results[i] for i in group if stability.pairs(results[i])]
        if len(runs) < 2:
            continue
        title = f"{per_run[group[0]]['name']} + {len(runs) - 1} other seed(s)"
        head, rows = stability.seed_rows(runs)
        words = (f"Error barrier (pp) over {len(runs)} seeds (seeds {', '.join(str(r['config'].get('seed')) for r in runs)}): "
                 f"mean and {science.interval_name(len(runs))}, and the seeds in which the pair is stable.")
        eh, er = stability.earliest_seed_rows(runs, tolerance)
        md += [f"## Stability over seeds: {title}", "", words, "", _md_table(head, rows), "",
               "Earliest stable reset point per seed, and whether that seed's ticket reset there matches its dense "
               "network:", "", _md_table(eh, er), ""]
        text += [f"Stability over seeds: {title}", words, _text_table(head, rows), "",
                 "Earliest stable k per seed", _text_table(eh, er), ""]

    # -- scaling ------------------------------------------------------------------------------------
    md += ["## Scaling", ""]
    ph = plots.phases_figure(per_run, os.path.join(out, "phases.png"))
    files.append(ph)
    md += [f"![phase breakdown]({os.path.basename(ph)})", ""]
    for i, (r, pr) in enumerate(zip(results, per_run)):
        tasks, _ = scaling.session_tasks(r)
        if not tasks:
            continue
        resets = [p for p in r["config"].get("reset", {}).get("points", [])]
        path = os.path.join(out, "timeline.png" if len(results) == 1 else f"timeline_{i + 1}.png")
        files.append(plots.timeline_figure(r, pr, tasks, resets, path))
        md += [f"![task timeline of {pr['name']}]({os.path.basename(path)})", ""]
    seen = []
    for pr in per_run:
        s = pr.get("series")
        if s and not any(s is x for x in seen):
            seen.append(s)
            path = os.path.join(out, "speedup.png" if len(seen) == 1 else f"speedup_{len(seen)}.png")
            files.append(plots.speedup_figure(s, path))
            md += [f"![{s['kind']} scaling]({os.path.basename(path)})", ""]
    head, rows = scaling_rows(per_run)
    md += [_md_table(head, rows), ""]
    md += [f"- {line.strip()}" for line in fits(per_run)] + [""]
    md += ["Imbalance = max over workers of busy time (sum of its tasks' wall times) / mean busy time. "
           "S(P) = T(P0)/T(P) with T the run's total wall time, E = S·P0/P; Karp–Flatt "
           "e = (1/S − 1/P)/(1 − 1/P); Amdahl's f from a least-squares fit of T(P) = T1·(f + (1 − f)/P). "
           "Weak scaling: S_w = (T(P0)/W(P0))/(T(P)/W(P)) with W the training iterations of the run; "
           "Gustafson s = (P − S_w)/(P − 1). See lthmpi/analysis/scaling.py.", ""]
    md += ["### Phases (wall seconds)", ""]
    phase_names = list(dict.fromkeys(p for pr in per_run for p in pr["phases"]))
    md += [_md_table(["run", "P", *phase_names, "total"],
                     [[pr["name"], pr["ranks"], *(_f(pr["phases"].get(p), ".2f") for p in phase_names),
                       _f(pr["total_seconds"], ".2f")] for pr in per_run]), ""]
    text += ["Scaling (wall time of the whole run)", _text_table(head, rows), *fits(per_run), ""]

    # -- provenance ---------------------------------------------------------------------------------
    md += ["## Provenance", ""]
    for r, pr in zip(results, per_run):
        md += [f"### {pr['name']}", "", f"Results file: `{r['path']}`", "", "```json",
               json.dumps(r["provenance"], indent=1, sort_keys=True, default=str), "```", ""]
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(md))
    files.append(report)
    return dict(text="\n".join(text), files=files, report=report)
