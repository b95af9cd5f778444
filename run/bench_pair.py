"""Benchmark: the trainer and the sparse kernels of a base revision against the working tree, in ONE process.

This box's speed drifts by up to 2x between minutes, and one process differs from the next by a few percent
(memory layout, caches), so separate before/after runs cannot show a difference of a few percent. Here both
versions live in one process, pinned to one core: the base revision's `lthmpi` package is unpacked (`git
archive`) as `lthmpi_base` next to the working tree's `lthmpi`, and the two alternate, one timed unit each
in turn (the order flips every round), so that drift hits both alike. Per form it prints both medians, the
median of the per-round ratios new/base with their quartiles, how often the new one was faster, and a sign
test (two-sided p of that count if neither were faster).

Forms (LeNet-300-100, Fashion-MNIST, batch 60, 20% of the weights kept, validation every 100 iterations):
  trainer-sparse  one epoch of `MaskedTrainer.fit` on the sparse C kernels (the default at 20% kept)
  trainer-dense   the same on the dense XLA kernels (parallel.sparse_below = 0)
  kernels         one `SparseMLP.train` call of 100 steps and one `evaluate` of 5000 examples (random data)
Both trainers start from the same weights and masks and train the same batches: their histories are compared
too, and printed as identical or not (a refactoring must give identical ones).

    .venv/bin/python run/bench_pair.py --base 1b0987c [--forms trainer-sparse,trainer-dense,kernels]
                                       [--rounds 40] [--core N]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from paired import ratio_summary  # run/, this script's directory

FORMS = ("trainer-sparse", "trainer-dense", "kernels")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of: {', '.join(FORMS)}")
    ap.add_argument("--rounds", type=int, default=40, help="timed units of each version per form (default 40)")
    ap.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="core to pin to (default: the last)")
    args = ap.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    if not forms or any(f not in FORMS for f in forms):
        ap.error(f"--forms must name some of {', '.join(FORMS)}")
    if args.rounds < 2:
        ap.error("--rounds must be >= 2")
    if args.core not in os.sched_getaffinity(0):
        ap.error(f"--core must be one of {sorted(os.sched_getaffinity(0))}")
    os.sched_setaffinity(0, [args.core])
    with tempfile.TemporaryDirectory(prefix="lthmpi-base-") as tmp:
        rev = unpack_base(args.base, tmp, ap)
        sys.path.insert(0, tmp)
        print(f"base {args.base} ({rev}) against the working tree of {ROOT}; one process on core {args.core}, "
              f"1 thread; {args.rounds} rounds per form, alternating (order flipped every round)", flush=True)
        for form in forms:
            runner = kernels_pair if form == "kernels" else trainer_pair
            for label, times, same in runner(form, args.rounds):
                report(label, times, same)


def unpack_base(rev: str, into: str, ap) -> str:
    """The base revision's package as `lthmpi_base` under `into`; its commit id."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", f"{rev}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        ap.error(f"--base {rev!r} is not a commit of {ROOT} (git rev-parse failed)")
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "lthmpi"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    shutil.move(os.path.join(into, "lthmpi"), os.path.join(into, "lthmpi_base"))
    absolute = re.compile(r"^\s*(from|import) lthmpi\b", re.M)
    for d, _, files in os.walk(os.path.join(into, "lthmpi_base")):
        for f in files:
            if f.endswith(".py") and absolute.search(open(os.path.join(d, f)).read()):
                ap.error(f"--base {rev}: {f} imports lthmpi by its absolute name, so it cannot load beside the "
                         f"working tree's package; pick a revision whose package imports itself relatively")
    return commit


def trainer_pair(form: str, rounds: int):
    """One-epoch retrainings of the base's and the working tree's MaskedTrainer, alternating."""
    from lthmpi.runtime import configure_tensorflow

    configure_tensorflow(1)
    import lthmpi_base.training as base_training

    import lthmpi.training as new_training
    from lthmpi.config import Config
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.pruning import magnitude_masks

    cfg = Config()
    data = load_dataset(cfg.data, cfg.seed)
    tcfg = SimpleNamespace(**{**vars(cfg.train), "eval_every": "100it"})
    below = 0.0 if form == "trainer-dense" else cfg.parallel.sparse_below
    trainers = {}
    for name, module in (("base", base_training), ("new", new_training)):
        model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
        tr = module.MaskedTrainer(model, data, tcfg, 0, prunable_variables(model), sparse_below=below)
        tr.set_masks(magnitude_masks({v.path: v.numpy() for v in prunable_variables(model)}, 0.2, "global",
                                     {"output": 0.5}))
        tr.fit(0, tr.per_epoch)  # compile and warm up
        trainers[name] = tr
    kernels = {n: t.kernels for n, t in trainers.items()}
    if kernels["base"] != kernels["new"]:
        raise SystemExit(f"bench_pair: the two trainers picked different kernels ({kernels}); nothing to compare")
    per = trainers["new"].per_epoch
    times, histories = {"base": [], "new": []}, {"base": [], "new": []}
    for r in range(rounds):
        for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
            t = time.perf_counter()
            h = trainers[name].fit(per, 2 * per)
            times[name].append(time.perf_counter() - t)
            histories[name].append((h.evals, h.epochs, h.final_accuracy))
    yield f"{form} ({kernels['new']} kernels), s/epoch", times, histories["base"] == histories["new"]


def kernels_pair(form: str, rounds: int):
    """The base's and the working tree's SparseMLP on the same random net and batches, alternating."""
    import numpy as np

    import lthmpi.sparse as new_sparse
    import lthmpi_base.sparse as base_sparse

    rng = np.random.default_rng(0)
    shapes = [(784, 300), (300, 100), (100, 10)]
    kernels = [rng.normal(0, 0.05, s).astype(np.float32) for s in shapes]
    biases = [np.zeros(s[1], np.float32) for s in shapes]
    masks = [(rng.random(s) < (0.5 if i == len(shapes) - 1 else 0.2)).astype(np.float32) for i, s in enumerate(shapes)]
    x = rng.random((55000, 784), dtype=np.float32)
    y = rng.integers(0, 10, 55000).astype(np.int32)
    xv, yv = new_sparse.feature_major(x[:5000]), y[:5000].copy()
    nets = {}
    for name, module in (("base", base_sparse), ("new", new_sparse)):
        if module.library() is None:
            raise SystemExit(f"bench_pair: the {name} sparse kernels did not build; nothing to compare")
        nets[name] = module.SparseMLP(kernels, biases, masks, "adam")
    lr = np.full(100, 1.2e-3, np.float32)
    train, evaluate = {"base": [], "new": []}, {"base": [], "new": []}
    losses = {"base": [], "new": []}
    for r in range(rounds):
        idx = rng.integers(0, len(y), (100, 60)).astype(np.int32)
        for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
            t = time.perf_counter()
            losses[name].append(nets[name].train(x, y, idx, lr))
            train[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            losses[name].append(nets[name].evaluate(xv, yv))
            evaluate[name].append(time.perf_counter() - t)
    same = losses["base"] == losses["new"]
    yield "kernels: train, 100 steps of 60, s", train, same
    yield "kernels: evaluate, 5000 examples, s", evaluate, same


def report(label: str, times: dict, same: bool):
    base, new = times["base"], times["new"]
    print(f"\n{label}\n  base {statistics.median(base):.4f} (range {min(base):.4f}-{max(base):.4f}), "
          f"new {statistics.median(new):.4f} (range {min(new):.4f}-{max(new):.4f})\n"
          f"  new/base per round: {ratio_summary(new, base)}; results {'identical' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
