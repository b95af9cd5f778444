"""SIGTERM and SIGINT (lthmpi/errors.py): the process exits 128 + signal, cleanly, and what it starts while it
unwinds can still be stopped. run/signal_check.sh does the conv-net run 10 times (docs/faults.md); here, once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from faultkit import ROOT, clean_env


def test_while_unwinding_signals_are_dropped_but_not_ignored_by_children():
    """After the first SIGTERM, a second one must not interrupt the unwinding; but SIG_IGN would be inherited by
    every child started meanwhile (exec keeps ignored signals), which then cannot be stopped."""
    from lthmpi.errors import Interrupted, install_signal_handlers

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        install_signal_handlers()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("no Interrupted raised")
        except Interrupted as e:
            assert e.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, dropped while unwinding
            child = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGTERM) == "
                                    "signal.SIG_DFL, signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
                                   capture_output=True, text=True, timeout=60)
            assert child.stdout.split() == ["True", "True"], "the child inherited ignored signals: " + child.stdout
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_sigterm_a_conv_run_mid_task_exits_143_cleanly():
    r = subprocess.run(["bash", str(ROOT / "run" / "signal_check.sh"), "1"], capture_output=True, text=True,
                       timeout=300, env=clean_env({"PYTHON": sys.executable}))
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert r.returncode == 0 and len(rows) == 1, r.stdout + r.stderr[-2000:]
    assert rows[0][1] == "143" and rows[0][-1] == "clean" and 0 < int(rows[0][2]) < 8, r.stdout
