#!/usr/bin/env python3
"""Workers' idle time per task under the `dynamic` scheduler, before and after rank 0 answers requests from a
thread of its own (issue 19). A benchmark that prints; not a test.

Runs one grid twice under `mpirun -np P` with parallel.schedule = dynamic: with the code of commit --before
(default dd455de: rank 0 answered requests only between its own training blocks, so a worker that finished a
task waited up to one `train.eval_every` block), extracted with `git archive`, and with this checkout. Then
prints, per run, the idle time before each task (lthmpi.analysis.scaling.idle_before: since the rank's
previous task ended) for the workers (ranks > 0) and for rank 0, each rank's first task left out (it also
waits for the first task's set-up); then every task's.

    run/bench_dispatch.py [--ranks 3] [--epochs 30] [--eval-every 30ep] [--before dd455de] [--out DIR]

Tasks of a few seconds: digits, 2 masks x 2 reset points x (ticket, random re-init) = 8 tasks of `--epochs`
epochs (~38 iterations each); one TF thread per rank. On a busy machine the absolute figures move: compare
the two runs of one invocation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def grid(epochs: int, eval_every: str) -> list[str]:
    sets = ["data.dataset=digits", "data.validation=200", f"train.epochs={epochs}", "train.batch_size=32",
            "prune.remaining=[0.5, 0.2]", 'reset.points=["0ep", "1ep"]', 'reset.controls=["random_reinit"]',
            f"train.eval_every={eval_every}", "parallel.threads=1", "parallel.schedule=dynamic"]
    return [a for s in sets for a in ("--set", s)]


def launch(code: Path, run_dir: Path, ranks: int, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "HYDI_", "LTHMPI_"))}
    env["PYTHONPATH"] = str(code)
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun), "-np", str(ranks), sys.executable, "-m", "lthmpi.main", "--run-dir", str(run_dir), "--quiet",
           *args]
    print("+", " ".join(cmd), f"(PYTHONPATH={code})", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def idle_rows(run_dir: Path) -> dict:
    from lthmpi import results
    from lthmpi.analysis.scaling import idle_before, session_tasks, training_start

    res = results.load(str(run_dir))
    tasks, _ = session_tasks(res)
    idle = idle_before(tasks, training_start(res))
    first = {}
    for t in sorted(tasks, key=lambda t: t["start_time"]):
        first.setdefault(t["rank"], t["task_id"])
    # a rank's first task also waits for the first task's set-up (weights, masks, optimizer, first traces):
    # the dispatch shows in the idle time before the later ones
    workers = [idle[t["task_id"]] for t in tasks if t["rank"] != 0 and t["task_id"] != first[t["rank"]]]
    rank0 = [idle[t["task_id"]] for t in tasks if t["rank"] == 0 and t["task_id"] != first[0]]
    return dict(tasks=len(tasks), task_s=statistics.mean(t["seconds"] for t in tasks), workers=workers, rank0=rank0,
                training=res["timing"]["training"], per_task=sorted((t["rank"], t["start_time"], t["task_id"],
                                                                      idle[t["task_id"]]) for t in tasks))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eval-every", default="30ep", help="rank 0's training block (default: the whole task, where "
                   "the old code made a worker wait longest)")
    p.add_argument("--before", default="dd455de", help="the commit before the change (default dd455de)")
    p.add_argument("--out", help="keep the run directories here (default: a temporary directory)")
    a = p.parse_args()
    args = grid(a.epochs, a.eval_every)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.before], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        rows = {}
        for name, code in ((f"before ({a.before})", old), ("after (this checkout)", ROOT)):
            run = out / name.split()[0]
            wall = launch(code, run, a.ranks, args)
            rows[name] = dict(idle_rows(run), wall=wall)
        print(f"\nidle time before each task, dynamic scheduler, P = {a.ranks}, {a.epochs} epochs per task, "
              f"eval_every {a.eval_every}:")
        print(f"{'code':<24} {'tasks':>5} {'task s':>7} {'workers: mean idle s':>21} {'max':>6} "
              f"{'rank 0: mean':>13} {'training s':>11} {'wall s':>7}   (idle before all but a rank's first task)")
        for name, r in rows.items():
            w = r["workers"] or [float("nan")]
            z = r["rank0"] or [float("nan")]
            print(f"{name:<24} {r['tasks']:>5} {r['task_s']:>7.2f} {statistics.mean(w):>21.3f} {max(w):>6.3f} "
                  f"{statistics.mean(z):>13.3f} {r['training']:>11.2f} {r['wall']:>7.2f}")
        for name, r in rows.items():
            print(f"\n{name}: rank, task, idle s before it")
            for rank, _, tid, idle in r["per_task"]:
                print(f"  {rank}  {tid:<24} {idle:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
