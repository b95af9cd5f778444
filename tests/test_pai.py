"""Pruning criteria wired into runs (issue 34, docs/pruning.md): the config keys and their one-line refusals, masks
of every criterion through the masks phase with exact counts, the invert and layer_shuffle controls, ticket
transfer (shape refusal, provenance), the analysis' criterion table, and P = 1 equals P = 2 on a SNIP grid."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lthmpi.config import Config, ConfigError, from_dict
from lthmpi.validation import validate, validate_against_data

ROOT = Path(__file__).resolve().parents[1]

# digits, 1 epoch of 38 iterations: the parent is shared by every criterion's masks (copied, not retrained); seed,
# data and training are SOURCE's, whose run's parent it is
PAI = {"seed": 7, "data": {"dataset": "digits", "validation": 200},
       "train": {"epochs": 1, "batch_size": 32, "eval_every": "10it"},
       "prune": {"remaining": [0.5, 0.1], "score_batches": 2, "synflow_iterations": 10},
       "reset": {"points": ["0ep"], "controls": ["invert", "layer_shuffle"]}}


def cfg_of(base=PAI, **sections) -> Config:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for s, v in sections.items():
        raw[s] = {**raw.get(s, {}), **v} if isinstance(v, dict) else v
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


# -- config -------------------------------------------------------------------------------------------------

def test_new_keys_at_their_defaults_keep_every_run_name():
    """Hashes as lthmpi made them before issue 34's keys (computed with the code of commit d56575b): unchanged, so
    existing run directories keep their names and resume; a criterion other than magnitude is another run."""
    from conftest import TINY

    tiny = from_dict(TINY)
    assert Config().hash() == "44136fa355b3" and tiny.hash() == "bd3a16d7d5b7"
    assert Config().legacy_hash() == "bc9df0e015a4" and tiny.legacy_hash() == "681439e58129"
    defaults = {"criterion": "magnitude", "score_at": "0ep", "score_batches": 1, "synflow_iterations": 100,
                "masks_from": "", "masks_from_reset": "0ep"}
    assert from_dict({**TINY, "prune": {**TINY["prune"], **defaults}}).hash() == tiny.hash()
    snip = from_dict({**TINY, "prune": {**TINY["prune"], "criterion": "snip"}})
    assert snip.hash() != tiny.hash() and snip.legacy_hash() is None


@pytest.mark.parametrize("sections, words", [
    ({"prune": {"criterion": "snipp"}}, "unknown pruning criterion 'snipp'"),
    ({"prune": {"criterion": "snip", "score_batches": 0}}, "prune.score_batches must be an integer >= 1"),
    ({"prune": {"synflow_iterations": 0}}, "prune.synflow_iterations must be an integer >= 1"),
    ({"prune": {"criterion": "snip", "method": "imp", "remaining": []}}, "IMP prunes by magnitude"),
    ({"reset": {"controls": ["random_mask", "layer_shuffle"]}}, "they are the same control"),
    ({"prune": {"method": "imp", "remaining": []}, "reset": {"controls": ["invert"]}}, "'invert' needs"),
    ({"prune": {"masks_from": "x", "criterion": "snip"}}, "cannot be combined with prune.criterion"),
    ({"prune": {"score_at": "soon"}}, "prune.score_at"),
])
def test_bad_criterion_settings_are_one_line(sections, words):
    with pytest.raises(ConfigError) as e:
        cfg_of(**sections)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_score_batches_larger_than_the_data_are_refused_in_one_line():
    cfg = cfg_of(prune={"criterion": "grasp", "score_batches": 50})
    with pytest.raises(ConfigError) as e:
        validate_against_data(cfg, 38, 1237)
    assert "1600 training examples but there are 1237; use at most 38" in str(e.value) and "\n" not in str(e.value)
    validate_against_data(cfg_of(prune={"criterion": "synflow", "score_batches": 50}), 38, 1237)  # data-free


# -- masks of every criterion through the masks phase ----------------------------------------------------------

@pytest.fixture(scope="module")
def parent_dir(source_run):
    """The trained parent of PAI, whose parent.h5 every criterion's run directory copies: source_run's, which
    PAI trains alike (seed, data and training are the same; masks and tasks are not), so it is trained once."""
    return source_run


def experiment(parent_dir, tmp_path, **prune):
    from lthmpi.experiment import Experiment

    path = tmp_path / f"run_{prune.get('criterion', 'magnitude')}"
    os.makedirs(path)
    shutil.copy(parent_dir / "parent.h5", path / "parent.h5")
    exp = Experiment(cfg_of(prune=prune), str(path))
    exp.load_parent()
    exp.compute_masks()
    return exp


def unit_counts(mask, scope, layer_rates):
    from lthmpi.pruning import _units

    return {u: sum(int(mask[p].sum()) for p in paths) for u, paths in _units(mask, scope, layer_rates).items()}


@pytest.mark.parametrize("criterion", ["magnitude", "magnitude_init", "snip", "grasp", "synflow", "random"])
def test_every_criterion_cuts_masks_with_exact_counts(parent_dir, tmp_path, criterion):
    from lthmpi import criteria
    from lthmpi.pruning import magnitude_masks, oneshot_counts

    exp = experiment(parent_dir, tmp_path, criterion=criterion)
    p = exp.cfg.prune
    assert len(exp.masks) == 2 and exp.scores is not None  # the invert control keeps the scores
    for r, m in zip(p.remaining, exp.masks):
        assert unit_counts(m, p.scope, p.layer_rates) == oneshot_counts(exp.sizes, r, p.scope, p.layer_rates)
    final = {q: exp.checkpoints[exp.total][q] for q in exp.prunable}
    by_magnitude = [magnitude_masks(final, r, p.scope, p.layer_rates) for r in p.remaining]
    same = all(np.array_equal(a[q], b[q]) for a, b in zip(exp.masks, by_magnitude) for q in exp.prunable)
    assert same == (criterion == "magnitude"), "magnitude masks are today's, bitwise; every other criterion's differ"
    if criterion != "synflow":  # single-shot: the masks keep the highest of the stored scores
        for r, m in zip(p.remaining, exp.masks):
            cut = criteria.masks_from_scores(exp.scores, r, p.scope, p.layer_rates)
            assert all(np.array_equal(cut[q], m[q]) for q in exp.prunable)
    if criterion == "snip":  # scored at θ_0 on the seeded batches, recomputed here
        exp.trainer.set_weights(exp.checkpoints[0])
        x, y = exp.data.x_train, exp.data.y_train
        rows = np.random.default_rng([exp.cfg.seed, 34]).permutation(len(x))[:64]
        batches = [(x[np.sort(i)], y[np.sort(i)]) for i in np.split(rows, 2)]
        want = criteria.snip_scores(exp.model, batches)
        assert all(np.array_equal(want[q], exp.scores[q]) for q in exp.prunable)


def test_invert_and_layer_shuffle_keep_per_layer_counts(parent_dir, tmp_path):
    from lthmpi.kinds.retraining import Retraining, start_weights

    exp = experiment(parent_dir, tmp_path, criterion="snip")
    for i, mask in enumerate(exp.masks):
        seed = Retraining(i, 0, "layer_shuffle").seed(exp.cfg.seed)
        w_inv, inv = start_weights(exp, 0, mask, "invert", Retraining(i, 0, "invert").seed(exp.cfg.seed))
        _, shuf = start_weights(exp, 0, mask, "layer_shuffle", seed)
        _, alias = start_weights(exp, 0, mask, "random_mask", seed)
        for q in exp.prunable:
            assert inv[q].sum() == mask[q].sum() == shuf[q].sum(), q
            assert not np.array_equal(inv[q], mask[q]) and not np.array_equal(shuf[q], mask[q])
            assert np.array_equal(shuf[q], alias[q]), "random_mask is layer_shuffle: the same draw"
            s = exp.scores[q]
            assert s[inv[q]].max() <= s[~inv[q]].min(), "invert keeps the lowest scores of each layer"
            assert np.all(w_inv[q][~inv[q]] == 0) and np.array_equal(w_inv[q][inv[q]], exp.checkpoints[0][q][inv[q]])


# -- ticket transfer --------------------------------------------------------------------------------------------

SOURCE = {"seed": 7, "data": {"dataset": "digits", "validation": 200},
          "train": {"epochs": 1, "batch_size": 32, "eval_every": "10it"},
          "prune": {"remaining": [0.3]}, "reset": {"points": ["0ep", "10it"], "controls": []}}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tf_runtime):
    from lthmpi.parallel.coordinator import run_serial

    path = tmp_path_factory.mktemp("source") / "run"
    run_serial(cfg_of(SOURCE), str(path), threads=1, quiet=True)
    return path


def test_transfer_retrains_the_source_ticket_and_records_its_provenance(source_run, tmp_path):
    from lthmpi import results
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.store import RunDir

    cfg = cfg_of(SOURCE, seed=8, data={"validation": 300}, reset={"points": ["0ep"], "controls": ["layer_shuffle"]},
                 prune={"masks_from": str(source_run), "masks_from_reset": "10it"})
    run_serial(cfg, str(tmp_path / "t"), threads=1, quiet=True)
    src, dst = RunDir(str(source_run)), RunDir(str(tmp_path / "t"))
    (src_masks, _), (dst_masks, _) = src.read_masks(), dst.read_masks()
    assert all(np.array_equal(src_masks[0][q], dst_masks[0][q]) for q in src_masks[0])
    task = dst.read_task("m000_r00_ticket")[0]
    assert task["source_hash"] == cfg_of(SOURCE).hash() and task["source_iteration"] == 10
    assert task["source_commit"] == results.load(str(source_run))["provenance"]["git_commit"]
    assert task["source_run"] == os.path.abspath(source_run) and task["remaining"] == pytest.approx(0.3, abs=1e-4)
    _, attrs = dst.read_mask_extras()
    assert attrs["source_hash"] == task["source_hash"]
    from lthmpi import transfer
    from lthmpi.experiment import Experiment

    exp = Experiment(cfg, str(tmp_path / "t"))
    exp.load_parent()
    exp.load_masks()
    start = src.read_checkpoints()[0][10]
    assert all(np.array_equal(exp.transfer.weights[q], start[q]) for q in start), "the source's weights at 10it"
    assert not np.array_equal(exp.checkpoints[0][exp.prunable[0]], start[exp.prunable[0]])
    assert isinstance(exp.transfer, transfer.Source)


def test_transfer_refuses_another_input_shape_in_one_line(source_run, tmp_path, tf_runtime):
    from lthmpi.experiment import Experiment

    rng = np.random.default_rng(0)
    npz = tmp_path / "ten.npz"
    np.savez(npz, x_train=rng.random((600, 10, 10, 1), dtype=np.float32), y_train=rng.integers(0, 10, 600),
             x_test=rng.random((50, 10, 10, 1), dtype=np.float32), y_test=rng.integers(0, 10, 50))
    cfg = cfg_of(SOURCE, data={"dataset": "npz", "dir": str(npz), "validation": 100},
                 reset={"points": ["0ep"]}, prune={"masks_from": str(source_run)})
    os.makedirs(tmp_path / "t")
    with pytest.raises(ConfigError) as e:
        Experiment(cfg, str(tmp_path / "t"))
    msg = str(e.value)
    assert "\n" not in msg and "a ticket needs the same model and input shape" in msg
    assert "(64, 300) there and (100, 300) here" in msg and "digits vs npz" in msg
    assert not os.path.exists(tmp_path / "t" / "parent.h5"), "refused before the parent trains"


# -- analysis ---------------------------------------------------------------------------------------------------

def test_falls_below_names_the_first_sparsity_under_dense_minus_tolerance():
    from lthmpi.analysis.pai import falls_below

    line = {"remaining": [0.5, 0.2, 0.1, 0.05], "value": [0.90, 0.897, 0.893, 0.80]}
    assert falls_below(line, 0.9, 0.005) == (0.2, 0.1)
    assert falls_below(dict(line, value=[0.9] * 4), 0.9, 0.005) == (0.05, None)
    assert falls_below(dict(line, value=[0.1, 0.9, 0.9, 0.9]), 0.9, 0.005) == (None, 0.5)
    assert falls_below(dict(line, value=[float("nan")] * 4), 0.9, 0.005) == (None, 0.5)


def test_analysis_puts_the_criteria_of_one_parent_on_one_figure_with_their_table(tmp_path):
    from test_analysis import accuracy, assert_png, make_run

    from lthmpi.analysis import load_runs
    from lthmpi.analysis.report import analyse

    make_run(tmp_path / "magnitude")
    make_run(tmp_path / "snip", acc=lambda m, r, c: accuracy(m, r, c) - 0.02)
    results = load_runs([str(tmp_path / "magnitude"), str(tmp_path / "snip")])
    results[1]["config"]["prune"]["criterion"] = "snip"  # the same parent, masks by another criterion
    done = analyse(results, str(tmp_path / "out"))
    assert_png(tmp_path / "out" / "criteria.png")
    rows = {" ".join(line.split()[:-2]): line.split() for line in done["text"].splitlines()
            if " ticket k=" in line or "random_" in line}
    assert rows["magnitude ticket k=0ep"][-2:] == ["20.00", "10.00"]  # 0.894 < 0.90 - 0.005 at 10 %
    assert rows["snip ticket k=0ep"][-2:] == ["-", "50.00"]  # 0.89 at 50 %: below from the densest mask on
    assert "## Pruning criteria: magnitude, snip" in open(done["report"]).read()


# -- P = 1 equals P = 2 on a SNIP grid ---------------------------------------------------------------------------

SNIP = {"seed": 5, "data": {"dataset": "digits", "validation": 200},
        "train": {"iterations": 20, "batch_size": 32, "eval_every": "5it"},
        "prune": {"remaining": [0.5, 0.2], "criterion": "snip", "score_batches": 2},
        "reset": {"points": ["0ep"], "controls": ["invert", "layer_shuffle"]}}


def test_snip_grid_p2_under_mpirun_equals_p1(tmp_path, tf_runtime):
    """P = 1 in this process (one thread, as every rank), P = 2 under mpirun: bitwise the same results. Rank 0
    cuts the masks and the others read them, so a third rank would show nothing more here (and costs a
    TensorFlow import); three ranks under lpt are tests/test_mpi.py's failing-rank test."""
    from faultkit import curves, records

    from lthmpi.parallel.coordinator import run_serial

    run_serial(cfg_of(SNIP), str(tmp_path / "p1"), threads=1, quiet=True)
    sets = [f"--set={k}.{kk}={json.dumps(vv)}" for k, v in SNIP.items() if isinstance(v, dict) for kk, vv in v.items()]
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", "2", sys.executable, "-m", "lthmpi.main", "--run-dir",
           str(tmp_path / "p2"), "--set=seed=5", *sets, "--set=parallel.threads=1", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert sorted(one) == sorted(two) == sorted(f"m00{m}_r00_{c}" for m in (0, 1)
                                                 for c in ("ticket", "invert", "layer_shuffle"))
    assert {t["rank"] for t in two.values()} == {0, 1}
    for tid in one:
        for k in ("final_accuracy", "early_stop_iteration", "early_stop_accuracy", "best_val_loss", "remaining"):
            assert one[tid][k] == two[tid][k], (tid, k)
    c1, c2 = curves(tmp_path / "p1"), curves(tmp_path / "p2")
    assert c1.keys() == c2.keys()
    for key in c1:
        np.testing.assert_array_equal(c1[key], c2[key], err_msg=str(key))
