"""The registry of model builders.

Every builder returns a Keras 3 functional model that maps NHWC float32 images to *logits* (no softmax).
Layers carry stable explicit names, so variable paths (``v.path``, e.g. ``"fc1/kernel"``) are the same in
every build and can be used as HDF5 keys; the last classification layer is always named ``"output"``.

Initialisation is a pure function of ``seed``: each random initialiser gets its own integer seed derived
from ``(seed, "build", variable path)``, so two builds with the same seed have identical weights and no
two layers share a random stream. :func:`fresh_init` derives from ``(seed, "fresh", variable path)``
instead, so a "random re-initialisation" control can never silently reproduce the original init, even
when it is given the seed the model was built with.

Small inputs (e.g. the 8x8 digits used in tests): every 2x2 max pool uses ``padding="same"``, so a
spatial size n becomes ceil(n / 2) and never 0 (1 stays 1); at the paper shapes (32x32) this is exactly
the usual "valid" pooling. Strided ResNet convolutions use "same" padding for the same reason.
The pool is :class:`MaxPool2x2`, not Keras' ``MaxPooling2D``: with op determinism on, XLA has no
deterministic gradient for ``MaxPool`` and refuses to compile the training step.
MobileNetV2 needs at least 32x32: smaller inputs are first upsampled by a ``Resizing`` layer named
``"resize"`` to at least 32 in each spatial dimension.

Parameter counts at the paper shapes (10 classes unless said): lenet300_100 at 28x28x1 266,610;
conv2 4,301,642; conv4 2,425,930; conv6 2,262,602; resnet20 274,042; vgg16 14,736,714;
mobilenetv2 at 224x224x3 with 1000 classes 3,538,984.

Note on Conv-6: Frankle & Carbin (2019, Fig. 2) give "1.7M" weights for Conv-6, but the architecture
in the same table (3x3 'same' convolutions 64,64,pool,128,128,pool,256,256,pool, then FC 256,256,10 on
32x32x3) has 1.14M convolution weights (their "1.1M" conv figure, which matches) plus 4096*256 + 256*256 +
256*10 = 1.12M fully connected weights: 2.26M. The architecture is built as described; the 1.7M total of
the paper cannot be reached by it.
"""
from __future__ import annotations

import functools
import random as _pyrandom
import zlib
from typing import Callable

import numpy as np

from .runtime import import_tensorflow

import_tensorflow()  # loads TF here rather than through `import keras`: its start-up notices stay off stderr
import keras  # noqa: E402
from keras import layers  # noqa: E402

__all__ = [
    "ModelError",
    "MODELS",
    "build_model",
    "prunable_variables",
    "fresh_init",
    "describe",
    "has_convolutions",
    "MaxPool2x2",
    "FusedBatchNorm",
]


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, unusable shape, ...); one-line message."""


# --------------------------------------------------------------------------------------------------
# layers


@keras.saving.register_keras_serializable(package="lthmpi")
class MaxPool2x2(layers.Layer):
    """A 2x2, stride 2, 'same' max pool written as a max over a reshape.

    Why: under `enable_op_determinism` XLA rejects the gradient of MaxPool ("no deterministic XLA
    implementation"), so a conv net with MaxPooling2D could not be trained by the compiled step at all;
    reduce_max's gradient is deterministic. Its forward equals MaxPooling2D(2, padding="same"); at an
    exact tie inside a window the gradient is shared among the tied inputs instead of given to one."""

    def call(self, x):
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:  # 'same': one row / column of -inf at the bottom / right
            x = keras.ops.pad(x, [[0, 0], [0, h % 2], [0, w % 2], [0, 0]], constant_values=float("-inf"))
        x = keras.ops.reshape(x, (-1, (h + 1) // 2, 2, (w + 1) // 2, 2, x.shape[3]))
        return keras.ops.max(x, axis=(2, 4))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, (h + 1) // 2, (w + 1) // 2, c)


@keras.saving.register_keras_serializable(package="lthmpi")
class FusedBatchNorm(layers.BatchNormalization):
    """Keras' BatchNormalization, computed on the CPU by TensorFlow's fused kernel (FusedBatchNormV3).

    Why: Keras 3 normalises with separate ops (moments, then the affine transform, and their gradients op by
    op), each a pass over the activations; the fused kernel takes one pass forward and one back. A ResNet-20
    training step on one core is ~20% faster with it (run/bench_conv.py, docs/gpu.md). Same statistics, same
    moving-average update (the kernel returns the unbiased batch variance; Keras' moving average takes the
    biased one, as here), same variables: results differ from Keras' layer by float rounding only. Where a
    GPU is visible (XLA fuses Keras' ops there, and cuDNN wants epsilon above 1e-5) and where the kernel does
    not apply (not 4-D channels-last, renorm, synchronized, a mask, no centre or scale), Keras' own code runs."""

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, tf.float32)  # as Keras' layer: statistics in float32 whatever the policy
        if training and self.trainable:
            y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=self.gamma, offset=self.beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)  # values per channel
            variance = tf.where(n > 1.0, variance * ((n - 1.0) / n), tf.zeros_like(variance))  # biased, as Keras'
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            y = tf.raw_ops.FusedBatchNormV3(x=x, scale=self.gamma, offset=self.beta, mean=self.moving_mean,
                                            variance=self.moving_variance, epsilon=self.epsilon,
                                            data_format="NHWC", is_training=False)[0]
        return tf.cast(y, self.compute_dtype)

    def _fusable(self, inputs, mask) -> bool:
        return (mask is None and len(inputs.shape) == 4 and self.axis in (3, -1) and self.center and self.scale
                and not self.renorm and not getattr(self, "synchronized", False) and not _gpu_visible()
                and keras.backend.backend() == "tensorflow")


@functools.cache
def _gpu_visible() -> bool:
    """Whether TensorFlow places ops on a GPU in this process (asked once: devices are fixed at start-up)."""
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


# --------------------------------------------------------------------------------------------------
# seeds and initialisers


def _derive_seed(seed: int, salt: str, path: str) -> int:
    """A 31-bit seed derived from (seed, salt, variable path); stable across processes and platforms."""
    entropy = [int(seed), zlib.crc32(salt.encode("utf-8")), zlib.crc32(path.encode("utf-8"))]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


def _glorot(seed: int, layer_name: str, var: str = "kernel"):
    return keras.initializers.GlorotNormal(seed=_derive_seed(seed, "build", f"{layer_name}/{var}"))


def _he(seed: int, layer_name: str, var: str = "kernel"):
    return keras.initializers.HeNormal(seed=_derive_seed(seed, "build", f"{layer_name}/{var}"))


# --------------------------------------------------------------------------------------------------
# shape checks


def _check_image_shape(name: str, input_shape) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise ModelError(f"model {name!r} needs an image input shape (height, width, channels) of positive "
                         f"integers, got {tuple(input_shape)!r}")
    return tuple(int(d) for d in shape)


def _check_any_shape(name: str, input_shape) -> tuple:
    shape = tuple(input_shape)
    if len(shape) < 1 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise ModelError(f"model {name!r} needs an input shape of positive integers, got {tuple(input_shape)!r}")
    return tuple(int(d) for d in shape)


# --------------------------------------------------------------------------------------------------
# builders


def _lenet300_100(input_shape, num_classes, seed):
    """LeNet-300-100 (Frankle & Carbin 2019): Flatten, Dense 300 relu, Dense 100 relu, Dense classes."""
    shape = _check_any_shape("lenet300_100", input_shape)
    inputs = keras.Input(shape=shape, name="input")
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(300, activation="relu", kernel_initializer=_glorot(seed, "fc1"), name="fc1")(x)
    x = layers.Dense(100, activation="relu", kernel_initializer=_glorot(seed, "fc2"), name="fc2")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=_glorot(seed, "output"), name="output")(x)
    return keras.Model(inputs, outputs, name="lenet300_100")


def _conv_n(n_conv: int):
    """Conv-2/4/6 of Frankle & Carbin (2019, Fig. 2): 3x3 'same' relu convolutions in pairs of
    64 | 128 | 256 filters, each pair followed by a 2x2 max pool ('same' padding, see the module note),
    then FC 256 relu, FC 256 relu, output. Glorot normal init."""
    name = f"conv{n_conv}"

    def build(input_shape, num_classes, seed):
        shape = _check_image_shape(name, input_shape)
        inputs = keras.Input(shape=shape, name="input")
        x = inputs
        for i in range(n_conv):
            filters = 64 * 2 ** (i // 2)
            lname = f"conv{i + 1}"
            x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                              kernel_initializer=_glorot(seed, lname), name=lname)(x)
            if i % 2 == 1:
                x = MaxPool2x2(name=f"pool{i // 2 + 1}")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(256, activation="relu", kernel_initializer=_glorot(seed, "fc1"), name="fc1")(x)
        x = layers.Dense(256, activation="relu", kernel_initializer=_glorot(seed, "fc2"), name="fc2")(x)
        outputs = layers.Dense(num_classes, kernel_initializer=_glorot(seed, "output"), name="output")(x)
        return keras.Model(inputs, outputs, name=name)

    build.__name__ = f"_{name}"
    build.__doc__ = _conv_n.__doc__
    return build


def _bn(name):
    # PyTorch defaults (as in open_lth): momentum 0.1 there == 0.9 here, eps 1e-5.
    return FusedBatchNorm(momentum=0.9, epsilon=1e-5, name=name)


def _resnet20(input_shape, num_classes, seed):
    """CIFAR ResNet-20 (He et al. 2016, as in open_lth / Frankle et al.): 3x3 conv 16 + BN + relu, then
    3 stages of 3 basic blocks with 16/32/64 filters (first block of stages 2 and 3 strides 2), a 1x1
    conv + BN projection shortcut where the shape changes, global average pool, Dense classes.
    Convolutions have no bias (BN follows); He normal init."""
    shape = _check_image_shape("resnet20", input_shape)
    inputs = keras.Input(shape=shape, name="input")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, kernel_initializer=_he(seed, "stem_conv"),
                      name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    in_filters = 16
    for s, filters in enumerate((16, 32, 64), start=1):
        for b in range(1, 4):
            p = f"stage{s}_block{b}"
            stride = 2 if (s > 1 and b == 1) else 1
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                              kernel_initializer=_he(seed, f"{p}_conv1"), name=f"{p}_conv1")(x)
            y = _bn(f"{p}_bn1")(y)
            y = layers.ReLU(name=f"{p}_relu1")(y)
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              kernel_initializer=_he(seed, f"{p}_conv2"), name=f"{p}_conv2")(y)
            y = _bn(f"{p}_bn2")(y)
            if stride != 1 or in_filters != filters:
                sc = layers.Conv2D(filters, 1, strides=stride, padding="same", use_bias=False,
                                   kernel_initializer=_he(seed, f"{p}_shortcut_conv"),
                                   name=f"{p}_shortcut_conv")(x)
                sc = _bn(f"{p}_shortcut_bn")(sc)
            else:
                sc = x
            x = layers.Add(name=f"{p}_add")([y, sc])
            x = layers.ReLU(name=f"{p}_relu2")(x)
            in_filters = filters
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=_he(seed, "output"), name="output")(x)
    return keras.Model(inputs, outputs, name="resnet20")


_VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16(input_shape, num_classes, seed):
    """CIFAR VGG-16 of Frankle et al. (as open_lth's cifar_vgg_16): 13 3x3 'same' convolutions
    64,64,M,128,128,M,256x3,M,512x3,M,512x3, each conv (with bias, as open_lth) + BN + relu; M is a 2x2
    max pool ('same' padding, see the module note); then global average pool (open_lth's AvgPool2d(2)
    on the 2x2 map at 32x32) and Dense classes. He normal init."""
    shape = _check_image_shape("vgg16", input_shape)
    inputs = keras.Input(shape=shape, name="input")
    x = inputs
    conv_i, pool_i = 0, 0
    for item in _VGG16_PLAN:
        if item == "M":
            pool_i += 1
            x = MaxPool2x2(name=f"pool{pool_i}")(x)
            continue
        conv_i += 1
        x = layers.Conv2D(item, 3, padding="same", kernel_initializer=_he(seed, f"conv{conv_i}"),
                          name=f"conv{conv_i}")(x)
        x = _bn(f"bn{conv_i}")(x)
        x = layers.ReLU(name=f"relu{conv_i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=_he(seed, "output"), name="output")(x)
    return keras.Model(inputs, outputs, name="vgg16")


def _mobilenetv2(input_shape, num_classes, seed):
    """Keras' own MobileNetV2 (alpha 1.0, weights=None) without its top, then global average pool and a
    Dense classifier named "output" (the same layers and parameter count as Keras' include_top=True).
    Inputs smaller than 32 in a spatial dimension are upsampled to at least 32 by a Resizing layer.
    Keras' initialisers in this architecture are unseeded, so after building every trainable variable is
    re-drawn from its own initialiser class with a seed derived from (seed, "build", path); the Python
    `random` state Keras consumes while building is restored afterwards."""
    shape = _check_image_shape("mobilenetv2", input_shape)
    h, w, c = shape
    py_state = _pyrandom.getstate()
    try:
        inputs = keras.Input(shape=shape, name="input")
        x = inputs
        if h < 32 or w < 32:
            h, w = max(h, 32), max(w, 32)
            x = layers.Resizing(h, w, name="resize")(x)
        backbone = keras.applications.MobileNetV2(
            input_shape=(h, w, c), input_tensor=x, include_top=False, weights=None, pooling="avg")
        outputs = layers.Dense(num_classes, name="output")(backbone.output)
        model = keras.Model(inputs, outputs, name="mobilenetv2")
    finally:
        _pyrandom.setstate(py_state)
    for v, value in zip(model.trainable_variables, _init_values(model, seed, "build")):
        v.assign(value)
    return model


MODELS: dict[str, Callable] = {
    "lenet300_100": _lenet300_100,
    "conv2": _conv_n(2),
    "conv4": _conv_n(4),
    "conv6": _conv_n(6),
    "resnet20": _resnet20,
    "vgg16": _vgg16,
    "mobilenetv2": _mobilenetv2,
}


def build_model(name: str, input_shape: tuple, num_classes: int, seed: int, precision: str = "float32") -> keras.Model:
    """Build registry model `name` for NHWC inputs of `input_shape` and `num_classes` logits.

    The weights are a deterministic function of `seed` (a non-negative integer), the same in every precision:
    `precision` ("float32", "mixed_bfloat16", "mixed_float16") is Keras' dtype policy of the layers, which keep
    float32 variables and compute in the lower precision (their logits come out in it too)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ModelError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        raise ModelError(f"input_shape must be a tuple of positive integers, got {input_shape!r}") from None
    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # read by every layer as it is made; process-wide, so put back
    try:
        return MODELS[name](input_shape, int(num_classes), int(seed))
    finally:
        keras.config.set_dtype_policy(saved)


# --------------------------------------------------------------------------------------------------
# introspection


_PRUNABLE_TYPES = (layers.Dense, layers.Conv2D, layers.DepthwiseConv2D)


def has_convolutions(model) -> bool:
    return any(isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)) for layer in _leaf_layers(model))


def _leaf_layers(model):
    """All layers in order, descending into nested models (the registry's models are flat)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _kernel_of(layer):
    # Keras 3 names the depthwise weight "kernel" (attribute `kernel`); older versions `depthwise_kernel`.
    k = getattr(layer, "kernel", None)
    if k is None:
        k = getattr(layer, "depthwise_kernel", None)
    return k


def prunable_variables(model) -> list:
    """The kernels of the Dense, Conv2D and DepthwiseConv2D layers, in layer order.

    Never biases, batch-norm gamma/beta or moving statistics."""
    out = []
    for layer in _leaf_layers(model):
        if isinstance(layer, _PRUNABLE_TYPES):
            k = _kernel_of(layer)
            if k is None:
                raise ModelError(f"layer {layer.name!r} has no kernel (is the model built?)")
            out.append(k)
    return out


def _initializer_for(layer, var):
    """The initializer that made `var`, a weight of `layer`."""
    if isinstance(layer, layers.DepthwiseConv2D) and var is _kernel_of(layer):
        attr = "depthwise_initializer"
    else:
        attr = f"{var.name.split('/')[-1]}_initializer"
    init = getattr(layer, attr, None)
    if init is None:
        raise ModelError(f"cannot find the initializer of {var.path!r} (looked for {type(layer).__name__}.{attr})")
    return init


def _reseeded(init, seed: int):
    """The same initializer class and config with a new integer seed (configs without a seed are constant)."""
    if isinstance(init, str):
        init = keras.initializers.get(init)
    cfg = init.get_config()
    if "seed" in cfg:
        cfg = dict(cfg, seed=seed)
    return type(init).from_config(cfg)


def _init_values(model, seed: int, salt: str) -> list:
    owner = {}
    for layer in _leaf_layers(model):
        for v in layer.weights:
            owner[id(v)] = layer
    values = []
    for v in model.trainable_variables:
        layer = owner.get(id(v))
        if layer is None:
            raise ModelError(f"cannot find the layer that owns variable {v.path!r}")
        init = _reseeded(_initializer_for(layer, v), _derive_seed(seed, salt, v.path))
        arr = keras.ops.convert_to_numpy(init(shape=tuple(v.shape), dtype=v.dtype))
        values.append(np.asarray(arr, dtype=np.dtype(v.dtype)).reshape(tuple(v.shape)))
    return values


def fresh_init(model, seed: int) -> list:
    """New values for `model.trainable_variables` (same order), each drawn from its layer's own
    initializer class and config re-seeded from `seed` (the random re-initialisation control).

    Deterministic in `seed`; never equal to the build's init (a different seed derivation). Zero/one
    initialisers (biases, BN beta/gamma) give their constants. Does not build or modify the model."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ModelError(f"seed must be a non-negative integer, got {seed!r}")
    return _init_values(model, int(seed), "fresh")


def _shape_str(layer) -> str:
    try:
        out = layer.output
    except (AttributeError, ValueError):
        return "?"
    if isinstance(out, (list, tuple)):
        return ", ".join(str(tuple(o.shape)) for o in out)
    return str(tuple(out.shape))


def describe(model) -> str:
    """One line per layer: name, type, output shape, parameter count, and "prunable" where the layer's
    kernel is pruned; the last line gives the total (and prunable) parameter count."""
    prunable_ids = {id(v) for v in prunable_variables(model)}
    rows = []
    for layer in _leaf_layers(model):
        flag = "prunable" if any(id(v) in prunable_ids for v in layer.weights) else ""
        rows.append((layer.name, type(layer).__name__, _shape_str(layer), f"{layer.count_params():,}", flag))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip()
             for r in rows]
    n_prunable = sum(int(np.prod(v.shape)) for v in prunable_variables(model))
    lines.append(f"total params: {model.count_params():,} (prunable: {n_prunable:,})")
    return "\n".join(lines)
