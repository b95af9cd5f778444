"""A dead peer rank ends the waits of the others (lthmpi/parallel/liveness.py), with fake MPI requests and a fake
clock: where the launcher does not end the job, a barrier, a
receive or a wait for inputs would sleep forever."""
from __future__ import annotations

import threading

import pytest


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

