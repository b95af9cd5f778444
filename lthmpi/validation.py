"""What a valid config is: every check that needs no data (`validate`), the checks against the model's layers
and the data's size, and `resolve`: a config file and `--set` overrides, parsed (config.py) and checked.

Checks fail before any work starts, each as one ConfigError line that says what to set instead.
"""
from __future__ import annotations

from .config import (CONTROLS, CONV_STEPS, DEVICES, METHODS, NORMALIZATIONS, OPTIMIZERS, PRECISIONS, SCHEDULES, SCOPES,
                     WEIGHT_DECAY_MODES, Config, ConfigError, PruneConfig, _merge, from_dict, load_toml, parse_set)
from .steps import Step, StepError


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
    if d.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1 (e.g. 224), not {d.image_size}")
    if d.in_memory not in (True, False, "auto") or not isinstance(d.in_memory, (bool, str)):
        raise ConfigError(f"data.in_memory must be true, false or \"auto\", not {d.in_memory!r}")
    if t.epochs < 1 and t.iterations < 1:
        raise ConfigError("train.epochs must be >= 1 (or set train.iterations >= 1)")
    if t.iterations < 0:
        raise ConfigError(f"train.iterations must be >= 0, not {t.iterations}")
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, not {t.batch_size}")
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.weight_decay_mode", t.weight_decay_mode, WEIGHT_DECAY_MODES)
    if t.optimizer == "adamw" and t.weight_decay_mode == "l2":
        raise ConfigError("train.optimizer 'adamw' is Adam with decoupled weight decay; for Adam with coupled L2 "
                          "(PyTorch's Adam weight_decay) use train.optimizer = 'adam' with weight_decay_mode = 'l2'")
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
    _validate_method(p)
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
    validate_criterion(cfg)
    for name, mult in p.layer_rates.items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 <= mult * p.imp_rate <= 1:
            raise ConfigError(f"prune.layer_rates.{name} = {mult!r} must be a number >= 0 that keeps the per-round "
                              f"rate prune.imp_rate x it <= 1 (at most {1 / p.imp_rate:g})")
    if not points:
        raise ConfigError("reset.points is empty: give at least one reset point, e.g. [\"0ep\"]")
    if len({x.text for x in points}) != len(points):
        raise ConfigError(f"reset.points {r.points} contain duplicates")
    for c in r.controls:
        if c not in CONTROLS:
            raise ConfigError(f"reset.controls entry {c!r} is unknown (choose from {', '.join(CONTROLS)})")
    if len(set(r.controls)) != len(r.controls):
        raise ConfigError(f"reset.controls {r.controls} contain duplicates")
    if {"random_mask", "layer_shuffle"} <= set(r.controls):
        raise ConfigError("reset.controls names random_mask and layer_shuffle: they are the same control (the mask's "
                          "per-layer counts at random positions, the same draw); keep one")
    if "invert" in r.controls and cfg.imp:
        raise ConfigError("reset.controls 'invert' needs a criterion's scores, which IMP levels do not keep: remove it "
                          "or use prune.method = \"oneshot\"")
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
    if isinstance(q.peer_timeout, bool) or not isinstance(q.peer_timeout, (int, float)) or not q.peer_timeout >= 0:
        raise ConfigError(f"parallel.peer_timeout must be a number of seconds >= 0 (0 = never), not {q.peer_timeout!r}")
    _one_of("parallel.schedule", q.schedule, SCHEDULES)
    validate_stability(cfg)
    _one_of("parallel.device", q.device, DEVICES)
    _one_of("parallel.conv_step", q.conv_step, CONV_STEPS)
    if q.subgroups not in (True, False, "auto") or not isinstance(q.subgroups, (bool, str)):
        raise ConfigError(f"parallel.subgroups must be true, false or \"auto\", not {q.subgroups!r}")
    pdp = q.parent_data_parallel
    if pdp not in (True, False, "auto") or not isinstance(pdp, (bool, str)):
        raise ConfigError(f"parallel.parent_data_parallel must be true, false or \"auto\", not {pdp!r}")
    if q.backend == "horovod":
        raise ConfigError("parallel.backend = 'horovod' is gone: Horovod 0.28.1 builds only against TF <= 2.15 and "
                          "Keras 2 (horovod#4290); mpi4py's Allreduce does its job: use parallel.backend = 'mpi4py'")
    _one_of("parallel.backend", q.backend, ("mpi4py",))


def validate_criterion(cfg: Config) -> None:
    """prune.criterion and its keys, and ticket transfer (prune.masks_from): one line each (docs/pruning.md)."""
    from .criteria import check_criterion

    p = cfg.prune
    check_criterion(p.criterion, True, p.score_batches)
    if isinstance(p.synflow_iterations, bool) or p.synflow_iterations < 1:
        raise ConfigError(f"prune.synflow_iterations must be an integer >= 1, not {p.synflow_iterations!r}")
    for name in ("score_at", "masks_from_reset"):
        try:
            Step.parse(getattr(p, name))
        except StepError as e:
            raise ConfigError(f"prune.{name}: {e}") from None
    if cfg.imp and p.criterion != "magnitude":
        raise ConfigError(f"prune.criterion {p.criterion!r} cuts one-shot masks; IMP prunes by magnitude level by "
                          f"level: remove prune.criterion or use prune.method = \"oneshot\"")
    if p.masks_from and (cfg.imp or p.criterion != "magnitude"):
        raise ConfigError("prune.masks_from takes the masks of another run: it cannot be combined with "
                          "prune.criterion or prune.method = \"imp\"; remove one of them")


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
    """stability.masks as mask indices, None for the dense network (all-ones mask), dense first. In an IMP
    run (prune.method = "imp") the list names levels 1 … prune.levels, and level l is mask index l - 1."""
    m, n = cfg.stability.masks, len(cfg.remaining_fractions())
    first = 1 if cfg.imp else 0  # IMP levels count from 1, one-shot mask indices from 0
    if m == "dense":
        return [None]
    if m == "all":
        return [None, *range(n)]
    if not isinstance(m, list) or not m:
        raise ConfigError(f"stability.masks must be \"dense\", \"all\" or a non-empty list of "
                          f"{'IMP levels' if cfg.imp else 'mask indices'} (and \"dense\"), e.g. [\"dense\", 1, 3], "
                          f"not {m!r}")
    out = []
    for x in m:
        if x == "dense":
            out.append(None)
        elif isinstance(x, bool) or not isinstance(x, int) or not first <= x < n + first:
            what = (f"IMP level {x!r}, but prune.levels = {n} (levels 1..{n})" if cfg.imp else
                    f"mask {x!r}, but the config has masks 0..{n - 1} (one per prune.remaining entry)")
            raise ConfigError(f"stability.masks names {what} and \"dense\"; choose among those")
        else:
            out.append(x - first)
    if len(set(out)) != len(out):
        raise ConfigError(f"stability.masks {m} contain duplicates")
    return sorted(out, key=lambda x: -1 if x is None else x)


def _validate_method(p: PruneConfig) -> None:
    """prune.method and, for IMP, its keys (before remaining_fractions() does arithmetic on them)."""
    _one_of("prune.method", p.method, METHODS)
    if isinstance(p.imp_rate, bool) or not isinstance(p.imp_rate, (int, float)) or not 0 < p.imp_rate < 1:
        raise ConfigError(f"prune.imp_rate must be a fraction in (0, 1) of the surviving weights pruned per level "
                          f"(e.g. 0.2), not {p.imp_rate!r}")
    if p.method != "imp":
        from .pruning import ONESHOT_RATE

        if p.imp_rate != ONESHOT_RATE and any(m != 1 for m in p.layer_rates.values()):
            raise ConfigError(f"prune.imp_rate = {p.imp_rate!r}: one-shot masks with prune.layer_rates use the "
                              f"per-round rate {ONESHOT_RATE} (Frankle & Carbin's) in this version; remove "
                              f"prune.imp_rate or use prune.method = \"imp\"")
        return
    if p.levels < 1:
        raise ConfigError(f"prune.levels must be >= 1 (IMP pruning levels per reset point), not {p.levels}")
    if p.quantiles:
        raise ConfigError("prune.quantiles cannot be combined with prune.method = \"imp\" (IMP's levels keep "
                          "(1 - prune.imp_rate)^l): remove prune.quantiles or use prune.method = \"oneshot\"")


def validate_against_model(cfg: Config, sizes: dict) -> None:
    """Checks that need the prunable layers' sizes (path -> weight count): IMP levels must leave every
    pruning unit (a layer on its own, or the global pool) at least one weight per layer; a one-shot fraction
    must leave room for the layers that rate multiplier 0 keeps dense."""
    from .pruning import imp_counts, oneshot_counts, rate_multiplier

    p = cfg.prune
    if not cfg.imp:
        for f in cfg.remaining_fractions():
            try:
                oneshot_counts(sizes, f, p.scope, p.layer_rates, p.imp_rate)
            except ValueError as e:
                raise ConfigError(f"prune.remaining {f}: {e}") from None
        return
    pooled = sum(1 for path in sizes if p.scope == "global" and rate_multiplier(path, p.layer_rates) == 1.0)
    for level, counts in enumerate(imp_counts(sizes, p.levels, p.imp_rate, p.scope, p.layer_rates), start=1):
        for unit, n in counts.items():
            if n < (pooled if unit == "*" else 1):
                what = "the global pool of layers" if unit == "*" else f"layer {unit}"
                raise ConfigError(f"prune.levels = {p.levels} with prune.imp_rate = {p.imp_rate} would leave {what} "
                                  f"with no weight at level {level}: use at most {level - 1} levels or a lower imp_rate")


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
    from .criteria import check_criterion

    check_criterion(cfg.prune.criterion, True, cfg.prune.score_batches, cfg.train.batch_size, n_train)
    k = Step.parse(cfg.prune.score_at).iterations(iterations_per_epoch)
    if k >= total:
        raise ConfigError(f"prune.score_at {cfg.prune.score_at} (iteration {k}) is at or past the end of training "
                          f"({total} iterations): lower it")
    if its != sorted(its) or len(set(its)) != len(its):
        raise ConfigError(f"reset.points {cfg.reset.points} must be strictly increasing "
                          f"(as iterations: {its})")
    if cfg.stability.enabled:
        for s in cfg.stability_steps():
            if s.iterations(iterations_per_epoch) >= total:
                raise ConfigError(f"stability point {s} (iteration {s.iterations(iterations_per_epoch)}) is at or "
                                  f"past the end of training ({total} iterations): lower it or train longer")
            if cfg.imp and stability_masks(cfg) != [None] and s.iterations(iterations_per_epoch) not in its:
                raise ConfigError(f"stability point {s} is not a reset point: an IMP level's mask belongs to the "
                                  f"chain of a reset point, so with IMP levels in stability.masks every "
                                  f"stability point must be one of reset.points {cfg.reset.points}")
        if cfg.imp and cfg.stability.only and any(m for m in stability_masks(cfg) if m is not None):
            raise ConfigError("stability.only = true cannot measure IMP levels above 1: their masks come from the "
                              "chains' retrainings; set stability.only = false or stability.masks = [\"dense\", 1]")
    return total
