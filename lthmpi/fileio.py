"""File io written once: atomic writes, checksums, HDF5 arrays and attributes.

Every file is written whole or not at all: built under a temporary name in the same directory, flushed and
fsynced, then renamed (and the rename made durable), so a killed process leaves either the old state or the
new one. Arrays carry a sha256 of their bytes, because HDF5 itself does not notice a flipped bit in raw data,
and every HDF5 file written by `atomic_h5` carries a sha256 of its whole content (attributes, and the bytes of
every array that has no checksum of its own) in the root attribute `content_sha256`, checked on opening.
Used by the run directory (store.py), the results (results.py) and the prepared data (data/prepare.py).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
import uuid

import h5py
import numpy as np


class StoreError(RuntimeError):
    """A run-directory problem, phrased as one line with what to do about it."""


DIGEST = "content_sha256"  # root attribute: sha256 of the file's content (see content_digest)
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO)
_DISK_TEXT = {"no space left on device": errno.ENOSPC, "read-only file system": errno.EROFS,
              "disk quota exceeded": errno.EDQUOT, "permission denied": errno.EACCES}


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def disk_errno(e: BaseException) -> int | None:
    """The errno of a full, read-only or forbidden disk behind `e`, else None. h5py raises OSError whose
    errno may be unset, or RuntimeError, with the C library's text ("errno = 28, error message = 'No space
    left on device'")."""
    if not isinstance(e, (OSError, RuntimeError)):  # h5py raises RuntimeError when a flush or close fails
        return None
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return e.errno
    text = str(e).lower()
    m = re.search(r"errno = (\d+)", text)
    if m and int(m.group(1)) in DISK_ERRNOS:
        return int(m.group(1))
    return next((code for words, code in _DISK_TEXT.items() if words in text), None)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it vanishes.

    A full, read-only or forbidden disk is reported as OSError(errno, strerror, path), naming `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for the whole group to read
        commit(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        code = disk_errno(e)
        if code is not None:
            raise OSError(code, os.strerror(code), path) from None
        raise


@contextlib.contextmanager
def atomic_h5(path: str):
    """A new HDF5 file at `path`, written atomically, with its content checksum added on success.

    HDF5 builds the file in memory (the core driver, no backing store) and Python writes its bytes: HDF5 never
    meets the disk, because a write that fails inside it (ENOSPC in the flush at close) leaves its objects
    half-closed, and their later release crashes the process (SIGSEGV) instead of raising. These files (the
    parent, the masks, task results, results.h5) are held in memory as arrays anyway."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", driver="core", backing_store=False) as f:
            yield f
            f.attrs[DIGEST] = content_digest(f)
            f.flush()
            image = f.id.get_file_image()
        with open(tmp, "wb") as out:
            out.write(image)


def _canon(v) -> str:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        v = v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    return repr(v)


def content_digest(f: h5py.Group) -> str:
    """sha256 over every attribute and every dataset (its bytes, unless it carries its own sha256 attribute,
    which is then covered instead and checked when the array is read): HDF5 does not notice a flipped bit
    in raw data or attributes, this does."""
    d = hashlib.sha256()

    def attrs(obj):
        for k in sorted(obj.attrs):
            if obj.name == "/" and k == DIGEST:
                continue
            d.update(f"{obj.name}@{k}={_canon(obj.attrs[k])}\n".encode())

    def walk(g):
        attrs(g)
        for k in sorted(g):
            obj = g[k]
            if isinstance(obj, h5py.Group):
                walk(obj)
                continue
            attrs(obj)
            d.update(f"{obj.name}:{obj.dtype.str}:{obj.shape}\n".encode())
            if "sha256" not in obj.attrs:
                a = obj[()]
                if isinstance(a, np.ndarray) and a.dtype.kind != "O":
                    d.update(np.ascontiguousarray(a).tobytes())
                else:
                    d.update(_canon(a).encode())

    walk(f)
    return d.hexdigest()


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
                raise StoreError(f"{where} is corrupt (array {name}: checksum mismatch); delete it to recompute it")
            out[name] = a

    group.visititems(visit)
    return out


def open_h5(path: str, what: str, fix: str = "delete it to recompute it") -> h5py.File:
    """Open for reading, verifying the content checksum if the file has one; damage is one StoreError line."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"{what} {path} is unreadable ({str(e).splitlines()[0]}); {fix}") from None
    try:
        expected = f.attrs.get(DIGEST)
        if expected is not None and _canon(expected) != repr(content_digest(f)):
            raise StoreError(f"{what} {path} is corrupt (content checksum mismatch); {fix}")
    except StoreError:
        f.close()
        raise
    except Exception as e:  # noqa: BLE001 - damaged metadata fails in many ways inside h5py
        f.close()
        raise StoreError(f"{what} {path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"{fix}") from None
    return f


def sha256_rows(x, chunk_bytes: int = 64 << 20) -> str:
    """The same digest as `sha256` of an array on disk (h5py dataset, DiskArray), read in pieces."""
    h = hashlib.sha256()
    row = int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize
    step = max(1, chunk_bytes // max(1, row))
    for start in range(0, x.shape[0], step):
        h.update(np.ascontiguousarray(x[start:start + step]).data)
    return h.hexdigest()


def temp_path(path: str) -> str:
    """An empty temporary file next to `path` (same file system, so the rename is atomic), with a unique
    name and the usual permissions (mkstemp's 0600 would hide it from others)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def commit(tmp: str, path: str) -> None:
    """fsync `tmp`, rename it to `path`, and make the rename durable."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def attr_value(v, arrays: bool = False):
    """An HDF5 attribute as a plain Python value: text for bytes, Python scalars for numpy's; arrays as lists
    when `arrays`."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if arrays and isinstance(v, np.ndarray):
        return v.tolist()
    return v
