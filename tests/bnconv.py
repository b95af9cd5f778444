"""A test-only conv net with batch norm, registered as model "bn_conv", and a command line that runs lthmpi.main
with it:

    [mpirun -np P] python tests/bnconv.py --run-dir DIR --set model.name=bn_conv [lthmpi.main's options]

One 3x3 convolution of 8 filters without bias, lthmpi's batch norm (models._bn: FusedBatchNorm, as ResNet-20
has after each convolution), ReLU, global average pool, Dense. It has what the data-parallel code treats apart
(convolutions, so `auto` trains it in subgroups and its parent over every rank; moving statistics, which are
non-trainable variables that each replica updates from its own rows), and traces in a second where ResNet-20
takes each rank ~8 s of CPU.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAME = "bn_conv"


def build(input_shape, num_classes, seed):
    from lthmpi import models

    keras, layers = models.keras, models.layers
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer=models._he(seed, "conv"),
                      name="conv")(inputs)
    x = models._bn("bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=models._he(seed, "output"), name="output")(x)
    return keras.Model(inputs, outputs, name=NAME)


if __name__ == "__main__":
    from lthmpi import models
    from lthmpi.main import main

    models.MODELS[NAME] = build
    sys.exit(main())
