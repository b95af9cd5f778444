"""lthmpi/runtime.py: how TensorFlow is loaded. In a fresh process each time: a process loads it once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, sys
from lthmpi.runtime import import_tensorflow
import_tensorflow()
loaded = sorted(m for m in ("sklearn", "scipy", "matplotlib") if m in sys.modules)
finders = [type(f).__name__ for f in sys.meta_path]
import sklearn.datasets, matplotlib.pyplot  # afterwards they import as usual
print(json.dumps({"loaded": loaded, "finders": finders, "digits": len(sklearn.datasets.load_digits().data)}))
"""


def test_tensorflow_loads_quietly_and_without_what_keras_would_pull_in():
    # oneDNN on, as TF has it by default on Intel CPUs: its notice ignores TF_CPP_MIN_LOG_LEVEL.
    env = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="1", MPLBACKEND="Agg")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"loading TensorFlow imported {out['loaded']}"
    assert "_HideOptionalImports" not in out["finders"], "the import hook outlived the import"
    assert out["digits"] == 1797
    assert proc.stderr.strip() == "", proc.stderr[-3000:]


def test_a_fatal_message_while_tensorflow_loads_reaches_the_user(tmp_path):
    """TensorFlow that dies while it loads (SIGILL on a CPU without AVX, an abort): what it printed last must
    still reach stderr, though import_tensorflow keeps TF's start-up notices off it."""
    import signal

    for name, body in (("keras", ""), ("tensorflow", "import os, signal\nos.write(2, b'cpu_feature_guard.cc: a notice\\n"
                                                       "FATAL: this TensorFlow needs AVX\\n')\n"
                                                       "os.kill(os.getpid(), signal.SIGILL)\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, "-c", "from lthmpi.runtime import import_tensorflow; import_tensorflow()"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGILL
    assert proc.stderr == "FATAL: this TensorFlow needs AVX\n"
