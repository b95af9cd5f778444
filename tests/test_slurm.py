"""run/slurm/*.sbatch under real Slurm (marker `slurm`): one private one-node cluster for the session
(run/slurm/local_cluster.sh, as root; run/setup.sh installs slurm-wlm and munge), the tiny digits grid
(8 tasks, 1 epoch, one thread per process), results held against one in-process run of the same grid:
1. array.sbatch end to end: parent -> array of 3 shards (at most 2 at once) -> merge, chained by Slurm;
2. one array element scancel'ed mid-task, then the same submission again: only its unfinished tasks train;
3. multi_node.sbatch with `srun --mpi=pmi2` and 2 ranks, one rank SIGKILLed mid-task: the job ends at once
   (srun --kill-on-bad-exit), and the rerun completes;
4. single_node.sbatch past its time limit mid-task (--time=2), then the same submission again: it resumes.
Most of this is waiting: for TensorFlow to start in each job's processes, and for Slurm, which checks time
limits every 30 s (a 2-minute job ends 120-150 s after it started; 2, not 1, so that a loaded box reaches the
second task well before). So each test's first submission is made
as the module starts (for the selected tests), and they run side by side on a node that declares
max(6, nproc) CPUs (LOCAL_CLUSTER_CPUS); each test then waits for its own jobs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import ROOT, assert_same_results, clean_env, done_counts, task_files

LOCAL_CLUSTER = ROOT / "run" / "slurm" / "local_cluster.sh"
SLURM_DIR = ROOT / "run" / "slurm"
SBIN = os.pathsep.join(("/usr/sbin", "/sbin"))
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo")
POLL_S = 0.5
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}
GRID = {"seed": 3, "data": {"dataset": "digits", "validation": 200},
        "train": {"epochs": 1, "batch_size": 32, "eval_every": "10it"},
        "prune": {"remaining": [0.5, 0.2]},
        "reset": {"points": ["0ep", "10it"], "controls": ["random_reinit"]}}
N_TASKS = 8  # 2 masks x 2 reset points x (ticket + random_reinit)


def _no_slurm() -> str | None:
    """Why Slurm cannot be had here (the one line a skipped test shows), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (a private Slurm cluster: slurmd starts jobs as root); CI runs the tests as root"
    path = os.environ.get("PATH", "") + os.pathsep + SBIN
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=path) is None]
    if missing and shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and apt-get is not there to install it"
    return None  # as root where apt works, run/setup.sh installs it: a missing binary then fails the cluster fixture


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_no_slurm() is not None, reason=str(_no_slurm()))]


class Cluster:
    def __init__(self, path: Path):
        self.path = path
        self.conf = path / "slurm.conf"

    def env(self, **more) -> dict:
        """The jobs' environment: the tests' own (no MPI or fault variables), no Slurm variables from outside,
        this cluster's slurm.conf, and the knobs of run/slurm/*.sbatch."""
        env = {k: v for k, v in clean_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env.update(SLURM_CONF=str(self.conf), PATH=env.get("PATH", "") + os.pathsep + SBIN, LTHMPI_HOME=str(ROOT),
                   VENV=sys.prefix)
        env.update({k: str(v) for k, v in more.items()})
        return env

    def cmd(self, *args, check=True, timeout=30) -> str:
        r = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}\n{self.daemon_logs()}")
        return r.stdout

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {p} (tail)\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((self.path / "log").glob("*.log")))

    def states(self, job: str) -> dict[str, tuple[str, str]]:
        """Job or array element id -> (state, reason), over every element of `job` (ended ones included)."""
        out = self.cmd("squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%i|%T|%r")
        return {i: (s, r) for i, s, r in (ln.split("|", 2) for ln in out.splitlines() if ln.strip())}

    def job(self, job_id: str) -> dict:
        """`scontrol show job`'s fields of one job (or array element)."""
        text = self.cmd("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def wait(self, jobs: list[str], logs: Path, timeout: float = 240) -> dict[str, str]:
        """Until every element of `jobs` has ended (or waits on a dependency that can never be met): id -> state."""
        deadline = time.monotonic() + timeout
        while True:
            now = {}
            for j in jobs:
                now.update(self.states(j))
            if now and all(s in ENDED or r == "DependencyNeverSatisfied" for s, r in now.values()):
                return {i: s for i, (s, _) in now.items()}
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs {jobs} not ended within {timeout} s: {now}\n{job_logs(logs)}")
            time.sleep(POLL_S)


def job_logs(*dirs: Path) -> str:
    """Every job log and run log under `dirs`, for an assertion's message."""
    parts = []
    for d in dirs:
        for p in sorted(list(Path(d).glob("*.out")) + list(Path(d).glob("**/logs/*.log"))):
            parts.append(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts) or f"(no logs under {', '.join(map(str, dirs))})"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A private one-node cluster for the whole session, stopped at its end."""
    path = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + os.pathsep + SBIN,
               LOCAL_CLUSTER_CPUS=str(max(6, os.cpu_count() or 1)))
    r = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", str(path)], env=env, capture_output=True, text=True,
                       timeout=120)
    site = _site_files()
    c = Cluster(path)
    if r.returncode != 0:
        pytest.fail(f"local_cluster.sh start failed (exit {r.returncode}): {r.stderr.strip()}\n{c.daemon_logs()}")
    try:
        yield c
    finally:
        r = subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(path)], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        status = subprocess.run(["bash", str(LOCAL_CLUSTER), "status", str(path)], capture_output=True, text=True)
        assert status.returncode == 3 and "no cluster" in status.stdout, status.stdout
        assert _site_files() == site, "the site's Slurm or munge configuration changed"


def _site_files() -> dict:
    """/etc/slurm's and /etc/munge's files and their mtimes: local_cluster.sh must leave them alone."""
    return {str(p): p.stat().st_mtime_ns for d in ("/etc/slurm", "/etc/munge") for p in Path(d).rglob("*")}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    from lthmpi.config import from_dict
    from lthmpi.validation import validate

    cfg = from_dict(GRID)
    validate(cfg)
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(cfg.to_toml())
    return cfg, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tf_runtime, grid):
    """The grid run in this process, one thread: what every job's results must equal, bit for bit."""
    from lthmpi.parallel.coordinator import run_serial

    path = tmp_path_factory.mktemp("reference") / "run"
    run_serial(grid[0], str(path), threads=1, quiet=True)
    assert len(task_files(path)) == N_TASKS
    return path


def sbatch(cluster: Cluster, script: str, args: list[str], cwd: Path, **env) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args, str(SLURM_DIR / script)], cwd=cwd, env=cluster.env(**env),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sbatch {script}: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def submit_array(cluster: Cluster, grid, base: Path, **env) -> tuple[str, str, str]:
    """`bash run/slurm/array.sbatch --cpus-per-task=1 --time=10` with 3 shards, at most 2 at once: the ids of
    the parent job, the array and the merge job."""
    r = subprocess.run(["bash", str(SLURM_DIR / "array.sbatch"), "--cpus-per-task=1", "--time=10"], cwd=base,
                       env=cluster.env(SHARDS=3, MAX_RUNNING=2, CONFIG=grid[1], RUN_DIR=base / "run",
                                       LOG_DIR=base / "logs", **env),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"submitted parent job (\d+), array (\d+) \(3 shards\), merge (\d+)", r.stdout)
    assert m, r.stdout
    return m.groups()


def wait_for_log(run: Path, text: str, cluster: Cluster, jobs: list[str], logs: Path, timeout=180):
    """Until a run log says `text`; fails early when the jobs ended without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in p.read_text(errors="replace") for p in (run / "logs").glob("*.log")):
            return
        states = {}
        for j in jobs:
            states.update(cluster.states(j))
        if states and all(s in ENDED for s, _ in states.values()):
            raise AssertionError(f"jobs ended ({states}) before the logs said {text!r}\n{job_logs(logs, run)}")
        time.sleep(POLL_S)
    raise AssertionError(f"the logs did not say {text!r} within {timeout} s\n{job_logs(logs, run)}")


def times(cluster: Cluster, job_id: str) -> tuple[str, str]:
    j = cluster.job(job_id)
    return j["StartTime"], j["EndTime"]


def same_files(run: Path, before: dict) -> bool:
    return {p.name: p.stat().st_mtime_ns for p in (run / "tasks").glob("*.h5") if p.name in before} == before


def mtimes(run: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (run / "tasks").glob("*.h5")}


# ---- each test's first submission, made as the module starts (see the module's docstring) -----------------

MPI_ARGS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
SINGLE_ARGS = ["--ntasks-per-node=1", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def time_limited(cluster, grid, tmp_path_factory):
    """single_node.sbatch, one rank, --time=2 (minutes), whose process waits in its second task
    (LTHMPI_FAULT=wait:0:2) until Slurm ends the job at its time limit: (job id, its directory)."""
    base = tmp_path_factory.mktemp("timelimit")
    return sbatch(cluster, "single_node.sbatch", [*SINGLE_ARGS, "--time=2"], base, SRUN_MPI="pmi2",
                  CONFIG=grid[1], RUN_DIR=base / "run", LTHMPI_FAULT="wait:0:2"), base


@pytest.fixture(scope="module")
def killed_rank(cluster, grid, tmp_path_factory):
    """multi_node.sbatch, 2 ranks by srun --mpi=pmi2, rank 1 SIGKILLed in its first task: (job id, directory)."""
    base = tmp_path_factory.mktemp("mpi")
    return sbatch(cluster, "multi_node.sbatch", MPI_ARGS, base, SRUN_MPI="pmi2", CONFIG=grid[1], RUN_DIR=base / "run",
                  LTHMPI_FAULT="kill:1:1"), base


def mpi_job(cluster: Cluster, base: Path, job: str | None = None, **env) -> tuple[str, dict, str]:
    """Submit multi_node.sbatch (unless `job` is given), wait: (job id, states, its log)."""
    if job is None:
        job = sbatch(cluster, "multi_node.sbatch", MPI_ARGS, base, SRUN_MPI="pmi2", **env)
    states = cluster.wait([job], base, timeout=300)
    return job, states, (base / f"lthmpi-{job}.out").read_text()


@pytest.fixture(scope="module")
def array_run(cluster, grid, tmp_path_factory):
    base = tmp_path_factory.mktemp("array")
    return submit_array(cluster, grid, base), base


@pytest.fixture(scope="module")
def cancelled_array(cluster, grid, tmp_path_factory):
    """The array with shard 1 pausing in its second task (LTHMPI_FAULT=wait:1:2), for the test to scancel."""
    base = tmp_path_factory.mktemp("scancel")
    return submit_array(cluster, grid, base, LTHMPI_FAULT="wait:1:2"), base


FIRST_SUBMISSIONS = ("time_limited", "killed_rank", "array_run", "cancelled_array")  # in this order


@pytest.fixture(scope="module", autouse=True)
def _first_submissions_early(request):
    wanted = {f for item in request.session.items if item.module is request.module for f in item.fixturenames}
    for name in FIRST_SUBMISSIONS:
        if name in wanted:
            request.getfixturevalue(name)


# ---- the tests ----------------------------------------------------------------------------------------------

def test_local_cluster_status_and_refusals(cluster):
    """status names the running daemons and how to use them; a second start on the running directory, an
    unknown command or a missing directory are refused in one line, and nothing changes."""
    def run(*args):
        return subprocess.run(["bash", str(LOCAL_CLUSTER), *args], capture_output=True, text=True, timeout=60)

    r = run("status", str(cluster.path))
    assert r.returncode == 0 and all(d in r.stdout for d in DAEMONS) and f"export SLURM_CONF={cluster.conf}" in r.stdout
    conf = cluster.conf.read_text()
    for args, rc, words in (
            (("start", str(cluster.path)), 1, f"the cluster of {cluster.path} is already running"),
            (("restart", str(cluster.path)), 2, "unknown command 'restart'; usage: local_cluster.sh start|stop|status DIR"),
            (("start",), 2, "usage: local_cluster.sh start|stop|status DIR")):
        r = run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == rc and len(lines) == 1 and lines[0].startswith("local_cluster.sh: error: "), r.stderr
        assert words in lines[0], lines
    assert cluster.conf.read_text() == conf and run("status", str(cluster.path)).returncode == 0
    assert cluster.cmd("sinfo", "-h", "-o", "%t").strip() in {"idle", "mix", "alloc"}  # it still serves


def test_array_end_to_end_equals_one_process(cluster, reference, array_run):
    (parent, array, merge), base = array_run
    logs, run = base / "logs", base / "run"
    states = cluster.wait([parent, array, merge], logs, timeout=420)
    assert states == {parent: "COMPLETED", **{f"{array}_{i}": "COMPLETED" for i in range(3)}, merge: "COMPLETED"}, \
        f"{states}\n{job_logs(logs, run)}"
    # Slurm ran them in order: the array after the parent, the merge after every element, never 3 elements at once
    _, p_end = times(cluster, parent)
    elements = [times(cluster, f"{array}_{i}") for i in range(3)]
    m_start, _ = times(cluster, merge)
    assert all(s >= p_end for s, _ in elements) and all(m_start >= e for _, e in elements), (p_end, elements, m_start)
    assert all(sum(s <= t < e for s, e in elements) <= 2 for t, _ in elements), elements
    # one log per job, named after the job
    names = {p.name for p in logs.glob("*.out")}
    assert names == {f"lthmpi-parent-{parent}.out", f"lthmpi-merge-{merge}.out",
                     *(f"lthmpi-shards-{array}_{i}.out" for i in range(3))}, names
    assert "step merge" in (logs / f"lthmpi-merge-{merge}.out").read_text()

    assert set(done_counts(run).values()) == {1} and task_files(run) == task_files(reference)
    assert_same_results(run, reference)
    from lthmpi.results import load

    prov = load(str(run))["provenance"]
    assert prov["schedule"] == "shards" and prov["ranks"] == 3
    assert (base / "run-analysis").is_dir()


def test_scancel_one_element_then_resubmit_trains_only_its_rest(cluster, grid, reference, cancelled_array):
    import json

    jobs, base = cancelled_array
    parent, array, merge = jobs
    logs, run = base / "logs", base / "run"
    wait_for_log(run, "injected fault: waiting", cluster, list(jobs), logs, timeout=420)
    cluster.cmd("scancel", f"{array}_1")
    states = cluster.wait(list(jobs), logs, timeout=420)
    assert states == {parent: "COMPLETED", f"{array}_0": "COMPLETED", f"{array}_1": "CANCELLED",
                      f"{array}_2": "COMPLETED", merge: "FAILED"}, f"{states}\n{job_logs(logs, run)}"
    share = json.loads((run / "shards" / "1-of-3.json").read_text())
    assert len(share["tasks"]) >= 2 and not share["finished"]
    lost = set(share["tasks"][1:])
    assert task_files(run) == task_files(reference) - lost, job_logs(logs, run)
    merge_log = (logs / f"lthmpi-merge-{merge}.out").read_text()
    assert f"{len(lost)} of {N_TASKS} tasks have no result yet" in merge_log and "rerun shard 1/3" in merge_log

    before = mtimes(run)
    jobs = submit_array(cluster, grid, base)  # the same command, without the injected pause
    states = cluster.wait(list(jobs), logs, timeout=420)
    assert set(states.values()) == {"COMPLETED"} and len(states) == 5, f"{states}\n{job_logs(logs, run)}"
    trained = {i: json.loads((run / "shards" / f"{i}-of-3.json").read_text())["trained"] for i in range(3)}
    assert trained == {0: [], 1: share["tasks"][1:], 2: []}, trained
    assert same_files(run, before), "a finished task was trained again"
    assert set(done_counts(run).values()) == {1} and task_files(run) == task_files(reference)
    assert_same_results(run, reference)


def test_mpi_job_with_a_killed_rank_ends_then_rerun_completes(cluster, grid, reference, killed_rank):
    job, base = killed_rank
    run = base / "run"
    # rank 1 is SIGKILLed in its first task; srun --kill-on-bad-exit ends rank 0 and the job, long before the
    # job's 10 minutes (without it, rank 0 waits for rank 1 for ever)
    job, states, log = mpi_job(cluster, base, job, CONFIG=grid[1], RUN_DIR=run, LTHMPI_FAULT="kill:1:1")
    assert states == {job: "FAILED"}, f"{states}\n{job_logs(base, run)}"
    assert "2 ranks" in log and "task 1: Killed" in log, log[-3000:]
    assert len(task_files(run)) < N_TASKS

    before = mtimes(run)
    job, states, _ = mpi_job(cluster, base, CONFIG=grid[1], RUN_DIR=run)
    assert states == {job: "COMPLETED"}, f"{states}\n{job_logs(base, run)}"
    assert same_files(run, before), "a finished task was trained again"
    assert set(done_counts(run).values()) == {1} and task_files(run) == task_files(reference)
    assert_same_results(run, reference)
    from lthmpi.results import load

    assert load(str(run))["provenance"]["ranks"] == 2
    assert (base / "run-analysis").is_dir()


def test_time_limit_mid_task_then_the_same_submission_resumes(cluster, grid, reference, time_limited):
    job, base = time_limited
    run = base / "run"
    wait_for_log(run, "injected fault: waiting", cluster, [job], base, timeout=300)
    states = cluster.wait([job], base, timeout=300)
    log = (base / f"lthmpi-{job}.out").read_text()
    assert states == {job: "TIMEOUT"} and "DUE TO TIME LIMIT" in log, f"{states}\n{job_logs(base, run)}"
    done_before = task_files(run)
    assert 1 <= len(done_before) < N_TASKS, done_before

    before = mtimes(run)
    job = sbatch(cluster, "single_node.sbatch", [*SINGLE_ARGS, "--time=2"], base, SRUN_MPI="pmi2", CONFIG=grid[1],
                 RUN_DIR=run)  # the same submission, without the injected pause
    states = cluster.wait([job], base, timeout=300)
    assert states == {job: "COMPLETED"}, f"{states}\n{job_logs(base, run)}"
    assert same_files(run, before), "a finished task was trained again"
    assert set(done_counts(run).values()) == {1} and task_files(run) == task_files(reference)
    assert_same_results(run, reference)


def test_a_new_cluster_never_reuses_a_job_id_whose_killed_ranks_left_shared_memory(tmp_path_factory):
    """A 2-rank step SIGKILLed after MPI_Init leaves MPICH's /dev/shm/mpich_shm_* (named after the job step)
    behind; a new private cluster (a new directory, as each test session makes) that began job ids at 1 again
    gave a later step that very segment, and MPI_Init failed ("invalid bandwidth 0.00", "Out of memory"): twice
    in one CI run. Two clusters of their own, one after the other, so that the session's one keeps its jobs."""
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + os.pathsep + SBIN, LOCAL_CLUSTER_CPUS="2")

    def on_new_cluster(body: str) -> tuple[str, str]:
        """Start a cluster in a new directory, run `body` as a 2-rank srun step, stop it: (job id, its log)."""
        path = tmp_path_factory.mktemp("fresh")
        c = Cluster(path)
        script = path / "mpi.py"
        script.write_text("import os, signal\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n" + body)

        def cluster_cmd(verb):
            r = subprocess.run(["bash", str(LOCAL_CLUSTER), verb, str(path)], env=env, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, f"{verb}: {r.stderr}\n{c.daemon_logs()}"

        cluster_cmd("start")
        try:
            r = subprocess.run(["sbatch", "--parsable", "--wait", "-n", "2", "-o", str(path / "job-%j.out"), "--wrap",
                                f"srun --mpi=pmi2 --kill-on-bad-exit=1 {sys.executable} {script}"],
                               env=c.env(), capture_output=True, text=True, timeout=120)
        finally:
            cluster_cmd("stop")
        job = r.stdout.strip().split(";")[0]
        return job, (path / f"job-{job}.out").read_text(errors="replace") if job else r.stderr

    killed, _ = on_new_cluster("print(c.allreduce(1), flush=True)\nc.Barrier()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    job, log = on_new_cluster("print('sum', c.allreduce(1), flush=True)\n")
    assert log.count("sum 2") == 2, f"job {job} after job {killed}: {log}"
