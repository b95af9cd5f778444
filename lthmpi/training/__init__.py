"""The masked trainer, in parts: the hot path of every experiment.

    trainer.py        MaskedTrainer: model, masks, optimizer state; picks a backend; runs the fit loop on it
    loop.py           the fit loop (evaluation boundaries, History, best weights, checkpoints, progress)
    lr_schedule.py    the learning-rate schedule (float32 per iteration; every backend trains from it)
    optimizer.py      the Keras optimizer of a config, and all knowledge of Keras' slot names
    batches.py        the batch order and the batch source (in memory; a streaming source plugs in there)
    dense.py          dense backend: XLA-compiled masked steps (K steps per call; conv nets one per call)
    step_form.py      a CPU conv net's step form, oneDNN graph or XLA: timed at start-up, cached per host
    data_parallel.py  data-parallel backend: dense steps with gradients summed through a reducer
    sparse_backend.py sparse backend: masked Dense/ReLU nets on the C kernels of lthmpi/sparse.py

A backend is an object with `kernels` (the name a task records) and the methods the fit loop calls:
`begin()`, `train(t, n, lrs) -> sum of losses`, `evaluate(split) -> (mean loss, accuracy)`, `keep_best()`,
`best_test_accuracy()`, `replicas() -> (count, identical)`, `sync()` (model/optimizer variables up to date)
and `end()`. docs/trainer.md says how to add one.
"""
from .batches import BatchOrder, InMemoryBatches
from .loop import History, fit
from .optimizer import make_optimizer
from .lr_schedule import StepDecay
from .trainer import MaskedTrainer

__all__ = ["BatchOrder", "History", "InMemoryBatches", "MaskedTrainer", "StepDecay", "fit",
           "make_optimizer"]
