"""Typed experiment configuration: defaults, TOML files, `--set` overrides, identity hash (the checks of a
config, and `resolve`, which parses and checks it, are lthmpi/validation.py's).

Everything an experiment's results depend on lives here, so that the resolved config saved in a run
directory is a complete description of the run and its hash can name the directory. The `parallel`
section only says *how* the work is spread, not *what* is computed, so it is left out of the identity:
the same run directory can be resumed with a different number of ranks.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from .steps import Step

OPTIMIZERS = ("adam", "adamw", "sgd")
WEIGHT_DECAY_MODES = ("decoupled", "l2")
SCOPES = ("global", "layerwise")
METHODS = ("oneshot", "imp")
IMP_KEYS = ("method", "levels", "imp_rate")  # left out of a one-shot config's identity (hash unchanged)
ONESHOT_KEYS = ("remaining", "quantiles")  # left out of an IMP config's identity (unused there)
CONTROLS = ("random_reinit", "random_mask", "layer_shuffle", "invert")  # random_mask = layer_shuffle (docs/pruning.md)
SCHEDULES = ("static", "lpt", "dynamic")
NORMALIZATIONS = ("scale", "standardize")
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
CONV_STEPS = ("auto", "graph", "xla")


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that says what is wrong and how to fix it."""


def _default_remaining() -> list[float]:
    return [round(0.8 ** k, 6) for k in range(1, 21)]


def key(default, help: str):
    """One config key: its default and the one line of help that `--help` and docs/config.md show
    (`python -m lthmpi.reference` regenerates that page; a test fails when it is stale)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """The dataset, its split and its preprocessing."""

    dataset: str = key("fashion_mnist", "fashion_mnist | mnist | cifar10 | npz | digits | imagefolder")
    dir: str = key("", "data directory (or .npz file); \"\" = $LTHMPI_DATA_DIR or the dataset's system location")
    subset: int = key(0, "train on the first N training examples (0 = all)")
    validation: int = key(5000, "examples held out of the training set for early stopping")
    normalize: str = key("scale", "scale (to [0, 1]) | standardize (per channel, with training statistics)")
    augment: bool = key(False, "CIFAR augmentation: random crop with 4-pixel padding and horizontal flip, seeded")
    prepared: str = key("", "a file made by `python -m lthmpi.data prepare` (refused if made with other settings); "
                            "\"\" = read the raw files")
    image_size: int = key(224, "imagefolder: each image is cropped to a centred square and resized to N x N "
                               "when prepared")
    in_memory: bool | str = key("auto", "prepared file: true = loaded into every rank, false = batches read from "
                                        "disk, \"auto\" = from its size, the host's memory and ranks per host")


@dataclass
class ModelConfig:
    """The network."""

    name: str = key("lenet300_100", "lenet300_100 | conv2 | conv4 | conv6 | resnet20 | vgg16 | mobilenetv2")


@dataclass
class TrainConfig:
    """The training recipe, shared by the parent run and every retraining."""

    epochs: int = key(2, "training length T in epochs (ignored when train.iterations > 0)")
    iterations: int = key(0, "training length T in iterations (0 = use train.epochs)")
    batch_size: int = key(60, "examples per training step")
    optimizer: str = key("adam", "adam | adamw | sgd (with train.momentum)")
    lr: float = key(1.2e-3, "learning rate")
    momentum: float = key(0.9, "SGD momentum (sgd only)")
    weight_decay: float = key(0.0, "weight decay coefficient (train.weight_decay_mode says which form)")
    weight_decay_mode: str = key("decoupled", "decoupled (Keras, AdamW: w -= lr * wd * w after the step) | l2 "
                                              "(PyTorch, open_lth: g += wd * w before momentum)")
    lr_milestones: list = key([], "steps (\"80ep\", \"500it\") at which the learning rate is multiplied by "
                                  "train.lr_gamma")
    lr_gamma: float = key(0.1, "learning-rate factor at each of train.lr_milestones")
    eval_every: str = key("100it", "validation interval for early stopping (\"100it\", \"1ep\")")
    precision: str = key("float32", "float32 | mixed_bfloat16 | mixed_float16 (with loss scaling): the compute "
                                    "precision; weights, optimizer slots and masks stay float32 (docs/gpu.md)")
    deterministic: bool = key(True, "TF op determinism; false for ops without a deterministic GPU kernel "
                                    "(recorded per task)")


@dataclass
class PruneConfig:
    """How masks are cut from the parent's final weights (one-shot), or found level by level (IMP, docs/imp.md)."""

    remaining: list = key(_default_remaining(), "fractions of prunable weights kept, one mask each")
    quantiles: list = key([], "the seed study's magnitude percentiles pruned (60 -> 40% kept); overrides "
                              "prune.remaining when given")
    scope: str = key("global", "global (layers ranked together) | layerwise")
    layer_rates: dict = key({"output": 0.5}, "layer-name pattern -> multiplier m of the per-round rate prune.imp_rate "
                                             "(Frankle & Carbin: output at half rate); a one-shot mask gives layer j "
                                             "the density (1 - imp_rate * m_j)^n that IMP reaches, one n per mask")
    method: str = key("oneshot", "oneshot (a mask per prune.remaining fraction) | imp (iterative magnitude "
                                 "pruning: a chain of levels per reset point, docs/imp.md)")
    levels: int = key(20, "imp: pruning levels per reset point (level l keeps about (1 - imp_rate)^l)")
    imp_rate: float = key(0.2, "fraction of the surviving weights pruned per IMP level (x the layer multiplier); "
                               "one-shot's layer_rates scale it too")
    criterion: str = key("magnitude", "one-shot masks by: magnitude (parent's final weights) | magnitude_init | snip | "
                                      "grasp | synflow | random (scored at prune.score_at; docs/pruning.md)")
    score_at: str = key("0ep", "where magnitude_init, snip, grasp, synflow and random score the weights (\"0ep\" = "
                               "theta_0, pruning at initialization)")
    score_batches: int = key(1, "snip, grasp: training batches of train.batch_size the scores are summed over")
    synflow_iterations: int = key(100, "synflow: pruning rounds on the exponential schedule (Tanaka et al.: 100)")
    masks_from: str = key("", "ticket transfer: a run directory whose masks and start weights (at "
                              "prune.masks_from_reset) are retrained here; \"\" = masks of this run")
    masks_from_reset: str = key("0ep", "with prune.masks_from: the source run's reset point whose weights start every "
                                       "retraining here (one of its reset.points)")


@dataclass
class ResetConfig:
    """Late resetting: where the subnetworks restart from, and the controls."""

    points: list = key(["0ep", "100it", "250it", "500it", "1ep"], "late-reset points k, in epochs or iterations")
    controls: list = key(["random_reinit"], "controls per mask and reset point: any of random_reinit, random_mask "
                                            "(= layer_shuffle), layer_shuffle, invert (docs/pruning.md)")
    optimizer_state: str = key("fresh", "fresh optimizer at the reset (open_lth) | restore (the state saved at k)")
    length: str = key("remaining", "train T - k after the reset (remaining) | T (full)")


@dataclass
class ParallelConfig:
    """How the work is spread (not part of the run's identity: a run resumes with other settings)."""

    threads: int = key(0, "TF threads per rank; 0 = max(1, cores on the host // ranks on the host)")
    schedule: str = key("lpt", "static (masks dealt round-robin) | lpt (longest task onto the least-loaded rank) "
                               "| dynamic (rank 0 hands out tasks on request)")
    subgroups: bool | str = key("auto", "more ranks than units of work: data-parallel subgroups (true | false | "
                                        "auto: for models with convolutions)")
    parent_data_parallel: bool | str = key("auto", "train the parent data-parallel over all ranks (true | false | auto: on "
                                                   "more than one rank, for models with convolutions)")
    backend: str = key("mpi4py", "gradient averaging in subgroups: mpi4py (Allreduce; Horovod cannot run with TF >= 2.16 "
                                 "and Keras 3)")
    sparse_below: float = key(0.3, "masks keeping at most this fraction of the prunable weights train on the "
                                   "sparse kernels (Dense/ReLU nets; 0 = never)")
    conv_step: str = key("auto", "conv nets on the CPU: the step's form, graph (oneDNN) | xla | auto (the faster, "
                                 "timed at start-up and cached per host, model, batch and threads; docs/gpu.md)")
    peer_timeout: float = key(600.0, "MPI: a rank that waits ends the job when a peer rank has given no sign of "
                                     "life (its heartbeat file, beaten by a thread every 5 s whatever the rank is "
                                     "doing) for this many seconds, for launchers that leave the others waiting; "
                                     "0 = off")
    device: str = key("auto", "auto (a GPU where TensorFlow sees one, else the CPU) | cpu | gpu (refuse to start "
                              "without one); rank r of a node takes GPU r mod G (docs/gpu.md)")


@dataclass
class StabilityConfig:
    """Stability pairs and linear mode connectivity (docs/stability.md); part of the identity only when enabled."""

    enabled: bool = key(False, "train stability pairs and measure linear mode connectivity (docs/stability.md)")
    only: bool = key(False, "with enabled: the stability pairs alone, without the one-shot (or IMP) retrainings")
    points: list = key([], "reset points k of the pairs, e.g. [\"0ep\", \"500it\"]; [] = reset.points")
    masks: str | list = key("dense", "\"dense\", \"all\", or a list of mask indices (0 = first prune.remaining) "
                                     "and \"dense\"")
    alphas: int = key(11, "evenly spaced interpolation coefficients in [0, 1], ends included (the paper used 30)")
    threshold: float = key(0.02, "a pair is stable when its error barrier is below this (the paper's 2%)")
    bn_reestimate: bool = key(False, "re-estimate batch-norm statistics at each alpha (default: interpolate them)")
    bn_batches: int = key(10, "training batches that re-estimate the batch-norm statistics (with bn_reestimate)")


@dataclass
class Config:
    seed: int = key(0, "init, data order and controls all derive from it")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    # -- derived views ---------------------------------------------------------------------------
    @property
    def imp(self) -> bool:
        return self.prune.method == "imp"

    def remaining_fractions(self) -> list[float]:
        """The target fraction left per mask: one-shot's thresholds, or IMP's (1 - imp_rate)^l per level."""
        if self.imp:
            return [(1.0 - self.prune.imp_rate) ** lv for lv in range(1, self.prune.levels + 1)]
        if self.prune.quantiles:
            return [round(1.0 - q / 100.0, 10) for q in self.prune.quantiles]
        return [float(r) for r in self.prune.remaining]

    def reset_steps(self) -> list[Step]:
        return [Step.parse(p) for p in self.reset.points]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stability_steps(self) -> list[Step]:
        """The reset points of the stability pairs (stability.points, or reset.points when empty)."""
        return [Step.parse(p) for p in (self.stability.points or self.reset.points)]

    def identity(self) -> dict:
        """What the results depend on: everything but the `parallel` section, the `stability` section only
        when it is enabled (so every run without stability pairs keeps its hash and run directory), and not
        where the data are held (data.in_memory: a run streamed from disk gives the same bits as one in memory).
        data.image_size counts only for imagefolder, so the hashes of all other configs stay; the IMP keys
        count only for IMP runs and prune.remaining/quantiles only for one-shot ones (docs/imp.md)."""
        d = self.to_dict()
        d.pop("parallel")
        if not self.stability.enabled:
            d.pop("stability")
        d["data"].pop("in_memory")
        if d["data"]["dataset"] != "imagefolder":
            d["data"].pop("image_size")
        for k in (ONESHOT_KEYS if self.imp else IMP_KEYS):
            d["prune"].pop(k)
        return d

    def hash(self) -> str:
        """Names the default run directory: a hash of the identity's values that differ from the defaults,
        so that a new field with a default leaves every existing name as it was."""
        return identity_hash(self.identity(), Config().identity())

    def legacy_hash(self) -> str | None:
        """The name's hash as lthmpi <= 0.x made it (every identity field of LEGACY_KEYS, defaults too); None
        when a field added since is set to other than its default (no such directory can exist)."""
        ident, default = self.identity(), Config().identity()
        old = {s: {k: v for k, v in sec.items() if f"{s}.{k}" in LEGACY_KEYS} if isinstance(sec, dict) else sec
               for s, sec in ident.items()}
        for s, sec in ident.items():
            for k, v in (sec.items() if isinstance(sec, dict) else ()):
                if f"{s}.{k}" not in LEGACY_KEYS and v != default[s].get(k):
                    return None
        return _digest(old)

    def default_run_name(self, legacy: bool = False) -> str:
        h = self.legacy_hash() if legacy else self.hash()
        return f"{self.data.dataset}_{self.model.name}_{h}" if h else ""

    def to_toml(self) -> str:
        return to_toml(self.to_dict())


SECTIONS = {f.name: f.type for f in fields(Config) if f.name != "seed"}

# The identity fields that the run-directory hash covered before it hashed only non-default values (the
# legacy name, still found by `parallel.phases.default_run_dir`). Frozen: never add to it.
LEGACY_KEYS = frozenset(
    "data.dataset data.dir data.subset data.validation data.normalize data.augment data.prepared model.name "
    "train.epochs train.iterations train.batch_size train.optimizer train.lr train.momentum train.weight_decay "
    "train.lr_milestones train.lr_gamma train.eval_every prune.remaining prune.quantiles prune.scope "
    "prune.layer_rates reset.points reset.controls reset.optimizer_state reset.length".split())


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def identity_hash(identity: dict, defaults: dict) -> str:
    """sha256 (12 hex digits) of the identity's values that differ from `defaults` (sections flattened to
    "section.key"): a field added with a default value does not change it."""
    flat = {}
    for s, sec in identity.items():
        if isinstance(sec, dict):
            flat.update({f"{s}.{k}": v for k, v in sec.items() if v != defaults.get(s, {}).get(k, _MISSING)})
        elif sec != defaults.get(s, _MISSING):
            flat[s] = sec
    return _digest(flat)


_MISSING = object()


def _section_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _check_type(where: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ) or typ
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r} (quote it in TOML)")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list such as [a, b], not {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table such as {{output = 0.5}}, not {value!r}")
        return value
    return value


def _unknown(where: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"unknown config key {where}{key!r}{hint}")


def from_dict(raw: dict, base: Config | None = None) -> Config:
    """Overlay a nested dict (as read from TOML) on `base`, refusing unknown keys and wrong types."""
    cfg = copy.deepcopy(base) if base else Config()
    for key, value in raw.items():
        if key == "seed":
            cfg.seed = _check_type("seed", value, int)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a section (a TOML table), not {value!r}")
            section = getattr(cfg, key)
            types = _section_types(type(section))
            for k, v in value.items():
                if k not in types:
                    raise _unknown(f"{key}.", k, types)
                setattr(section, k, _check_type(f"{key}.{k}", v, types[k]))
        else:
            raise _unknown("", key, ["seed", *SECTIONS])
    return cfg


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None


def parse_set(item: str) -> dict:
    """`section.key=value` -> nested dict; the value is read as TOML, bare words as strings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like section.key=value (e.g. --set train.epochs=5)")
    path, text = item.split("=", 1)
    keys = [k.strip() for k in path.strip().split(".")]
    if not all(keys) or len(keys) > 2:
        raise ConfigError(f"--set {item!r}: the key must be 'seed' or 'section.key'")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text and text[0] not in "[{\"'" and all(c.isalnum() or c in "_-./:" for c in text):
            value = text
        else:
            raise ConfigError(f"--set {item!r}: {text!r} is not a valid TOML value") from None
    out: dict = value
    for k in reversed(keys):
        out = {k: out}
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k in SECTIONS else v
    return out


def toml_value(v) -> str:
    """One value as TOML (scalars, lists and flat tables: all that a config holds)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(d: dict) -> str:
    """Write the resolved config as TOML."""
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def keys() -> list[tuple[str, Any, str]]:
    """(dotted name, default, one-line help) of every config key, in definition order."""
    cfg = Config()
    out = []
    for f in fields(Config):
        if f.name in SECTIONS:
            out += [(f"{f.name}.{g.name}", getattr(getattr(cfg, f.name), g.name), g.metadata.get("help", ""))
                    for g in fields(getattr(cfg, f.name))]
        else:
            out.append((f.name, getattr(cfg, f.name), f.metadata.get("help", "")))
    return out


def help_text() -> str:
    """Every config key with its default and help, for --help."""
    return "\n".join(f"  {name} = {toml_value(default)}\n      {text}" for name, default, text in keys())
