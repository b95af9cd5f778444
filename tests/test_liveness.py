"""A dead peer rank ends the waits of the others (lthmpi/parallel/liveness.py), with fake MPI requests and a fake
clock, and once under the real mpirun with a frozen rank: where the launcher does not end the job, a barrier, a
receive or a wait for inputs would sleep forever."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import pytest
from faultkit import error_lines, finish, start, wait_for


class Clock:
    """Advances `step` seconds per reading."""

    def __init__(self, step=0.6):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_a_beating_peer_is_alive_and_a_silent_one_is_named(tmp_path):
    from lthmpi.parallel.liveness import Heartbeat, PeerLost, PeerWatch

    beat = Heartbeat(str(tmp_path), rank=1, host="nodeB", every_s=3600)  # beaten by hand below
    beat.stop()
    watch = PeerWatch(str(tmp_path), [1], timeout_s=5, clock=Clock())
    for _ in range(20):  # 12 s of the fake clock, beating: alive
        beat.beat()
        watch.check()
    with pytest.raises(PeerLost, match=r"rank 1 \(host nodeB, pid \d+\) has given no sign of life for \d+ s "
                                       r"\(parallel.peer_timeout = 5; .* ending the job"):
        for _ in range(20):  # no more beats
            watch.check()


def test_a_barrier_waiting_for_a_dead_rank_ends(tmp_path):
    """MpiComm.barrier over a request that never completes (rank 1 died, the launcher did not end the job):
    raises PeerLost naming rank 1 instead of polling forever."""
    from lthmpi.parallel.liveness import PeerLost, PeerWatch
    from lthmpi.parallel.mpi import MpiComm

    class Never:
        def Test(self):
            return False

        def test(self):
            return False, None

    class World:
        def Ibarrier(self):
            return Never()

        def irecv(self, source, tag):
            return Never()

    comm = MpiComm.__new__(MpiComm)
    comm.comm, comm.rank, comm.size = World(), 0, 2
    comm.watch = PeerWatch(str(tmp_path), [1], timeout_s=2, clock=Clock(0.5)).check
    for wait in (comm.barrier, lambda: comm.recv(1, 11)):
        got = []
        t = threading.Thread(target=lambda w=wait: got.append(_raised(w)), daemon=True)
        t.start()
        t.join(timeout=10)
        assert got and isinstance(got[0], PeerLost) and "rank 1 (never beat)" in str(got[0]), got
        comm.watch = PeerWatch(str(tmp_path), [1], timeout_s=2, clock=Clock(0.5)).check


def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def test_a_rank_held_in_a_collective_is_watched_from_a_thread():
    """StallGuard: outside a collective it never looks; inside one (here a data-parallel Allreduce that never
    returns, as with a frozen replica) its thread checks the peers and hands PeerLost to `lost`, which ends the
    job, since the rank itself is held in MPI."""
    from lthmpi.parallel.liveness import PeerLost, StallGuard
    from lthmpi.parallel.mpi import MpiReducer

    looked, lost, released = [], [], threading.Event()

    def check():
        looked.append(time.monotonic())
        if len(looked) >= 2:
            raise PeerLost("rank 1 (host nodeB, pid 7) has given no sign of life for 5 s")

    guard = StallGuard(check, lambda e: (lost.append(e), released.set()), after_s=0.2)

    class HeldComm:  # Allreduce of a subgroup whose other replica is frozen: returns only when the job ends
        def Get_size(self):
            return 2

        def Get_rank(self):
            return 0

        def Allreduce(self, buf, out, op):
            assert guard.since is not None, "the Allreduce runs inside the guard"
            released.wait(timeout=20)
            out[...] = 2 * buf

    try:
        time.sleep(1.2)
        assert looked == [], "no check outside a collective"
        t0 = time.monotonic()
        MpiReducer(HeldComm(), guard).allreduce_sum(np.ones(3, np.float32))
        assert len(lost) == 1 and "rank 1 (host nodeB" in str(lost[0]) and time.monotonic() - t0 < 10, (lost, looked)
        assert guard.since is None
    finally:
        guard.stop()


def test_peer_lost_is_one_line_exit_1():
    from lthmpi.errors import describe_error
    from lthmpi.parallel.liveness import PeerLost

    assert describe_error(PeerLost("rank 1 (...) has given no sign of life"))[1:] == (1, False)


def test_a_job_suspended_whole_is_not_a_dead_peer(tmp_path):
    """The waiter's own clock jumps (the job was suspended and resumed, or the waiter trained for long): the
    silent peer gets a fresh window, and is named only after timeout_s more of watching."""
    from lthmpi.parallel.liveness import Heartbeat, PeerLost, PeerWatch

    Heartbeat(str(tmp_path), rank=1, host="nodeB", every_s=3600).stop()
    clock = Clock()
    watch = PeerWatch(str(tmp_path), [1], timeout_s=5, clock=clock)
    watch.check()
    clock.t += 1000  # suspended: no beat, no check
    for _ in range(8):  # 4.8 s of watching again: still within the window
        watch.check()
    with pytest.raises(PeerLost, match=r"rank 1 \(host nodeB"):
        for _ in range(8):
            watch.check()


def test_liveness_is_on_by_default():
    from lthmpi.config import Config

    assert Config().parallel.peer_timeout >= 60  # minutes of slack for a stalled shared file system


FROZEN_TIMEOUT_S = 4


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of MPI rank `rank` among the descendants of `root` (mpirun; hydra starts each rank in a session
    of its own), else None."""
    parent = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    for pid in parent:
        up = pid
        while up in parent and up != root:
            up = parent[up]
        with contextlib.suppress(OSError):
            if up == root and pid != root:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"PMI_RANK={rank}".encode() in f.read().split(b"\0"):
                        return pid
    return None


def job_with_a_frozen_rank_1(run, sets, env=None, freeze_it=True, timeout=60):
    """mpirun -np 2 on the tiny grid; once the parent is on disk, rank 1 is SIGSTOPped (`freeze_it`; otherwise the
    run stops it itself, LTHMPI_FAULT=stop); wait for the job to end, then kill what is left frozen. Returns
    (exit status, stderr, seconds from the parent to the end, rank 1's pid)."""
    p = start(run, 2, sets=sets, env=env)
    pid = None
    try:
        wait_for(lambda: (run / "parent.h5").exists(), p, timeout=120, what="the parent")  # rank 1 waits for it
        pid = rank_pid(p.pid, 1)
        assert pid is not None, "no process with PMI_RANK=1 under mpirun"
        if freeze_it:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        rc, _out, err = finish(p, timeout=timeout)
        return rc, err, time.time() - t0, pid
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_frozen_rank_ends_the_job_with_a_line_naming_it(tmp_path):
    """mpirun -np 2 where rank 1 is SIGSTOPped once rank 0 has trained the parent (a hung host: mpirun sees no exit and
    kills nothing): rank 0, waiting for it in a barrier, ends the job within the timeout with one line naming
    rank 1 and its pid, exit status non-zero. With parallel.peer_timeout = 0 this job never ends."""
    rc, err, took, pid = job_with_a_frozen_rank_1(tmp_path / "run", [f"parallel.peer_timeout={FROZEN_TIMEOUT_S}"])
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1, (rc, err[-3000:])
    assert "rank 1 (host " in lines[0] and f"pid {pid})" in lines[0] and "no sign of life" in lines[0], lines
    assert took < FROZEN_TIMEOUT_S + 30, took


def test_a_replica_frozen_in_a_data_parallel_step_ends_the_job(tmp_path):
    """mpirun -np 2, one task trained by a data-parallel subgroup of both ranks; rank 1 freezes (SIGSTOP, a hung
    host) after its first training block, so rank 0 is held inside the step's Allreduce, where no wait polls:
    its stall guard ends the job within the timeout with one line naming rank 1, where before it hung for ever."""
    run = tmp_path / "run"
    sets = ["prune.remaining=[0.5]", 'reset.points=["0ep"]', "reset.controls=[]", "parallel.subgroups=true",
            f"parallel.peer_timeout={FROZEN_TIMEOUT_S}"]
    rc, err, took, pid = job_with_a_frozen_rank_1(run, sets, env={"LTHMPI_FAULT": "stop:1:1"}, freeze_it=False,
                                                  timeout=120)
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1, (rc, err[-3000:])
    assert "rank 0 on " in lines[0] and "rank 1 (host " in lines[0] and f"pid {pid})" in lines[0], lines
    assert "no sign of life" in lines[0], lines
    log = (run / "logs" / "rank0.log").read_text()
    assert "data-parallel subgroups of [2] ranks" in log and "in a collective of a data-parallel step" in log, log[-3000:]
    assert took < 90, took
