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


@pytest.mark.parametrize("model,dataset,total,how", [("lenet300_100", "fashion_mnist", "266,610", "process"),
                                                     ("mobilenetv2", "imagenet", "3,538,984", "in_process")])
def test_describe_prints_layers_and_paper_parameter_count(model, dataset, total, how, tmp_path):
    """The command line as a process of its own once; MobileNetV2 through lthmpi.main.main in this process, the
    same code after the interpreter starts, without a second TensorFlow import (~4 s of CPU)."""
    from faultkit import main_in_process

    args = ["--describe", "--set", f"model.name={model}", "--set", f"data.dataset={dataset}",
            "--set", f"data.dir={tmp_path}"]
    if how == "process":
        r = subprocess.run([sys.executable, "-m", "lthmpi.main", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    else:
        r = main_in_process(args)
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


def describe(*args):
    """--describe through lthmpi.main.main in this process (it builds its models without values): the command
    line's own process is tested by test_describe_prints_layers_and_paper_parameter_count."""
    from faultkit import main_in_process

    r = main_in_process(["--describe", *args])
    assert r.returncode == 0, r.stderr
    return r.stdout


def density_rows(text: str) -> dict:
    """The densities table: mask label -> {column head: percent}, from the line that starts with "mask"."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("mask "))
    heads = lines[start].split()[1:]
    rows = {}
    for ln in lines[start + 1:]:
        cells = ln.rsplit(None, len(heads))
        if len(cells) != len(heads) + 1 or not cells[-1].endswith("%"):
            break
        rows[cells[0]] = {h: float(c.rstrip("%")) for h, c in zip(heads, cells[1:])}
    return rows


@pytest.mark.parametrize("preset,mask,rounds", [("lenet_mnist_frankle", "0.028147", 0.1),
                                                ("lenet_mnist_frankle_imp", "level 16", 0.02)])
def test_describe_prints_memory_and_the_per_layer_densities_of_every_mask(preset, mask, rounds):
    """LeNet-300-100 (Frankle & Carbin): the fully connected layers keep 0.8^n and the output 0.9^n with one n:
    16 at IMP's level 16; a little more at one-shot's 0.8^16 of all weights (IMP's level 16 keeps more than that,
    its output being pruned at half rate). The output keeps ~18.5% in both, not one-shot's old 51%."""
    import math

    cfg = resolve(str(ROOT / "run" / "configs" / f"{preset}.toml"))
    text = describe("--config", str(ROOT / "run" / "configs" / f"{preset}.toml"))
    params = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    weights = params * 4 / 2 ** 20
    assert f"float32 weights {weights:.1f} MiB + 2 Adam slots = {3 * weights:.1f} MiB per model and rank" in text
    rows = density_rows(text)
    assert len(rows) == len(cfg.remaining_fractions())
    row = rows[mask]
    n = math.log(row["fc1"] / 100) / math.log(0.8)
    assert n == pytest.approx(16, abs=rounds) and row["kept"] >= 100 * 0.8 ** 16 - 0.005
    assert row["fc2"] == pytest.approx(row["fc1"], abs=0.01)
    assert row["output"] == pytest.approx(100 * 0.9 ** n, abs=0.1) and row["output"] == pytest.approx(18.5, abs=0.3)
    assert "depend on the trained weights" not in text  # layer-wise: every density is fixed by the sizes


def test_describe_says_when_per_layer_densities_depend_on_the_weights():
    text = describe("--set", "prune.layer_rates={}", "--set", "train.optimizer=sgd")
    assert "global by magnitude: per-layer densities depend on the trained weights" in text
    assert density_rows(text)["0.8"] == {"kept": 80.0, "pool[fc1,fc2,output]": 80.0}
    assert "+ 1 SGD momentum slot =" in text


def image_tree(root: Path, classes: int) -> Path:
    for c in range(classes):
        (root / "train" / f"class{c}").mkdir(parents=True)
    return root


def test_describe_warns_of_a_model_far_larger_than_on_its_papers_input(tmp_path):
    """conv2 on a 224x224 image tree: fc1 alone has 112 * 112 * 64 * 256 weights, ~48x Conv-2 on CIFAR-10."""
    tree = image_tree(tmp_path, 3)
    sets = ["--set", "data.dataset=imagefolder", "--set", f"data.dir={tree}", "--set", "model.name=conv2"]
    conv = 3 * 3 * 3 * 64 + 64 + 3 * 3 * 64 * 64 + 64
    big = conv + 112 * 112 * 64 * 256 + 256 + 256 * 256 + 256 + 256 * 3 + 3
    paper = conv + 16 * 16 * 64 * 256 + 256 + 256 * 256 + 256 + 256 * 3 + 3
    text = describe(*sets)
    warning = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and f"{big:,} parameters, {big / paper:.0f}x the {paper:,}" in warning[0]
    assert "set data.image_size = 32" in warning[0] and f"total params: {big:,}" in text
    assert "GiB per model and rank" in text
    assert "warning:" not in describe(*sets, "--set", "data.image_size=32")


def test_presets_on_image_trees_use_their_papers_input_size(tmp_path):
    tree = image_tree(tmp_path, 4)
    for preset in PRESETS:
        if resolve(str(preset)).data.dataset == "imagefolder":
            text = describe("--config", str(preset), "--set", f"data.dir={tree}", "--set", 'data.prepared=""')
            assert "warning:" not in text and "4 classes" in text, preset.name


def test_describe_an_image_tree_without_its_directory_is_one_line():
    """In this process: a refusal after TensorFlow's import as a real process, its own start-up output on stderr
    included, is tests/test_bad_config.py's (BY_CLI)."""
    from faultkit import main_in_process

    r = main_in_process(["--describe", "--set", "data.dataset=imagefolder", "--set", "data.dir=/nonexistent/tree"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "set data.dir to the image tree" in r.stderr
