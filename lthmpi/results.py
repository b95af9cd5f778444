"""The merged results file: every task's measurements in one HDF5 file, with timings and provenance.

Layout of results.h5:
  attrs            config (resolved TOML text), config_hash, created, format
  /parent          attrs: test_accuracy, early_stop_accuracy, early_stop_iteration, iterations, seconds
  /tasks/<column>  one entry per retraining (id, mask, remaining, reset, control, accuracies, seconds, rank, ...)
  /curves/<task>/{evals,epochs}/<column>   the per-eval and per-epoch curves
  /stability/<pair>  attrs: mask (-1 = dense), remaining, reset, reset_iteration, barrier, stable, ...;
                   datasets alpha, error, loss: the interpolation curve of one stability pair (docs/stability.md)
  /timing          attrs: wall seconds per phase (startup, parent, masks, distribution, training, gather)
  /provenance      attrs: versions, MPI library, ranks, hosts, threads, git commit
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields

import h5py
import numpy as np

from .config import tomllib
from .fileio import DIGEST, StoreError, atomic_h5, attr_value, open_h5, read_arrays
from .runtime import available_cores
from .store import RunDir
from .tables import text_table

FORMAT = 1


@dataclass
class TaskResult:
    """The columns of a task result, declared once: the experiment writes them into tasks/<id>.h5, the merge
    makes one /tasks/<column> dataset of each, the analysis reads them back. Columns a task file lacks (a
    kind that is not a retraining, or a file written before the column existed) take their defaults here."""
    task_id: str
    mask: int = -1
    remaining: float = math.nan
    target_remaining: float = math.nan
    reset: str = ""
    reset_iteration: int = -1
    control: str = ""
    final_accuracy: float = math.nan
    early_stop_iteration: int = -1
    early_stop_accuracy: float = math.nan
    best_val_loss: float = math.nan
    iterations: int = 0
    diverged: bool = False
    seconds: float = math.nan
    start_time: float = math.nan
    end_time: float = math.nan
    rank: int = -1
    host: str = ""
    threads: int = 0
    kernels: str = ""
    conv_step: str = ""  # a CPU conv net's step form, graph | xla (parallel.conv_step); "" for a net with one form
    device: str = "cpu"
    precision: str = "float32"
    deterministic: bool = True
    kind: str = "oneshot"
    deps: str = ""  # the ids of the tasks it waited for, comma-separated (the merge fills it from the graph)
    upstream: str = ""  # IMP: the diverged level whose chain stopped before this task; it was not trained

    @classmethod
    def from_attrs(cls, attrs: dict) -> "TaskResult":
        """From a task file's attributes: columns it lacks take their defaults, other attributes are ignored."""
        return cls(**{f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})

    @staticmethod
    def dtype(column: str):
        """How the merged file stores a column: text, 64-bit integers, or 64-bit floats (booleans too)."""
        kind = {f.name: f.type for f in fields(TaskResult)}[column]
        return h5py.string_dtype() if kind == "str" else np.int64 if kind == "int" else np.float64


TASK_COLUMNS = tuple(f.name for f in fields(TaskResult))


def merge(run: RunDir, task_ids: list[str], timing: dict, provenance: dict, during=None, pair_ids=(),
          deps: dict | None = None) -> str:
    """Gather the per-task files named by `task_ids` into results.h5 (written atomically; it is derived, so a
    damaged one is simply rebuilt by the next run), and the stability evaluations (tasks whose result holds a
    `curve`, and any named by `pair_ids`) into /stability. `deps` (task id -> ids it depends on) fills the `deps` column.
    `during()` is called with the
    file half-written (fault tests)."""
    pairs = {pid: run.read_task(pid) for pid in pair_ids}
    rows, curves = [], {}
    for tid in task_ids:
        attrs, series = run.read_task(tid)
        rows.append(attrs)
        curves[tid] = series
        if "curve" in series:  # a stability pair's evaluation (lthmpi/kinds/stability.py)
            pairs[tid] = (attrs, series)
    with open_h5(run.parent_path, "parent checkpoint file") as f:
        parent = {k: v for k, v in f.attrs.items() if k != DIGEST}
        parent_history = read_arrays(f["history"], f"parent checkpoint file {run.parent_path}") if "history" in f else {}
    with open(run.config_path) as f:
        config_text = f.read()
    with atomic_h5(run.results_path) as f:
        f.attrs.update(config=config_text, created=time.time(), format=FORMAT)
        p = f.create_group("parent")
        p.attrs.update({k: v for k, v in parent.items()})
        for k, v in parent_history.items():
            p.create_dataset(f"history/{k}", data=v)
        t = f.create_group("tasks")
        records = [TaskResult.from_attrs(r) for r in rows]
        for r in records:
            r.deps = ",".join((deps or {}).get(r.task_id, ()))
        for col in TASK_COLUMNS:
            t.create_dataset(col, data=np.array([getattr(r, col) for r in records], dtype=TaskResult.dtype(col)))
        if during:
            during()
        for tid, series in curves.items():
            for name, cols in series.items():
                for col, values in cols.items():
                    f.create_dataset(f"curves/{tid}/{name}/{col}", data=values)
        for pid, (attrs, series) in pairs.items():
            g = f.create_group(f"stability/{pid}")
            g.attrs.update(attrs)
            for col, values in series.get("curve", {}).items():
                g.create_dataset(col, data=values)
        f.create_group("timing").attrs.update(timing)
        f.create_group("provenance").attrs.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                                   for k, v in provenance.items()})
    return run.results_path


def load(path: str) -> dict:
    """Read a results file (or a run directory's) into plain Python: config, parent, tasks, timing, provenance."""
    if os.path.isdir(path):
        path = RunDir(path).results_path
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(os.path.dirname(path), "shards")):  # job-array shards merge in a step of their own
            raise StoreError(f"no results file at {path}: once every shard is done, build it with "
                             f"python -m lthmpi.main --merge --run-dir {os.path.dirname(path)}")
        raise StoreError(f"no results file at {path}: the run has not finished (rerun it to complete and merge)")
    with open_h5(path, "results file", "rerun the experiment to rebuild it from the task files") as f:
        try:
            config = tomllib.loads(f.attrs["config"])
            parent = {k: attr_value(v, arrays=True) for k, v in f["parent"].attrs.items()}
            cols = {c: [attr_value(x, arrays=True) for x in f["tasks"][c][()]] for c in f["tasks"]}
            timing = {k: attr_value(v, arrays=True) for k, v in f["timing"].attrs.items()}
            provenance = {k: attr_value(v, arrays=True) for k, v in f["provenance"].attrs.items()}
            stability = [{"pair": pid, **{k: attr_value(v, arrays=True) for k, v in g.attrs.items()}, **{c: g[c][()] for c in g}}
                         for pid, g in f["stability"].items()] if "stability" in f else []
            parent["early_stop_val_accuracy"] = early_stop_val_accuracy(
                {c.split("/", 1)[1]: v[()] for c, v in _items(f["parent"].get("history"), "evals/")})
            val = [early_stop_val_accuracy({c: v[()] for c, v in _items(f.get(f"curves/{tid}/evals"))})
                   for tid in cols.get("task_id", [])]
        except (KeyError, ValueError) as e:
            raise StoreError(f"results file {path} is incomplete or corrupt ({e}); rerun the experiment to rebuild it") from None
    n = len(cols.get("task_id", []))
    tasks = [{c: cols[c][i] for c in cols} for i in range(n)]
    for t, v in zip(tasks, val):
        t["early_stop_val_accuracy"] = v
        t["control"] = t.get("control") or None
        t["rank"] = int(t["rank"])
        t["mask"] = int(t["mask"])
    return dict(config=config, parent=parent, tasks=tasks, timing=timing, provenance=provenance, path=path,
                stability=stability)


def _items(group, prefix: str = "") -> list:
    """(name, dataset) of an HDF5 group's datasets whose names start with `prefix`, walking subgroups
    ("evals/val_loss"); none for a missing group."""
    if group is None:
        return []
    found = []
    group.visititems(lambda name, obj: found.append((name, obj)) if hasattr(obj, "shape") and name.startswith(prefix)
                     else None)
    return found


def early_stop_val_accuracy(evals: dict) -> float:
    """The validation accuracy where the validation loss was lowest (the early-stop point; the first on ties, as
    the trainer keeps it): what the analysis selects winning tickets and reset points by. NaN where the curves
    hold no finite validation loss or no validation accuracy."""
    loss = np.asarray(evals.get("val_loss", []), dtype=float)
    acc = np.asarray(evals.get("val_accuracy", []), dtype=float)
    if not loss.size or acc.shape != loss.shape or not np.isfinite(loss).any():
        return math.nan
    return float(acc[int(np.argmin(np.where(np.isfinite(loss), loss, np.inf)))])


def summary_json(res: dict) -> dict:
    """The machine-readable summary `python -m lthmpi.analysis RUN_DIR --json` prints."""
    keys = ("mask", "remaining", "reset", "control", "final_accuracy", "early_stop_iteration",
            "early_stop_accuracy", "early_stop_val_accuracy", "seconds", "rank")
    tasks = [{k: _none_if_nan(t[k]) for k in keys} | {"diverged": bool(t.get("diverged", False))} for t in res["tasks"]]
    parent = {k: _none_if_nan(v) for k, v in res["parent"].items()}
    return dict(config=res["config"], parent=parent, tasks=tasks, timing=res["timing"], provenance=res["provenance"])


def provenance(ranks: int, hosts: list[str], threads: int, mpi_library: str = "none") -> dict:
    return dict(python=sys.version.split()[0], tensorflow=_version("tensorflow"), keras=_version("keras"),
                numpy=np.__version__, h5py=h5py.__version__, platform=platform.platform(),
                mpi_library=mpi_library, ranks=ranks, hosts=sorted(set(hosts)), threads_per_rank=threads,
                ranks_per_host=max(Counter(hosts).values()) if hosts else 1, cores_per_host=available_cores(),
                git_commit=git_commit())


def _version(package: str) -> str:
    """An installed package's version without importing it (--merge must not pay TensorFlow's import)."""
    module = sys.modules.get(package)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    from importlib import metadata

    for dist in (package, f"{package}-cpu", f"{package}-gpu", f"{package}-macos"):  # tensorflow's wheels
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _none_if_nan(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def format_table(res: dict) -> str:
    """A short terminal table: early-stop test accuracy per mask (rows) and reset point (columns)."""
    tasks = res["tasks"]
    resets = list(dict.fromkeys(t["reset"] for t in tasks))
    controls = list(dict.fromkeys(t["control"] for t in tasks if t["control"]))
    masks = sorted({t["mask"] for t in tasks})
    by = {(t["mask"], t["reset"], t["control"]): t for t in tasks}
    head = ["left %"] + [f"k={r}" for r in resets] + [f"{c} (mean)" for c in controls]
    rows = []
    for m in masks:
        rem = next(t["remaining"] for t in tasks if t["mask"] == m)
        row = [f"{100 * rem:6.2f}"]
        row += [_pct(by.get((m, r, None), {}).get("early_stop_accuracy")) for r in resets]
        for c in controls:
            vals = [by[(m, r, c)]["early_stop_accuracy"] for r in resets if (m, r, c) in by]
            row.append(_pct(sum(vals) / len(vals) if vals else None))
        rows.append(row)
    parent = res["parent"].get("test_accuracy")
    return f"dense parent test accuracy: {_pct(parent)}%   (test accuracy at early stop, %)\n" + text_table(head, rows)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"
