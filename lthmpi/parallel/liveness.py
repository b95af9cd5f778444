"""Is every peer rank still alive? Heartbeat files in the run directory, for waits the launcher may not end.

mpirun (hydra) and `srun --kill-on-bad-exit=1` end the whole job when a rank dies; other launchers leave the
survivors waiting for it (at a barrier, for a task file it was to write, for a request it will never send).
So each rank beats: a thread rewrites RUN_DIR/logs/alive/rank<r> ("host pid count") every few seconds. A
waiting rank looks at its peers' files (PeerWatch.check, called from every waiting loop: MpiComm.barrier
and recv, the coordinator's wait for inputs, the dispatcher's wait for requests) and, when one has not
changed for `parallel.peer_timeout` seconds by the waiter's own clock (no clocks compared across hosts),
raises PeerLost naming that rank: the coordinator then ends the job with that line. A data-parallel step's
Allreduce stays the plain blocking call (polling MPICH's non-blocking one costs the same on idle cores but up
to twice as much on busy ones: run/bench_allreduce.py), so a rank held in it by a frozen replica is watched
from a thread of its own (StallGuard), which ends the job. A thread beats while
its process lives, through long training blocks, GPU steps and compiles (TensorFlow and MPI release the
GIL); it stops only when the process is gone (or frozen whole). Files on the shared run directory, not MPI
messages: a dead peer cannot answer those. The default timeout (config.py: 600 s) is far above a beat's
period, for shared file systems that stall writes for minutes. A beat rewrites its file in place (same
length, no truncation), so a full disk leaves the last beat readable instead of an empty file. Only time
the waiter spent watching counts: after a gap in its own checks (it trained, or the whole job was
suspended and resumed) every peer gets a fresh window.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

log = logging.getLogger("lthmpi")


class PeerLost(RuntimeError):
    """A peer rank stopped beating: it died (or its host did). Said as one line, exit status 1."""

    plain_line = True  # errors.describe_error: no traceback, exit 1


def alive_dir(run_path: str) -> str:
    return os.path.join(run_path, "logs", "alive")


class Heartbeat:
    """This rank's beat: a daemon thread rewriting its file every `every_s` seconds until stop()."""

    def __init__(self, run_path: str, rank: int, host: str, every_s: float):
        os.makedirs(alive_dir(run_path), exist_ok=True)
        self.path = os.path.join(alive_dir(run_path), f"rank{rank}")
        self.text, self.every_s, self.count = f"{host} {os.getpid()}", every_s, 0
        self._stop = threading.Event()
        with contextlib.suppress(OSError):  # a longer line of an earlier run would outlast the in-place beats
            os.unlink(self.path)
        self.beat()
        self._thread = threading.Thread(target=self._run, name="lthmpi-heartbeat", daemon=True)
        self._thread.start()

    def beat(self):
        """Overwrite the file in place at a fixed length: no block to allocate once it exists (a full disk keeps
        the last beat, where truncate-and-write left it empty), and closed each time (NFS shows other hosts a
        file's data on close)."""
        self.count += 1
        with contextlib.suppress(OSError):  # a full disk must not end the run here: the writes will say it
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.pwrite(fd, f"{self.text} {self.count:012d}\n".encode(), 0)
            finally:
                os.close(fd)

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.beat()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


GAP_S = 30.0  # checks further apart than this: the waiter was not watching (it trained, or the job was suspended)


class PeerWatch:
    """The waiting side: check() raises PeerLost for a peer whose file has not changed in `timeout_s` seconds
    of this rank's watching."""

    def __init__(self, run_path: str, peers, timeout_s: float, clock=time.monotonic):
        self.dir, self.timeout_s, self.clock = alive_dir(run_path), timeout_s, clock
        now = clock()
        self.seen = {r: (None, now) for r in peers}  # rank -> (content last read, when it last changed)
        self.next_look = self.last_look = now
        self._busy = threading.Lock()  # the rank's waits and its StallGuard's thread both check

    def check(self):
        """Cheap when called often: reads the files at most once a second."""
        if not self._busy.acquire(blocking=False):  # the other thread is looking right now
            return
        try:
            self._check()
        finally:
            self._busy.release()

    def _check(self):
        now = self.clock()
        if self.timeout_s <= 0 or now < self.next_look:
            return
        if now - self.last_look > GAP_S:  # a peer frozen with us (a suspended job) is not dead: a fresh window
            self.seen = {r: (old, now) for r, (old, _) in self.seen.items()}
        self.next_look, self.last_look = now + 1.0, now
        for rank, (old, since) in self.seen.items():
            try:
                with open(os.path.join(self.dir, f"rank{rank}")) as f:
                    text = f.read().strip()
            except OSError:
                text = None
            if text != old and text:
                self.seen[rank] = (text, now)
            elif now - since > self.timeout_s:
                who = f"host {text.split()[0]}, pid {text.split()[1]}" if text and len(text.split()) > 2 else "never beat"
                raise PeerLost(f"rank {rank} ({who}) has given no sign of life for {now - since:.0f} s "
                               f"(parallel.peer_timeout = {self.timeout_s:g}; its heartbeat "
                               f"{os.path.join(self.dir, f'rank{rank}')} stopped): it died or its host did; "
                               f"ending the job; rerun the same command to resume")


class StallGuard:
    """Watches the peers from a thread while this rank is inside a blocking collective (`with guard:` around it;
    MPI releases the GIL there): after `after_s` inside, `check` once a second; when it raises PeerLost,
    `lost(error)` ends the job (the rank itself cannot: it is held in MPI). Outside, the thread only sleeps."""

    def __init__(self, check, lost, after_s: float = 1.0, clock=time.monotonic):
        self.check, self.lost, self.after_s, self.clock = check, lost, after_s, clock
        self.since = None  # when this rank entered the collective it is in, or None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lthmpi-stall-guard", daemon=True)
        self._thread.start()

    def __enter__(self):
        self.since = self.clock()
        return self

    def __exit__(self, *exc):
        self.since = None

    def _run(self):
        while not self._stop.wait(0.5):
            since = self.since
            if since is None or self.clock() - since < self.after_s:
                continue
            try:
                self.check()
            except PeerLost as e:
                log.warning("held %.0f s in a collective of a data-parallel step by a peer that gives no sign of life",
                            self.clock() - since)
                self.lost(e)
                return

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


class Liveness:
    """This rank's heartbeat and its stall guard: what `start` began, for `stop`."""

    def __init__(self, beat: Heartbeat, guard: StallGuard):
        self.beat, self.guard = beat, guard

    def stop(self):
        self.guard.stop()
        self.beat.stop()


def start(run_path: str, comm, timeout_s: float, lost):
    """Beat for this rank and watch the others: comm.watch for its waits, comm.guard around its blocking
    collectives (`lost(PeerLost)` ends the job from the guard's thread). Returns the Liveness to stop, or None
    with one rank or peer_timeout 0."""
    if comm.size == 1 or timeout_s <= 0:
        return None
    beat = Heartbeat(run_path, comm.rank, comm.host, every_s=min(5.0, timeout_s / 4))
    comm.watch = PeerWatch(run_path, [r for r in range(comm.size) if r != comm.rank], timeout_s).check
    comm.guard = StallGuard(comm.watch, lost)
    return Liveness(beat, comm.guard)
