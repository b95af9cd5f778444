"""The run directory's locks and claims under job-array shards (lthmpi/store.py, lthmpi/parallel/shards.py), unit
level and in this process: a second open file description of a lock file stands for another shard (flock is
per open file description). Issue 31's review: a sweep under a shared lock, shares dealt from host-local
facts, claims that ignore their holder, symlinks followed, temporaries never swept, --merge refusing at once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from faultkit import ROOT, clean_env

TMP = ".tmp-m000_r00_ticket.h5.abc123"


@pytest.fixture
def run_path(tmp_path, tiny_config):
    from lthmpi.store import RunDir

    path = str(tmp_path / "run")
    RunDir(path).create(tiny_config)
    RunDir(path).unlock()
    yield path
    RunDir(path).unlock()


def test_a_shard_starting_beside_a_writer_leaves_its_temporaries(run_path, tiny_config):
    """Another shard holds the lock shared and is writing a task file: a shard that starts now must not delete
    that temporary (it did: the writer then failed in atomic_path and its share stayed untrained)."""
    from lthmpi.store import RunDir, _flock, release

    other = _flock(os.path.join(run_path, "lock"), shared=True, wait=False)
    live = os.path.join(run_path, "tasks", TMP)
    open(live, "w").close()
    try:
        RunDir(run_path).create(tiny_config, shared=True)
        assert os.path.exists(live), "a live shard's temporary was swept"
    finally:
        release(other)


def test_a_shard_alone_sweeps_every_temporary(run_path, tiny_config):
    """Alone in the directory (nobody else holds the lock), a shard removes what killed processes left, in
    tasks/, stability/ and shards/ too."""
    from lthmpi.store import RunDir

    left = [os.path.join(run_path, d, f".tmp-x.{d}") for d in ("tasks", "stability", "shards", "")]
    for p in left:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "w").close()
    RunDir(run_path).create(tiny_config, shared=True)
    assert [p for p in left if os.path.exists(p)] == []
    RunDir(run_path).unlock()
    RunDir(run_path).lock()  # it shares the lock after its sweep, never keeps it exclusive


def test_flock_that_does_not_exclude_is_refused_at_start(run_path, tiny_config, monkeypatch):
    """flock emulated as a no-op (some FUSE and network mounts): two shards would train the same task; refuse
    at start-up, naming the filesystem, before any claim."""
    import fcntl

    from lthmpi.store import RunDir, StoreError

    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)
    with pytest.raises(StoreError, match=r"flock does not exclude on \S+ at /.* job-array shards would train the "
                                         r"same task twice"):
        RunDir(run_path).create(tiny_config, shared=True)
    assert not os.path.exists(os.path.join(run_path, "claims"))


def test_a_claim_names_its_holder_and_a_lost_claim_refuses_the_write(run_path):
    """The claim file says host, pid and start; a shard whose claim now names another process (flock local to
    each host: another host took the task) refuses to write that task's result, in one line."""
    from lthmpi.parallel.shards import _holders
    from lthmpi.parallel.graph import Task
    from lthmpi.store import RunDir, StoreError, holder_stamp, hostname, release

    run = RunDir(run_path)
    fd = run.claim("m000_r00_ticket")
    try:
        with open(run.claim_path("m000_r00_ticket")) as f:
            assert f.read().strip() == holder_stamp() and holder_stamp().startswith(f"{hostname()}:{os.getpid()} since ")
        run.claim_is_mine("m000_r00_ticket")
        waiting = [Task("m000_r01_ticket", "oneshot", deps=("m000_r00_ticket",))]
        assert _holders(run, waiting, set()) == f"task m000_r00_ticket (held by {holder_stamp()})"
        with open(run.claim_path("m000_r00_ticket"), "w") as f:
            f.write("otherhost:4242 since 2026-01-01 00:00:00\n")
        run.before_write = run.claim_is_mine
        with pytest.raises(StoreError, match=r"claim .*m000_r00_ticket is now held by otherhost:4242 since .*, not by "
                                             r"this shard .* does not exclude across hosts"):
            run.write_task("m000_r00_ticket", {"x": 1}, {})
        assert not os.path.exists(run.task_path("m000_r00_ticket"))
    finally:
        release(fd)


def test_a_symlink_at_a_claim_path_is_refused_and_its_target_untouched(run_path, tmp_path):
    from lthmpi.store import RunDir, StoreError

    run = RunDir(run_path)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.makedirs(run.claims_dir, exist_ok=True)
    os.symlink(target, os.path.join(run.claims_dir, "m000_r00_ticket"))
    with pytest.raises(StoreError, match="is a symbolic link; .* remove it"):
        run.claim("m000_r00_ticket")
    assert target.read_text() == "keep me\n"


def _graph(costs):
    from lthmpi.parallel.graph import Graph, Task

    return Graph([Task(f"t{i}", "oneshot", cost=c) for i, c in enumerate(costs)])


def test_shards_that_would_deal_differently_still_cover_every_task_once(run_path, tiny_config):
    """Task costs differ between hosts (sparse kernels compiled or not, parallel.sparse_below): dealt by each
    shard for itself, the shares leave tasks in nobody's share; recorded once, every task is in exactly one."""
    from lthmpi.parallel.shards import recorded_shares, shares
    from lthmpi.store import RunDir

    here, there = _graph([6, 1, 1, 1, 1, 1]), _graph([1, 1, 1, 1, 1, 6])  # the same tasks, other costs
    dealt = [t.id for t in shares(tiny_config, here, 2)[0] + shares(tiny_config, there, 2)[1]]
    assert sorted(dealt) != sorted(here.by_id), "a weak test: both deals agree"
    run = RunDir(run_path)
    got = [t.id for t in recorded_shares(run, tiny_config, here, 2)[0] + recorded_shares(run, tiny_config, there, 2)[1]]
    assert sorted(got) == sorted(here.by_id)
    with open(os.path.join(run_path, "shards", "shares-of-2.json")) as f:
        assert sorted(sum(json.load(f)["shares"], [])) == sorted(here.by_id)


def test_merge_waits_for_a_shard_still_ending_and_imports_no_tensorflow(tiny_run, tmp_path):
    """--merge while a shard still holds the run lock (Slurm starts the merge job as soon as an element is
    cancelled, before its processes are gone): it waits, says for whom, merges once the lock is free, and never
    imports TensorFlow."""
    from lthmpi.results import load
    from lthmpi.store import _flock, release

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    tasks = load(str(run))["tasks"]
    (run / "results.h5").unlink()
    (run / "shards").mkdir()
    (run / "shards" / "graph.json").write_text(json.dumps({"tasks": [t["task_id"] for t in tasks]}))
    shard = _flock(str(run / "lock"), shared=True, wait=False)
    code = ("import sys; from lthmpi.main import main; rc = main(sys.argv[1:]); "
            "print('tensorflow imported:', 'tensorflow' in sys.modules or 'keras' in sys.modules); sys.exit(rc)")
    merge = subprocess.Popen([sys.executable, "-c", code, "--merge", "--run-dir", str(run), "--quiet"], cwd=ROOT,
                             env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(2.0, release, (shard,))
    timer.start()
    try:
        out, err = merge.communicate(timeout=120)
    finally:
        timer.cancel()
        release(shard)
    assert merge.returncode == 0, err[-2000:]
    assert "lthmpi: waiting (at most 120 s) for job-array shards, the last started " in err, err
    assert "tensorflow imported: False" in out and (run / "results.h5").exists()
