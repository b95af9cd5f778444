"""python -m lthmpi.analysis model RUN_DIR [--ranks 1,2,4,...,1000] [--schedulers static,lpt,dynamic]
                                   [--cores N] [--check RUN_DIR ...] [--seed-study] [--json]

The scaling model (lthmpi.scaling_model) driven by a measured run: the run's results give a RunProfile
(per-task durations = the `seconds` column, costs = `iterations`, groups = `mask`, the phase times of
`/timing`, P = provenance ranks); the model predicts wall time, speed-up S and efficiency E on other P
for each scheduler. ``--check`` names other measured runs of the same work (other P, other scheduler):
for each the model's prediction from the first run is set against the measured wall time, and the error
in % is printed. The check runs are never used to fit the model: the errors are honest predictions.

Mapping of the measured run onto the model (see scaling_model.py for the model itself):

* ``phases``: startup, parent, masks, distribution as measured; ``gather`` is the gather plus whatever
  ``total`` holds beyond the named phases (the merge of results.h5 on rank 0), so that the model's wall
  time is comparable with ``timing.total``.
* ``overhead_per_task``: a task's `seconds` is its training loop only; setting the weights, evaluating
  and writing the task file come on top. The model charges (training phase - busiest rank's summed task
  seconds) / tasks on that rank to every task (``--overhead S`` overrides it).
* ``warm-up``: the first task a rank trains traces and compiles the training step; rank 0 has done so in
  the parent run, every other rank pays it once on its first task. The model has no term for it, so the
  CLI adds it to the training phase of every P >= 2 (scaled by the oversubscription like the tasks):
  exact when the rank that finishes last is not rank 0 (balanced static / LPT schedules), pessimistic by
  up to the warm-up otherwise (the dynamic scheduler lets rank 0 take more tasks meanwhile). It is
  measured on the profiled run: with ranks other than 0, as their first task's excess over the seconds per
  iteration of the other tasks (and those first tasks' durations are cleaned of it); at P = 1 as the
  parent's excess over its iterations at the tasks' seconds per iteration. ``--warmup S`` overrides it.
* ``--cores N``: the cores of the machine, both for the measured runs and for the predictions (ranks
  beyond N share cores, see ``oversubscription``). Default: every rank has a core of its own.

``--seed-study`` adds the what-if of the seed study (MobileNetV2 on ImageNet): M = 20 masks, N = 5 late
resets at epochs 5, 10, 20, 30, 40, T = 350 epochs of 4.5 min each, every retraining T - k epochs, the
parent T epochs, on P = 20 and P = 100 ranks with a core (GPU) each. RUN_DIR may then be left out.

Errors are one line "lthmpi.analysis model: error: ...", exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

PROG = "lthmpi.analysis model"

SEED_STUDY = dict(M=20, N=5, epochs=350, epoch_minutes=4.5, reset_epochs=[5, 10, 20, 30, 40], ranks=[20, 100])


class ModelCliError(RuntimeError):
    """A problem phrased as one line for the user."""


# -- argument parsing ---------------------------------------------------------------------------------
def parse_ranks(text: str) -> list[int]:
    """ "1,2,4,16" -> those; "1,2,4,...,1000" -> doubling from the last value before "..." up to 1000,
    then 1000 itself (1, 2, 4, 8, ..., 512, 1000). Sorted, unique, every P >= 1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out: list[int] = []
    try:
        if "..." in parts:
            i = parts.index("...")
            head, tail = [int(p) for p in parts[:i]], [int(p) for p in parts[i + 1:]]
            if not head or len(tail) != 1:
                raise ValueError
            ratio = head[-1] / head[-2] if len(head) >= 2 and head[-2] > 0 else 2
            ratio = ratio if ratio > 1 else 2
            out = list(head)
            p = head[-1]
            while p * ratio < tail[0]:
                p = int(round(p * ratio))
                out.append(p)
            out.append(tail[0])
        else:
            out = [int(p) for p in parts]
    except ValueError:
        raise ModelCliError(f"--ranks {text!r}: give integers separated by commas, e.g. 1,2,4,8 or 1,2,4,...,1000") from None
    if not out or min(out) < 1:
        raise ModelCliError(f"--ranks {text!r}: every P must be an integer >= 1")
    return sorted(set(out))


def parse_schedulers(text: str) -> list[str]:
    from ..schedule import SCHEDULERS

    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in SCHEDULERS]
    if bad or not out:
        raise ModelCliError(f"--schedulers: unknown scheduler {', '.join(bad) or '(none)'} "
                            f"(choose from {', '.join(SCHEDULERS)})")
    return list(dict.fromkeys(out))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Predict wall time, speed-up and efficiency on P ranks per scheduler from one measured run "
                    "(lthmpi.scaling_model), and check the prediction against runs measured at other P.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m lthmpi.analysis model runs/strong/p1 --ranks 1,2,4,...,1000\n"
               "  python -m lthmpi.analysis model runs/strong/p1 --cores 2 --check runs/strong/p2 runs/strong/p4\n"
               "  python -m lthmpi.analysis model --seed-study")
    p.add_argument("run", nargs="?", metavar="RUN_DIR", help="the measured run (directory or its results.h5)")
    p.add_argument("--ranks", metavar="LIST", help="P values, e.g. 1,2,4,8 or 1,2,4,...,1000 (doubling up to 1000); "
                   "default: powers of two up to the first >= the number of tasks, plus M and the number of tasks")
    p.add_argument("--schedulers", metavar="LIST", default="static,lpt,dynamic",
                   help="schedulers to model, comma-separated (default static,lpt,dynamic)")
    p.add_argument("--cores", type=int, metavar="N", help="cores of the machine (measured runs and predictions): "
                   "ranks beyond N share cores; default: every rank has a core of its own")
    p.add_argument("--check", nargs="+", default=[], metavar="RUN_DIR",
                   help="runs of the same work at other P: print the model's error against each")
    p.add_argument("--overhead", type=float, metavar="S",
                   help="seconds added before every task (default: estimated from the measured run)")
    p.add_argument("--warmup", type=float, metavar="S",
                   help="seconds every rank other than 0 spends tracing/compiling on its first task "
                        "(default: estimated from the measured run)")
    p.add_argument("--dp-efficiency", type=float, metavar="E",
                   help="with more ranks than units of work, model data-parallel subgroups whose s ranks train "
                        "1 + E(s - 1) times faster (default: the surplus ranks idle)")
    p.add_argument("--seed-study", action="store_true",
                   help="also predict the seed study (M = 20, N = 5 resets at epochs 5..40, 350 epochs of 4.5 min) "
                        "on P = 20 and 100")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    return p


# -- the profile of a measured run ------------------------------------------------------------------------
def load_one(path: str) -> dict:
    from . import AnalysisError, load_runs

    try:
        return load_runs([path])[0]
    except AnalysisError as e:
        raise ModelCliError(str(e)) from None


def scheduler_of(res: dict) -> str:
    """The scheduler a run used: provenance (the MPI path records it), else its config; serial runs: lpt."""
    s = res["provenance"].get("schedule") or res["config"].get("parallel", {}).get("schedule") or "lpt"
    return str(s)


def estimate_warmup(res: dict) -> tuple[float, dict[int, float], str]:
    """(warm-up seconds, {task index: duration without it}, how it was measured) of one run.

    Ranks other than 0 that trained in this session: each one's first task minus what its iterations cost
    at the seconds per iteration of all the other tasks; the median over those ranks. Otherwise (P = 1,
    or only rank 0 trained): the parent's seconds minus its iterations at that rate. Never negative.
    """
    from .scaling import session_tasks

    tasks = res["tasks"]
    index = {t["task_id"]: i for i, t in enumerate(tasks)}
    mine, _ = session_tasks(res)
    first: dict[int, dict] = {}
    for t in mine:
        r = int(t["rank"])
        if r != 0 and (r not in first or t["start_time"] < first[r]["start_time"]):
            first[r] = t
    firsts = {t["task_id"] for t in first.values()}
    rest = [t for t in tasks if t["task_id"] not in firsts]
    its = sum(float(t.get("iterations") or 0) for t in rest)
    rate = sum(float(t["seconds"]) for t in rest) / its if its > 0 else math.nan
    if first and math.isfinite(rate):
        cleaned, excess = {}, []
        for t in first.values():
            expected = rate * float(t.get("iterations") or 0)
            excess.append(max(0.0, float(t["seconds"]) - expected))
            cleaned[index[t["task_id"]]] = min(float(t["seconds"]), expected)
        return float(sorted(excess)[len(excess) // 2]), cleaned, f"first tasks of {len(first)} ranks other than 0"
    parent = res.get("parent", {})
    ps, pi = parent.get("seconds"), parent.get("iterations")
    if ps is not None and pi and math.isfinite(rate):
        return max(0.0, float(ps) - rate * float(pi)), {}, "parent run beyond its iterations at the tasks' rate"
    return 0.0, {}, "not measurable in this run"


def profile_from_results(res: dict, cores: int | None = None, overhead: float | None = None,
                         dp_efficiency: float | None = None):
    """A scaling_model.RunProfile from one loaded results dict (lthmpi.results.load).

    The durations of first tasks that carried a warm-up (ranks other than 0) are cleaned of it; the
    warm-up itself is ``estimate_warmup`` and is added by ``predictions``.
    """
    from ..scaling_model import RunProfile
    from .scaling import ranks_of, rank_busy, session_tasks

    tasks = res["tasks"]
    if not tasks:
        raise ModelCliError(f"{res.get('path', 'the run')} has no tasks to model")
    durations = [float(t["seconds"]) for t in tasks]
    costs = [float(t.get("iterations") or 0) for t in tasks]
    if not all(math.isfinite(d) and d >= 0 for d in durations):
        raise ModelCliError(f"{res.get('path', 'the run')}: a task has no valid `seconds`")
    for i, d in estimate_warmup(res)[1].items():
        durations[i] = d
    if not any(c > 0 for c in costs):
        costs = list(durations)
    groups = [int(t["mask"]) for t in tasks]
    timing = res["timing"]
    phases = {k: float(timing[k]) for k in ("startup", "parent", "masks", "distribution", "gather") if k in timing}
    named = sum(float(v) for k, v in timing.items() if k not in ("total", "start_time") and isinstance(v, (int, float)))
    if "total" in timing:
        phases["gather"] = phases.get("gather", 0.0) + max(0.0, float(timing["total"]) - named)
    if overhead is None:
        mine, _ = session_tasks(res)
        busy = rank_busy(mine)
        training = float(timing.get("training", math.nan))
        if busy and math.isfinite(training):
            r = max(busy, key=busy.get)  # the rank that set the training phase (busy includes any warm-up)
            n = sum(1 for t in mine if int(t["rank"]) == r)
            overhead = max(0.0, (training - busy[r]) / n) if n else 0.0
        else:
            overhead = 0.0
    return RunProfile(durations, costs, phases, ranks=ranks_of(res), cores=cores, task_groups=groups,
                      overhead_per_task=float(overhead), data_parallel_efficiency=dp_efficiency)


def default_ranks(profile) -> list[int]:
    n = len(profile.task_durations)
    m = len(set(profile.task_groups or range(n)))
    out, p = [], 1
    while True:
        out.append(p)
        if p >= n:
            break
        p *= 2
    return sorted(set(out + [m, n]))


def predictions(profile, ranks, schedulers, cores, warmup: float = 0.0) -> list[dict]:
    """scaling_model.predict_many, plus the warm-up of ranks other than 0 on every P >= 2 (S, E redone)."""
    from ..scaling_model import predict_many

    rows = predict_many(profile, ranks, schedulers, cores)
    return [with_warmup(profile, r, cores, warmup) for r in rows]


def with_warmup(profile, row: dict, cores, warmup: float) -> dict:
    from ..scaling_model import oversubscription, predict

    row = dict(row, phases=dict(row["phases"]), warmup=0.0)
    if row["P"] >= 2 and warmup > 0:
        add = warmup * oversubscription(row["P"], cores) / oversubscription(profile.ranks, profile.cores)
        row["warmup"] = add
        row["makespan"] += add
        row["phases"]["training"] += add
        row["wall"] += add
        wall1 = predict(profile, 1, row["scheduler"], cores)["wall"]
        row["speedup"] = wall1 / row["wall"]
        row["efficiency"] = row["speedup"] / row["P"]
    return row


def check(profile, res_ref: dict, checks: list[dict], cores, warmup: float = 0.0) -> list[dict]:
    """For each measured run: P, scheduler, measured and predicted wall / training time, error %."""
    from ..scaling_model import predict
    from .scaling import ranks_of, work_key

    ref_key = work_key(res_ref)
    rows = []
    for res in checks:
        if work_key(res) != ref_key:
            raise ModelCliError(f"--check {res['path']} is not the same work as {res_ref['path']} "
                                f"(their configs differ outside the `parallel` section)")
        P, sched = ranks_of(res), scheduler_of(res)
        pred = with_warmup(profile, predict(profile, P, sched, cores), cores, warmup)
        measured = float(res["timing"].get("total", math.nan))
        m_train = float(res["timing"].get("training", math.nan))
        rows.append(dict(run=_run_dir(res["path"]), P=P, scheduler=sched, measured=measured, predicted=pred["wall"],
                         error_pct=_err(pred["wall"], measured), measured_training=m_train,
                         predicted_training=pred["makespan"], training_error_pct=_err(pred["makespan"], m_train)))
    return rows


def _run_dir(path: str) -> str:
    return os.path.dirname(path) if path.endswith(".h5") else path


def _err(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas if meas and math.isfinite(meas) and meas > 0 else math.nan


def seed_study(schedulers) -> dict:
    from ..scaling_model import predict_many, synthetic_profile

    s = SEED_STUDY
    prof = synthetic_profile(s["M"], s["N"], s["epochs"], s["epoch_minutes"] * 60.0, reset_epochs=s["reset_epochs"])
    rows = predict_many(prof, s["ranks"], schedulers, None)
    return dict(case=dict(s, tasks=len(prof.task_durations),
                          task_epochs=sum(prof.task_durations) / (s["epoch_minutes"] * 60.0),
                          serial_hours=(prof.phases["parent"] + sum(prof.task_durations)) / 3600.0),
                rows=rows)


# -- printing -------------------------------------------------------------------------------------------
def _f(v, fmt=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table(head: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *cells])


def prediction_table(rows: list[dict], unit: float = 1.0, unit_name: str = "s") -> str:
    head = ["P", "scheduler", f"wall {unit_name}", "S(P)", "E(P)", f"training {unit_name}", "imbalance", "workers", "idle"]
    body = [[r["P"], r["scheduler"], _f(r["wall"] / unit), _f(r["speedup"]), _f(r["efficiency"], ".3f"),
             _f(r["makespan"] / unit), _f(r["imbalance"], ".3f"), r["workers"], r["idle"]] for r in rows]
    return table(head, body)


def check_table(rows: list[dict]) -> str:
    head = ["run", "P", "scheduler", "measured s", "predicted s", "error %", "training meas. s", "training pred. s",
            "training error %"]
    body = [[r["run"], r["P"], r["scheduler"], _f(r["measured"]), _f(r["predicted"]), _signed(r["error_pct"]),
             _f(r["measured_training"]), _f(r["predicted_training"]), _signed(r["training_error_pct"])] for r in rows]
    return table(head, body)


def _signed(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.1f}%"


def describe_profile(profile, res: dict) -> str:
    n = len(profile.task_durations)
    ph = ", ".join(f"{k} {v:.2f}" for k, v in profile.phases.items())
    return (f"measured run {_run_dir(res['path'])}: P = {profile.ranks}, {n} tasks in {len(set(profile.task_groups))} masks, "
            f"task seconds {min(profile.task_durations):.2f}..{max(profile.task_durations):.2f} "
            f"(sum {sum(profile.task_durations):.2f}), overhead per task {profile.overhead_per_task:.3f} s\n"
            f"phases (s): {ph}; cores: {profile.cores if profile.cores else 'one per rank'}")


# -- main -----------------------------------------------------------------------------------------------
def run(args) -> tuple[dict, str]:
    if args.run is None and not args.seed_study:
        raise ModelCliError("give the measured RUN_DIR (or --seed-study alone)")
    if args.cores is not None and args.cores < 1:
        raise ModelCliError(f"--cores must be >= 1, not {args.cores}")
    if args.overhead is not None and not args.overhead >= 0:
        raise ModelCliError(f"--overhead must be >= 0 seconds, not {args.overhead}")
    if args.dp_efficiency is not None and not 0 <= args.dp_efficiency <= 1:
        raise ModelCliError(f"--dp-efficiency must lie in [0, 1], not {args.dp_efficiency}")
    if args.check and args.run is None:
        raise ModelCliError("--check needs the measured RUN_DIR to predict from")
    schedulers = parse_schedulers(args.schedulers)
    out: dict = {}
    text: list[str] = []
    if args.run is not None:
        res = load_one(args.run)
        prof = profile_from_results(res, args.cores, args.overhead, args.dp_efficiency)
        if args.warmup is None:
            warmup, _, how = estimate_warmup(res)
        else:
            warmup, how = args.warmup, "given (--warmup)"
        ranks = parse_ranks(args.ranks) if args.ranks else default_ranks(prof)
        rows = predictions(prof, ranks, schedulers, args.cores, warmup)
        out.update(run=_run_dir(res["path"]), profile=dict(ranks=prof.ranks, cores=prof.cores, tasks=len(prof.task_durations),
                                                 task_seconds=prof.task_durations, task_costs=prof.task_costs,
                                                 task_groups=prof.task_groups, phases=prof.phases,
                                                 overhead_per_task=prof.overhead_per_task,
                                                 warmup=warmup, warmup_source=how),
                   predictions=rows)
        text += [describe_profile(prof, res), f"warm-up of ranks other than 0 (first task): {warmup:.2f} s ({how})",
                 "", "predicted (wall = startup + parent + masks + distribution + "
                 "training makespan (+ warm-up for P >= 2) + gather; S, E against the model's own P = 1):",
                 prediction_table(rows)]
        if args.check:
            checks = [load_one(p) for p in args.check]
            crow = check(prof, res, checks, args.cores, warmup)
            out["check"] = crow
            errs = [abs(r["error_pct"]) for r in crow if math.isfinite(r["error_pct"])]
            text += ["", "model against measured runs (error = (predicted - measured) / measured):", check_table(crow)]
            if errs:
                text.append(f"mean |error| {sum(errs) / len(errs):.1f}%, max |error| {max(errs):.1f}%")
    if args.seed_study:
        ss = seed_study(schedulers)
        out["seed_study"] = ss
        c = ss["case"]
        text += ["" if text else None,
                 f"seed study: M = {c['M']} masks x N = {c['N']} resets at epochs {c['reset_epochs']}, "
                 f"T = {c['epochs']} epochs of {c['epoch_minutes']} min, retraining T - k; {c['tasks']} tasks, "
                 f"parent + tasks = {c['serial_hours']:.1f} h on one rank",
                 prediction_table(ss["rows"], 3600.0, "h")]
    return out, "\n".join(t for t in text if t is not None)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out, text = run(args)
    except ModelCliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # from the model (e.g. a profile it refuses): one line as well
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from . import dumps

        print(dumps(out))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
