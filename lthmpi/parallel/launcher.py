"""What the MPI launcher (mpirun, mpiexec, srun) says in the environment, read before MPI is initialised.

One place for the variables of MPICH/hydra, Open MPI, PMIx and Slurm: whether this process is a rank, which,
and how many ranks share its host.
"""
from __future__ import annotations

import os

MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in MPI_ENV)


def mpi_rank_from_env() -> int:
    """This process's rank as the launcher says it (before MPI is initialised), 0 when not launched so."""
    for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return 0


def ranks_on_this_host() -> int:
    """How many ranks of this job share this host, as the launcher says (1 when not launched by MPI)."""
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1
