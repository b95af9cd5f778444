"""Agreeing on the start over a communicator, and ending every rank when one fails later.

An error at the start that every rank sees alike (bad data, unknown model) is said once, by rank 0, and every
rank exits cleanly; any later exception on any rank ends the whole job (abort) after one line naming the rank.
"""
from __future__ import annotations

import logging
import sys

from ..config import Config, ConfigError
from ..errors import describe_error

log = logging.getLogger("lthmpi")


class StartupFailed(Exception):
    """Every rank knows the start failed and rank 0 has said why: exit with `code`, no abort."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def agree(comm, fn):
    """Run fn() on every rank; if it fails on any, rank 0 prints one line and every rank raises StartupFailed.
    One rank alone: fn's exception propagates (the caller reports it)."""
    if comm.size == 1:
        return fn()
    try:
        value, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - reported once, below
        value = None
        line, code, bug = describe_error(e)
        if bug:
            import traceback

            traceback.print_exc()
        failure = (comm.rank, comm.host, line, code)
    comm.barrier()  # sleep, not spin, while the slowest rank finishes
    failures = [f for f in comm.allgather(failure) if f is not None]
    if not failures:
        return value
    if comm.rank == 0:
        r, h, line, code = failures[0]
        same = len(failures) == comm.size and len({f[2] for f in failures}) == 1
        print(f"lthmpi: error: {line}" if same else f"lthmpi: error: rank {r} on {h}: {line}", file=sys.stderr,
              flush=True)
    raise StartupFailed(max(f[3] for f in failures))


def same_config(comm, resolve) -> Config:
    """The config every rank resolved itself; a rank that cannot read it, or reads another one, is named."""
    cfg = agree(comm, resolve)
    if comm.size == 1:
        return cfg
    texts = comm.allgather(cfg.to_toml())

    def compare():
        if texts[comm.rank] != texts[0]:
            raise ConfigError("this rank resolved another config than rank 0 (a config file that differs "
                              "between hosts?): give every rank the same --config and --set")

    agree(comm, compare)
    return cfg


def abort(comm, e: BaseException):
    """One line on stderr naming the rank and the error (traceback in the rank's log), then end every rank."""
    log.error("rank %d failed", comm.rank, exc_info=e)
    line, code, bug = describe_error(e)
    where = next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)
    if bug and where:
        line += f" (traceback in {where})"
    print(f"lthmpi: error: rank {comm.rank} on {comm.host} failed: {line}", file=sys.stderr, flush=True)
    comm.abort(code)
