"""Which form a conv net's step takes on the CPU (parallel.conv_step): chosen by measurement, not by rule.

A conv net on the CPU trains one step per call in one of two forms: "graph", TensorFlow's graph executor on
its oneDNN kernels with only the optimizer update and re-mask compiled by XLA (the rule's choice since issue
22), or "xla", the whole step compiled by XLA. Which is faster depends on the CPU: on the Intel box of
docs/gpu.md oneDNN was (ResNet-20: 417 against 1214 ms), on an AMD EPYC (AVX2) XLA was (Conv-2: 381 against
437 ms, issue 33). The two differ in their last bits, so the form is recorded with each task and checked on a
rerun like the thread count (store.mixed_kernels).

`auto` times a few steps of each form once, at a run's start-up, on the real model, batch and threads, runs
the faster, and caches the choice per host (CPU model and flags), model, batch, threads, precision and
TensorFlow version in a small JSON file (LTHMPI_CACHE_DIR, else $XDG_CACHE_HOME/lthmpi or ~/.cache/lthmpi),
so that later runs and the other ranks' runs on that host take the same form without timing it again.
A run shorter than MIN_TIMED_ITERATIONS is not timed (two compilations and ten steps would not pay for
themselves): without a cached choice it takes the rule's form.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

FORMS = ("graph", "xla")
RULE = "graph"  # the form devices.kernel_plan gave conv nets on the CPU before the choice was measured
WARM, TIMED = 2, 3  # steps of each form: traced and compiled on the first, timed on the last TIMED
MIN_TIMED_ITERATIONS = 1000
CACHE_FILE = "conv_step.json"

log = logging.getLogger("lthmpi")


def cache_path() -> str:
    from ..sparse import cache_dir

    return os.path.join(cache_dir(), CACHE_FILE)


def host_identity() -> str:
    """A short hash of the CPU's model and feature flags (what the kernels' speed depends on)."""
    from ..sparse import _cpu_identity

    return hashlib.sha256(_cpu_identity().encode()).hexdigest()[:16]


def cache_key(fields: dict) -> str:
    """One cache entry's name: the host and every field the timing depends on, readable, in a fixed order."""
    return "|".join(f"{k}={fields[k]}" for k in sorted(fields))


def read_cache(path: str) -> dict:
    """The cached choices; a missing, unreadable or damaged file is an empty cache (it is only a cache)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(path: str, key: str, entry: dict) -> None:
    """Add one entry, atomically (a reader never sees half a file); a cache that cannot be written is said
    once and otherwise ignored: the next run times again."""
    from ..fileio import atomic_path

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = read_cache(path)
        data[key] = entry
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
    except OSError as e:
        log.warning("conv step choice not cached (%s): the next run on this host times the forms again", e)


def faster(seconds: dict) -> str:
    """The form with the fewer seconds per step; a tie keeps the rule's form."""
    return min(FORMS, key=lambda f: (seconds[f], f != RULE))


def choose(setting: str, fields: dict, time_form, iterations: int, path: str | None = None) -> tuple[str, str]:
    """(form, why) for parallel.conv_step = `setting`. `fields`: what the cache entry is keyed by (the host is
    added here); `time_form(form)`: seconds per step of that form, measured (injectable for the tests);
    `iterations`: the run's training length T (a shorter run than MIN_TIMED_ITERATIONS is not timed)."""
    if setting in FORMS:
        return setting, f"parallel.conv_step = \"{setting}\""
    if setting != "auto":
        raise ValueError(f"parallel.conv_step {setting!r} is unknown (auto, {', '.join(FORMS)})")
    path = path or cache_path()
    key = cache_key({**fields, "cpu": host_identity()})
    hit = read_cache(path).get(key)
    if isinstance(hit, dict) and hit.get("form") in FORMS:
        return hit["form"], f"cached for this host ({path}): {_ms(hit.get('ms_per_step', {}))}"
    if iterations < MIN_TIMED_ITERATIONS:
        return RULE, (f"not timed: {iterations} iterations are too few to repay the timing "
                      f"(< {MIN_TIMED_ITERATIONS}), and none is cached for this host")
    seconds = {}
    for form in FORMS:
        try:
            seconds[form] = float(time_form(form))
        except Exception as e:  # noqa: BLE001 - a form that fails to build or run is not chosen
            if form == RULE:
                raise
            log.warning("conv step form %s failed while timed (%s): using %s", form, str(e).splitlines()[0], RULE)
            seconds[form] = float("inf")
    form = faster(seconds)
    ms = {f: round(s * 1e3, 2) for f, s in seconds.items()}
    write_cache(path, key, {"form": form, "ms_per_step": ms, "fields": fields, "when": time.time()})
    return form, f"timed now ({WARM} warm-up + {TIMED} steps each): {_ms(ms)}"


def _ms(ms: dict) -> str:
    return ", ".join(f"{f} {v} ms" for f, v in sorted(ms.items())) + " a step"
