"""A test-only experiment kind with chains and joins, and a command line that runs the real coordinator with it.

    [mpirun -np P] python tests/chainkind.py --run-dir DIR [lthmpi.main's options]

Graph (besides the one-shot grid): chain a0 -> a1 -> a2 -> a3, chain b0 -> b1, a leaf off a1, and a join
that needs a3, b1 and the grid's first ticket. Each task sleeps a few short "training blocks" (calling
`progress`, so LTHMPI_FAULT fires inside it) and writes a result whose `value` is 1 + the sum of its inputs'
values (a grid task counts 1): reading its inputs from the run directory is part of what is tested.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lthmpi.parallel.graph import Task  # noqa: E402
from lthmpi.results import TaskResult  # noqa: E402

BLOCKS, BLOCK_S = 4, 0.1
CHAINS = {"a0": (), "a1": ("a0",), "a2": ("a1",), "a3": ("a2",), "b0": (), "b1": ("b0",), "leaf": ("a1",),
          "join": ("a3", "b1", "m000_r00_ticket")}


class ChainKind:
    name = "chain"

    def enabled(self, cfg) -> bool:
        return True

    def tasks(self, exp) -> list[Task]:
        return [Task(f"chain_{k}", self.name, deps=tuple(d if d.startswith("m0") else f"chain_{d}" for d in deps),
                     cost=1000.0) for k, deps in CHAINS.items()]

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        t0 = time.time()
        inputs = [exp.run.read_task(d)[0] for d in task.deps]
        for n in range(BLOCKS):
            time.sleep(BLOCK_S)
            if progress:
                progress((n + 1) * 10)
        value = 1 + sum(int(a.get("value", 1)) for a in inputs)
        t1 = time.time()
        attrs = dict(vars(TaskResult(task.id, kind=self.name, start_time=t0, end_time=t1, seconds=t1 - t0,
                                     rank=exp.rank, host=exp.host)),
                     value=value, inputs_ended=max((a["end_time"] for a in inputs), default=0.0))
        if write:
            exp.run.write_task(task.id, attrs, {})
        return attrs


EXPECTED = {"chain_a0": 1, "chain_a1": 2, "chain_a2": 3, "chain_a3": 4, "chain_b0": 1, "chain_b1": 2,
            "chain_leaf": 3, "chain_join": 1 + 4 + 2 + 1}

if __name__ == "__main__":
    from lthmpi.kinds import register
    from lthmpi.main import main

    register(ChainKind())
    sys.exit(main())
