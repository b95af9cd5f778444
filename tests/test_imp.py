"""Iterative magnitude pruning (lthmpi/pruning.imp_step, lthmpi/kinds/imp.py): nested masks with exact counts,
level 1 equal to the one-shot mask, the chains' start weights and controls, resume, analysis."""
from __future__ import annotations

import os

import numpy as np
import pytest

from lthmpi.config import ConfigError, from_dict
from lthmpi.validation import validate, validate_against_model
from lthmpi.pruning import EmptyLayerError, fraction_remaining, imp_counts, imp_step, magnitude_masks

SIZES = {"fc1/kernel": (40, 25), "fc2/kernel": (25, 12), "output/kernel": (12, 10)}

# The tiny IMP run: digits, 30 iterations, 3 levels at 50% per level x 2 chains x (ticket + 2 controls).
IMP_TINY = {
    "seed": 3,
    "data": {"dataset": "digits", "validation": 200},
    "train": {"iterations": 30, "batch_size": 32, "eval_every": "10it"},
    "prune": {"method": "imp", "levels": 3, "imp_rate": 0.5, "layer_rates": {}},  # one pool: level 1 is one-shot 50%
    "reset": {"points": ["0it", "10it"], "controls": ["random_reinit", "random_mask"]},
    "parallel": {"threads": 1},
}


def random_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(size=s).astype(np.float32) for p, s in SIZES.items()}


def chain(scope, rates, levels=5, rate=0.2):
    """Masks of one chain where each level 'trains' to fresh random weights (the step only sees magnitudes)."""
    masks, prev = [], None
    for lv in range(levels):
        prev = imp_step(random_weights(lv), prev, rate, scope, rates)
        masks.append(prev)
    return masks


@pytest.mark.parametrize("scope,rates", [("global", {"output": 0.5}), ("layerwise", {"output": 0.5}),
                                         ("global", {}), ("layerwise", {"fc2": 0.0})])
def test_masks_are_nested_with_exact_counts(scope, rates):
    masks = chain(scope, rates)
    sizes = {p: int(np.prod(s)) for p, s in SIZES.items()}
    counts = imp_counts(sizes, len(masks), 0.2, scope, rates)
    for lv, (m, want) in enumerate(zip(masks, counts)):
        prev = masks[lv - 1] if lv else None
        for p in SIZES:
            if prev is not None:
                assert not (m[p] & ~prev[p]).any(), f"level {lv + 1} revives a weight of {p}"
        for unit, n in want.items():
            paths = [unit] if unit != "*" else [p for p in SIZES if p not in want]
            assert sum(int(m[p].sum()) for p in paths) == n, (lv, unit)
    # 20% of the survivors per level (rounded per unit): fc1's unit keeps ~0.8^5 of its weights after 5 levels
    unit = "fc1/kernel" if "fc1/kernel" in counts[-1] else "*"
    paths = [unit] if unit != "*" else [p for p in SIZES if p not in counts[-1]]
    assert abs(counts[-1][unit] / sum(sizes[p] for p in paths) - 0.8 ** 5) < 0.002


def test_each_level_prunes_the_smallest_survivors():
    w0, w1 = random_weights(0), random_weights(1)
    m1 = imp_step(w0, None, 0.3, "layerwise", {})
    m2 = imp_step(w1, m1, 0.3, "layerwise", {})
    for p in SIZES:
        kept, dropped = np.abs(w1[p][m2[p]]), np.abs(w1[p][m1[p] & ~m2[p]])
        assert kept.min() >= dropped.max()  # ranked by the magnitude of the weights the level ended with
        assert int(m2[p].sum()) == int(m1[p].sum()) - int(round(0.3 * m1[p].sum()))


@pytest.mark.parametrize("rate", [0.2, 0.1, 0.35, 0.5])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_level_one_equals_the_one_shot_mask(rate, scope):
    """At level 1's overall fraction, one-shot with the same per-round rate cuts level 1's mask."""
    w = random_weights(7)
    a = imp_step(w, None, rate, scope, {"output": 0.5})
    b = magnitude_masks(w, fraction_remaining(a), scope, {"output": 0.5}, rate=rate)
    assert all(np.array_equal(a[p], b[p]) for p in SIZES)


def test_a_layer_emptied_by_a_level_is_refused():
    w = {"a/kernel": np.ones((1, 1), np.float32), "b/kernel": np.ones((2, 2), np.float32)}
    with pytest.raises(EmptyLayerError, match="layer a"):
        imp_step(w, None, 0.6, "layerwise", {})  # round(0.6 * 1) = 1: the last weight would go


def imp_cfg(**prune):
    cfg = from_dict({"prune": {"method": "imp", **prune}})
    validate(cfg)
    return cfg


@pytest.mark.parametrize("prune,words", [
    ({"imp_rate": 1.0}, "prune.imp_rate must be a fraction in (0, 1)"),
    ({"imp_rate": 0}, "prune.imp_rate must be a fraction in (0, 1)"),
    ({"imp_rate": -0.2}, "prune.imp_rate must be a fraction in (0, 1)"),
    ({"levels": 0}, "prune.levels must be >= 1"),
    ({"quantiles": [60, 80]}, "prune.quantiles cannot be combined with prune.method = \"imp\""),
    ({"method": "iterative"}, "prune.method 'iterative' is unknown"),
])
def test_bad_imp_config_is_one_line(prune, words):
    with pytest.raises(ConfigError) as e:
        imp_cfg(**prune)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_levels_that_empty_a_layer_are_refused_before_any_work():
    sizes = {"fc1/kernel": 1000, "fc2/kernel": 300, "output/kernel": 10}
    validate_against_model(imp_cfg(levels=5, imp_rate=0.5, scope="layerwise"), sizes)
    # output: 10 -> 4 -> 2 -> 1 -> 0 at 60% a level
    with pytest.raises(ConfigError, match=r"would leave layer output/kernel with no weight at level 4: use at most 3"):
        validate_against_model(imp_cfg(levels=20, imp_rate=0.6, scope="layerwise", layer_rates={}), sizes)
    validate_against_model(imp_cfg(levels=3, imp_rate=0.6, scope="layerwise", layer_rates={}), sizes)
    # the pool fc1 + fc2: 1300 -> 520 -> 208 -> 83 -> 33 -> 13 -> 5 -> 2 -> 1, fewer than its 2 layers
    with pytest.raises(ConfigError, match=r"global pool of layers with no weight at level 8: use at most 7"):
        validate_against_model(imp_cfg(levels=30, imp_rate=0.6, layer_rates={"output": 0.0}), sizes)


def test_identity_of_a_one_shot_config_ignores_the_imp_keys():
    base = from_dict({})
    assert from_dict({"prune": {"levels": 3, "imp_rate": 0.5}}).hash() == base.hash()
    assert "method" not in base.identity()["prune"]
    a, b = imp_cfg(levels=3), imp_cfg(levels=4)
    assert a.hash() != b.hash() != base.hash()
    assert imp_cfg(levels=3, remaining=[0.5]).hash() == a.hash()  # one-shot's thresholds mean nothing to IMP
    assert a.remaining_fractions() == pytest.approx([0.8, 0.64, 0.512])


# -- the chains, run end to end on digits -----------------------------------------------------------------

@pytest.fixture(scope="module")
def imp_run(tmp_path_factory, tf_runtime):
    from lthmpi.parallel.coordinator import run_serial

    cfg = from_dict(IMP_TINY)
    validate(cfg)
    path = str(tmp_path_factory.mktemp("imp") / "run")
    run_serial(cfg, path, threads=1, quiet=True)
    return cfg, path


def chain_masks(run_dir, reset, levels):
    from lthmpi.store import RunDir

    run = RunDir(run_dir)
    return [run.read_chain_mask(reset, lv) for lv in range(1, levels + 1)]


def test_run_keeps_every_level_nested_per_chain(imp_run):
    from lthmpi.experiment import Experiment
    from lthmpi.results import load

    cfg, path = imp_run
    exp = Experiment(cfg, path)
    planned = exp.remaining if exp.load_masks() is None else None
    chains = [chain_masks(path, r, 3) for r in range(2)]
    for masks in chains:
        for lv, (m, attrs) in enumerate(masks, start=1):
            assert attrs["level"] == lv and attrs["remaining"] == pytest.approx(fraction_remaining(m))
            assert attrs["remaining"] == pytest.approx(planned[lv - 1])  # exact counts: known before training
            if lv > 1:
                prev = masks[lv - 2][0]
                assert all(not (m[p] & ~prev[p]).any() for p in m)
    # level 1 is the same in every chain; the chains part from level 2 on (their level-1 weights differ)
    assert all(np.array_equal(chains[0][0][0][p], chains[1][0][0][p]) for p in chains[0][0][0])
    assert any(not np.array_equal(chains[0][1][0][p], chains[1][1][0][p]) for p in chains[0][1][0])
    res = load(path)
    ids = sorted(t["task_id"] for t in res["tasks"])
    assert len(ids) == 3 * 2 * 3 and "l03_r01_random_mask" in ids
    for t in res["tasks"]:
        lv = int(t["task_id"][1:3])
        assert t["mask"] == lv - 1 and t["remaining"] == pytest.approx(planned[lv - 1]) and t["kind"] == "imp"
        assert t["deps"] == ("" if lv == 1 else f"l{lv - 1:02d}_r{t['task_id'][5:7]}_ticket")


def test_level_one_is_the_one_shot_mask_of_the_parent(imp_run):
    from lthmpi.store import RunDir

    cfg, path = imp_run
    ckpts, _, attrs = RunDir(path).read_checkpoints()
    final = ckpts[int(attrs["iterations"])]
    m1 = chain_masks(path, 0, 1)[0][0]
    one_shot = magnitude_masks({p: final[p] for p in m1}, fraction_remaining(m1), cfg.prune.scope,
                               cfg.prune.layer_rates, rate=cfg.prune.imp_rate)
    assert all(np.array_equal(m1[p], one_shot[p]) for p in m1)


def test_start_weights_and_controls_per_level(imp_run):
    from lthmpi.experiment import Experiment
    from lthmpi.kinds.retraining import Retraining as Task

    cfg, path = imp_run
    exp = Experiment(cfg, path)
    exp.load_parent()
    exp.load_masks()
    for reset, k in enumerate(exp.reset_iterations):
        theta_k = exp.checkpoints[k]
        for lv, (m, _) in enumerate(chain_masks(path, reset, 3), start=1):
            w, mask = exp.start_weights(Task(lv - 1, reset, None, level=lv))
            assert mask is not None and all(np.array_equal(mask[p], m[p]) for p in m)
            for p, v in w.items():  # exactly theta_k * m_l; biases exactly theta_k's
                assert np.array_equal(v, theta_k[p] * m[p] if p in m else theta_k[p]), (reset, lv, p)
            wr, mr = exp.start_weights(Task(lv - 1, reset, "random_mask", level=lv))
            assert all(int(mr[p].sum()) == int(m[p].sum()) and not np.array_equal(mr[p], m[p]) for p in m)
            assert all(np.array_equal(wr[p], theta_k[p] * mr[p]) for p in m)
            wi, mi = exp.start_weights(Task(lv - 1, reset, "random_reinit", level=lv))
            assert all(np.array_equal(mi[p], m[p]) for p in m)
            assert all(not np.array_equal(wi[p], theta_k[p] * m[p]) and not (wi[p][~m[p]]).any() for p in m)


def test_analysis_draws_imp_next_to_one_shot_of_the_same_parent(imp_run, tmp_path):
    from lthmpi.analysis import load_runs
    from lthmpi.analysis.report import analyse
    from lthmpi.analysis.science import build_grid, method_pairs, science_groups
    from lthmpi.parallel.coordinator import run_serial

    cfg, path = imp_run
    one_shot = from_dict({**IMP_TINY, "prune": {"remaining": [0.5, 0.25], "layer_rates": {}},
                          "reset": {"points": ["0it"], "controls": []}})
    validate(one_shot)
    other = run_serial(one_shot, str(tmp_path / "oneshot"), threads=1, quiet=True)
    results = load_runs([path, other])
    groups = science_groups(results)
    assert method_pairs(results, groups) == [(0, 1)]
    g = build_grid([results[0]])
    assert g.method == "imp" and g.masks == [0, 1, 2] and g.remaining[2] == pytest.approx(0.125, abs=0.01)
    # the IMP level-1 ticket at k=0 starts exactly where one-shot's 50% ticket does: the same parent, mask, theta_0
    imp1 = next(t for t in results[0]["tasks"] if t["task_id"] == "l01_r00_ticket")
    os1 = next(t for t in results[1]["tasks"] if t["task_id"] == "m000_r00_ticket")
    assert imp1["final_accuracy"] == os1["final_accuracy"] and imp1["best_val_loss"] == os1["best_val_loss"]
    done = analyse(results, str(tmp_path / "out"), command="test")
    names = sorted(os.path.basename(f) for f in done["files"])
    assert "accuracy_imp_vs_oneshot.png" in names and "early_stop_imp_vs_oneshot.png" in names
    report = open(done["report"]).read()
    assert "## IMP vs one-shot" in report and "| IMP | k=0it |" in report and "| one-shot | k=0it |" in report
    assert "sparsest level" in report  # the IMP grid's tables count levels, not masks



def test_the_kind_chains_levels_and_hangs_controls_off_them(imp_run):
    from lthmpi import kinds
    from lthmpi.experiment import Experiment

    cfg, path = imp_run
    exp = Experiment(cfg, path)
    exp.load_parent()
    exp.load_masks()
    graph = kinds.build_graph(exp)
    assert {t.kind for t in graph.tasks} == {"imp"} and len(graph) == 3 * 2 * 3
    for t in graph.tasks:
        lv, r = t.spec.level, t.spec.reset
        want = () if lv == 1 else (f"l{lv - 1:02d}_r{r:02d}_ticket",)  # the task whose final weights give m_l
        assert t.deps == want, t.id
    # the critical path is a chain: L levels in sequence (k = 0's, the longest), whatever the controls
    assert graph.critical_path() == pytest.approx(sum(graph.by_id[f"l{lv:02d}_r00_ticket"].cost for lv in (1, 2, 3)))
    assert graph.width() == 2 * 3  # per depth: each chain's ticket and its two controls


def test_model_replays_imp_chains_at_their_critical_path(imp_run):
    from lthmpi.analysis.scaling_measured import profile_from_results
    from lthmpi.analysis.scaling_model import predict, synthetic_profile
    from lthmpi.results import load

    # 4 levels x chains at k = 0 and 2 epochs of 10 (10 and 8 s a level) x (ticket + 1 control)
    prof = synthetic_profile(4, 2, epochs=10, epoch_seconds=1.0, reset_epochs=[0, 2], controls=1, chains=True,
                             parent_seconds=0.0)
    assert predict(prof, 1, "lpt")["makespan"] == pytest.approx(2 * (40 + 32))  # everything, one after another
    for scheduler in ("lpt", "dynamic", "static"):
        wide = predict(prof, 100, scheduler)
        assert wide["makespan"] == pytest.approx(40) == wide["critical_path"]  # the chain at k = 0
        assert predict(prof, 2, scheduler)["makespan"] >= 72  # half the work
    prof.data_parallel_efficiency = 1.0  # 8 ranks over the 4 tasks that can run at once: pairs, twice as fast
    sub = predict(prof, 8, "dynamic")
    assert sub["workers"] == 4 and sub["makespan"] == pytest.approx(20)

    measured = profile_from_results(load(imp_run[1]))  # the results record each level's dependency
    chain = [i for i, d in enumerate(measured.task_deps) if d]
    assert len(chain) == 2 * 3 * 2  # levels 2 and 3 of both chains, tickets and controls
    far = predict(measured, 1000, "dynamic")  # every chain at once: its 3 levels (each + the per-task overhead)
    assert far["makespan"] == pytest.approx(far["critical_path"] + 3 * measured.overhead_per_task)
    assert far["critical_path"] >= 3 * min(measured.task_durations)


def test_seed_study_prices_imp_on_20_100_and_1000_ranks(capsys):
    import json

    from lthmpi.analysis.scaling_cli import main

    assert main(["--seed-study", "--json"]) == 0
    imp = json.loads(capsys.readouterr().out)["seed_study_imp"]
    assert imp["case"]["tasks"] == 100 and imp["case"]["longest_chain_hours"] == pytest.approx(20 * 345 * 4.5 / 60)
    alone, grouped = imp["rows"]["no subgroups"], next(v for k, v in imp["rows"].items() if k.startswith("subgroups"))
    for rows in (alone, grouped):
        assert sorted({r["P"] for r in rows}) == [20, 100, 1000]
    parent = 350 * 4.5 / 60
    for r in alone:  # 5 chains can run at once: more ranks do not help, the chain is the wall time
        assert r["wall"] / 3600 == pytest.approx(parent + 20 * 345 * 4.5 / 60) and r["idle"] == r["P"] - 5
    walls = [min(r["wall"] for r in grouped if r["P"] == p) for p in (20, 100, 1000)]
    assert walls[0] > walls[1] > walls[2] > parent * 3600  # subgroups shorten the chains; the parent stays


# -- the chains after a SIGKILL, resumed over MPI (the real command line) ---------------------------------------

def chain_mask_bytes(run_dir) -> dict:
    """Every chain's every level's mask, as arrays (what the levels computed, whoever computed them)."""
    from lthmpi.store import RunDir

    run, out = RunDir(str(run_dir)), {}
    for name in sorted(os.listdir(run.chains_dir)):
        reset, level = int(name[1:3]), int(name[5:7])
        mask, attrs = run.read_chain_mask(reset, level)
        out[name] = ({p: m.tobytes() for p, m in mask.items()}, attrs["remaining"])
    return out


def test_sigkill_mid_chain_resumes_without_retraining_and_three_ranks_agree(imp_run, tmp_path):
    """P = 1 killed (SIGKILL) in its third task, resumed on 3 ranks: no finished level is trained again, every
    rank trains levels whose masks other ranks cut, and the result equals the uninterrupted one-process run
    (`imp_run`: masks, measurements, curves, bit for bit). Keep P = 3: it is the default suite's lpt on chains
    under mpirun -np 3 (test_graph_run.py's lpt variant is in the battery)."""
    from faultkit import assert_same_results, done_counts, finish, launch, records, start, task_files

    cfg, reference = imp_run
    toml = tmp_path / "imp.toml"
    toml.write_text(cfg.to_toml())
    config, killed = ["--config", str(toml)], tmp_path / "killed"
    p = start(killed, None, args=config, base=[], env={"LTHMPI_FAULT": "kill:0:3"})
    rc, _, err = finish(p, timeout=300)
    assert rc != 0, err[-2000:]
    finished = task_files(killed)
    n_tasks = 3 * 2 * 3  # levels x chains x (ticket + 2 controls)
    assert 0 < len(finished) < n_tasks and not (killed / "results.h5").exists()
    before = {t: os.stat(killed / "tasks" / f"{t}.h5").st_mtime_ns for t in finished}
    r = launch(killed, 3, args=config, base=[])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {t: os.stat(killed / "tasks" / f"{t}.h5").st_mtime_ns for t in finished} == before
    counts = done_counts(killed)
    assert len(counts) == n_tasks and set(counts.values()) == {1}, counts  # each level trained once, in all
    assert {v["rank"] for t, v in records(killed).items() if t not in finished} == {0, 1, 2}

    assert_same_results(killed, reference)
    a, b = chain_mask_bytes(killed), chain_mask_bytes(reference)
    assert len(a) == 3 * 2 and a == b


def test_a_diverged_level_stops_its_chain_with_one_line(imp_run, tmp_path, monkeypatch):
    """Level 2 of chain 0 made to diverge (its weights turned NaN mid-training): it is recorded
    as diverged with one log line, no level-3 mask is cut from its NaNs (NaN sorts after the pruned positions, so
    such a mask would revive pruned weights), level 3's ticket and controls are recorded as diverged upstream
    without training, every earlier mask stays nested, the other chain runs on, and the analysis says so. Run as
    the resume of a copy of `imp_run` without chain 0's levels 2 and 3 (their task files and level 3's mask):
    only those levels are trained again, the rest is the uninterrupted run's."""
    import shutil

    from faultkit import log_has

    from lthmpi.analysis import load_runs, science
    from lthmpi.analysis.report import analyse
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load

    from lthmpi.kinds import imp as kind_imp

    cfg, reference = imp_run
    victim = "l02_r00_ticket"
    later = ("l03_r00_ticket", "l03_r00_random_reinit", "l03_r00_random_mask")
    path = str(tmp_path / "run")
    shutil.copytree(reference, path, ignore=shutil.ignore_patterns("logs", "lock", "results.h5"))
    for tid in (victim, *later):
        os.unlink(os.path.join(path, "tasks", f"{tid}.h5"))
    os.unlink(os.path.join(path, "imp_masks", "r00_l03.h5"))
    real = kind_imp.run_grid_task

    def poisoned(exp, spec, load_mask, kind, progress=None, write=True, **kw):
        if spec.id != victim:
            return real(exp, spec, load_mask, kind, progress, write, **kw)
        fit = exp.trainer.fit

        def nan_fit(*args, **kwargs):  # the victim ends with NaN weights (whichever kernels trained it)
            h = fit(*args, **kwargs)
            for v in exp.trainer.model.trainable_variables:
                v.assign(v * float("nan"))
            return h

        exp.trainer.fit = nan_fit
        try:
            return real(exp, spec, load_mask, kind, progress, write, **kw)
        finally:
            del exp.trainer.fit

    monkeypatch.setattr(kind_imp, "run_grid_task", poisoned)
    run_serial(cfg, path, threads=1, quiet=True)
    tasks = {t["task_id"]: t for t in load(path)["tasks"]}
    assert tasks[victim]["diverged"] and tasks[victim]["upstream"] == ""
    for tid in later:
        assert tasks[tid]["diverged"] and tasks[tid]["upstream"] == victim and tasks[tid]["iterations"] == 0, tid
    others = [t for tid, t in tasks.items() if tid != victim and tid not in later]
    assert len(others) == 14 and not any(t["diverged"] for t in others)
    assert not os.path.exists(os.path.join(path, "imp_masks", "r00_l03.h5"))
    for reset, levels in ((0, 2), (1, 3)):
        masks = [m for m, _ in chain_masks(path, reset, levels)]
        for prev, m in zip(masks, masks[1:]):
            assert all(not (m[p] & ~prev[p]).any() for p in m)
    lines = [ln for ln in open(os.path.join(path, "logs", "rank0.log")) if "diverged" in ln]
    assert len(lines) == 1 and victim in lines[0] and "its chain stops here" in lines[0], lines
    assert log_has(path, "levels 3-3 of the chain are recorded as diverged upstream")
    (res,) = load_runs([path])
    g = science.build_grid([res])
    assert g.diverged == 4 and len(g.stopped) == 1 and "diverged at level 2 (l02_r00_ticket); 3 later task(s)" in g.stopped[0]
    assert "diverged IMP chain: seed 3: the chain of k=0it diverged at level 2" in analyse([res], str(tmp_path / "r"))["text"]
    # a stability pair of level 3 on the stopped chain: recorded as diverged upstream, no curve through NaNs
    from lthmpi.experiment import Experiment
    from lthmpi.kinds import stability as kind

    stab = from_dict({**IMP_TINY, "stability": {"enabled": True, "points": ["0it"], "masks": [3], "alphas": 3}})
    validate(stab)
    exp = Experiment(stab, path, threads=1)
    exp.load_parent()
    exp.load_masks()
    got = {t.id: kind.KIND.run(exp, t) for t in kind.KIND.tasks(exp)}
    assert sorted(got) == ["stab_l03_k00_a", "stab_l03_k00_b", "stab_l03_k00_eval"]
    assert all(a["diverged"] and a["upstream"] == victim and a["iterations"] == 0 for a in got.values())
    assert not got["stab_l03_k00_eval"]["stable"] and np.isnan(got["stab_l03_k00_eval"]["barrier"])
