"""Benchmark: one data-parallel gradient sum, three ways, alternating in one MPI job so that drift hits each alike.

  blocking  MpiReducer.allreduce_sum without a guard: MPI_Allreduce into a new array, as before
            lthmpi/parallel/liveness.py's StallGuard
  guarded   the same with a StallGuard: the Allreduce inside `with guard:`, as an MPI run trains now
  polled    the same with MPI_Iallreduce tested in a loop (the watched alternative the guard avoids)

    .venv/bin/mpirun -np 2 .venv/bin/python run/bench_allreduce.py [--sizes 50610,266610] [--rounds 30]

Per size, rank 0 prints each way's median microseconds per sum and the median of the per-round ratios to
`blocking`. Sizes are float32 gradient lengths (LeNet-300-100 on digits: 50,610; on MNIST: 266,610).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50610,266610", help="comma-separated gradient lengths")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per way and size")
    ap.add_argument("--reps", type=int, default=100, help="sums per timed round")
    args = ap.parse_args()
    from mpi4py import MPI

    from lthmpi.parallel.liveness import StallGuard
    from lthmpi.parallel.mpi import MpiReducer

    comm = MPI.COMM_WORLD
    guard = StallGuard(lambda: None, lambda e: None)
    bare, guarded = MpiReducer(comm), MpiReducer(comm, guard)
    for n in (int(s) for s in args.sizes.split(",")):
        buf = np.random.default_rng(comm.rank).random(n).astype(np.float32)

        def polled():
            out = np.empty_like(buf)
            req = comm.Iallreduce(buf, out, op=MPI.SUM)
            while not req.Test():
                pass
            return out

        ways = {"blocking": lambda: bare.allreduce_sum(buf), "guarded": lambda: guarded.allreduce_sum(buf),
                "polled": polled}
        times = {w: [] for w in ways}
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for w in order:
                comm.Barrier()
                t = time.perf_counter()
                for _ in range(args.reps):
                    ways[w]()
                times[w].append((time.perf_counter() - t) / args.reps * 1e6)
        if comm.rank == 0:
            base = times["blocking"]
            print(f"{n:,} float32 over {comm.size} ranks ({args.rounds} rounds of {args.reps}):")
            for w, ts in times.items():
                ratio = statistics.median(t / b for t, b in zip(ts, base))
                print(f"  {w:9s} median {statistics.median(ts):8.1f} us   ratio to blocking {ratio:.3f}")
    guard.stop()


if __name__ == "__main__":
    main()
