"""Paper presets under run/configs, `--describe`, and training from a prepared file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lthmpi.config import Config
from lthmpi.validation import resolve

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "run" / "configs").glob("*.toml"))


def test_presets_exist_for_every_model():
    names = {resolve(str(p)).model.name for p in PRESETS}
    assert names == {"lenet300_100", "conv2", "conv4", "conv6", "resnet20", "vgg16", "mobilenetv2"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_resolves_and_round_trips(preset):
    cfg = resolve(str(preset))
    assert 0 < min(cfg.remaining_fractions()) < max(cfg.remaining_fractions()) < 1
    if not cfg.imp:  # the one-shot presets run the seed's five reset points; IMP presets the paper's own
        assert len(cfg.reset.points) == 5


def test_imp_presets_are_the_papers_recipes():
    lenet = resolve(str(ROOT / "run/configs/lenet_mnist_frankle_imp.toml"))  # Frankle & Carbin 2019
    assert (lenet.prune.method, lenet.prune.imp_rate, lenet.prune.layer_rates, lenet.prune.scope) == \
        ("imp", 0.2, {"output": 0.5}, "layerwise")  # 20% a level, the output layer 10%
    assert (lenet.train.optimizer, lenet.train.lr, lenet.train.batch_size, lenet.reset.points) == \
        ("adam", 1.2e-3, 60, ["0it"])
    resnet = resolve(str(ROOT / "run/configs/resnet20_cifar10_imp_rewind.toml"))  # Frankle et al. 2020
    assert resnet.imp and "500it" in resnet.reset.points and resnet.prune.scope == "global"
    assert (resnet.train.optimizer, resnet.train.lr, resnet.train.batch_size) == ("sgd", 0.1, 128)


def test_default_preset_is_the_builtin_default():
    assert resolve(str(ROOT / "run/configs/default.toml")).hash() == Config().hash()


@pytest.mark.parametrize("model,dataset,total", [("lenet300_100", "fashion_mnist", "266,610"),
                                                 ("mobilenetv2", "imagenet", "3,538,984")])
def test_describe_prints_layers_and_paper_parameter_count(model, dataset, total, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lthmpi.main", "--describe", "--set", f"model.name={model}",
                        "--set", f"data.dataset={dataset}", "--set", f"data.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"total params: {total}" in r.stdout
    assert "output" in r.stdout and "prunable" in r.stdout


def test_training_from_prepared_file_equals_raw(tmp_path):
    """The prepared HDF5 is a cache of the raw data: the experiment's results must not change."""
    from lthmpi.data.prepare import prepare
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load

    sets = ["data.dataset=digits", "data.validation=200", "train.epochs=2", "train.batch_size=32",
            "prune.remaining=[0.3]", 'reset.points=["0ep", "10it"]', "reset.controls=[]", "train.eval_every=10it"]
    raw = resolve(None, sets)
    prepared_file = tmp_path / "digits.h5"
    prepare(SimpleNamespace(dataset="digits", dir="", subset=0, validation=200, normalize="scale"), str(prepared_file))
    cached = resolve(None, sets + [f"data.prepared={prepared_file}"])
    a = load(run_serial(raw, str(tmp_path / "raw"), 1, quiet=True))
    b = load(run_serial(cached, str(tmp_path / "cached"), 1, quiet=True))
    assert a["parent"]["test_accuracy"] == b["parent"]["test_accuracy"]
    key = lambda t: t["task_id"]  # noqa: E731
    for x, y in zip(sorted(a["tasks"], key=key), sorted(b["tasks"], key=key)):
        assert (x["final_accuracy"], x["early_stop_iteration"], x["best_val_loss"]) == \
               (y["final_accuracy"], y["early_stop_iteration"], y["best_val_loss"])


def test_presets_use_the_weight_decay_their_papers_used():
    """SGD recipes with weight decay (Frankle et al. in PyTorch/open_lth, MobileNetV2 in TF-slim) use coupled
    L2 (g += wd * w before momentum), not Keras' decoupled form: with momentum 0.9 the two differ ~10x."""
    for preset in PRESETS:
        cfg = resolve(str(preset))
        if cfg.train.weight_decay:
            assert cfg.train.weight_decay_mode == "l2", preset.name
