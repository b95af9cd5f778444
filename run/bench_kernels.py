"""Benchmark: seconds per epoch of a masked retraining on the dense XLA kernels and on the sparse kernels,
across the densities of a pruning grid: where the sparse kernels start to pay on this CPU, to choose
`parallel.sparse_below` (default 0.3) for it.

LeNet-300-100 on Fashion-MNIST (55k training examples), batch 60, validation every 100 iterations and
the test set at the epoch end, as a task runs; one process pinned to the last `--threads` cores. Each
density trains one epoch on each kernel, alternating, `--rounds` times (the host's noise shows in the range).

    .venv/bin/python run/bench_kernels.py [--remaining 0.8,0.5,0.3,0.2,0.1,0.05,0.02,0.01] [--rounds 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--remaining", default="0.8,0.5,0.3,0.2,0.1,0.05,0.02,0.01",
                    help="fractions of weights kept, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="epochs timed per density and kernel (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="TF threads for the dense kernels (the sparse ones use one)")
    args = ap.parse_args()
    try:
        fractions = [float(x) for x in args.remaining.split(",")]
    except ValueError:
        ap.error(f"--remaining must be comma-separated fractions such as 0.2,0.05, not {args.remaining!r}")
    if not all(0 < f <= 1 for f in fractions) or args.rounds < 1:
        ap.error("--remaining fractions must be in (0, 1] and --rounds >= 1")
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(cores):
        ap.error(f"--threads must be between 1 and the {len(cores)} cores this process may use")
    os.sched_setaffinity(0, cores[-args.threads:])

    from lthmpi.runtime import configure_tensorflow

    configure_tensorflow(args.threads)
    from lthmpi import sparse
    from lthmpi.config import Config
    from lthmpi.data import load_dataset
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.pruning import magnitude_masks
    from lthmpi.training import MaskedTrainer

    if sparse.library() is None:
        sys.exit(f"bench_kernels: the sparse kernels cannot be built here: {sparse.library_error()}")
    cfg = Config()
    data = load_dataset(cfg.data, cfg.seed)
    trainers = {}
    for kernels, below in (("dense", 0.0), ("sparse", 1.0)):
        model = build_model("lenet300_100", data.input_shape, data.num_classes, 0)
        trainers[kernels] = MaskedTrainer(model, data, cfg.train, 0, prunable_variables(model), sparse_below=below)
    init = trainers["dense"].get_weights()
    prunable = trainers["dense"].prunable_paths
    print(f"LeNet-300-100, fashion_mnist, batch 60, eval every 100 it; dense kernels on {args.threads} thread(s), "
          f"sparse on one; cores {cores[-args.threads:]}; {args.rounds} epoch(s) each (median, range)")
    print(f"  {'kept':>6}  {'dense s/epoch':>20}  {'sparse s/epoch':>20}  sparse speed-up")
    for f in fractions:
        masks = magnitude_masks({p: init[p] for p in prunable}, f, "global", {"output": 0.5})
        times = {k: [] for k in trainers}
        for tr in trainers.values():  # compile / warm up at this mask
            tr.set_weights(init)
            tr.set_masks(masks)
            tr.reset_optimizer(None)
            tr.fit(0, 100)
        for _ in range(args.rounds):
            for k, tr in trainers.items():
                tr.set_weights(init)
                tr.set_masks(masks)
                tr.reset_optimizer(None)
                t = time.perf_counter()
                tr.fit(0, tr.per_epoch)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        cell = {k: f"{med[k]:5.2f} ({min(times[k]):.2f}-{max(times[k]):.2f})" for k in times}
        print(f"  {f:6.3f}  {cell['dense']:>20}  {cell['sparse']:>20}  {med['dense'] / med['sparse']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
