"""Tests of lthmpi/config.py and lthmpi/steps.py: defaults, TOML + --set, one-line errors, identity hash."""
from __future__ import annotations

import dataclasses

import pytest

from lthmpi.config import Config, ConfigError, from_dict, parse_set, tomllib
from lthmpi.validation import resolve, validate, validate_against_data
from lthmpi.steps import Step, StepError


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cfg_with(**sections):
    """A validated config: defaults overlaid with the given sections (dicts) or seed."""
    cfg = from_dict(sections)
    validate(cfg)
    return cfg


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, f"config errors are one line: {msg!r}"
    return msg


# -- defaults, file and --set -------------------------------------------------------------------------

def test_defaults_validate():
    cfg = Config()
    validate(cfg)
    assert resolve() == cfg
    fractions = cfg.remaining_fractions()
    assert fractions[0] == 0.8 and len(fractions) == 20 and fractions == sorted(fractions, reverse=True)
    assert [s.text for s in cfg.reset_steps()] == cfg.reset.points


def test_toml_file_with_set_overlay(tmp_path):
    path = write(tmp_path, """
seed = 7
[train]
epochs = 5
lr = 0.01
[prune]
scope = "layerwise"
layer_rates = {output = 0.5, "fc*" = 1.0}
""")
    cfg = resolve(path, ["train.epochs=9", "prune.remaining=[0.5, 0.2]", "model.name=conv2",
                         "reset.points=[\"0ep\", \"100it\"]", "train.eval_every=50it"])
    assert cfg.seed == 7
    assert cfg.train.epochs == 9  # --set wins over the file
    assert cfg.train.lr == 0.01  # the file's other keys in that section survive the overlay
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep their defaults
    assert cfg.prune.scope == "layerwise"
    assert cfg.prune.layer_rates == {"output": 0.5, "fc*": 1.0}
    assert cfg.prune.remaining == [0.5, 0.2]
    assert cfg.model.name == "conv2"  # a bare word is a string
    assert cfg.reset.points == ["0ep", "100it"]
    assert cfg.train.eval_every == "50it"


def test_set_value_is_read_as_toml():
    assert parse_set("prune.remaining=[0.5, 0.2]") == {"prune": {"remaining": [0.5, 0.2]}}
    assert parse_set("train.lr=1e-3") == {"train": {"lr": 0.001}}
    assert parse_set("train.epochs=4") == {"train": {"epochs": 4}}
    assert parse_set("data.augment=true") == {"data": {"augment": True}}
    assert parse_set("seed=5") == {"seed": 5}
    assert parse_set('reset.points=["0ep","1ep"]') == {"reset": {"points": ["0ep", "1ep"]}}
    assert parse_set("prune.layer_rates={output=0.25}") == {"prune": {"layer_rates": {"output": 0.25}}}
    assert parse_set("data.dir=/data/fashion-mnist") == {"data": {"dir": "/data/fashion-mnist"}}
    # the value is typed: an integer where a float is expected is accepted, a string for an int is not
    assert resolve(None, ["train.lr=1"]).train.lr == 1.0
    assert isinstance(resolve(None, ["train.lr=1"]).train.lr, float)


def test_layer_rates_set_replaces_the_table():
    cfg = resolve(None, ["prune.layer_rates={fc1 = 0.5}"])
    assert cfg.prune.layer_rates == {"fc1": 0.5}


# -- refused input ---------------------------------------------------------------------------------

def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        resolve(None, ["train.epocs=5"])
    msg = one_line(e)
    assert "epocs" in msg and "did you mean 'epochs'" in msg


def test_unknown_section_and_key_in_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve(write(tmp_path, "[trian]\nepochs = 2\n"))
    assert "trian" in one_line(e) and "'train'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        resolve(write(tmp_path, "[prune]\nremainig = [0.5]\n", "b.toml"))
    assert "did you mean 'remaining'" in one_line(e)


@pytest.mark.parametrize("item, words", [
    ("train.epochs=\"three\"", ["train.epochs", "integer"]),
    ("train.epochs=2.5", ["train.epochs", "integer"]),
    ("train.epochs=true", ["train.epochs", "integer"]),
    ("train.lr=\"fast\"", ["train.lr", "number"]),
    ("data.augment=1", ["data.augment", "true or false"]),
    ("prune.remaining=0.5", ["prune.remaining", "list"]),
    ("prune.layer_rates=[0.5]", ["prune.layer_rates", "table"]),
    ("model.name=3", ["model.name", "string"]),
    ("seed=abc", ["seed", "integer"]),
    ("train=5", ["[train]", "section"]),
    ("prune.remaining=[\"a\"]", ["prune.remaining", "'a'"]),
    ("prune.quantiles=[\"a\"]", ["prune.quantiles", "'a'"]),
    ("reset.points=[0]", ["0", "string"]),
])
def test_wrong_types_are_refused(item, words):
    with pytest.raises(ConfigError) as e:
        resolve(None, [item])
    msg = one_line(e)
    for w in words:
        assert w in msg


def test_malformed_toml_file(tmp_path):
    path = write(tmp_path, "[train]\nepochs = = 3\n")
    with pytest.raises(ConfigError) as e:
        resolve(path)
    msg = one_line(e)
    assert path in msg and "not valid TOML" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve(str(tmp_path / "nope.toml"))
    assert "does not exist" in one_line(e)


@pytest.mark.parametrize("item", ["prune.remaining=[0.5,", "train.epochs", "train.lr=1 2", "a.b.c=1",
                                  "=3", "model.name=\"unterminated"])
def test_malformed_set(item):
    with pytest.raises(ConfigError) as e:
        resolve(None, [item])
    assert "--set" in one_line(e)


@pytest.mark.parametrize("remaining", [[0.5, 1.5], [0.0], [1.0], [-0.2], [1]])
def test_threshold_outside_unit_interval(remaining):
    with pytest.raises(ConfigError) as e:
        cfg_with(prune={"remaining": remaining})
    assert "prune.remaining" in one_line(e) and "(0, 1)" in str(e.value)


@pytest.mark.parametrize("quantiles", [[0], [100], [60, 120]])
def test_quantile_outside_range(quantiles):
    with pytest.raises(ConfigError) as e:
        cfg_with(prune={"quantiles": quantiles})
    assert "prune.quantiles" in one_line(e)


def test_quantiles_override_remaining():
    cfg = cfg_with(prune={"quantiles": [60, 95, 99], "remaining": [0.5]})
    assert cfg.remaining_fractions() == pytest.approx([0.4, 0.05, 0.01], abs=1e-12)


def test_empty_mask_list():
    with pytest.raises(ConfigError) as e:
        cfg_with(prune={"remaining": []})
    assert "prune.remaining is empty" in one_line(e)


def test_empty_reset_points():
    with pytest.raises(ConfigError) as e:
        cfg_with(reset={"points": []})
    assert "reset.points is empty" in one_line(e)


@pytest.mark.parametrize("prune", [{"remaining": [0.5, 0.2, 0.5]}, {"quantiles": [80, 90, 80]}])
def test_duplicate_thresholds(prune):
    with pytest.raises(ConfigError) as e:
        cfg_with(prune=prune)
    assert "duplicate" in one_line(e)


@pytest.mark.parametrize("section, words", [
    ({"reset": {"controls": ["random_pony"]}}, ["random_pony", "random_reinit"]),
    ({"reset": {"controls": ["random_mask", "random_mask"]}}, ["duplicates"]),
    ({"reset": {"points": ["0ep", "0ep"]}}, ["duplicates"]),
    ({"reset": {"points": ["2 epochs"]}}, ["2 epochs"]),
    ({"train": {"optimizer": "adagrad"}}, ["adagrad", "adam"]),
    ({"train": {"eval_every": "0it"}}, ["eval_every"]),
    ({"train": {"lr_milestones": ["80"]}}, ["80"]),
    ({"train": {"batch_size": 0}}, ["batch_size"]),
    ({"train": {"lr": 0.0}}, ["train.lr"]),
    ({"prune": {"scope": "local"}}, ["local", "layerwise"]),
    ({"prune": {"layer_rates": {"output": -1}}}, ["layer_rates.output"]),
    ({"data": {"validation": 0}}, ["data.validation"]),
    ({"parallel": {"schedule": "fifo"}}, ["fifo"]),
])
def test_other_invalid_values(section, words):
    with pytest.raises(ConfigError) as e:
        cfg_with(**section)
    msg = one_line(e)
    for w in words:
        assert w in msg


# -- checks that need the data size ---------------------------------------------------------------

def test_validate_against_data_returns_T():
    cfg = cfg_with(train={"epochs": 2}, reset={"points": ["0ep", "10it", "1ep", "1.5ep"]})
    assert validate_against_data(cfg, 100, 6000) == 200
    cfg = cfg_with(train={"epochs": 2, "iterations": 150}, reset={"points": ["0ep", "149it"]})
    assert validate_against_data(cfg, 100, 6000) == 150  # iterations > 0 overrides epochs


@pytest.mark.parametrize("points", [["1ep", "10it"], ["0ep", "1ep", "100it"], ["1ep", "1.0ep"], ["50it", "0.5ep"]])
def test_unsorted_or_duplicate_reset_points(points):
    cfg = cfg_with(train={"epochs": 3}, reset={"points": points})
    with pytest.raises(ConfigError) as e:
        validate_against_data(cfg, 100, 6000)
    assert "strictly increasing" in one_line(e)


@pytest.mark.parametrize("points", [["0ep", "2ep"], ["0ep", "200it"], ["3ep"], ["0ep", "250it"]])
def test_reset_point_at_or_past_end(points):
    cfg = cfg_with(train={"epochs": 2}, reset={"points": points})
    with pytest.raises(ConfigError) as e:
        validate_against_data(cfg, 100, 6000)
    msg = one_line(e)
    assert "at or past the end of training" in msg and "200 iterations" in msg


def test_last_iteration_before_end_is_accepted():
    cfg = cfg_with(train={"epochs": 2}, reset={"points": ["0ep", "199it"]})
    assert validate_against_data(cfg, 100, 6000) == 200


def test_batch_larger_than_training_set():
    cfg = cfg_with(train={"batch_size": 512}, reset={"points": ["0ep"]})
    with pytest.raises(ConfigError) as e:
        validate_against_data(cfg, 0, 300)
    assert "batch_size" in one_line(e)


# -- steps ------------------------------------------------------------------------------------------

def test_steps():
    assert Step.parse("2ep").iterations(38) == 76
    assert Step.parse("0.5ep").iterations(38) == 19
    assert Step.parse("0.1ep").iterations(30) == 3  # no float truncation to 2
    assert Step.parse(" 500it ").iterations(38) == 500
    assert str(Step.parse("500it")) == "500it"
    for bad in ("2", "ep", "1.5it", "-1ep", "2 epochs", 3):
        with pytest.raises(StepError):
            Step.parse(bad)


# -- identity --------------------------------------------------------------------------------------

def test_hash_ignores_parallel_but_not_the_rest():
    base = cfg_with()
    h = base.hash()
    assert len(h) == 12
    same = cfg_with(parallel={"threads": 3, "schedule": "dynamic", "subgroups": False, "parent_data_parallel": True})
    assert same.hash() == h
    assert same.default_run_name() == base.default_run_name()
    for section in ({"seed": 1}, {"train": {"lr": 0.002}}, {"prune": {"remaining": [0.5]}},
                    {"reset": {"points": ["0ep"]}}, {"data": {"dataset": "digits"}}, {"model": {"name": "conv2"}},
                    {"reset": {"optimizer_state": "restore"}}, {"prune": {"layer_rates": {}}}):
        assert cfg_with(**section).hash() != h, section


def test_to_toml_round_trips():
    cfg = cfg_with(seed=11,
                   data={"dataset": "digits", "dir": "/x/\"quoted\" dir", "validation": 123, "augment": True},
                   train={"lr": 1e-05, "lr_milestones": ["1ep", "30it"], "weight_decay": 0.00051, "optimizer": "sgd"},
                   prune={"remaining": [0.8 ** k for k in range(1, 6)], "scope": "layerwise",
                          "layer_rates": {"output": 0.5, "conv*": 0.75}},
                   reset={"points": ["0ep", "0.25ep", "100it"], "controls": [], "length": "full"},
                   parallel={"threads": 2, "schedule": "static"})
    text = cfg.to_toml()
    back = from_dict(tomllib.loads(text))
    assert back == cfg
    assert back.hash() == cfg.hash()
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert from_dict(tomllib.loads(Config().to_toml())) == Config()
