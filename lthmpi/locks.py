"""File locks and claims: flock on files opened without following links, the holder written into the file,
and the check that flock excludes at all on this filesystem (RunDir in store.py uses them)."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import time

from .fileio import StoreError


class _NoLocks(OSError):
    """The filesystem does not support flock."""


def _flock(path: str, shared: bool, wait: bool) -> int:
    """An open fd of `path` (created if need be) holding a flock, and "host:pid since ..." written into the file
    for whoever is refused. Raises BlockingIOError(holder text) when not waiting and another process holds it,
    _NoLocks where the filesystem has no flock, StoreError when the file cannot be opened or locked."""
    import fcntl

    fd = open_nofollow(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BaseException as e:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        code = getattr(e, "errno", None)
        if code in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(code, os.strerror(code), holder) from None
        if code in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise _NoLocks(code, os.strerror(code)) from None
        if isinstance(e, OSError):
            raise StoreError(f"cannot lock {path}: {e.strerror}") from None
        raise  # an interrupt while waiting
    _write_holder(fd, shared)
    return fd


def _write_holder(fd: int, shared: bool):
    """Who holds it, for the message a refused process prints."""
    with contextlib.suppress(OSError):
        prefix = "job-array shards, the last started " if shared else ""
        text = f"{prefix}{holder_stamp()}\n".encode()
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))  # after the write: the file is never empty while held


def open_nofollow(path: str) -> int:
    """Open (create) a lock or claim file without following a symlink planted at its path (O_NOFOLLOW) and
    without leaking it into children (O_CLOEXEC); not truncated (the holder is written once the lock is held)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symbolic link; lthmpi does not follow links for its lock and claim "
                             f"files: remove it") from None
        raise StoreError(f"cannot open {path}: {e.strerror}; choose another --run-dir") from None


_STAMP: list[str] = []


def holder_stamp() -> str:
    """"host:pid since <start>" of this process: whose a lock or a claim is (the start time tells a pid reused
    on the same host apart)."""
    if not _STAMP or not _STAMP[0].startswith(f"{hostname()}:{os.getpid()} "):
        _STAMP[:] = [f"{hostname()}:{os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    return _STAMP[0]


def read_holder(path: str) -> str:
    """What the holder of a lock or claim file wrote into it ('' when nothing, or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)


def filesystem_of(path: str) -> str:
    """"<type> at <mount point>" of the filesystem holding `path` (from /proc/mounts), for error lines."""
    best = ("", "unknown filesystem")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                        best = (mnt, f"{parts[2]} at {mnt}")
    except OSError:
        pass
    return best[1]


def check_flock_excludes(directory: str):
    """Two open file descriptions of one file must not both hold an exclusive flock: where they can (flock
    emulated as a no-op, some FUSE or network mounts), shards would train the same task twice. Refuse then.
    (A flock that excludes on one host but not across hosts, NFS local_lock or Lustre localflock, passes this
    test; the holder written into each claim is checked before a result is written, see RunDir.claim_is_mine.)"""
    import fcntl

    path = os.path.join(directory, ".flock-probe")
    a, b = open_nofollow(path), open_nofollow(path)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        raise StoreError(f"flock does not exclude on {filesystem_of(directory)} (two opens of {path} both got "
                         f"an exclusive lock), so job-array shards would train the same task twice: put --run-dir "
                         f"on a filesystem with working flock (Lustre: -o flock; NFS: not local_lock) or run one "
                         f"MPI job instead of shards")
    finally:
        os.close(a)
        os.close(b)


def release(fd: int | None):
    """Drop a claim (closing the fd drops its flock)."""
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def hostname() -> str:
    return socket.gethostname()
