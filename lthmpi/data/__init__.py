"""Datasets for the engine: raw readers, the validation split, normalisation, prepared HDF5 files.

Import `load_dataset(cfg, seed)` to get a training-ready `Dataset`; `KNOWN_SHAPES` gives a dataset's
input shape and class count without reading any file. Augmentation (which imports TensorFlow) lives
in `lthmpi.data.augment`, so that reading data does not pay for importing TensorFlow. Image trees of any
size (ImageNet's layout) are prepared by `stream_prepare` into uint8 files that training can read from disk
(`batches`); docs/data.md.
"""
from .prepare import Dataset, load_dataset
from .readers import DATASETS, KNOWN_SHAPES, DataError

__all__ = ["DataError", "Dataset", "DATASETS", "KNOWN_SHAPES", "load_dataset"]
