"""`--describe`: what a config builds and cuts, before any data is read or any weight is drawn.

The model is built in a Keras stateless scope, so its variables have shapes but no values: an absurd network
(conv2 on 224x224 inputs, 205M parameters) is described in seconds and without its gigabytes. From the layer
sizes alone follow the parameter count, the memory of the weights and optimizer slots, and the per-layer
densities of every mask wherever they are fixed by the sizes (layer rates, layer-wise scope, IMP levels).
"""
from __future__ import annotations

import math
import os

from .config import Config, ConfigError
from .pruning import imp_counts, oneshot_counts, rate_multiplier

# The input side each model's paper used, and where: a model on much larger inputs gets a warning.
PAPER_INPUT = {
    "lenet300_100": (28, "MNIST, LeCun et al. 1998; Frankle & Carbin 2019"),
    "conv2": (32, "CIFAR-10, Frankle & Carbin 2019"),
    "conv4": (32, "CIFAR-10, Frankle & Carbin 2019"),
    "conv6": (32, "CIFAR-10, Frankle & Carbin 2019"),
    "resnet20": (32, "CIFAR-10, He et al. 2016"),
    "vgg16": (32, "CIFAR-10, Frankle et al. 2020"),
    "mobilenetv2": (224, "ImageNet, Sandler et al. 2018"),
}
ABSURD = 10  # times the parameter count at the paper's input
SLOTS = {"adam": ("Adam", 2), "adamw": ("AdamW", 2), "sgd": ("SGD momentum", 1)}
PER_LAYER_COLUMNS = 9  # more pruning units than this are shown as groups of equal rate multiplier


def input_of(cfg: Config) -> tuple[tuple[int, int, int], int]:
    """(input shape, classes) without reading an image: a known dataset's, or an image tree's from
    data.image_size and its train/ class directories (or the prepared file's recorded class count)."""
    from .data import KNOWN_SHAPES

    d = cfg.data
    if d.dataset in KNOWN_SHAPES:
        return KNOWN_SHAPES[d.dataset]
    if d.dataset != "imagefolder":
        raise ConfigError(f"--describe needs a dataset of known shape ({', '.join(sorted(KNOWN_SHAPES))}) or "
                          f"imagefolder, not {d.dataset!r}")
    shape = (d.image_size, d.image_size, 3)
    if d.prepared and os.path.isfile(d.prepared):
        import h5py

        with h5py.File(d.prepared, "r") as f:
            return shape, int(f.attrs["num_classes"])
    train = os.path.join(d.dir, "train")
    if not d.dir or not os.path.isdir(train):
        raise ConfigError(f"--describe on imagefolder counts the classes of data.dir/train/, but {train!r} is not a "
                          f"directory: set data.dir to the image tree (or data.prepared to its prepared file)")
    return shape, sum(1 for n in os.listdir(train) if not n.startswith(".") and os.path.isdir(os.path.join(train, n)))


def _build(name: str, shape, classes: int, seed: int):
    """The model with shapes but no values: nothing is drawn or allocated. Its variables stay uninitialised
    (Keras would fill them when a later stateless scope ends), so only a process that exits after describing
    (--describe) builds models this way."""
    import keras

    from .models import build_model

    with keras.StatelessScope(initialize_variables=False):
        return build_model(name, shape, classes, seed)


def size_text(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB" if n_bytes >= 2 ** 30 else f"{n_bytes / 2 ** 20:.1f} MiB"


def memory_line(cfg: Config, params: int, prunable: int) -> str:
    """The parameter count and the float32 memory of weights and optimizer slots, per model (per rank)."""
    name, slots = SLOTS[cfg.train.optimizer]
    if cfg.train.optimizer == "sgd" and cfg.train.momentum == 0:
        name, slots = "SGD", 0
    weights = 4 * params
    return (f"parameters: {params:,} ({prunable:,} prunable); float32 weights {size_text(weights)} + {slots} {name} "
            f"slot{'s' * (slots != 1)} = {size_text(weights * (1 + slots))} per model and rank")


def absurd_warning(cfg: Config, shape, classes: int, params: int) -> str | None:
    """A line when the input makes the model more than ABSURD times larger than on its paper's input."""
    side, where = PAPER_INPUT[cfg.model.name]
    if shape[0] <= side:
        return None
    paper = _build(cfg.model.name, (side, side, shape[2]), classes, cfg.seed).count_params()
    if params <= ABSURD * paper:
        return None
    fix = f"data.image_size = {side}" if cfg.data.dataset == "imagefolder" else f"a dataset of {side}x{side} images"
    return (f"warning: {cfg.model.name} on {shape[0]}x{shape[1]} inputs has {params:,} parameters, {params / paper:.0f}x "
            f"the {paper:,} it has on the {side}x{side} inputs of its paper ({where}): set {fix}")


def _label(paths: list[str]) -> str:
    names = [p.rsplit("/", 1)[0] for p in paths]
    return ",".join(names) if len(names) <= 3 else f"{names[0]}…{names[-1]}({len(names)})"


def mask_counts(cfg: Config, sizes: dict) -> list[tuple[str, dict]]:
    """(mask label, kept weights per pruning unit) for every mask of the config, from the sizes alone."""
    p = cfg.prune
    if cfg.imp:
        return [(f"level {lv}", c) for lv, c in
                enumerate(imp_counts(sizes, p.levels, p.imp_rate, p.scope, p.layer_rates), start=1)]
    return [(f"{f:g}", oneshot_counts(sizes, f, p.scope, p.layer_rates, p.imp_rate)) for f in cfg.remaining_fractions()]


def densities_table(cfg: Config, sizes: dict) -> str:
    """Per-layer densities of every mask: one column per pruning unit (or per group of units with one rate
    multiplier, for deep models: "conv1…conv6(6)"); the global pool's ("pool[...]") per-layer split depends on the
    trained weights."""
    p = cfg.prune
    masks = mask_counts(cfg, sizes)
    units = list(masks[0][1])
    members = {u: [path for path in sizes if path == u or (u == "*" and path not in units)] for u in units}
    if len(units) > PER_LAYER_COLUMNS:
        groups: dict = {}
        for u in units:
            groups.setdefault("*" if u == "*" else rate_multiplier(u, p.layer_rates), []).append(u)
        columns = list(groups.values())
    else:
        columns = [[u] for u in units]
    heads = []
    for us in columns:
        paths = [path for u in us for path in members[u]]
        heads.append(f"pool[{_label(paths)}]" if us == ["*"] else _label(paths))
    total = sum(sizes.values())
    rows = [["mask", "kept"] + heads]
    for label, counts in masks:
        kept = sum(counts.values())
        cells = [f"{100 * sum(counts[u] for u in us) / sum(sizes[path] for u in us for path in members[u]):.2f}%"
                 for us in columns]
        rows.append([label, f"{100 * kept / total:.2f}%"] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    how = "IMP levels" if cfg.imp else "one-shot masks"
    head = f"per-layer densities of the {len(masks)} {how} (scope {p.scope}, rate multipliers {p.layer_rates or '{}'}):"
    notes = []
    if "*" in units:
        notes.append("global by magnitude: per-layer densities depend on the trained weights (the pool's column is "
                     "the pool's overall density)")
    return "\n".join([head, *lines, *notes])


def describe(cfg: Config) -> str:
    """Everything --describe prints, in order: the input, the layers, parameters and memory, a warning for an
    absurd input, the per-layer densities of every mask."""
    from .models import describe as describe_model, prunable_variables
    from .runtime import configure_tensorflow

    shape, classes = input_of(cfg)
    configure_tensorflow(1)
    model = _build(cfg.model.name, shape, classes, cfg.seed)
    sizes = {v.path: math.prod(v.shape) for v in prunable_variables(model)}
    params = model.count_params()
    lines = [f"{cfg.model.name} on {cfg.data.dataset} {shape}, {classes} classes", describe_model(model),
             memory_line(cfg, params, sum(sizes.values()))]
    warning = absurd_warning(cfg, shape, classes, params)
    return "\n".join(lines + ([warning] if warning else []) + ["", densities_table(cfg, sizes)])
