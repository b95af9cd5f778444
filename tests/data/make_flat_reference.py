"""Make tests/data/flat_reference.json: the per-task results of the one-shot grid from the code before the
task graph (issue 19), kept so that the coordinator's "identical to the old code" test has a reference.

It was made once, at commit dd455de (before lthmpi/coordinator.py existed), with:

    PYTHONPATH=$PWD .venv/bin/python tests/data/make_flat_reference.py

which runs the real CLI on one process (no mpirun), one TF thread, on test_mpi.py's tiny digits grid
(3 masks x 2 reset points x (ticket + random_reinit) = 12 tasks), and writes each task's measured columns
and curves. Python's float repr round-trips, so the JSON holds the exact bits. Do not rerun it on newer code:
that would make the reference agree with whatever the code does now.

Issue 32 changed one-shot masks with rate multipliers (prune.layer_rates) to Frankle & Carbin's per-round
densities, so the reference was re-made at dd455de (`git archive dd455de`, this script copied in) with
prune.layer_rates = {}: a global pool without multipliers, cut the same way by dd455de and by the code since.
That re-make ran on an AMD EPYC (AVX2) box; tests/portable.py says how it is compared on other CPUs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("flat_reference.json")
SETS = ["data.dataset=digits", "data.validation=200", "train.epochs=2", "train.batch_size=32",
        "prune.remaining=[0.5, 0.2, 0.1]", 'reset.points=["0ep", "10it"]', 'reset.controls=["random_reinit"]',
        "train.eval_every=10it", "parallel.threads=1", "prune.layer_rates={}"]
MEASURED = ("final_accuracy", "early_stop_iteration", "early_stop_accuracy", "best_val_loss", "remaining",
            "target_remaining", "iterations", "reset_iteration", "mask", "reset", "control", "diverged")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lthmpi.main", "--run-dir", str(run), "--quiet"]
        for s in SETS:
            cmd += ["--set", s]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "HYDI_", "LTHMPI_"))}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        tasks = {}
        for p in sorted((run / "tasks").glob("*.h5")):
            with h5py.File(p, "r") as f:
                attrs = {k: (v.item() if isinstance(v, np.generic) else v.decode() if isinstance(v, bytes) else v)
                         for k, v in f.attrs.items() if k in MEASURED}
                curves = {f"{g}/{c}": f[g][c][()].tolist() for g in f for c in f[g]}
            tasks[p.stem] = {"attrs": attrs, "curves": curves}
    OUT.write_text(json.dumps({"sets": SETS, "tasks": tasks}, indent=1, sort_keys=True) + "\n")
    print(f"{len(tasks)} tasks -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
