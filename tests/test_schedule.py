"""Schedulers and the scaling model against answers computed by hand; no MPI, no TensorFlow."""
import math
import random
from collections import namedtuple

import pytest

from lthmpi.parallel.scheduling import (SCHEDULERS, Schedule, assign_lpt, assign_static, groups_for, imbalance,
                             simulate, use_subgroups)
from lthmpi.analysis.scaling_model import (RunProfile, amdahl_fit, contention, extrapolate_durations, fit_log, gustafson,
                                  karp_flatt, predict, predict_many, synthetic_profile, task_time_factor)

T = namedtuple("T", "mask reset")
COSTS = [4, 3, 3, 2, 2]


# ---------- assignment ----------

def test_lpt_by_hand():
    # 4 -> r0, 3 -> r1, 3 -> r1 (3 < 4) = 6, 2 -> r0 = 6, 2 -> tie 6/6 -> r0 = 8
    plan = assign_lpt(list(range(5)), COSTS, 2)
    assert plan == [[0, 3, 4], [1, 2]]
    s = simulate(plan, COSTS, 2)
    assert s.makespan == 8 and s.busy == [8, 6]


def test_static_by_hand():
    tasks = [T(m, 0) for m in range(5)]  # five single-task masks
    plan = assign_static(tasks, 2)
    assert [[t.mask for t in lst] for lst in plan] == [[0, 2, 4], [1, 3]]
    s = simulate([[t.mask for t in lst] for lst in plan], COSTS, 2)
    assert s.busy == [9, 5] and s.makespan == 9
    assert imbalance(s.busy) == pytest.approx(9 / 7)
    assert round(imbalance([9, 5]), 4) == 1.2857


def test_dynamic_by_hand():
    # r0 4, r1 3; r1 free at 3 -> 6; r0 free at 4 -> 6; then r0 and r1 free at 6 -> r0 -> 8
    s = simulate(list(range(5)), COSTS, 2, dynamic=True)
    assert s.makespan == 8
    assert [i for i, _, _ in s.per_rank[0]] == [0, 3, 4]
    assert s.per_rank[1] == [(1, 0, 3), (2, 3, 6)]
    assert simulate("dynamic", COSTS, 2).makespan == 8


def test_dynamic_dispatch_latency():
    s = simulate([0, 1], [5, 5], 1, overhead_per_task=0.5, dynamic=True)
    assert s.per_rank[0] == [(0, 0.5, 5.5), (1, 6.0, 11.0)]
    assert s.busy == [11.0] and s.makespan == 11.0


def test_policy_names_match_explicit_plans():
    assert simulate("lpt", COSTS, 2).makespan == 8
    assert simulate("static", COSTS, 2).makespan == 9
    # static with groups: masks {0: tasks 0,1}, {1: tasks 2,3}, {2: task 4}: r0 gets masks 0, 2 -> 4+3+2
    s = simulate("static", COSTS, 2, groups=[0, 0, 1, 1, 2])
    assert s.busy == [9, 5]
    with pytest.raises(ValueError):
        simulate("fifo", COSTS, 2)


def test_static_keeps_whole_masks_and_order():
    tasks = [T(m, r) for m in range(3) for r in range(2)]
    plan = assign_static(tasks, 2)
    assert plan[0] == [T(0, 0), T(0, 1), T(2, 0), T(2, 1)]
    assert plan[1] == [T(1, 0), T(1, 1)]
    # resume: mask 0 complete, remaining masks still dealt 1 -> r0, 2 -> r1
    plan = assign_static(tasks[2:], 2)
    assert [[t.mask for t in lst] for lst in plan] == [[1, 1], [2, 2]]


def test_imbalance():
    assert imbalance([3, 3, 3]) == 1.0
    assert imbalance([6, 0, 0]) == 3.0
    assert imbalance([0, 0]) == 1.0
    with pytest.raises(ValueError):
        imbalance([])


@pytest.mark.parametrize("seed", range(20))
def test_every_task_exactly_once(seed):
    rng = random.Random(seed)
    n_tasks = rng.randint(0, 12)
    n_ranks = rng.randint(1, 7)  # includes n_ranks > n_tasks: empty ranks allowed
    costs = [rng.choice([1.0, 2.0, 3.5, 7.0]) for _ in range(n_tasks)]
    tasks = [T(rng.randint(0, 4), i) for i in range(n_tasks)]
    for plan in (assign_static(tasks, n_ranks), assign_lpt(tasks, costs, n_ranks)):
        assert len(plan) == n_ranks
        flat = [t for lst in plan for t in lst]
        assert sorted(flat) == sorted(tasks)
    idx = list(range(n_tasks))
    for name in SCHEDULERS:
        s = simulate(name, costs, n_ranks, groups=[t.mask for t in tasks])
        assert sorted(i for lst in s.per_rank for i, _, _ in lst) == idx
        assert s.makespan == pytest.approx(max(s.busy, default=0.0))
        assert sum(s.busy) == pytest.approx(sum(costs))
        assert s.makespan >= (max(costs) if costs else 0.0) - 1e-12
    # determinism
    assert assign_lpt(tasks, costs, n_ranks) == assign_lpt(tasks, costs, n_ranks)
    assert assign_static(tasks, n_ranks) == assign_static(tasks, n_ranks)
    assert simulate("dynamic", costs, n_ranks) == simulate("dynamic", costs, n_ranks)


def test_lpt_tie_breaks():
    # equal costs: original order, round the ranks from the lowest
    assert assign_lpt(list("abcd"), [1, 1, 1, 1], 3) == [["a", "d"], ["b"], ["c"]]


def test_bad_plans_rejected():
    with pytest.raises(ValueError):
        simulate([[0], [0]], [1.0], 2)  # a task twice
    with pytest.raises(ValueError):
        simulate([[0]], [1.0, 2.0], 1)  # a task missing
    with pytest.raises(ValueError):
        assign_lpt([1, 2], [1.0], 2)
    with pytest.raises(ValueError):
        assign_static([T(0, 0)], 0)


def test_speeds_divide_durations():
    s = simulate([[0], [1]], [6.0, 6.0], 2, speeds=[1.0, 2.0])
    assert s.busy == [6.0, 3.0]


def test_groups_for():
    assert groups_for(5, 2) == [0, 0, 0, 1, 1]
    assert groups_for(4, 2) == [0, 0, 1, 1]
    assert groups_for(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    assert groups_for(3, 5) == [0, 1, 2]
    assert groups_for(3, 3) == [0, 1, 2]
    assert groups_for(4, 1) == [0, 0, 0, 0]
    assert groups_for(2, 0) == [0, 0]
    for p in range(1, 12):
        for u in range(1, 8):
            c = groups_for(p, u)
            assert len(c) == p and c == sorted(c)
            assert len(set(c)) == min(p, u)
            sizes = [c.count(g) for g in set(c)]
            assert max(sizes) - min(sizes) <= 1


def test_schedule_dataclass():
    s = Schedule([[(0, 0.0, 2.0)], []], [2.0, 0.0], 2.0)
    assert s.imbalance == 2.0


# ---------- scaling laws ----------

def test_speedup_efficiency_karp_flatt_by_hand():
    s = 100 / 31
    assert round(s, 3) == 3.226
    assert round(s / 4, 3) == 0.806
    assert round(karp_flatt(s, 4), 3) == 0.080
    assert math.isnan(karp_flatt(1.0, 1))


def test_amdahl_fit_recovers_serial_fraction():
    ps = [1, 2, 4, 8, 16]
    f, t1 = amdahl_fit(ps, [100 * (0.1 + 0.9 / p) for p in ps])
    assert f == pytest.approx(0.1) and t1 == pytest.approx(100)
    with pytest.raises(ValueError):
        amdahl_fit([4, 4], [1.0, 1.0])


def test_gustafson():
    assert gustafson(0.1, 20) == pytest.approx(18.1)
    assert gustafson(0.0, 8) == 8


def test_fit_log():
    assert fit_log([(1, 2.0), (2, 3.0), (4, 4.0)]) == pytest.approx((2.0, 1.0))
    assert fit_log([(4, 5.0)]) == (5.0, 0.0)
    assert fit_log([(1, 4.0), (4, 2.0)]) == (3.0, 0.0)  # getting faster with P is noise: constant
    assert fit_log([]) == (0.0, 0.0)


# ---------- the model ----------

def _equal(n, d=10.0, **phases):
    return RunProfile([d] * n, [1.0] * n, dict(phases), ranks=1)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_equal_tasks_speedup_is_p(scheduler):
    prof = _equal(12)
    for p in (1, 2, 3, 4, 6, 12):
        r = predict(prof, p, scheduler)
        assert r["speedup"] == pytest.approx(p) and r["efficiency"] == pytest.approx(1.0)
        assert r["wall"] == pytest.approx(120 / p) and r["makespan"] == r["wall"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_speedup_saturates_at_task_count(scheduler):
    prof = _equal(5)
    for p in (5, 6, 9, 20):
        r = predict(prof, p, scheduler)
        assert r["speedup"] == pytest.approx(5)
        assert r["idle"] == p - 5


def test_subgroups_auto_only_for_conv_nets():
    assert use_subgroups("auto", has_convolutions=True) and not use_subgroups("auto", has_convolutions=False)
    assert use_subgroups(True, has_convolutions=False) and not use_subgroups(False, has_convolutions=True)


def test_data_parallel_subgroups():
    prof = _equal(2)
    prof.data_parallel_efficiency = 1.0
    r = predict(prof, 4, "lpt")  # 2 subgroups of 2, perfect data parallelism
    assert r["workers"] == 2 and r["speedup"] == pytest.approx(4)
    prof.data_parallel_efficiency = 0.5
    assert predict(prof, 4, "lpt")["makespan"] == pytest.approx(10 / 1.5)


def test_phases_and_serial_part():
    prof = _equal(4, startup=2.0, parent=20.0, masks=1.0, distribution=0.5, gather=0.5)
    r1, r4 = predict(prof, 1, "lpt"), predict(prof, 4, "lpt")
    assert r1["wall"] == pytest.approx(2 + 20 + 1 + 0.5 + 40 + 0.5)
    assert r4["wall"] == pytest.approx(2 + 20 + 1 + 0.5 + 10 + 0.5)
    assert r4["phases"]["training"] == 10
    # the model obeys Amdahl with f = serial / T1
    f, _ = amdahl_fit([1, 2, 4], [predict(prof, p, "lpt")["wall"] for p in (1, 2, 4)])
    assert f == pytest.approx(24 / 64)


def test_log_phases_fitted():
    prof = _equal(4, gather=1.0)
    prof.ranks = 2
    prof.phase_points = {"gather": [(4, 2.0)]}  # 1 s at P=2, 2 s at P=4: gather = log2 P
    assert predict(prof, 8, "lpt")["phases"]["gather"] == pytest.approx(3.0)
    assert predict(prof, 1, "lpt")["phases"]["gather"] == pytest.approx(0.0)


def test_calibrated_phases_grow_with_log2_p():
    # startup per core 10 + 2 log2 P (the P = 4 run on 2 cores paid twice 14 s), parent 4 + 1 log2 P
    prof = RunProfile([10.0] * 8, [1.0] * 8, {"startup": 10.0, "parent": 4.0}, ranks=1, cores=2)
    prof.phase_points = {"startup": [(2, 12.0), (4, 28.0)], "parent": [(2, 5.0), (4, 6.0)]}
    r = predict(prof, 8, "lpt", cores=2)
    assert r["phases"]["startup"] == pytest.approx((10 + 2 * 3) * 4)
    assert r["phases"]["parent"] == pytest.approx(7.0)
    assert predict(prof, 1, "lpt", cores=2)["phases"]["startup"] == pytest.approx(10.0)
    # one measurement: constant, as before calibration existed
    assert predict(_equal(4, parent=4.0), 64, "lpt")["phases"]["parent"] == 4.0


def test_contention_scales_task_times():
    # a task takes 1 + 0.1 log2 P times as long with P ranks busy (measured at P = 2 and 4)
    prof = _equal(8)
    assert contention(prof, 8) == 1.0
    prof.contention_points = [(2, 1.1), (4, 1.2)]
    assert contention(prof, 8) == pytest.approx(1.3)
    assert predict(prof, 8, "lpt")["makespan"] == pytest.approx(10.0 * 1.3)
    assert predict(prof, 1, "lpt")["makespan"] == pytest.approx(80.0)
    # on top of the oversubscription: 8 ranks on 2 cores run 4 times slower and contend like P = 8
    prof.cores = 2
    assert task_time_factor(prof, 8, 2) == pytest.approx(4 * 1.3)
    # profiled at P = 2: the factor is relative to that run (r(2) = 1.1 there)
    prof = RunProfile([10.0] * 8, [1.0] * 8, {}, ranks=2, contention_points=[(1, 1 / 1.1), (4, 1.2 / 1.1)])
    assert contention(prof, 8) == pytest.approx(1.3 / 1.1)
    # runs that got faster with P are noise, not a law: no factor
    prof = _equal(8)
    prof.contention_points = [(2, 0.9)]
    assert contention(prof, 16) == pytest.approx(1.0)


def test_oversubscription():
    # measured with 4 ranks on 2 cores: durations and startup doubled by contention
    prof = RunProfile([20.0] * 4, [1.0] * 4, {"startup": 10.0}, ranks=4, cores=2)
    r = predict(prof, 4, "lpt", cores=2)
    assert r["wall"] == pytest.approx(30.0)  # reproduces the measurement
    r = predict(prof, 4, "lpt")  # own cores
    assert r["phases"]["startup"] == 5.0 and r["makespan"] == 10.0
    r = predict(prof, 8, "lpt", cores=2)
    assert r["phases"]["startup"] == 20.0 and r["makespan"] == 40.0


def test_dependent_tasks_are_serial():
    prof = _equal(4)
    prof.independent = False
    assert predict(prof, 4, "lpt")["wall"] == 40.0


def test_schedulers_differ_on_unequal_tasks():
    prof = RunProfile([4.0, 3.0, 3.0, 2.0, 2.0], COSTS, {}, task_groups=[0, 1, 2, 3, 4])
    got = {r["scheduler"]: r["makespan"] for r in predict_many(prof, [2])}
    assert got == {"static": 9, "lpt": 8, "dynamic": 8}
    rows = predict_many(prof, [1, 2, 4], ("lpt",))
    assert [r["P"] for r in rows] == [1, 2, 4]
    with pytest.raises(ValueError):
        predict(prof, 2, "fifo")


def test_synthetic_seed_study():
    prof = synthetic_profile(M=20, N=8, epochs=150, epoch_seconds=270,
                             reset_epochs=[5, 10, 15, 20, 25, 30, 35, 40])
    assert len(prof.task_durations) == 160
    assert prof.task_durations[0] == 145 * 270 and prof.task_costs[7] == 110
    assert prof.phases["parent"] == 150 * 270
    r = predict(prof, 20, "static")  # one mask per rank: balanced
    assert r["imbalance"] == pytest.approx(1.0)
    assert synthetic_profile(2, 3, 10, 1.0, controls=2).task_durations.__len__() == 18
    with pytest.raises(ValueError):
        synthetic_profile(2, 3, 10, 1.0, reset_epochs=[1, 2])


def test_extrapolate_durations():
    prof = RunProfile([3.0, 5.0], [100, 200], {"parent": 7.0})  # 1 s fixed + 0.02 s per iteration
    new = extrapolate_durations(prof, [50, 300], task_groups=[0, 1])
    assert new.task_durations == pytest.approx([2.0, 7.0])
    assert new.phases == {"parent": 7.0} and new.task_groups == [0, 1]
