"""Prepare an image tree of any size into the uint8 prepared HDF5 file, on one rank or many.

ImageNet does not fit in memory (~190 GB at 224x224 as uint8), so nothing here holds more than a few
images at once. Rank 0 lists the tree and creates the temporary file with every array allocated,
contiguous and uncompressed (so that training can memory-map it); every rank then decodes its contiguous
share of the images and writes each row with pwrite at its offset in the file. No parallel HDF5 is needed,
and the bytes written do not depend on how many ranks wrote them. Normalisation statistics are exact
integer sums of the training images' values and squares, added up over the ranks, so they do not depend on
the number of ranks either. Rank 0 then computes the checksums in one streaming pass and renames the file
into place: whole or not at all.

Any rank's failure (a damaged image, a full disk) is gathered, the lowest-numbered image's message is
raised on every rank as one DataError, and the temporary file is removed. The communicator is anything
with rank, size, bcast, allgather and barrier (lthmpi.parallel.mpi.world() under mpirun, parallel.comm.SelfComm alone).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from ..fileio import commit, remove_quietly, sha256_rows, temp_path
from .imagefolder import decode, list_images
from .prepare import ARRAYS, UINT8_FORMAT, held_out_bounds
from .readers import DataError

WRITE_ROWS = 64  # images gathered before one pwrite


@dataclass
class Part:
    """One image array of the file: its images (path, label), and where its rows start in the file."""
    name: str  # x_train, x_val or x_test
    items: list
    offset: int  # byte offset of row 0 (-1 when the array is empty)


@dataclass
class Plan:
    tmp: str
    parts: list
    size: int  # images are size x size x 3
    classes: list

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * 3


def _split(train: list, validation: int, subset: int, root: str) -> tuple[list, list]:
    end, keep = held_out_bounds(len(train), validation, subset, f"training images in {root}/train", "--validation ")
    return train[:end], train[keep:]


def _create(settings: dict, root: str, out: str) -> Plan:
    """Rank 0: list the tree and create the temporary file, labels written, image arrays allocated."""
    import h5py

    images = list_images(root)
    train, val = _split(images.train, settings["validation"], settings["subset"], root)
    size = settings["image_size"]
    tmp = temp_path(out)
    try:
        parts = []
        with h5py.File(tmp, "w") as f:
            for key, value in settings.items():
                f.attrs[key] = value
            f.attrs["num_classes"] = len(images.classes)
            f.attrs["classes"] = images.classes
            f.attrs["format_version"] = UINT8_FORMAT
            f.attrs["source"] = os.path.abspath(root)
            for part, items in (("train", train), ("val", val), ("test", images.test)):
                f.create_dataset("y_" + part, data=np.array([lab for _, lab in items], np.int32))
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)  # contiguous, allocated now, never filled
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                x = f.create_dataset("x_" + part, (len(items), size, size, 3), np.uint8, dcpl=dcpl)
                offset = x.id.get_offset()
                parts.append(Part("x_" + part, items, -1 if offset is None else int(offset)))
        return Plan(tmp, parts, size, images.classes)
    except BaseException:
        remove_quietly(tmp)
        raise


def _decode_share(plan: Plan, rank: int, size: int, progress: bool, after_write):
    """Decode this rank's contiguous share of all images into the file. Returns (first error as (index,
    line) or None, integer sums over training rows: per channel [sum, sum of squares])."""
    total = sum(len(p.items) for p in plan.parts)
    lo, hi = total * rank // size, total * (rank + 1) // size
    sums = np.zeros((2, 3), np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=hi - lo, unit="img", desc="prepare", file=sys.stderr, disable=not sys.stderr.isatty())
    fd = os.open(plan.tmp, os.O_WRONLY)
    try:
        base = 0
        for part in plan.parts:
            a, b = max(lo, base) - base, min(hi, base + len(part.items)) - base
            for start in range(a, b, WRITE_ROWS):
                stop = min(start + WRITE_ROWS, b)
                rows = np.empty((stop - start, plan.size, plan.size, 3), np.uint8)
                for i in range(start, stop):
                    try:
                        rows[i - start] = decode(part.items[i][0], plan.size)
                    except DataError as e:
                        return (base + i, str(e)), sums
                try:
                    os.pwrite(fd, rows.data, part.offset + start * plan.row_bytes)
                except OSError as e:
                    return (base + start, f"cannot write {plan.tmp}: {e.strerror}; free some space or "
                                          f"write --out elsewhere"), sums
                after_write()
                if part.name == "x_train":
                    flat = rows.reshape(-1, 3).astype(np.int64)
                    sums += np.stack([flat.sum(axis=0), (flat * flat).sum(axis=0)])
                if bar is not None:
                    bar.update(stop - start)
            base += len(part.items)
        os.fsync(fd)
        return None, sums
    finally:
        os.close(fd)
        if bar is not None:
            bar.close()


def statistics(sums: np.ndarray, count: int, normalize: str) -> dict:
    """Per-channel mean and std of the training images from exact integer sums, and the (shift, div) that
    the training step applies: x_float = (x_uint8 - shift) / div."""
    n = max(1, count)
    mean = sums[0].astype(np.float64) / n
    std = np.sqrt(np.maximum(sums[1].astype(np.float64) / n - mean * mean, 0.0))
    std[std == 0] = 1.0  # a constant channel carries no information; leave it centred
    if normalize == "standardize":
        shift, div = mean, std
    else:
        shift, div = np.zeros(3), np.full(3, 255.0)
    return dict(mean=mean, std=std, norm_shift=shift.astype(np.float32), norm_div=div.astype(np.float32))


def _finish(plan: Plan, stats: dict, out: str) -> None:
    """Rank 0: statistics and checksums into the file (read back in a streaming pass), then rename."""
    import h5py

    with h5py.File(plan.tmp, "r+") as f:
        for key, value in stats.items():
            f.attrs[key] = value
        for name in ARRAYS:
            f.attrs["sha256_" + name] = sha256_rows(f[name])
    commit(plan.tmp, out)


def prepare_images(settings: dict, root: str, out: str, comm=None, after_write=lambda: None) -> dict:
    """Prepare the image tree at `root` into `out`; every rank of `comm` calls this. Returns a summary.
    `after_write` is called after each pwrite (the fault tests' hook). `comm` None: this process alone."""
    if comm is None:
        from ..parallel.comm import SelfComm

        comm = SelfComm()
    plan, error = None, None
    if comm.rank == 0:
        try:
            plan = _create(settings, root, out)
        except DataError as e:
            error = str(e)
    error, plan = comm.bcast((error, plan))
    if error:
        raise DataError(error)
    try:
        failed, sums = _decode_share(plan, comm.rank, comm.size, progress=comm.rank == 0,
                                      after_write=after_write)
        comm.barrier()  # interruptible under MPI: a SIGTERM here still unwinds and removes the file
        gathered = comm.allgather((failed, sums))
        failures = sorted(f for f, _ in gathered if f is not None)
        if failures:
            raise DataError(failures[0][1])
        n_train = len(plan.parts[0].items)
        stats = statistics(sum(s for _, s in gathered), n_train * plan.size * plan.size, settings["normalize"])
        error = None
        if comm.rank == 0:
            try:
                _finish(plan, stats, out)
            except OSError as e:
                error = f"cannot finish {out}: {e}"
        error = comm.bcast(error)
        if error:
            raise DataError(error)
    except BaseException:
        if comm.rank == 0:
            remove_quietly(plan.tmp)
        raise
    return dict(train=len(plan.parts[0].items), val=len(plan.parts[1].items), test=len(plan.parts[2].items),
                size=plan.size, classes=len(plan.classes), ranks=comm.size)
