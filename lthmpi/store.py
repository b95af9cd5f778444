"""The run directory: resolved config, parent checkpoints, masks, one file per finished task, merged results.

Every file is written whole or not at all: it is built under a temporary name in the same directory,
flushed and fsynced, then renamed, so a killed process leaves either the old state or the new one.
Arrays carry a sha256 of their bytes, because HDF5 itself does not notice a flipped bit in raw data.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile

import h5py
import numpy as np

from .config import Config, ConfigError, from_dict, load_toml


class StoreError(RuntimeError):
    """A run-directory problem, phrased as one line with what to do about it."""


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it vanishes."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_h5(path: str):
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            yield f


def write_arrays(group: h5py.Group, arrays: dict, compression: str | None = None):
    """Datasets keyed by variable path ("fc1/kernel" becomes nested groups), each with its checksum."""
    for key, a in arrays.items():
        a = np.asarray(a)
        ds = group.create_dataset(key, data=a, compression=compression if a.size > 1024 else None)
        ds.attrs["sha256"] = sha256(a)


def read_arrays(group: h5py.Group, where: str) -> dict:
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            a = obj[()]
            expected = obj.attrs.get("sha256")
            if expected is not None and sha256(a) != expected:
                raise StoreError(f"{where}: array {name} is corrupt (checksum mismatch); delete the file to recompute it")
            out[name] = a

    group.visititems(visit)
    return out


def open_h5(path: str, what: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"{what} {path} is unreadable ({str(e).splitlines()[0]}); delete it to recompute it") from None


class RunDir:
    """Paths and life cycle of one experiment's directory."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config_path = os.path.join(self.path, "config.toml")
        self.parent_path = os.path.join(self.path, "parent.h5")
        self.masks_path = os.path.join(self.path, "masks.h5")
        self.tasks_dir = os.path.join(self.path, "tasks")
        self.logs_dir = os.path.join(self.path, "logs")
        self.results_path = os.path.join(self.path, "results.h5")

    def task_path(self, task_id: str) -> str:
        return os.path.join(self.tasks_dir, f"{task_id}.h5")

    def create(self, cfg: Config):
        """Make the directory and save the config; refuse a directory that holds another experiment."""
        try:
            os.makedirs(self.tasks_dir, exist_ok=True)
            os.makedirs(self.logs_dir, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create run directory {self.path}: {e.strerror}; choose another --run-dir") from None
        if not os.access(self.path, os.W_OK):
            raise StoreError(f"run directory {self.path} is not writable; choose another --run-dir")
        if os.path.exists(self.config_path):
            self.check_config(cfg)
            self.remove_stale_temporaries()
            return
        try:
            with atomic_path(self.config_path) as tmp, open(tmp, "w") as f:
                f.write(cfg.to_toml())
        except OSError as e:
            raise StoreError(f"cannot write {self.config_path}: {e.strerror}") from None

    def remove_stale_temporaries(self):
        """Temporary files a killed run left behind (never complete results; safe under the run lock)."""
        for d in (self.path, self.tasks_dir):
            for name in os.listdir(d):
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

    def read_checkpoints(self) -> tuple[dict, dict, dict]:
        with open_h5(self.parent_path, "parent checkpoint file") as f:
            ckpts, opts = {}, {}
            for it, g in f["checkpoints"].items():
                ckpts[int(it)] = read_arrays(g["weights"], self.parent_path)
                if "optimizer" in g:
                    opts[int(it)] = read_arrays(g["optimizer"], self.parent_path)
            attrs = dict(f.attrs)
            attrs["history"] = read_arrays(f["history"], self.parent_path)
        return ckpts, opts, attrs

    def write_masks(self, masks: list[dict], remaining: list[float], targets: list[float]):
        with atomic_h5(self.masks_path) as f:
            for i, m in enumerate(masks):
                g = f.create_group(f"masks/{i}")
                write_arrays(g, {p: a.astype(bool) for p, a in m.items()}, compression="gzip")
                g.attrs["remaining"] = remaining[i]
                g.attrs["target"] = targets[i]

    def read_masks(self) -> tuple[list[dict], list[float]]:
        with open_h5(self.masks_path, "mask file") as f:
            n = len(f["masks"])
            masks = [read_arrays(f[f"masks/{i}"], self.masks_path) for i in range(n)]
            remaining = [float(f[f"masks/{i}"].attrs["remaining"]) for i in range(n)]
        return masks, remaining

    # -- task results -----------------------------------------------------------------------------
    def write_task(self, task_id: str, attrs: dict, series: dict):
        """attrs: scalar measurements; series: name -> {column: 1-D array} (per-eval, per-epoch curves)."""
        with atomic_h5(self.task_path(task_id)) as f:
            f.attrs.update({k: ("" if v is None else v) for k, v in attrs.items()})
            for name, cols in series.items():
                g = f.create_group(name)
                for col, values in cols.items():
                    g.create_dataset(col, data=np.asarray(values))

    def read_task(self, task_id: str) -> tuple[dict, dict]:
        path = self.task_path(task_id)
        with open_h5(path, "task result") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            series = {name: {c: g[c][()] for c in g} for name, g in f.items()}
        return attrs, series


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                return _first_difference(a[k], b[k], f"{prefix}{k}.")
            return f"{prefix}{k} is {a.get(k)!r} there, {b.get(k)!r} here"
    return "no difference"


def hostname() -> str:
    return socket.gethostname()
