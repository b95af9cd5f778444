"""Typed experiment configuration: defaults, TOML files, `--set` overrides, validation, identity hash.

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

from .steps import Step, StepError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCOPES = ("global", "layerwise")
CONTROLS = ("random_reinit", "random_mask")
SCHEDULES = ("static", "lpt", "dynamic")
NORMALIZATIONS = ("scale", "standardize")


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that says what is wrong and how to fix it."""


def _default_remaining() -> list[float]:
    return [round(0.8 ** k, 6) for k in range(1, 21)]


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | npz | digits
    dir: str = ""  # data directory; "" = $LTHMPI_DATA_DIR or the dataset's system location
    subset: int = 0  # train on the first N training examples (0 = all)
    validation: int = 5000  # examples held out of the training set for early stopping
    normalize: str = "scale"  # scale (to [0, 1]) | standardize (per channel, train statistics)
    augment: bool = False  # CIFAR augmentation: random crop with 4-pixel padding + horizontal flip
    prepared: str = ""  # prepared HDF5 file (python -m lthmpi.data prepare); "" = read raw files


@dataclass
class ModelConfig:
    name: str = "lenet300_100"


@dataclass
class TrainConfig:
    epochs: int = 2  # training length T in epochs (ignored when iterations > 0)
    iterations: int = 0  # training length T in iterations (0 = use epochs)
    batch_size: int = 60
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1.2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_milestones: list = field(default_factory=list)  # steps such as ["80ep", "120ep"]: lr *= lr_gamma at each
    lr_gamma: float = 0.1
    eval_every: str = "100it"  # validation interval for early stopping


@dataclass
class PruneConfig:
    remaining: list = field(default_factory=_default_remaining)  # fractions of prunable weights kept
    quantiles: list = field(default_factory=list)  # magnitude percentiles pruned (60 -> 40% left); overrides remaining
    scope: str = "global"  # global | layerwise
    layer_rates: dict = field(default_factory=lambda: {"output": 0.5})  # layer-name pattern -> pruning-rate multiplier


@dataclass
class ResetConfig:
    points: list = field(default_factory=lambda: ["0ep", "100it", "250it", "500it", "1ep"])
    controls: list = field(default_factory=lambda: ["random_reinit"])
    optimizer_state: str = "fresh"  # fresh | restore (the optimizer state saved at the reset point)
    length: str = "remaining"  # remaining (train T - k) | full (train T)


@dataclass
class ParallelConfig:
    threads: int = 0  # TF intra-op threads per rank; 0 = max(1, cores // ranks on this host)
    schedule: str = "lpt"  # static | lpt | dynamic
    subgroups: bool | str = "auto"  # more ranks than work: data-parallel subgroups (auto: for conv nets)
    parent_data_parallel: bool = False  # train the parent data-parallel over all ranks
    backend: str = "mpi4py"  # gradient averaging in subgroups: mpi4py | horovod
    sparse_below: float = 0.3  # Dense/ReLU nets keeping at most this fraction of weights train on sparse kernels (0 = never)


@dataclass
class StabilityConfig:
    enabled: bool = False  # train stability pairs and measure linear mode connectivity (docs/stability.md)
    points: list = field(default_factory=list)  # reset points k of the pairs, e.g. ["0ep", "500it"]; [] = reset.points
    masks: str | list = "dense"  # "dense", "all", or a list of mask indices (0 = first prune.remaining) and "dense"
    alphas: int = 11  # evenly spaced interpolation coefficients in [0, 1], ends included (the paper used 30)
    threshold: float = 0.02  # a pair is stable when its error barrier is below this (the paper's 2%)
    bn_reestimate: bool = False  # re-estimate batch-norm statistics at each alpha (default: interpolate them)
    bn_batches: int = 10  # training batches that re-estimate the batch-norm statistics (with bn_reestimate)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    # -- derived views ---------------------------------------------------------------------------
    def remaining_fractions(self) -> list[float]:
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
        """What the results depend on: everything but the `parallel` section, and the `stability` section
        only when it is enabled (so every run without stability pairs keeps its hash and run directory)."""
        d = self.to_dict()
        d.pop("parallel")
        if not self.stability.enabled:
            d.pop("stability")
        return d

    def hash(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def default_run_name(self) -> str:
        return f"{self.data.dataset}_{self.model.name}_{self.hash()}"

    def to_toml(self) -> str:
        return to_toml(self.to_dict())


SECTIONS = {f.name: f.type for f in fields(Config) if f.name != "seed"}


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


def resolve(config_file: str | None = None, sets: list[str] | None = None) -> Config:
    raw: dict = load_toml(config_file) if config_file else {}
    for item in sets or []:
        raw = _merge(raw, parse_set(item))
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _one_of(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{key} {value!r} is unknown (choose one of {', '.join(options)})")


def validate(cfg: Config) -> None:
    """Every check that needs no data: fail before any work starts."""
    t, p, r, d = cfg.train, cfg.prune, cfg.reset, cfg.data
    if cfg.seed < 0:
        raise ConfigError(f"seed must be >= 0, not {cfg.seed}")
    if d.subset < 0:
        raise ConfigError(f"data.subset must be >= 0 (0 = all), not {d.subset}")
    if d.validation < 1:
        raise ConfigError(f"data.validation must be >= 1 (early stopping needs a validation set), not {d.validation}")
    _one_of("data.normalize", d.normalize, NORMALIZATIONS)
    if t.epochs < 1 and t.iterations < 1:
        raise ConfigError("train.epochs must be >= 1 (or set train.iterations >= 1)")
    if t.iterations < 0:
        raise ConfigError(f"train.iterations must be >= 0, not {t.iterations}")
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, not {t.batch_size}")
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    if not 0 < t.lr < float("inf"):
        raise ConfigError(f"train.lr must be a finite number > 0, not {t.lr}")
    if not 0 <= t.weight_decay < float("inf"):
        raise ConfigError(f"train.weight_decay must be a finite number >= 0, not {t.weight_decay}")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"train.momentum must be in [0, 1), not {t.momentum}")
    if not 0 < t.lr_gamma <= 1:
        raise ConfigError(f"train.lr_gamma must be in (0, 1], not {t.lr_gamma}")
    try:
        eval_every = Step.parse(t.eval_every)
        milestones = [Step.parse(m) for m in t.lr_milestones]
        points = [Step.parse(x) for x in r.points]
    except StepError as e:
        raise ConfigError(str(e)) from None
    if eval_every.value <= 0:
        raise ConfigError("train.eval_every must be > 0 (e.g. \"100it\")")
    del milestones
    for key, values, what in (("remaining", p.remaining, "a fraction in (0, 1), e.g. 0.2 for 20% kept"),
                              ("quantiles", p.quantiles, "a number in (0, 100)")):
        for v in values:  # before remaining_fractions() does arithmetic on them
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"prune.{key} entry {v!r} must be {what}")
    fractions = cfg.remaining_fractions()
    if not fractions:
        raise ConfigError("prune.remaining is empty: give at least one fraction of weights to keep, e.g. [0.2]")
    for q in p.quantiles:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 100:
            raise ConfigError(f"prune.quantiles entry {q!r} must be a number in (0, 100)")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ConfigError(f"prune.remaining entry {f!r} must be a fraction in (0, 1), e.g. 0.2 for 20% kept")
    if len(set(fractions)) != len(fractions):
        dup = sorted({f for f in fractions if fractions.count(f) > 1})
        raise ConfigError(f"prune thresholds contain duplicates {dup}: each mask must be distinct")
    _one_of("prune.scope", p.scope, SCOPES)
    for name, mult in p.layer_rates.items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 <= mult <= 1 / max(1e-9, 1 - min(fractions)):
            raise ConfigError(f"prune.layer_rates.{name} = {mult!r} must be a number >= 0 that keeps the rate <= 1")
    if not points:
        raise ConfigError("reset.points is empty: give at least one reset point, e.g. [\"0ep\"]")
    if len({x.text for x in points}) != len(points):
        raise ConfigError(f"reset.points {r.points} contain duplicates")
    for c in r.controls:
        if c not in CONTROLS:
            raise ConfigError(f"reset.controls entry {c!r} is unknown (choose from {', '.join(CONTROLS)})")
    if len(set(r.controls)) != len(r.controls):
        raise ConfigError(f"reset.controls {r.controls} contain duplicates")
    if r.optimizer_state not in ("fresh", "restore"):
        raise ConfigError(f"reset.optimizer_state {r.optimizer_state!r} must be 'fresh' or 'restore'")
    if r.length not in ("remaining", "full"):
        raise ConfigError(f"reset.length {r.length!r} must be 'remaining' (T - k) or 'full' (T)")
    q = cfg.parallel
    if q.threads < 0:
        raise ConfigError(f"parallel.threads must be >= 0 (0 = automatic), not {q.threads}")
    if isinstance(q.sparse_below, bool) or not isinstance(q.sparse_below, (int, float)) or not 0 <= q.sparse_below <= 1:
        raise ConfigError(f"parallel.sparse_below must be a fraction between 0 and 1 (0 = never use the sparse kernels), "
                          f"not {q.sparse_below!r}")
    _one_of("parallel.schedule", q.schedule, SCHEDULES)
    validate_stability(cfg)
    if q.subgroups not in (True, False, "auto") or not isinstance(q.subgroups, (bool, str)):
        raise ConfigError(f"parallel.subgroups must be true, false or \"auto\", not {q.subgroups!r}")
    if q.backend not in ("mpi4py", "horovod"):
        raise ConfigError(f"parallel.backend {q.backend!r} must be 'mpi4py' or 'horovod'")
    if q.backend == "horovod":
        import importlib.util

        if importlib.util.find_spec("horovod") is None:
            raise ConfigError("parallel.backend = 'horovod' but Horovod is not installed (it builds only with "
                              "TF 2.12 + Keras 2; use parallel.backend = 'mpi4py')")


def validate_stability(cfg: Config) -> None:
    """The [stability] section: one line per problem (docs/stability.md)."""
    s = cfg.stability
    if isinstance(s.alphas, bool) or not isinstance(s.alphas, int) or s.alphas < 2:
        raise ConfigError(f"stability.alphas must be an integer >= 2 (both ends of the path), not {s.alphas!r}")
    if not 0 < s.threshold < 1:
        raise ConfigError(f"stability.threshold must be a fraction in (0, 1), e.g. 0.02 for 2%, not {s.threshold!r}")
    if s.bn_batches < 1:
        raise ConfigError(f"stability.bn_batches must be >= 1, not {s.bn_batches}")
    try:
        points = [Step.parse(x) for x in s.points]
    except StepError as e:
        raise ConfigError(f"stability.points: {e}") from None
    if len({x.text for x in points}) != len(points):
        raise ConfigError(f"stability.points {s.points} contain duplicates")
    stability_masks(cfg)


def stability_masks(cfg: Config) -> list[int | None]:
    """stability.masks as mask indices, None for the dense network (all-ones mask), dense first."""
    m, n = cfg.stability.masks, len(cfg.remaining_fractions())
    if m == "dense":
        return [None]
    if m == "all":
        return [None, *range(n)]
    if not isinstance(m, list) or not m:
        raise ConfigError(f"stability.masks must be \"dense\", \"all\" or a non-empty list of mask indices "
                          f"(and \"dense\"), e.g. [\"dense\", 0, 3], not {m!r}")
    out = []
    for x in m:
        if x == "dense":
            out.append(None)
        elif isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            raise ConfigError(f"stability.masks names mask {x!r}, but the config has masks 0..{n - 1} "
                              f"(one per prune.remaining entry) and \"dense\"; choose among those")
        else:
            out.append(x)
    if len(set(out)) != len(out):
        raise ConfigError(f"stability.masks {m} contain duplicates")
    return sorted(out, key=lambda x: -1 if x is None else x)


def validate_against_data(cfg: Config, iterations_per_epoch: int, n_train: int) -> int:
    """Checks that need the data size; returns the training length T in iterations."""
    if cfg.train.batch_size > n_train:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the training set ({n_train} examples)")
    total = cfg.train.iterations or cfg.train.epochs * iterations_per_epoch
    points = cfg.reset_steps()
    its = [s.iterations(iterations_per_epoch) for s in points]
    for s, k in zip(points, its):
        if k >= total:
            raise ConfigError(f"reset point {s} (iteration {k}) is at or past the end of training "
                              f"({total} iterations): lower it or train longer")
    if its != sorted(its) or len(set(its)) != len(its):
        raise ConfigError(f"reset.points {cfg.reset.points} must be strictly increasing "
                          f"(as iterations: {its})")
    if cfg.stability.enabled:
        for s in cfg.stability_steps():
            if s.iterations(iterations_per_epoch) >= total:
                raise ConfigError(f"stability point {s} (iteration {s.iterations(iterations_per_epoch)}) is at or "
                                  f"past the end of training ({total} iterations): lower it or train longer")
    return total


def to_toml(d: dict) -> str:
    """Write the resolved config as TOML (a small writer: values are scalars, lists and flat tables)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)
    lines = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def help_text() -> str:
    """Every config key with its default, for --help."""
    cfg = Config()
    out = [f"  seed = {cfg.seed}"]
    for name in SECTIONS:
        for k, v in dataclasses.asdict(getattr(cfg, name)).items():
            out.append(f"  {name}.{k} = {json.dumps(v)}")
    return "\n".join(out)
