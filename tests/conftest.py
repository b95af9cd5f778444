"""Shared fixtures: one process-wide TensorFlow set-up and one tiny experiment run reused by several tests.

TensorFlow fixes its thread pools when it first runs an op, and `lthmpi.runtime.configure_tensorflow`
must come before that; so when any collected test asks for `tf_runtime`, TF is configured (1 thread,
op determinism) as soon as collection ends, before the first test of any module can touch it.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny experiment: digits (1237 train / 200 val / 360 test), batch 32 -> 38 iterations per epoch,
# T = 2 epochs = 76 iterations; 2 masks x 2 reset points x (ticket + 2 controls) = 12 retrainings.
TINY = {
    "seed": 3,
    "data": {"dataset": "digits", "validation": 200},
    "train": {"epochs": 2, "batch_size": 32, "eval_every": "10it"},
    "prune": {"remaining": [0.5, 0.2]},
    "reset": {"points": ["0ep", "10it"], "controls": ["random_reinit", "random_mask"]},
}
TINY_PER_EPOCH = 38


def needs_root(what: str):
    """The one way a test that needs root says so: skipped, with `what` it needs root for, for a developer who is
    not root; run (and failing if it cannot do what it needs) as root, as in CI."""
    return pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                              reason=f"needs root ({what}); CI runs the tests as root")
TINY_TOTAL = 76


# run/test.sh runs the suite on pytest-xdist workers with --dist loadscope: the tests of one module (or of one
# class) run on one worker, so that a module's shared run (a module-scoped fixture) is made once; a long module
# puts a part in a class of its own to split it over both workers. Scopes are handed out in collection order,
# so the longest modules (pytest --durations, docs/testing.md) come first: a long one started last would leave
# one worker running it alone at the end. test_slurm leads: most of its time is waiting on Slurm, which overlaps.
LONGEST_FIRST = ("test_slurm", "test_faults", "test_stability", "test_mpi", "test_cli", "test_sparse", "test_shards",
                 "test_analysis", "test_imp", "test_imagefolder", "test_engine", "test_models", "test_graph_run",
                 "test_training", "test_model_cli", "test_pai", "test_parent_data_parallel", "test_bad_config")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module, and of the other modules, is kept


def pytest_collection_finish(session):
    if any("tf_runtime" in getattr(item, "fixturenames", ()) for item in session.items):
        from lthmpi.runtime import configure_tensorflow

        configure_tensorflow(1)


@pytest.fixture(scope="session")
def tf_runtime():
    """TensorFlow configured for the tests: 1 intra-op thread, op determinism."""
    from lthmpi.runtime import configure_tensorflow

    return configure_tensorflow(1)


@pytest.fixture(scope="session")
def tiny_config():
    from lthmpi.config import from_dict
    from lthmpi.validation import validate

    cfg = from_dict(TINY)
    validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tf_runtime, tiny_config):
    """A finished tiny experiment, run in this process; read it, never write to it (copy it first)."""
    from lthmpi.parallel.coordinator import run_serial

    path = str(tmp_path_factory.mktemp("tiny") / "run")
    run_serial(tiny_config, path, threads=1, quiet=True)
    return path
