"""Running the experiment's task graph on one process, P MPI ranks, or job-array shards.

    launcher.py     what mpirun/srun say in the environment (is this a rank, which, how many on this host)
    comm.py         the communicator interface and its one-rank implementation (no MPI)
    mpi.py          the same interface over mpi4py: the only module that imports it
    graph.py        tasks and their dependencies: ready set, critical path (pure)
    scheduling.py   static / LPT / dynamic assignment, their replay, data-parallel subgroups (pure)
    startup.py      agreeing on the start over a communicator: one error line, every rank exits alike
    phases.py       start-up, parent, masks, one task, merge: shared by coordinator.py and shards.py
    coordinator.py  the run over a communicator: phases, who trains what, gather, merge
    dispatch.py     the dynamic schedule: rank 0 hands ready tasks out on request
    shards.py       job-array shards: independent processes sharing one run directory, and --merge

Nothing here imports TensorFlow at module level, and nothing but mpi.py imports mpi4py.
"""
