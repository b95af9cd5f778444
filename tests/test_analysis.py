"""Tests of the analysis (lthmpi/analysis): science tables against hand-computed values on a designed grid,
scaling figures of merit, timeline imbalance, valid non-blank PNGs, the CLI's --json/--csv and its errors.

No training: fake run directories are written with lthmpi.store.RunDir and merged with
lthmpi.results.merge, so the results layout used here is the project's own and cannot drift.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lthmpi.analysis import load_runs, scaling, science, summaries, write_csv
from lthmpi.analysis.report import analyse
from lthmpi.config import from_dict
from lthmpi.results import TASK_COLUMNS, merge
from lthmpi.store import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
RESETS = ["0ep", "500it"]
CONTROLS = ["random_reinit", "random_mask"]
REMAINING = [0.5, 0.2, 0.1, 0.05]
DENSE_ES, DENSE_FINAL = 0.90, 0.905

# Designed early-stop accuracies of the tickets: (mask, reset) -> accuracy. With tolerance 0.005 the
# threshold is 0.895: for k=0ep masks 0, 1 qualify (mask 2 misses by 0.001) -> mask 1 (20 %);
# for k=500it masks 0 and 2 qualify (mask 1 does not) -> mask 2 (10 %), the sparsest, not the first gap.
TICKET = {(0, "0ep"): 0.91, (1, "0ep"): 0.90, (2, "0ep"): 0.894, (3, "0ep"): 0.85,
          (0, "500it"): 0.905, (1, "500it"): 0.89, (2, "500it"): 0.896, (3, "500it"): 0.80}
REINIT = {(1, "0ep"): 0.88, (2, "500it"): 0.86}
RANDMASK = {(1, "0ep"): 0.87, (2, "500it"): 0.90}
OTHER_CONTROL = 0.70


def accuracy(mask, reset, control):
    if control is None:
        return TICKET[(mask, reset)]
    return {"random_reinit": REINIT, "random_mask": RANDMASK}[control].get((mask, reset), OTHER_CONTROL)


def evals_at(val_accuracy: float) -> dict:
    """Validation curves whose lowest loss (the early stop, at the 2nd of 4 evals, tied with the 4th: the first
    counts) is where the validation accuracy is `val_accuracy`."""
    return {"iteration": np.arange(4.0), "val_loss": np.array([0.5, 0.3, 0.4, 0.3]),
            "val_accuracy": np.array([val_accuracy - 0.1, val_accuracy, val_accuracy + 0.05, val_accuracy + 0.02])}


def make_run(path, *, seed=0, ranks=1, total=100.0, acc=accuracy, durations=None, masks=REMAINING,
             parent_iterations=1000, workers=None, prov_extra=None, val=None, dense=(DENSE_ES, DENSE_FINAL, None)):
    """A finished run directory: config, parent attrs, one task file per retraining, merged results.h5.

    durations(i, task) -> (rank, seconds[, start relative to launch]); by default tasks on one rank run
    back to back from launch + 10 s. val(mask, reset, control): each retraining's validation accuracy at early
    stop (None: no validation accuracy in the curves); dense: the parent's early-stop and final test accuracy
    and its validation accuracy at early stop.
    """
    dense_es, dense_final, dense_val = dense
    cfg = from_dict({"seed": seed, "data": {"dataset": "digits"},
                     "train": {"iterations": parent_iterations, "eval_every": "10it"},
                     "prune": {"remaining": list(masks)}, "reset": {"points": RESETS, "controls": CONTROLS}})
    run = RunDir(str(path))
    run.create(cfg)
    history = {"epochs/test_accuracy": [0.5, dense_final]}
    if dense_val is not None:
        history.update({f"evals/{k}": v for k, v in evals_at(dense_val).items()})
    run.write_checkpoints({}, {}, history,
                          dict(test_accuracy=dense_final, early_stop_accuracy=dense_es, early_stop_iteration=800,
                               iterations=parent_iterations, seconds=5.0, rank=0, host="h0"))
    t0 = 1_000_000.0
    clock = {}
    ids = []
    i = 0
    for m, rem in enumerate(masks):
        for r, point in enumerate(RESETS):
            for c in [None, *CONTROLS]:
                rank, secs, *at = durations(i, (m, point, c)) if durations else (0, 1.0)
                if at:
                    start = t0 + at[0]
                else:
                    start = clock.get(rank, t0 + 10.0)
                    clock[rank] = start + secs
                tid = f"m{m:03d}_r{r:02d}_{c or 'ticket'}"
                a = acc(m % len(REMAINING), point, c)
                k = 0 if point == "0ep" else 500
                run.write_task(tid, dict(task_id=tid, mask=m, remaining=rem, target_remaining=rem, reset=point,
                                         reset_iteration=k, control=c or "", final_accuracy=a + 0.001,
                                         early_stop_iteration=100 * (m + 1) + r, early_stop_accuracy=a,
                                         best_val_loss=0.3, iterations=parent_iterations - k, diverged=False,
                                         seconds=secs, start_time=start, end_time=start + secs, rank=rank,
                                         host="h0", threads=1),
                               {"evals": {"iteration": np.arange(3.0), "val_loss": np.ones(3)} if val is None
                                else evals_at(val(m % len(REMAINING), point, c))})
                ids.append(tid)
                i += 1
    timing = dict(startup=2.0, parent=5.0, masks=0.5, distribution=0.1, training=total - 8.0, gather=0.1,
                  total=total, start_time=t0)
    prov = dict(ranks=ranks, hosts=["h0"], threads_per_rank=1, mpi_library="none", git_commit="abc123")
    if workers is not None:
        prov["workers"] = workers
    prov.update(prov_extra or {})
    merge(run, ids, timing, prov)
    return str(path)


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "lthmpi.analysis", *map(str, args)], capture_output=True, text=True,
                          cwd=str(cwd), env=env, timeout=60)


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG, path
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"
    grey = np.round(img[::2, ::2, :3].mean(axis=-1) * 255).astype(np.uint8)
    assert np.bincount(grey.ravel(), minlength=256).astype(bool).sum() > 10, f"{path} has almost no content"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "grid")


@pytest.fixture(scope="module")
def second_seed(tmp_path_factory):
    """A replicate of one_run (seed 0): seed 1, every accuracy 0.02 lower. Read it, never write to it."""
    return make_run(tmp_path_factory.mktemp("runs") / "s1", seed=1, acc=lambda m, r, c: accuracy(m, r, c) - 0.02)


# -- science ---------------------------------------------------------------------------------------------
def test_grid_reads_the_layout(one_run):
    (res,) = load_runs([one_run])
    g = science.build_grid([res])
    assert g.resets == RESETS and g.controls == CONTROLS and g.masks == [0, 1, 2, 3]
    assert [g.remaining[m] for m in g.masks] == REMAINING
    assert g.mean("early_stop_accuracy", 2, "500it") == pytest.approx(0.896)
    assert g.mean("final_accuracy", 2, "500it") == pytest.approx(0.897)
    assert g.mean("early_stop_accuracy", 1, "0ep", "random_mask") == pytest.approx(0.87)
    assert g.dense_value("early_stop_accuracy") == DENSE_ES and g.dense_value("final_accuracy") == DENSE_FINAL
    assert g.label("500it") == "k=500it"


def test_winning_tickets_hand_computed(one_run):
    g = science.build_grid(load_runs([one_run]))
    w = {row["reset"]: row for row in science.winning_tickets(g, 0.005)}
    assert w["0ep"]["mask"] == 1 and w["0ep"]["remaining"] == 0.2 and w["0ep"]["accuracy"] == pytest.approx(0.90)
    assert w["0ep"]["margin"]["random_reinit"] == pytest.approx(0.02)
    assert w["0ep"]["margin"]["random_mask"] == pytest.approx(0.03)
    assert w["500it"]["mask"] == 2 and w["500it"]["remaining"] == 0.1 and w["500it"]["accuracy"] == pytest.approx(0.896)
    assert w["500it"]["margin"]["random_reinit"] == pytest.approx(0.036)
    assert w["500it"]["margin"]["random_mask"] == pytest.approx(-0.004)
    # tolerance 0: equality still qualifies (0.90 >= 0.90); 0.896 no longer does
    w0 = {row["reset"]: row["mask"] for row in science.winning_tickets(g, 0.0)}
    assert w0 == {"0ep": 1, "500it": 0}
    # a tolerance nothing meets: no ticket, margins None
    g.dense["early_stop_accuracy"] = np.array([0.99])
    assert all(row["mask"] is None and row["margin"]["random_mask"] is None for row in science.winning_tickets(g, 0.0))


def test_best_reset_per_sparsity(one_run):
    g = science.build_grid(load_runs([one_run]))
    best = {b["mask"]: (b["label"], b["lead"]) for b in science.best_reset(g)}
    assert best[0][0] == "k=0ep" and best[0][1] == pytest.approx(0.005)
    assert best[1][0] == "k=0ep" and best[1][1] == pytest.approx(0.01)
    assert best[2][0] == "k=500it" and best[2][1] == pytest.approx(0.002)
    assert best[3][0] == "k=0ep" and best[3][1] == pytest.approx(0.05)


def test_text_and_markdown_tables(one_run):
    g = science.build_grid(load_runs([one_run]))
    t = science.tables(g, 0.005)
    text = "\n".join(t.values())
    assert "k=0ep" in text and "k=500it" in text and "+3.60" in text and "-0.40" in text
    md = "\n".join(science.tables(g, 0.005, markdown=True).values())
    # these results hold no validation curves: selected on test accuracy, and the titles say so
    assert "| reset | sparsest mask |" in md and "| k=500it | 2 | 10.00 | - | 89.60 | - | 90.00 | +3.60 | -0.40 |" in md
    assert all("selected on TEST accuracy: these results hold no validation accuracy" in title for title in t
               if title.startswith(("Winning", "Best")))


def test_replicates_pool_by_seed(one_run, second_seed, tmp_path):
    c = make_run(tmp_path / "s0_p4", seed=0, ranks=4, total=31.0)  # one_run's seed: not a replicate
    res = load_runs([one_run, second_seed, c])
    groups = science.science_groups(res)
    assert groups == [[0, 1]]
    g = science.build_grid([res[i] for i in groups[0]])
    assert g.seeds == [0, 1]
    assert g.mean("early_stop_accuracy", 0, "0ep") == pytest.approx(0.90)
    assert g.spread("early_stop_accuracy", 0, "0ep") == pytest.approx((0.89, 0.91))
    done = analyse(res, str(tmp_path / "out"), 0.005)
    for f in done["files"]:
        if f.endswith(".png"):
            assert_png(f)
    assert "mean of 2 seeds" in done["text"]


def test_a_run_from_before_a_key_existed_pools_with_one_that_writes_its_default(one_run, second_seed):
    """A results file lists the config keys of the version that wrote it: IMP seed 0 of
    analysis/stability_seeds (made before prune.criterion existed) was a group of its own beside seeds 1 and 2."""
    res = load_runs([one_run, second_seed])  # loaded afresh: the edits below stay in this test
    assert res[1]["config"]["prune"]["criterion"] == "magnitude"
    del res[0]["config"]["prune"]["criterion"]
    assert science.science_groups(res) == [[0, 1]]
    res[1]["config"]["prune"]["criterion"] = "snip"  # another experiment, not a replicate
    assert science.science_groups(res) == [[0], [1]]


# Validation accuracies at early stop, designed against TICKET's test accuracies: on validation (dense 0.91,
# threshold 0.905 at tolerance 0.005) k=0ep's sparsest qualifying mask is 2 (on test it is mask 1: 2 misses by
# 0.001), and mask 0's best reset point is 500it (on test it is 0ep, 0.91 against 0.905).
VAL = {(0, "0ep"): 0.915, (1, "0ep"): 0.92, (2, "0ep"): 0.906, (3, "0ep"): 0.86,
       (0, "500it"): 0.925, (1, "500it"): 0.88, (2, "500it"): 0.89, (3, "500it"): 0.87}
DENSE_VAL = 0.91


def val_accuracy(mask, reset, control):
    return VAL[(mask, reset)] if control is None else 0.5


def test_early_stop_validation_accuracy_is_read_where_the_validation_loss_is_lowest(tmp_path):
    from lthmpi.results import early_stop_val_accuracy

    assert early_stop_val_accuracy(evals_at(0.8)) == pytest.approx(0.8)  # the first of two equal minima
    assert early_stop_val_accuracy({"val_loss": np.array([np.nan, 0.2]), "val_accuracy": np.array([0.9, 0.7])}) == 0.7
    assert math.isnan(early_stop_val_accuracy({"val_loss": np.ones(3)}))  # no validation accuracy recorded
    (res,) = load_runs([make_run(tmp_path / "v", val=val_accuracy, dense=(DENSE_ES, DENSE_FINAL, DENSE_VAL))])
    t = next(t for t in res["tasks"] if t["task_id"] == "m002_r00_ticket")
    assert t["early_stop_val_accuracy"] == pytest.approx(0.906) and t["early_stop_accuracy"] == pytest.approx(0.894)
    assert res["parent"]["early_stop_val_accuracy"] == pytest.approx(DENSE_VAL)


def test_winning_tickets_and_best_reset_are_selected_on_validation_not_test(tmp_path):
    run = make_run(tmp_path / "v", val=val_accuracy, dense=(DENSE_ES, DENSE_FINAL, DENSE_VAL))
    g = science.build_grid(load_runs([run]))
    w = {row["reset"]: row for row in science.winning_tickets(g, 0.005)}
    assert w["0ep"]["mask"] == 2  # best on validation; on test accuracy mask 1 would win
    assert g.selected_on == science.VAL
    assert w["0ep"]["selected"].mean == pytest.approx(0.906) and w["0ep"]["accuracy"] == pytest.approx(0.894)
    assert w["0ep"]["margin"]["random_reinit"] == pytest.approx(0.894 - 0.70)  # margins stay on test accuracy
    assert w["500it"]["mask"] == 0  # 0.925 qualifies; masks 1 and 2 do not on validation
    best = {b["mask"]: b for b in science.best_reset(g)}
    assert best[0]["reset"] == "500it" and best[0]["lead"] == pytest.approx(0.01)
    assert best[0]["accuracy"] == pytest.approx(0.905)  # its test accuracy, reported beside it
    md = science.tables(g, 0.005, markdown=True)
    title = next(t for t in md if t.startswith("Winning"))
    assert "early-stop validation accuracy" in title and "selected on validation accuracy, test beside it" in title
    assert "| k=0ep | 2 | 10.00 | 90.60 | 89.40 | 91.00 | 90.00 | +19.40 |" in md[title]


def seed_runs(tmp_path, offsets):
    """One run per seed, every accuracy shifted by its seed's offset."""
    return load_runs([make_run(tmp_path / f"s{s}", seed=s, acc=lambda m, r, c, d=d: accuracy(m, r, c) + d,
                               val=lambda m, r, c, d=d: val_accuracy(m, r, c) + d,
                               dense=(DENSE_ES + d, DENSE_FINAL + d, DENSE_VAL + d))
                      for s, d in enumerate(offsets)])


FIVE_OFFSETS = [-0.02, -0.01, 0.0, 0.01, 0.02]


@pytest.fixture(scope="module")
def five_seeds(tmp_path_factory):
    """Seeds 0-4, shifted by FIVE_OFFSETS, loaded once (the analysis only reads them: build_grid, tables and
    analyse leave the loaded results as they were)."""
    return seed_runs(tmp_path_factory.mktemp("seeds"), FIVE_OFFSETS)


def test_fewer_than_five_seeds_show_mean_and_min_max(five_seeds):
    g = science.build_grid([five_seeds[1], five_seeds[2], five_seeds[4]])  # offsets -0.01, 0.0, 0.02
    assert g.seeds == [1, 2, 4]
    e = g.estimate("early_stop_accuracy", 2, "500it")
    assert (e.mean, e.lo, e.hi, e.n) == pytest.approx((0.896 + 0.01 / 3, 0.886, 0.916, 3))
    assert g.spread("early_stop_accuracy", 2, "500it") == pytest.approx((0.886, 0.916))  # the figures' band
    assert g.dense_spread("early_stop_accuracy") == pytest.approx((0.89, 0.92))
    tables = science.tables(g, 0.005)
    title = next(t for t in tables if t.startswith("Test accuracy at early stop"))
    assert "mean of 3 seeds [min, max]: fewer than 5 seeds, no t-interval" in title
    assert "89.93 [88.60, 91.60]" in tables[title]
    w = {row["reset"]: row for row in science.winning_tickets(g, 0.005)}
    assert w["0ep"]["mask"] == 2 and (w["0ep"]["test"].lo, w["0ep"]["test"].hi) == pytest.approx((0.884, 0.914))


def test_five_seeds_show_mean_and_95_percent_t_interval(five_seeds, tmp_path):
    offsets = FIVE_OFFSETS
    g = science.build_grid(five_seeds)
    half = 2.7764 * np.std(offsets, ddof=1) / math.sqrt(5)  # t(0.975, 4 degrees of freedom) = 2.7764
    assert g.spread("early_stop_accuracy", 1, "0ep") == pytest.approx((0.90 - half, 0.90 + half), rel=1e-4)  # band
    e = g.estimate("early_stop_accuracy", 1, "0ep")
    assert e.mean == pytest.approx(0.90) and e.hi - e.mean == pytest.approx(half, rel=1e-4)
    assert e.mean - e.lo == pytest.approx(half, rel=1e-4) and e.n == 5
    tables = science.tables(g, 0.005)
    title = next(t for t in tables if t.startswith("Test accuracy at early stop"))
    assert "mean of 5 seeds ± 95% t-interval" in title and f"90.00 ± {100 * half:.2f}" in tables[title]
    done = analyse(five_seeds, str(tmp_path / "out"), 0.005)
    assert "95% t-interval" in done["text"]
    for f in done["files"]:
        if f.endswith(".png"):
            assert_png(f)


# -- scaling ---------------------------------------------------------------------------------------------
def test_scaling_laws_by_hand():
    s = scaling.speedup(100.0, 31.0)
    assert s == pytest.approx(3.2258, abs=1e-4)
    assert scaling.efficiency(s, 4) == pytest.approx(0.8065, abs=1e-4)
    assert scaling.karp_flatt(s, 4) == pytest.approx(0.08, abs=1e-9)
    f, t1 = scaling.amdahl_fit([1, 4], [100.0, 31.0])
    assert f == pytest.approx(0.08) and t1 == pytest.approx(100.0)
    # exact Amdahl data at f = 0.1 is recovered from any P set, with or without P = 1
    ps = np.array([2, 4, 8, 16])
    f, t1 = scaling.amdahl_fit(ps, 50 * (0.1 + 0.9 / ps))
    assert f == pytest.approx(0.1) and t1 == pytest.approx(50)
    assert scaling.gustafson(0.2, 4) == pytest.approx(3.4)
    assert scaling.gustafson_serial_fraction(3.4, 4) == pytest.approx(0.2)
    assert math.isnan(scaling.karp_flatt(1.0, 1))


def test_speedup_series_from_runs(one_run, tmp_path):
    four = make_run(tmp_path / "p4", ranks=4, total=31.0)
    res = load_runs([four, one_run])  # one_run: one rank, 100 s
    assert scaling.scaling_groups(res) == [[0, 1]]
    s = scaling.series([scaling.profile(r) for r in res])
    assert [r["ranks"] for r in s["rows"]] == [1, 4] and s["reference_ranks"] == 1
    row = s["rows"][1]
    assert round(row["speedup"], 3) == 3.226 and round(row["efficiency"], 3) == 0.806
    assert round(row["karp_flatt"], 3) == 0.080
    assert s["amdahl_serial_fraction"] == pytest.approx(0.08)
    done = analyse(res, str(tmp_path / "out"), 0.005)
    assert os.path.basename(done["files"][-2]) == "speedup.png"
    assert_png(done["files"][-2])
    assert "3.226" in done["text"] and "0.806" in done["text"] and "0.080" in done["text"]


def test_oversubscribed_and_other_thread_runs_are_not_fitted(tmp_path):
    """4 ranks on 2 cores and one process on 2 threads sit beside the series, never in the fit or as T(1)."""
    box = {"cores_per_host": 2}
    one = make_run(tmp_path / "p1", ranks=1, total=100.0, prov_extra={**box, "ranks_per_host": 1})
    two = make_run(tmp_path / "p2", ranks=2, total=52.0, prov_extra={**box, "ranks_per_host": 2})
    four = make_run(tmp_path / "p4", ranks=4, total=60.0, prov_extra={**box, "ranks_per_host": 4})
    base = make_run(tmp_path / "base", ranks=1, total=64.0, prov_extra={**box, "ranks_per_host": 1,
                                                                     "threads_per_rank": 2})
    s = scaling.series([scaling.profile(r) for r in load_runs([one, two, four, base])])
    assert [r["ranks"] for r in s["rows"]] == [1, 2]
    assert round(s["rows"][1]["speedup"], 4) == round(100 / 52, 4)
    assert s["amdahl_serial_fraction"] == pytest.approx(2 * 52 / 100 - 1)
    beside = {b["name"]: (b["oversubscribed"], round(b["speedup"], 4)) for b in s["baselines"]}
    assert beside == {"p4": (True, round(100 / 60, 4)), "base": (False, round(100 / 64, 4))}


def test_weak_scaling(tmp_path):
    one = make_run(tmp_path / "w1", ranks=1, total=100.0, masks=[0.5])
    four = make_run(tmp_path / "w4", ranks=4, total=125.0, masks=[0.5, 0.2, 0.1, 0.05])
    res = load_runs([one, four])
    # work: parent 1000 + per mask 2 resets x 3 = (1000 + 500) iterations x 3 -> 1000 + 4500 = 5500 per mask
    w1, w4 = 1000 + 4500, 1000 + 4 * 4500
    assert [scaling.work_iterations(r) for r in res] == [w1, w4]
    s = scaling.series([scaling.profile(r) for r in res], weak=True)
    expected = (100.0 / w1) / (125.0 / w4)
    assert s["rows"][1]["scaled_speedup"] == pytest.approx(expected)
    assert s["rows"][1]["efficiency"] == pytest.approx(expected / 4)
    assert s["gustafson_serial_fraction"] == pytest.approx((4 - expected) / 3)
    assert scaling.scaling_groups(res) == [[0], [1]]  # not the same work: no strong-scaling series
    done = analyse(res, str(tmp_path / "out"), 0.005, weak=True)
    assert "Gustafson" in done["text"] and f"{expected:.3f}" in done["text"]
    assert_png(os.path.join(str(tmp_path / "out"), "speedup.png"))


def test_run_without_tasks(tmp_path):
    path = make_run(tmp_path / "empty", masks=[0.5])
    merge(RunDir(path), [], dict(startup=1.0, total=5.0, start_time=0.0), dict(ranks=1))
    (res,) = load_runs([path])
    assert math.isnan(scaling.profile(res)["imbalance"])
    done = analyse([res], str(tmp_path / "out"), 0.005)
    assert "no retrainings" in done["text"] and os.path.exists(done["report"])
    assert json.loads(json.dumps(summaries([res])[0], allow_nan=False))["scaling"]["imbalance"] is None


def test_timeline_imbalance(tmp_path):
    # 24 tasks alternate between ranks 0 and 1: rank 0 busy 12 x 0.75 = 9 s, rank 1 busy 12 x 5/12 = 5 s
    path = make_run(tmp_path / "gantt", ranks=2, total=30.0,
                    durations=lambda i, t: (i % 2, 0.75 if i % 2 == 0 else 5 / 12))
    (res,) = load_runs([path])
    pr = scaling.profile(res)
    assert pr["busy_seconds"] == {"0": pytest.approx(9.0), "1": pytest.approx(5.0)}
    assert round(pr["imbalance"], 4) == 1.2857
    assert scaling.imbalance({0: 9.0, 1: 5.0}) == pytest.approx(9 / 7)
    assert scaling.imbalance({0: 9.0}, workers=2) == pytest.approx(2.0)  # an idle worker counts as 0
    assert pr["idle_per_task_max"] >= pr["idle_per_task_mean"] >= 0
    done = analyse([res], str(tmp_path / "out"), 0.005)
    assert "1.2857" in done["text"]
    timeline = os.path.join(str(tmp_path / "out"), "timeline.png")
    assert_png(timeline)


def test_idle_time_before_each_task():
    """A rank's idle time before a task: since its previous task ended, or since the training phase began."""
    tasks = [dict(task_id="a", rank=0, start_time=10.5, end_time=12.0), dict(task_id="b", rank=0, start_time=12.25,
                                                                            end_time=13.0),
             dict(task_id="c", rank=1, start_time=11.0, end_time=11.5), dict(task_id="d", rank=1, start_time=14.0,
                                                                            end_time=15.0)]
    assert scaling.idle_before(tasks, start=10.0) == {"a": 0.5, "b": 0.25, "c": 1.0, "d": 2.5}
    assert scaling.idle_before(tasks) == {"b": 0.25, "d": 2.5}
    timing = dict(start_time=100.0, startup=1.0, parent=2.0, masks=0.5, distribution=0.25, training=9.0)
    assert scaling.training_start(dict(timing=timing)) == 103.75


def test_efficiency_against_the_bound_of_the_serial_phases():
    ref = dict(timing=dict(total=100.0, training=90.0), provenance=dict(ranks=1), path="/x/p1")
    run = dict(timing=dict(total=55.0, distribution=1.0, training=45.0), provenance=dict(ranks=2), path="/x/p2")
    e = scaling.efficiency_against_bound(ref, run)
    assert e["serial_1"] == 10.0 and e["serial_p"] == 9.0
    assert e["e_training"] == 1.0 and e["e_wall"] == pytest.approx(100 / 110)
    assert e["bound"] == pytest.approx(100 / (2 * (9.0 + 90.0 / 2)))  # the serial phases cap E at 0.926
    assert e["wall_vs_bound"] == pytest.approx((100 / 110) / (100 / 108))
    (head, row) = scaling.efficiency_lines(ref, [run])
    assert row.split()[:2] == ["p2", "2"] and row.split()[-4:] == ["1.000", "0.909", "0.926", "0.982"]


def test_phase_labels_that_would_overlap_go_up_a_row():
    from lthmpi.analysis.plots import label_rows

    # startup at 0 s and the parent at 6 s of a 270 s run: the labels are ~20 s wide, so the second goes
    # up; the third, far to the right, fits back on the lowest row; a fourth right after it goes up again
    assert label_rows([0.0, 6.0, 100.0, 105.0], [20.0, 20.0, 20.0, 20.0]) == [0, 1, 0, 1]
    assert label_rows([0.0, 6.0, 10.0], [20.0, 20.0, 20.0]) == [0, 1, 2]
    assert label_rows([0.0, 30.0, 60.0], [20.0, 20.0, 20.0]) == [0, 0, 0]
    assert label_rows([], []) == []


def test_tasks_of_an_earlier_session_left_out(tmp_path):
    # tasks that ended before this session's launch were done by an interrupted earlier run
    path = make_run(tmp_path / "resumed", durations=lambda i, t: (0, 1.0, -3600.0) if i < 3 else (0, 1.0))
    (res,) = load_runs([path])
    mine, earlier = scaling.session_tasks(res)
    assert earlier == 3 and len(mine) == 21


def test_every_figure_is_a_valid_png(one_run, tmp_path):
    res = load_runs([one_run])
    done = analyse(res, str(tmp_path / "out"), 0.005, command="python -m lthmpi.analysis grid")
    pngs = [f for f in done["files"] if f.endswith(".png")]
    assert {os.path.basename(f) for f in pngs} == {"accuracy.png", "early_stop.png", "phases.png", "timeline.png"}
    for f in pngs:
        assert_png(f)
    md = open(done["report"]).read()
    for f in pngs:
        assert f"]({os.path.basename(f)})" in md
    assert "python -m lthmpi.analysis grid" in md and "abc123" in md and "| reset | sparsest mask |" in md


def test_json_summary_is_plain_json(one_run):
    res = load_runs([one_run])
    res[0]["tasks"][0]["early_stop_accuracy"] = math.nan
    (s,) = summaries(res)
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text)["tasks"][0]["early_stop_accuracy"] is None
    assert set(s) == {"config", "parent", "tasks", "timing", "provenance", "scaling"}


def test_csv_one_row_per_task(one_run, tmp_path):
    res = load_runs([one_run, one_run])
    n = write_csv(res, str(tmp_path / "t.csv"))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert n == len(rows) == 48
    assert set(TASK_COLUMNS) | {"run_dir"} <= set(rows[0])
    assert rows[0]["run_dir"] == one_run and rows[0]["reset"] == "0ep"


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_json_and_csv(one_run, tmp_path):
    p = cli(one_run, "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert {"config", "parent", "tasks", "timing", "provenance", "scaling"} <= set(s)
    assert len(s["tasks"]) == 24 and s["scaling"]["series"] is None
    assert not os.path.exists(tmp_path / "analysis_out"), "--json alone must write nothing"
    out = tmp_path / "o"
    p = cli(one_run, one_run, "--json", "--csv", "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert isinstance(json.loads(p.stdout), list)
    assert sum(1 for _ in open(out / "tasks.csv")) == 1 + 48
    assert os.listdir(out) == ["tasks.csv"]


def test_cli_full_report_default_out(one_run, tmp_path):
    before = sorted(os.listdir(one_run))
    p = cli(one_run, "--csv", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "analysis_out" / "grid"
    assert {"report.md", "tasks.csv", "accuracy.png", "timeline.png"} <= set(os.listdir(out))
    assert "Winning tickets" in p.stdout and "k=500it" in p.stdout
    assert sorted(os.listdir(one_run)) == before, "the analysis must not write into the run directory"


@pytest.mark.parametrize("case", ["missing_dir", "no_results", "corrupt"])
def test_cli_errors(case, tmp_path):
    run = tmp_path / "run"
    if case != "missing_dir":
        run.mkdir()
    if case == "corrupt":
        (run / "results.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    p = cli(run, cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lthmpi.analysis: error: "), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
