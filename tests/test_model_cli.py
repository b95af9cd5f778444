"""The scaling-model CLI (`python -m lthmpi.analysis model`) on synthetic run directories with known task
durations: the profile read from results.h5, predicted wall times against hand-computed schedules, the
prediction error against measured runs (--check), the seed-study what-if, and one-line errors.

No training: run directories are written with lthmpi.store.RunDir and merged with lthmpi.results.merge.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lthmpi.analysis import load_runs
from lthmpi.analysis.__main__ import main as analysis_main
from lthmpi.analysis.scaling_cli import parse_ranks
from lthmpi.analysis.scaling_measured import profile_from_results
from lthmpi.config import from_dict
from lthmpi.results import merge
from lthmpi.store import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The known answer: 5 tasks of 4, 3, 3, 2, 2 s, each its own mask, one reset point, no controls.
# On 2 ranks LPT places 4 -> r0, 3 -> r1, 3 -> r1 (3 < 4), 2 -> r0 (4 < 6), 2 -> r0 (6 = 6, lowest rank):
# makespan 8 (the optimum is 7). Static deals masks 0, 2, 4 -> r0 (4 + 3 + 2 = 9), 1, 3 -> r1: 9.
# Dynamic hands out longest first to the first free rank: 8.
DURATIONS = [4.0, 3.0, 3.0, 2.0, 2.0]
PHASES = dict(startup=1.0, parent=2.0, masks=0.5, distribution=0.25, gather=0.25)
SERIAL = sum(PHASES.values())  # 4.0 s outside the training phase


def make_run(path, *, ranks=1, durations=DURATIONS, training=None, total=None, schedule="lpt", seed=0,
             rank_of=None, iterations=None, parent_seconds=2.0, phases=PHASES, workers=None, parent_dp=False,
             recorded_parent_dp=None):
    """A finished run: task i took durations[i] s (its `seconds` and end - start) and iterations
    (default 100 * durations[i]); tasks of one rank run back to back. Timing: PHASES, training (default:
    the busiest rank's sum) and total (default: the phases + training). The parent: 1000 iterations in
    parent_seconds (default 2 s, faster than the tasks' 0.01 s per iteration: no warm-up measured).
    parent_dp: parallel.parent_data_parallel in the config; recorded_parent_dp: the provenance's record."""
    iterations = iterations or [int(100 * d) for d in durations]
    remaining = [0.8 ** (i + 1) for i in range(len(durations))]
    cfg = from_dict({"seed": seed, "data": {"dataset": "digits"}, "train": {"iterations": 1000},
                     "prune": {"remaining": remaining}, "reset": {"points": ["0ep"], "controls": []},
                     "parallel": {"schedule": schedule, "parent_data_parallel": parent_dp}})
    run = RunDir(str(path))
    run.create(cfg)
    run.write_checkpoints({}, {}, {"epochs/test_accuracy": [0.5, 0.9]},
                          dict(test_accuracy=0.9, early_stop_accuracy=0.9, early_stop_iteration=800, iterations=1000,
                               seconds=parent_seconds, rank=0, host="h0"))
    t0 = 1_000_000.0
    rank_of = rank_of or (lambda i: 0)
    clock, ids = {}, []
    for i, secs in enumerate(durations):
        r = rank_of(i)
        start = clock.get(r, t0 + 10.0)
        clock[r] = start + secs
        tid = f"m{i:03d}_r00_ticket"
        run.write_task(tid, dict(task_id=tid, mask=i, remaining=remaining[i], target_remaining=remaining[i],
                                 reset="0ep", reset_iteration=0, control="", final_accuracy=0.9,
                                 early_stop_iteration=100, early_stop_accuracy=0.9, best_val_loss=0.3,
                                 iterations=iterations[i], diverged=False, seconds=secs, start_time=start,
                                 end_time=start + secs, rank=r, host="h0", threads=1),
                       {"evals": {"iteration": np.arange(3.0), "val_loss": np.ones(3)}})
        ids.append(tid)
    busy = {}
    for i, secs in enumerate(durations):
        busy[rank_of(i)] = busy.get(rank_of(i), 0.0) + secs
    training = max(busy.values()) if training is None else training
    total = sum(phases.values()) + training if total is None else total
    timing = dict(phases, training=training, total=total, start_time=t0)
    prov = dict(ranks=ranks, hosts=["h0"], threads_per_rank=1, mpi_library="none", git_commit="abc", schedule=schedule)
    if workers is not None:
        prov["workers"] = workers
    if recorded_parent_dp is not None:
        prov["parent_data_parallel"] = recorded_parent_dp
    merge(run, ids, timing, prov)
    return str(path)


def model(*args, capsys):
    """Run `python -m lthmpi.analysis model ARGS` in-process; (exit code, stdout, stderr)."""
    code = analysis_main(["model", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def p1(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("model") / "p1")


def test_profile_from_results(p1):
    (res,) = load_runs([p1])
    prof = profile_from_results(res)
    assert prof.task_durations == DURATIONS
    assert prof.task_costs == [400.0, 300.0, 300.0, 200.0, 200.0]
    assert prof.task_groups == [0, 1, 2, 3, 4]
    assert prof.ranks == 1 and prof.overhead_per_task == 0.0
    assert prof.phases == pytest.approx(PHASES)


def test_known_schedule_lpt_makespan_8(p1, capsys):
    code, out, err = model(p1, "--ranks", "1,2", "--json", capsys=capsys)
    assert code == 0, err
    rows = {(r["P"], r["scheduler"]): r for r in json.loads(out)["predictions"]}
    assert rows[(2, "lpt")]["makespan"] == pytest.approx(8.0)
    assert rows[(2, "static")]["makespan"] == pytest.approx(9.0)
    assert rows[(2, "dynamic")]["makespan"] == pytest.approx(8.0)
    assert rows[(1, "lpt")]["wall"] == pytest.approx(SERIAL + 14.0)
    assert rows[(2, "lpt")]["wall"] == pytest.approx(SERIAL + 8.0)  # 12 s
    assert rows[(2, "lpt")]["speedup"] == pytest.approx(18.0 / 12.0)
    assert rows[(2, "lpt")]["efficiency"] == pytest.approx(0.75)


def test_oversubscribed_cores(p1, capsys):
    # P = 2 on 1 core: every task and the startup take twice as long: 2 + 2 + 0.5 + 0.25 + 16 + 0.25 = 21
    code, out, err = model(p1, "--ranks", "2", "--schedulers", "lpt", "--cores", "1", "--json", capsys=capsys)
    assert code == 0, err
    (row,) = json.loads(out)["predictions"]
    assert row["wall"] == pytest.approx(21.0) and row["makespan"] == pytest.approx(16.0)


def test_overhead_per_task_from_the_training_phase(tmp_path, capsys):
    # training phase 15.0 for 14.0 s of task loops -> 0.2 s per task; at P = 2 LPT: 8 + 3 * 0.2 on rank 0
    run = make_run(tmp_path / "p1", training=15.0)
    (res,) = load_runs([run])
    assert profile_from_results(res).overhead_per_task == pytest.approx(0.2)
    code, out, err = model(run, "--ranks", "2", "--schedulers", "lpt", "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["predictions"][0]["makespan"] == pytest.approx(8.6)
    code, out, err = model(run, "--ranks", "2", "--schedulers", "lpt", "--overhead", "0", "--json", capsys=capsys)
    assert json.loads(out)["predictions"][0]["makespan"] == pytest.approx(8.0)


def test_no_warmup_is_added_unless_asked(p1, tmp_path, capsys):
    # ranks other than 0 compile while rank 0 trains the parent: a slow first task of rank 1 (8 s for 3 s of
    # work) is what the run measured and stays in the profile; --warmup S adds S for a what-if.
    run = make_run(tmp_path / "w2", ranks=2, durations=[4.0, 8.0, 3.0, 2.0, 2.0],
                   iterations=[400, 300, 300, 200, 200], rank_of=lambda i: [0, 1, 1, 0, 0][i])
    (res,) = load_runs([run])
    assert profile_from_results(res).task_durations == [4.0, 8.0, 3.0, 2.0, 2.0]
    code, out, err = model(p1, "--ranks", "1,2", "--schedulers", "lpt", "--json", capsys=capsys)
    assert code == 0, err
    rows = {r["P"]: r for r in json.loads(out)["predictions"]}
    assert rows[2]["warmup"] == 0.0 and rows[2]["makespan"] == pytest.approx(8.0)
    code, out, err = model(p1, "--ranks", "1,2", "--schedulers", "lpt", "--cores", "1", "--warmup", "5",
                           "--json", capsys=capsys)
    rows = {r["P"]: r for r in json.loads(out)["predictions"]}
    assert rows[1]["wall"] == pytest.approx(SERIAL + 14.0) and rows[1]["warmup"] == 0.0
    assert rows[2]["warmup"] == pytest.approx(10.0)  # twice as long on a shared core
    assert rows[2]["wall"] == pytest.approx(21.0 + 10.0)
    assert rows[2]["speedup"] == pytest.approx(18.0 / 31.0)
    code, out, err = model(p1, "--warmup", "-1", capsys=capsys)
    assert code == 2 and "--warmup must be >= 0 seconds" in err


def test_check_prints_the_error(p1, tmp_path, capsys):
    # measured at P = 2 with LPT: 13.2 s in all (training 9.2), the model says 12 (training 8)
    on2 = make_run(tmp_path / "p2", ranks=2, training=9.2, rank_of=lambda i: [0, 1, 1, 0, 0][i])
    code, out, err = model(p1, "--ranks", "1,2,4", "--check", on2, capsys=capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(on2))
    cells = line.split()
    assert cells[1:3] == ["2", "lpt"]
    assert cells[3:6] == ["13.20", "12.00", f"{100 * (12 - 13.2) / 13.2:+.1f}%"]  # -9.1%
    assert cells[8] == f"{100 * (8 - 9.2) / 9.2:+.1f}%"
    assert "mean |error| 9.1%" in out
    code, out, err = model(p1, "--check", on2, "--json", capsys=capsys)
    (row,) = json.loads(out)["check"]
    assert row["predicted"] == pytest.approx(12.0) and row["error_pct"] == pytest.approx(100 * (12 - 13.2) / 13.2)


def test_check_uses_the_runs_scheduler(p1, tmp_path, capsys):
    on2 = make_run(tmp_path / "p2s", ranks=2, schedule="static", rank_of=lambda i: i % 2)
    code, out, err = model(p1, "--check", on2, "--json", capsys=capsys)
    assert code == 0, err
    (row,) = json.loads(out)["check"]
    assert row["scheduler"] == "static" and row["predicted_training"] == pytest.approx(9.0)
    assert row["error_pct"] == pytest.approx(0.0)  # the synthetic measurement is the schedule itself


def test_calibrate_fits_growth_with_p(p1, tmp_path, capsys):
    # measured at P = 2: every task 10% slower per iteration, start-up 2 s instead of 1, the parent 3 s
    # instead of 2. The model: tasks x (1 + 0.1 log2 P), startup 1 + log2 P, parent 2 + log2 P; at P = 4
    # LPT puts 4 | 3 | 3 | 2 + 2 on the ranks: makespan 4 x 1.2; wall 3 + 4 + 0.5 + 0.25 + 4.8 + 0.25 = 12.8
    on2 = make_run(tmp_path / "c2", ranks=2, durations=[1.1 * d for d in DURATIONS], iterations=[400, 300, 300, 200, 200],
                   rank_of=lambda i: [0, 1, 1, 0, 0][i], phases=dict(PHASES, startup=2.0, parent=3.0))
    code, out, err = model(p1, "--ranks", "1,4", "--schedulers", "lpt", "--calibrate", on2, "--json", capsys=capsys)
    assert code == 0, err
    got = json.loads(out)
    cal = got["calibration"]
    assert cal["ranks"] == [2] and cal["task_time_ratio"] == [pytest.approx(1.1)]
    assert cal["fits"]["startup"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    rows = {r["P"]: r for r in got["predictions"]}
    assert rows[4]["phases"]["startup"] == pytest.approx(3.0) and rows[4]["phases"]["parent"] == pytest.approx(4.0)
    assert rows[4]["makespan"] == pytest.approx(4.8) and rows[4]["wall"] == pytest.approx(12.8)
    assert rows[1]["wall"] == pytest.approx(SERIAL + 14.0)  # P = 1 is the profiled run itself
    code, out, err = model(p1, "--ranks", "4", "--calibrate", on2, capsys=capsys)
    assert code == 0 and "calibrated on 1 run(s) at P = 2: seconds per iteration 1.100 at P = 2" in out
    # without calibration the same run is predicted from P = 1 values alone: 4 + 4 = 8 s
    code, out, err = model(p1, "--ranks", "4", "--schedulers", "lpt", "--json", capsys=capsys)
    assert json.loads(out)["calibration"] is None and json.loads(out)["predictions"][0]["wall"] == pytest.approx(8.0)


def test_calibrate_refuses_other_work_and_check_overlap(p1, tmp_path, capsys):
    other = make_run(tmp_path / "other", seed=1, ranks=2)
    code, out, err = model(p1, "--calibrate", other, capsys=capsys)
    assert code == 2 and "--calibrate" in err and "is not the same work" in err and err.count("\n") == 1
    on2 = make_run(tmp_path / "c2", ranks=2, rank_of=lambda i: [0, 1, 1, 0, 0][i])
    code, out, err = model(p1, "--calibrate", on2, "--check", on2 + "/results.h5", capsys=capsys)
    assert code == 2 and out == "" and "both --calibrate and --check" in err and err.count("\n") == 1
    code, out, err = model("--seed-study", "--calibrate", on2, capsys=capsys)
    assert code == 2 and "--calibrate needs the measured RUN_DIR" in err
    # subgroups: a task's seconds are a data-parallel group's, not one rank's under contention
    dp = make_run(tmp_path / "dp4", ranks=4, workers=2, rank_of=lambda i: [0, 2, 2, 0, 0][i])
    code, out, err = model(p1, "--calibrate", dp, capsys=capsys)
    assert code == 2 and "trained in data-parallel subgroups (2 of 4 ranks led one)" in err and err.count("\n") == 1


def test_seed_study(capsys):
    code, out, err = model("--seed-study", "--json", capsys=capsys)
    assert code == 0, err
    ss = json.loads(out)["seed_study"]
    rows = {(r["P"], r["scheduler"]): r for r in ss["rows"]}
    epoch = 4.5 * 60
    parent = 350 * epoch
    one_mask = sum(350 - k for k in (5, 10, 20, 30, 40)) * epoch  # 1645 epochs
    assert ss["case"]["tasks"] == 100
    for s in ("static", "lpt", "dynamic"):
        assert rows[(20, s)]["wall"] == pytest.approx(parent + one_mask)
    assert rows[(100, "static")]["wall"] == pytest.approx(parent + one_mask)  # whole masks: 80 ranks idle
    assert rows[(100, "static")]["idle"] == 80
    assert rows[(100, "lpt")]["wall"] == pytest.approx(parent + 345 * epoch)  # one task per rank
    code, out, err = model("--seed-study", capsys=capsys)
    assert code == 0 and "seed study" in out and "52.12" in out and "149.62" in out


def test_parse_ranks():
    assert parse_ranks("1,2,4,...,1000") == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert parse_ranks("1,2,...,8") == [1, 2, 4, 8]
    assert parse_ranks("3, 1, 2") == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    ([], "give the measured RUN_DIR"),
    (["/nonexistent/run"], "no such run directory"),
    (["{p1}", "--ranks", "0,2"], "every P must be an integer >= 1"),
    (["{p1}", "--ranks", "a,b"], "give integers"),
    (["{p1}", "--schedulers", "fifo"], "unknown scheduler fifo"),
    (["{p1}", "--cores", "0"], "--cores must be >= 1"),
])
def test_errors_are_one_line(p1, capsys, args, message):
    code, out, err = model(*[a.format(p1=p1) for a in args], capsys=capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lthmpi.analysis model: error: ") and message in err


def test_check_refuses_other_work(p1, tmp_path, capsys):
    other = make_run(tmp_path / "other", seed=1, ranks=2)
    code, out, err = model(p1, "--check", other, capsys=capsys)
    assert code == 2 and "is not the same work" in err and err.count("\n") == 1


def test_cli_subprocess(p1):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "lthmpi.analysis", "model", p1, "--ranks", "1,2"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "predicted" in r.stdout and "lpt" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lthmpi.analysis", "model", "--help"], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0 and "--seed-study" in r.stdout


# -- the parent trained data-parallel (issue 33) ------------------------------------------------------------
def test_parent_time_is_one_rank_time_over_p_e():
    from lthmpi.analysis.scaling_model import RunProfile, parent_time

    assert parent_time(10.0, 4, 0.5) == pytest.approx(5.0)
    assert parent_time(10.0, 1, 0.5) == 10.0  # one rank: nothing to share
    assert parent_time(10.0, 4, None) == 10.0  # on rank 0
    with pytest.raises(ValueError, match="parent_efficiency must lie in"):
        RunProfile([1.0], [1.0], {}, parent_efficiency=1.5)


def test_parent_efficiency_predictions(p1, capsys):
    # parent 2 s on one rank; at e = 0.8 it takes 2 / (P 0.8): 1.25 s at P = 2, 0.625 s at P = 4.
    # P = 2: 1 + 1.25 + 0.5 + 0.25 + 8 + 0.25 = 11.25 s, S = 18 / 11.25 = 1.6; P = 4 (LPT 4 | 3 | 3 | 2 + 2): 6.625 s
    code, out, err = model(p1, "--ranks", "1,2,4", "--schedulers", "lpt", "--parent-efficiency", "0.8", "--json",
                           capsys=capsys)
    assert code == 0, err
    got = json.loads(out)
    one = {r["P"]: r for r in got["predictions"]}
    dp = {r["P"]: r for r in got["predictions_parent_dp"]}
    assert one[2]["wall"] == pytest.approx(12.0) and one[2]["phases"]["parent"] == pytest.approx(2.0)
    assert dp[1]["wall"] == pytest.approx(18.0)
    assert dp[2]["phases"]["parent"] == pytest.approx(1.25) and dp[2]["wall"] == pytest.approx(11.25)
    assert dp[2]["speedup"] == pytest.approx(1.6) and dp[2]["efficiency"] == pytest.approx(0.8)
    assert dp[4]["phases"]["parent"] == pytest.approx(0.625) and dp[4]["wall"] == pytest.approx(6.625)
    assert got["parent_efficiency"] == 0.8 and "given" in got["parent_efficiency_source"]
    code, out, err = model(p1, "--ranks", "2", "--parent-efficiency", "0.8", capsys=capsys)
    assert code == 0 and "parent data-parallel over all P ranks at efficiency 0.8 (given (--parent-efficiency))" in out
    code, out, err = model(p1, "--ranks", "2", "--json", capsys=capsys)
    assert json.loads(out)["predictions_parent_dp"] is None  # not asked, not measured: the parent stays on rank 0


def test_seed_study_with_the_parent_data_parallel(capsys):
    epoch = 4.5 * 60
    parent = 350 * epoch
    one_mask = sum(350 - k for k in (5, 10, 20, 30, 40)) * epoch
    t1 = parent + 20 * one_mask
    code, out, err = model("--seed-study", "--json", capsys=capsys)
    assert code == 0, err
    ss = json.loads(out)["seed_study"]
    assert ss["case"]["parent_efficiency"] == 0.9 and ss["case"]["parent_efficiency_source"].startswith("assumed")
    one = {(r["P"], r["scheduler"]): r for r in ss["rows"]}
    dp = {(r["P"], r["scheduler"]): r for r in ss["rows_parent_dp"]}
    assert one[(20, "lpt")]["efficiency"] == pytest.approx(t1 / (parent + one_mask) / 20)  # 0.833
    assert dp[(20, "lpt")]["wall"] == pytest.approx(parent / (20 * 0.9) + one_mask)
    assert dp[(20, "lpt")]["efficiency"] == pytest.approx(t1 / (parent / 18 + one_mask) / 20)
    assert dp[(20, "lpt")]["efficiency"] >= 0.95
    # the lowest e with E(20) >= 0.95: parent / (20 (T1 / (20 0.95) - one_mask)) = 1/6
    assert ss["parent_efficiency_needed"]["20"] == pytest.approx(parent / (20 * (t1 / 19 - one_mask)))
    imp = json.loads(out)["seed_study_imp"]
    chain = 20 * 345 * epoch  # the critical path: 20 levels at k = 5, one after another
    flat = {r["P"]: r for r in imp["rows_parent_dp"]["no subgroups"] if r["scheduler"] == "lpt"}
    assert flat[20]["wall"] == pytest.approx(parent / 18 + chain)
    assert imp["parent_efficiency_needed"]["no subgroups"]["20"] is None  # 15 ranks idle whatever the parent does
    code, out, err = model("--seed-study", capsys=capsys)
    assert code == 0
    assert "parent efficiency e = 0.9: assumed, not measured" in out
    summary = next(ln for ln in out.splitlines() if ln.split()[:2] == ["20", "16.67"])
    assert summary.split() == ["20", "16.67", "0.833", "19.98", "0.999", "0.167"]


def test_seed_study_given_parent_efficiency(capsys):
    epoch = 4.5 * 60
    parent, one_mask = 350 * epoch, 1645 * epoch
    code, out, err = model("--seed-study", "--parent-efficiency", "0.25", "--schedulers", "lpt", "--json", capsys=capsys)
    assert code == 0, err
    ss = json.loads(out)["seed_study"]
    assert ss["case"]["parent_efficiency_source"] == "given (--parent-efficiency)"
    (row,) = [r for r in ss["rows_parent_dp"] if r["P"] == 20]
    assert row["phases"]["parent"] == pytest.approx(parent / 5) and row["wall"] == pytest.approx(parent / 5 + one_mask)


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2", "nan"])
def test_parent_efficiency_out_of_range(value, capsys):
    code, out, err = model("--seed-study", "--parent-efficiency", value, capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("lthmpi.analysis model: error: --parent-efficiency must lie in (0, 1]")


def test_check_prices_a_data_parallel_parent(p1, tmp_path, capsys):
    # measured at P = 2 with the parent data-parallel: 1.0 s against 2.0 on one rank, i.e. e = 2 / (2 x 1.0) = 1.0;
    # the model at e = 0.8 says 2 / 1.6 = 1.25 s: +25%
    on2 = make_run(tmp_path / "dp2", ranks=2, parent_dp=True, rank_of=lambda i: [0, 1, 1, 0, 0][i],
                   phases=dict(PHASES, parent=1.0))
    code, out, err = model(p1, "--check", on2, "--parent-efficiency", "0.8", "--json", capsys=capsys)
    assert code == 0, err
    (row,) = json.loads(out)["check"]
    assert row["parent_data_parallel"] is True and row["parent_efficiency"] == 0.8
    assert row["predicted_parent"] == pytest.approx(1.25) and row["measured_parent"] == pytest.approx(1.0)
    assert row["parent_error_pct"] == pytest.approx(25.0)
    assert row["measured_parent_efficiency"] == pytest.approx(1.0)
    assert row["predicted"] == pytest.approx(12.0 - 2.0 + 1.25)
    code, out, err = model(p1, "--check", on2, "--parent-efficiency", "0.8", capsys=capsys)
    assert "parent data-parallel over 2 ranks, measured efficiency 1.000 (the model used 0.8)" in out
    assert "+25.0%" in next(ln for ln in out.splitlines() if ln.strip().startswith(on2))
    code, out, err = model(p1, "--check", on2, capsys=capsys)  # no efficiency to predict it with
    assert code == 2 and "trained its parent data-parallel: give --parent-efficiency" in err and err.count("\n") == 1
    # a run on rank 0 is checked as before, its parent against the one-rank time
    rank0 = make_run(tmp_path / "r2", ranks=2, rank_of=lambda i: [0, 1, 1, 0, 0][i])
    code, out, err = model(p1, "--check", rank0, "--parent-efficiency", "0.8", "--json", capsys=capsys)
    (row,) = json.loads(out)["check"]
    assert row["parent_data_parallel"] is False and row["predicted_parent"] == pytest.approx(2.0)


def test_calibrate_measures_the_parent_efficiency(p1, tmp_path, capsys):
    # a P = 2 run whose parent was data-parallel took 1.25 s for the one-rank 2.0 s: e = 2 / (2 x 1.25) = 0.8,
    # measured; the P = 4 prediction with the parent data-parallel then uses it: 2 / (4 x 0.8) = 0.625 s
    on2 = make_run(tmp_path / "dp2", ranks=2, parent_dp=True, rank_of=lambda i: [0, 1, 1, 0, 0][i],
                   phases=dict(PHASES, parent=1.25))
    code, out, err = model(p1, "--calibrate", on2, "--ranks", "4", "--schedulers", "lpt", "--json", capsys=capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["calibration"]["parent_efficiency_measured"] == [{"P": 2, "efficiency": pytest.approx(0.8)}]
    assert got["calibration"]["fits"]["parent"] == {"a": pytest.approx(2.0), "b": 0.0}  # not a one-rank parent time
    assert got["parent_efficiency"] == pytest.approx(0.8) and got["parent_efficiency_source"].startswith("measured")
    (row,) = got["predictions_parent_dp"]
    assert row["phases"]["parent"] == pytest.approx(0.625)
    code, out, err = model(p1, "--calibrate", on2, "--ranks", "4", capsys=capsys)
    assert "parent data-parallel at P = 2: efficiency 0.800 (measured)" in out


def test_profile_of_a_data_parallel_parent_is_refused(tmp_path, capsys):
    dp = make_run(tmp_path / "dp2", ranks=2, parent_dp=True, rank_of=lambda i: i % 2)
    code, out, err = model(dp, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "trained its parent data-parallel over 2 ranks" in err
    # the provenance's record of what the run did wins over the config (`auto` resolves at run time)
    rec = make_run(tmp_path / "rec2", ranks=2, parent_dp=False, recorded_parent_dp=True, rank_of=lambda i: i % 2)
    code, out, err = model(rec, capsys=capsys)
    assert code == 2 and "trained its parent data-parallel" in err
    one = make_run(tmp_path / "one", ranks=1, parent_dp=True)  # one rank: nothing to share
    code, out, err = model(one, "--ranks", "2", capsys=capsys)
    assert code == 0, err
