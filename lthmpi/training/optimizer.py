"""The Keras optimizer of a config, and everything lthmpi knows about Keras' optimizer internals.

Keras 3 names an optimizer's slot variables "<optimizer name>/<variable path with / as _>_<slot>", with slots
"momentum" (Adam's m, SGD's momentum) and "velocity" (Adam's v); its step count is `iterations`. Only this
module spells those names: the sparse kernels and the tests ask `slot_variables`.
"""
from __future__ import annotations

SLOT_NAMES = {"m": "momentum", "v": "velocity"}  # lthmpi's slot key -> Keras 3's suffix


def make_optimizer(train_cfg):
    """The Keras optimizer of the config. Weight decay goes to Keras (decoupled: w -= lr * wd * w, after the
    update) only in the "decoupled" mode; in "l2" the trainer adds wd * w to the gradients itself (PyTorch's
    coupled form, before momentum or Adam's moments). AdamW with weight decay 0 is Adam, exactly."""
    import keras

    # A fixed name: Keras would name a process's second Adam "adam_1", and the optimizer state saved
    # at a reset point (keyed by variable path) would no longer restore into another trainer.
    kw = dict(learning_rate=train_cfg.lr, name=train_cfg.optimizer)
    decoupled = train_cfg.weight_decay if getattr(train_cfg, "weight_decay_mode", "decoupled") == "decoupled" else 0.0
    if decoupled:
        kw["weight_decay"] = decoupled
    if train_cfg.optimizer == "adamw" and decoupled:
        opt = keras.optimizers.AdamW(**kw)
    elif train_cfg.optimizer in ("adam", "adamw"):
        opt = keras.optimizers.Adam(**kw)
    elif train_cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(momentum=train_cfg.momentum, **kw)
    else:
        raise ValueError(f"unknown optimizer {train_cfg.optimizer!r}")
    if getattr(train_cfg, "precision", "float32") == "mixed_float16":  # float16 gradients underflow unscaled
        opt = keras.optimizers.LossScaleOptimizer(opt, name="loss_scale")
    return opt


def coupled_weight_decay(train_cfg) -> float:
    """The L2 coefficient the trainer adds to the gradients (g += wd * w): train.weight_decay in mode "l2"."""
    return float(train_cfg.weight_decay) if getattr(train_cfg, "weight_decay_mode", "decoupled") == "l2" else 0.0


def state_variables(optimizer) -> dict:
    """The optimizer's state by path (slots and step count; not the learning rate, which the schedule sets)."""
    return {v.path: v for v in optimizer.variables if "learning_rate" not in v.path}


def slot_key(optimizer_name: str, variable_path: str, slot: str) -> str:
    """The path of `variable_path`'s slot ("m" or "v") in an optimizer named `optimizer_name`."""
    return f"{optimizer_name}/{variable_path.replace('/', '_')}_{SLOT_NAMES[slot]}"


def slot_variables(optimizer, variable) -> dict:
    """{"m": slot variable or None, "v": ...} of one model variable."""
    by_path = {v.path: v for v in optimizer.variables}
    return {k: by_path.get(slot_key(optimizer.name, variable.path, k)) for k in SLOT_NAMES}


def slots_needed(train_cfg) -> tuple:
    """The slots the config's optimizer keeps: Adam m and v, SGD m when it has momentum."""
    if train_cfg.optimizer != "sgd":
        return ("m", "v")
    return ("m",) if train_cfg.momentum else ()


def hyperparameters(optimizer, train_cfg) -> dict:
    """What the sparse kernels need to repeat the Keras update: SGD's momentum, Adam's betas and epsilon,
    decoupled weight decay (Keras') and coupled L2 (the trainer's)."""
    hyper = ({"momentum": float(optimizer.momentum)} if train_cfg.optimizer == "sgd" else
             {"beta1": float(optimizer.beta_1), "beta2": float(optimizer.beta_2), "eps": float(optimizer.epsilon)})
    return {**hyper, "weight_decay": float(optimizer.weight_decay or 0.0), "l2": coupled_weight_decay(train_cfg)}
