"""The run directory: resolved config, parent checkpoints, masks, one file per finished task, merged results.

Every file is written whole or not at all: it is built under a temporary name in the same directory,
flushed and fsynced, then renamed, so a killed process leaves either the old state or the new one.
Arrays carry a sha256 of their bytes, because HDF5 itself does not notice a flipped bit in raw data, and
every HDF5 file written here carries a sha256 of its whole content (attributes, and the bytes of every
array that has no checksum of its own) in the root attribute `content_sha256`, checked on opening.
One run at a time: the process that works in a directory holds an flock on RUN_DIR/lock. Atomic writes
and checksums are lthmpi/fileio.py's.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from .config import Config, ConfigError, from_dict, load_toml
from .locks import (_NoLocks, _flock, _write_holder, check_flock_excludes, filesystem_of,  # noqa: F401
                    holder_stamp, hostname, open_nofollow, read_holder, release)
from .fileio import (DIGEST, StoreError, atomic_h5, atomic_path, attr_value, open_h5, read_arrays, remove_quietly,
                     temp_path, write_arrays)

_HELD_LOCKS: dict[str, int] = {}  # run directory -> fd of its lock file, for the run(s) of this process


SWEPT = ("stability", "shards", "checkpoints")  # more subdirectories whose temporaries are swept (their writers are not RunDir's)


class RunDir:
    """Paths and life cycle of one experiment's directory."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config_path = os.path.join(self.path, "config.toml")
        self.parent_path = os.path.join(self.path, "parent.h5")
        self.masks_path = os.path.join(self.path, "masks.h5")
        self.chains_dir = os.path.join(self.path, "imp_masks")  # IMP: one mask file per chain and level
        self.tasks_dir = os.path.join(self.path, "tasks")
        self.logs_dir = os.path.join(self.path, "logs")
        self.results_path = os.path.join(self.path, "results.h5")
        self.checkpoints_dir = os.path.join(self.path, "checkpoints")  # the parent's, one a file, while it trains
        self.lock_path = os.path.join(self.path, "lock")
        self.claims_dir = os.path.join(self.path, "claims")
        self.conv_step_path = os.path.join(self.path, "conv_step")  # the form a CPU conv net's step takes here
        self.before_write = None  # called with a task id before its file is written (a shard: its claim is still its own)

    def task_path(self, task_id: str) -> str:
        return os.path.join(self.tasks_dir, f"{task_id}.h5")

    # -- the conv step's form ---------------------------------------------------------------------
    def recorded_conv_step(self) -> str:
        """The conv step's form this run recorded first ("" if none)."""
        try:
            with open(self.conv_step_path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def record_conv_step(self, form: str) -> str:
        """The run's conv step form: `form` if no process recorded one before, else the one recorded. Write-once
        and race-free: a complete file is linked into place, and a second link fails (job-array shards that
        choose at once end in one form)."""
        if self.recorded_conv_step():
            return self.recorded_conv_step()
        tmp = temp_path(self.conv_step_path)
        try:
            with open(tmp, "w") as f:
                f.write(form + "\n")
            try:
                os.link(tmp, self.conv_step_path)
                return form
            except FileExistsError:
                return self.recorded_conv_step() or form
            except OSError:  # a file system without hard links: not exclusive, but a complete file
                if not os.path.exists(self.conv_step_path):
                    os.replace(tmp, self.conv_step_path)
                return self.recorded_conv_step() or form
        finally:
            remove_quietly(tmp)

    def create(self, cfg: Config, shared: bool = False):
        """Make the directory, take its lock and save the config; refuse a directory that holds another
        experiment or that another run is using. Temporaries of a killed run are removed (under the lock).
        `shared`: a job-array shard, which shares the directory with the other shards (see lock())."""
        try:
            os.makedirs(self.tasks_dir, exist_ok=True)
            os.makedirs(self.logs_dir, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create run directory {self.path}: {e.strerror}; choose another --run-dir") from None
        if not os.access(self.path, os.W_OK):
            raise StoreError(f"run directory {self.path} is not writable; choose another --run-dir")
        self.lock(shared)
        if os.path.exists(self.config_path):
            self.check_config(cfg)
            return
        try:
            with atomic_path(self.config_path) as tmp, open(tmp, "w") as f:
                f.write(cfg.to_toml())
        except OSError as e:
            raise StoreError(f"cannot write {self.config_path}: {e.strerror}") from None

    # -- one run at a time ------------------------------------------------------------------------
    def lock(self, shared: bool = False, wait_s: float = 0.0):
        """Hold an exclusive flock on RUN_DIR/lock until unlock() or the end of the process (the kernel drops
        it when the holder dies, so a killed run's lock is never stale). Refuses with who holds it, after
        waiting up to `wait_s` seconds for it (saying whom it waits for).

        `shared`: job-array shards hold it shared, so that they work side by side (each task claimed first,
        see claim()) while a run without --shard, which holds it exclusively, is kept out, and vice versa.
        Temporaries a killed process left are removed only while this process holds the lock exclusively
        (a shard takes it exclusively first when it is alone, then shares it): under a shared lock another
        shard may be writing them."""
        if self.path in _HELD_LOCKS:
            return
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fd = _flock(self.lock_path, shared=False, wait=False)
                break
            except BlockingIOError as e:
                holder = e.filename
                if shared:
                    fd = self._lock_shared(holder)
                    _HELD_LOCKS[self.path] = fd
                    return
                if time.monotonic() >= deadline:
                    raise StoreError(f"run directory {self.path} is in use by another lthmpi run "
                                     f"({holder or 'holder unknown'}); wait for it to end or use another "
                                     f"--run-dir") from None
                if not said:
                    print(f"lthmpi: waiting (at most {wait_s:.0f} s) for {holder or 'another process'} to release "
                          f"{self.lock_path}", file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)
            except _NoLocks:
                if shared:
                    raise StoreError(f"the filesystem of {self.path} has no flock, and job-array shards need it "
                                     f"to claim their tasks: mount it with flock (Lustre: -o flock) or run one MPI "
                                     f"job instead of shards") from None
                _HELD_LOCKS[self.path] = -1  # a filesystem without locks (some cluster mounts): run unguarded
                return
        if shared:
            try:
                check_flock_excludes(self.path)
            except BaseException:
                release(fd)
                raise
        _HELD_LOCKS[self.path] = fd
        self.remove_stale_temporaries()  # exclusive: no live process of ours can be writing them
        if shared:
            import fcntl

            try:  # then share it with the shards that come (a conversion: dropped, then taken shared)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                _write_holder(fd, shared=True)
            except BlockingIOError:
                self.unlock()
                _HELD_LOCKS[self.path] = self._lock_shared("")

    def _lock_shared(self, holder: str, wait_s: float = 3.0) -> int:
        """The lock shared, another shard holding it now; refused while a run without --shard holds it (after
        `wait_s`: a shard that starts alone holds it exclusively for the moment of its sweep)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return _flock(self.lock_path, shared=True, wait=False)
            except BlockingIOError as e:
                if time.monotonic() >= deadline:
                    raise StoreError(f"run directory {self.path} is in use by another lthmpi run "
                                     f"({e.filename or holder or 'holder unknown'}); wait for it to end or use "
                                     f"another --run-dir") from None
                time.sleep(0.05)

    def claim(self, name: str) -> int | None:
        """Claim RUN_DIR/claims/<name> for this process (a job-array shard about to run task <name>): an
        exclusive flock, not waited for, and this process's host, pid and start written into the file. Returns
        its fd (release() it, or let the process end), or None while another live process holds it. The kernel
        drops the flock of a process that dies, however it dies (Linux NFS clients too, once the server sees
        the client gone), so a dead shard's claim is taken over."""
        os.makedirs(self.claims_dir, exist_ok=True)
        try:
            return _flock(self.claim_path(name), shared=False, wait=False)
        except BlockingIOError:
            return None

    def claim_path(self, name: str) -> str:
        return os.path.join(self.claims_dir, name)

    def claim_is_mine(self, name: str):
        """Before writing a claimed task's result: the claim file must still name this process. Where flock
        excludes only within a host (NFS local_lock, Lustre localflock), a shard on another host may have
        claimed the same task since; then this one refuses to write."""
        holder = read_holder(self.claim_path(name))
        if holder != holder_stamp():
            raise StoreError(f"the claim {self.claim_path(name)} is now held by {holder or 'nobody'}, not by this "
                             f"shard ({holder_stamp()}): flock on {filesystem_of(self.path)} does not exclude "
                             f"across hosts; put --run-dir on a filesystem with cluster-wide flock or run one MPI "
                             f"job instead of shards")

    @contextlib.contextmanager
    def hold(self, name: str):
        """RUN_DIR/claims/<name> held exclusively for the `with` block, waiting for whoever holds it now (the
        shard that trains the parent: the others wait here, then find it on disk)."""
        os.makedirs(self.claims_dir, exist_ok=True)
        fd = _flock(os.path.join(self.claims_dir, name), shared=False, wait=True)
        try:
            yield
        finally:
            release(fd)

    def remove_temporaries_of(self, path: str):
        """The temporaries of one file that a dead process left (call it only while holding that file's
        claim: nobody else is writing it)."""
        prefix = ".tmp-" + os.path.basename(path) + "."
        directory = os.path.dirname(path)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))

    def unlock(self):
        fd = _HELD_LOCKS.pop(self.path, None)
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def remove_stale_temporaries(self):
        """Temporary files a killed run left behind (never complete results), in every directory that holds
        written files; only under the exclusive run lock (see lock())."""
        if self.path not in _HELD_LOCKS:
            return
        for d in (self.path, self.tasks_dir, self.chains_dir, *(os.path.join(self.path, s) for s in SWEPT)):
            for name in (os.listdir(d) if os.path.isdir(d) else ()):
                if name.startswith(".tmp-"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, name))

    def check_config(self, cfg: Config):
        try:
            saved = from_dict(load_toml(self.config_path))
        except ConfigError as e:
            raise StoreError(f"{self.config_path} is not a valid lthmpi config ({e}); use another --run-dir") from None
        if saved.identity() != cfg.identity():
            diff = _first_difference(saved.identity(), cfg.identity())
            raise StoreError(f"run directory {self.path} holds a different experiment ({diff}); "
                             f"use another --run-dir or the same config")

    def check_seen(self, cfg: Config):
        """On a rank other than 0, once rank 0 has created the directory: it must be the same directory,
        since the ranks read the parent and masks that rank 0 writes there."""
        try:
            seen = from_dict(load_toml(self.config_path)).identity() == cfg.identity()
        except ConfigError:
            seen = False
        if not seen:
            raise StoreError(f"this rank does not see the run directory {self.path} that rank 0 created (no "
                             f"config.toml of this experiment there): put --run-dir on a filesystem that every "
                             f"rank sees under the same path, not on node-local storage")

    def load_config(self) -> Config:
        if not os.path.exists(self.config_path):
            raise StoreError(f"{self.path} is not an lthmpi run directory (no config.toml)")
        return from_dict(load_toml(self.config_path))

    def done_tasks(self) -> set[str]:
        if not os.path.isdir(self.tasks_dir):
            return set()
        return {f[:-3] for f in os.listdir(self.tasks_dir) if f.endswith(".h5") and not f.startswith(".")}

    # -- checkpoints and masks --------------------------------------------------------------------
    def write_checkpoints(self, checkpoints: dict, optimizer_states: dict, history: dict, attrs: dict):
        """checkpoints: iteration -> {path: array}; history: name -> 1-D array; attrs: scalars."""
        with atomic_h5(self.parent_path) as f:
            for it, weights in sorted(checkpoints.items()):
                g = f.create_group(f"checkpoints/{it}")
                write_arrays(g.create_group("weights"), weights)
                if it in optimizer_states:
                    write_arrays(g.create_group("optimizer"), optimizer_states[it])
            hist = f.create_group("history")
            for k, v in history.items():
                hist.create_dataset(k, data=np.asarray(v))
            f.attrs.update(attrs)

    def checkpoint_path(self, it: int) -> str:
        return os.path.join(self.checkpoints_dir, f"{it}.h5")

    def write_checkpoint(self, it: int, weights: dict, optimizer_state: dict | None):
        """One parent checkpoint in a file of its own as soon as it is reached (atomic: a killed parent leaves
        it whole or absent), for the tasks that read only it (Task.checkpoint). Idempotent: a complete file is
        kept, and must hold these very arrays (a rerun of a killed parent reaches the same checkpoint)."""
        path = self.checkpoint_path(it)
        if os.path.exists(path):
            old_w, old_o = self.read_checkpoint(it)
            if not (_same(old_w, weights) and _same(old_o, optimizer_state or {})):
                raise StoreError(f"parent checkpoint {path}, left by an earlier run, differs from the one this run "
                                 f"reached (training is not deterministic): delete {self.checkpoints_dir} and the "
                                 f"task files of the dense stability pairs (tasks/stab_dense_*) to retrain them")
            return
        os.makedirs(self.checkpoints_dir, exist_ok=True)
        with atomic_h5(path) as f:
            write_arrays(f.create_group("weights"), weights)
            if optimizer_state is not None:
                write_arrays(f.create_group("optimizer"), optimizer_state)
            f.attrs["iteration"] = it

    def checkpoint_done(self, it: int) -> bool:
        return os.path.exists(self.checkpoint_path(it))

    def read_checkpoint(self, it: int) -> tuple[dict, dict]:
        """(weights, optimizer state) of one checkpoint file, checksums verified."""
        path = self.checkpoint_path(it)
        with open_h5(path, "parent checkpoint", "delete it to rewrite it") as f:
            try:
                w = read_arrays(f["weights"], f"parent checkpoint {path}")
                o = read_arrays(f["optimizer"], f"parent checkpoint {path}") if "optimizer" in f else {}
            except (KeyError, ValueError, OSError) as e:
                raise StoreError(f"parent checkpoint {path} is corrupt ({e}); delete it to rewrite it") from None
        return w, o

    def remove_checkpoints(self):
        """The per-checkpoint files, once parent.h5 holds them all and no rank reads them any more."""
        for name in (os.listdir(self.checkpoints_dir) if os.path.isdir(self.checkpoints_dir) else ()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.checkpoints_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.checkpoints_dir)

    def read_checkpoints(self) -> tuple[dict, dict, dict]:
        what = f"parent checkpoint file {self.parent_path}"
        with open_h5(self.parent_path, "parent checkpoint file") as f:
            try:
                ckpts, opts = {}, {}
                for it, g in f["checkpoints"].items():
                    ckpts[int(it)] = read_arrays(g["weights"], what)
                    if "optimizer" in g:
                        opts[int(it)] = read_arrays(g["optimizer"], what)
                attrs = {k: v for k, v in f.attrs.items() if k != DIGEST}
                attrs["history"] = read_arrays(f["history"], what)
            except (KeyError, ValueError, OSError) as e:
                raise StoreError(f"parent checkpoint file {self.parent_path} is corrupt ({e}); "
                                 f"delete it to recompute it") from None
        return ckpts, opts, attrs

    def write_masks(self, masks: list[dict], remaining: list[float], targets: list[float], scores: dict | None = None,
                    attrs: dict | None = None, groups: dict | None = None):
        """The one-shot masks; `scores` (the criterion's, for the invert control), `attrs` (the criterion, a
        transfer's source) and `groups` of arrays (a transfer's start weights) when given.
        Without them the file holds what it held before issue 34."""
        with atomic_h5(self.masks_path) as f:
            for i, m in enumerate(masks):
                g = f.create_group(f"masks/{i}")
                write_arrays(g, {p: a.astype(bool) for p, a in m.items()}, compression="gzip")
                g.attrs["remaining"] = remaining[i]
                g.attrs["target"] = targets[i]
            if scores is not None:
                write_arrays(f.create_group("scores"), {p: np.asarray(a, np.float64) for p, a in scores.items()})
            for name, arrays in (groups or {}).items():
                write_arrays(f.create_group(name), arrays)
            f.attrs.update(attrs or {})

    def read_mask_extras(self) -> tuple[dict | None, dict]:
        """(the criterion's scores or None, the mask file's attributes)."""
        with open_h5(self.masks_path, "mask file") as f:
            scores = read_arrays(f["scores"], f"mask file {self.masks_path}") if "scores" in f else None
            return scores, {k: attr_value(v) for k, v in f.attrs.items() if k != DIGEST}

    def read_masks(self) -> tuple[list[dict], list[float]]:
        with open_h5(self.masks_path, "mask file") as f:
            try:
                n = len(f["masks"])
                masks = [read_arrays(f[f"masks/{i}"], f"mask file {self.masks_path}") for i in range(n)]
                remaining = [float(f[f"masks/{i}"].attrs["remaining"]) for i in range(n)]
            except (KeyError, ValueError, OSError) as e:
                raise StoreError(f"mask file {self.masks_path} is corrupt ({e}); delete it to recompute it") from None
        return masks, remaining

    def chain_mask_path(self, reset: int, level: int) -> str:
        return os.path.join(self.chains_dir, f"r{reset:02d}_l{level:02d}.h5")

    def write_chain_mask(self, reset: int, level: int, mask: dict, attrs: dict):
        """One IMP level's mask of the chain for reset point index `reset`, with its attrs (fraction left)."""
        os.makedirs(self.chains_dir, exist_ok=True)
        with atomic_h5(self.chain_mask_path(reset, level)) as f:
            write_arrays(f.create_group("mask"), {p: a.astype(bool) for p, a in mask.items()}, compression="gzip")
            f.attrs.update(attrs)

    def read_chain_mask(self, reset: int, level: int) -> tuple[dict, dict]:
        path = self.chain_mask_path(reset, level)
        with open_h5(path, "IMP mask file", "delete it and the task files of its chain from that level on") as f:
            try:
                mask = read_arrays(f["mask"], f"IMP mask file {path}")
                attrs = {k: attr_value(v) for k, v in f.attrs.items() if k != DIGEST}
            except (KeyError, ValueError, OSError) as e:
                raise StoreError(f"IMP mask file {path} is corrupt ({e}); delete it and the task files of its "
                                 f"chain from that level on") from None
        return mask, attrs

    # -- task results -----------------------------------------------------------------------------
    def write_task(self, task_id: str, attrs: dict, series: dict):
        """attrs: scalar measurements; series: name -> {column: 1-D array} (per-eval, per-epoch curves)."""
        if self.before_write is not None:
            self.before_write(task_id)
        with atomic_h5(self.task_path(task_id)) as f:
            f.attrs.update({k: ("" if v is None else v) for k, v in attrs.items()})
            for name, cols in series.items():
                g = f.create_group(name)
                for col, values in cols.items():
                    g.create_dataset(col, data=np.asarray(values))

    def read_task(self, task_id: str) -> tuple[dict, dict]:
        """A finished task's measurements, checksum verified (a damaged file is a StoreError naming it)."""
        path = self.task_path(task_id)
        with open_h5(path, "task result", "delete it to recompute that task") as f:
            try:
                attrs = {k: attr_value(v) for k, v in f.attrs.items() if k != DIGEST}
                series = {name: {c: g[c][()] for c in g} for name, g in f.items()}
            except (KeyError, ValueError, OSError, TypeError) as e:
                raise StoreError(f"task result {path} is corrupt ({e}); delete it to recompute that task") from None
        return attrs, series


def _same(a: dict, b: dict) -> bool:
    """The same arrays, bit for bit (dtype and shape included)."""
    return a.keys() == b.keys() and all(np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
                                        and np.asarray(a[k]).shape == np.asarray(b[k]).shape
                                        and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def task_conv_step(attrs: dict) -> str:
    """The conv step's form a finished task trained in ("" for a net with one form): a task file from before
    the form was recorded that trained on the CPU took "graph", the only form there was."""
    return str(attrs.get("conv_step", "graph" if str(attrs.get("device", "cpu")) == "cpu" else ""))


def mixed_kernels(done: dict, threads: int, kernels_for, conv_step: str = "") -> list[str]:
    """Finished tasks that were trained otherwise than this run would train them (another TF thread count,
    other kernels, or a conv net's step in another form: parallel.threads, parallel.sparse_below and
    parallel.conv_step are outside the identity), so that a rerun does not mix them into one grid unsaid.
    `done`: task id -> its attrs (threads, kernels, remaining, conv_step); `kernels_for(remaining)`: the kernels
    this run picks alone; `conv_step`: the form this run's conv step takes ("" for a net with one form; a task
    file from before the form was recorded, trained on the CPU, took "graph"). A task trained data-parallel
    (replicas > 1) was on the dense kernels whatever the mask, and a task that trained nothing (iterations = 0:
    a stability pair's evaluation) used none and no step: only their threads are compared. One line per kind
    of difference."""
    groups: dict[str, list[str]] = {}
    for tid, a in sorted(done.items()):
        if not int(a.get("threads", threads)):  # threads 0: a task of a kind that trains nothing (an evaluation)
            continue
        t0, k0 = int(a.get("threads", threads)), str(a.get("kernels") or "dense")
        trained = int(a.get("iterations", 1)) != 0
        trained_alone = int(a.get("replicas", 1)) <= 1 and trained
        k1 = kernels_for(float(a.get("remaining", 1.0))) if trained_alone else k0
        c0 = task_conv_step(a)
        mixed_step = trained and bool(c0) and bool(conv_step) and c0 != conv_step
        how = ", ".join(([f"{t0} TF threads (this run: {threads})"] if t0 != threads else []) +
                        ([f"{k0} kernels (this run: {k1})"] if k0 != k1 else []) +
                        ([f"the {c0} conv step (this run: {conv_step})"] if mixed_step else []))
        if how:
            groups.setdefault(how, []).append(tid)
    return [f"{len(tids)} finished task(s) trained with {how}: " + ", ".join(tids[:3]) +
            (f" and {len(tids) - 3} more" if len(tids) > 3 else "") for how, tids in groups.items()]


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                return _first_difference(a[k], b[k], f"{prefix}{k}.")
            return f"{prefix}{k} is {a.get(k)!r} there, {b.get(k)!r} here"
    return "no difference"

