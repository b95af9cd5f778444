"""Error lines, exit codes and interrupts: what the command line and the coordinator both say and return.

Its own module so that main.py (which hands over to the coordinator) and parallel/coordinator.py (which reports a
failing rank) import it without importing each other.
"""
from __future__ import annotations

import os
import signal
import sys

from .config import ConfigError

EXIT_USAGE = 2
EXIT_FAILURE = 1


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT: raised in the main thread so that Python unwinds (atomic writes remove their
    temporaries) instead of dying where it stands."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install_signal_handlers():
    """SIGTERM (a scheduler's time limit, `kill`) and SIGINT (Ctrl-C) raise Interrupted once; while the
    process unwinds, further ones are dropped by a handler that does nothing (not SIG_IGN, which the children
    started meanwhile would inherit across exec: they could then not be stopped)."""
    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _drop)
        raise Interrupted(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def _drop(signum, frame):
    """A signal that arrives while the process unwinds from the first one."""


def exit_interrupted(code: int):
    """End an interrupted command-line process now, cleanly: close the disk readers' threads, flush the logs
    and the streams, restore the default handlers, then os._exit(code) (128 + signal). Not sys.exit: the
    interpreter's teardown with TensorFlow/XLA loaded and a reader thread alive has ended in glibc's
    "corrupted size vs. prev_size" (the MPI path exits the same way, parallel/mpi.py stop_together)."""
    import logging

    readers = sys.modules.get("lthmpi.data.disk_batches")
    if readers is not None:
        readers.close_all()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    os._exit(code)


def interrupt_code(e: KeyboardInterrupt) -> int:
    return 128 + getattr(e, "signum", signal.SIGINT)


def interrupt_line(e: KeyboardInterrupt) -> str:
    return f"interrupted by {signal.Signals(getattr(e, 'signum', signal.SIGINT)).name}"


def resume_line(e: KeyboardInterrupt) -> str:
    return f"lthmpi: {interrupt_line(e)}; finished tasks are on disk, rerun the same command to resume"


def is_user_error(e: BaseException) -> bool:
    """Errors a user can fix from the message alone: no traceback for these."""
    from .fileio import StoreError

    kinds = [ConfigError, StoreError]
    # Only an imported module can have raised its error: importing lthmpi.models here would import
    # TensorFlow (seconds, and its C++ log lines on stderr) just to report a config error.
    for module, name in (("lthmpi.data", "DataError"), ("lthmpi.models", "ModelError"),
                         ("lthmpi.parallel.graph", "GraphError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(e, tuple(kinds))


def describe_error(e: BaseException) -> tuple[str, int, bool]:
    """(one line after "lthmpi: error: ", exit status, whether it is a bug that deserves a traceback)."""
    from .fileio import disk_errno

    if is_user_error(e):
        return str(e), EXIT_USAGE, False
    if getattr(e, "plain_line", False):  # a failure said whole by its message (parallel/liveness.PeerLost)
        return str(e), EXIT_FAILURE, False
    code = disk_errno(e)
    if code is not None:
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return (f"{os.strerror(code)}{where}; finished tasks are kept: free space or fix the disk or its "
                f"permissions and rerun the same command to resume"), EXIT_FAILURE, False
    from .devices import determinism_error_line

    line = determinism_error_line(str(e))
    if line is not None:  # an op without a deterministic kernel on this device: the user's choice to make
        return line, EXIT_USAGE, False
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}", EXIT_FAILURE, True


def report_error(e: BaseException) -> int:
    """One clear line for the errors a user can fix; a traceback only for bugs."""
    line, code, bug = describe_error(e)
    if bug:
        import traceback

        traceback.print_exception(e)
    print(f"lthmpi: error: {line}", file=sys.stderr, flush=True)
    return code
