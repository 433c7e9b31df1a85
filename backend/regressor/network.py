"""The regressor's network: an eye crop in, a pupil heatmap -> (x, y) and its spread out.

The head is a heatmap decoded by a soft-argmax (integral regression, Sun et al. 2018): the
point is the heatmap's expected position, so it is sub-pixel, differentiable, trained with an
L1 loss on coordinates, and the heatmap's spread comes for free as an uncertainty cue. A
global-pooled dense head (the reference's) throws away where features are; it is kept only for
TF-Hub feature-VECTOR modules, which offer nothing else.

Backbones:
- "compact" (default): a small U-Net trained from scratch; offline and ~1 ms per crop on CPU.
- any TF-Hub image module handle (tfhub.dev / Kaggle URL, or a local SavedModel directory),
  loaded with `tensorflow_hub.KerasLayer`. That layer is a tf-keras (Keras 2) layer, so this
  package uses tf-keras everywhere (`import tf_keras`), never Keras 3.

Inputs are grey crops in [0, 255], shape (B, H, W, 1); every model standardises them itself.
Outputs: {"xy": (B, 2) in input pixels (pixel centres at integers), "spread": (B, 1) pixels}.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

# tensorflow_hub picks tf-keras only if told before TensorFlow loads Keras.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

COMPACT = "compact"


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a network before loading its weights."""

    input_height: int = 40
    input_width: int = 64
    backbone: str = COMPACT  # "compact" or a TF-Hub handle / SavedModel directory
    widths: tuple[int, ...] = (8, 16, 32, 64)  # compact: channels per resolution level
    # A TF-Hub module sees the crop resized to this (height, width), as RGB in [0, 1].
    hub_input_size: tuple[int, int] = (96, 160)
    hub_trainable: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> NetworkConfig:
        data = dict(data)
        data["widths"] = tuple(data.get("widths", cls.widths))
        data["hub_input_size"] = tuple(data.get("hub_input_size", cls.hub_input_size))
        return cls(**data)


class Standardise(keras.layers.Layer):
    """Per-crop zero mean, unit variance: exposure and contrast stop mattering."""

    def call(self, x):
        mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        return (x - mean) / tf.sqrt(var + 25.0)


class SoftArgmax(keras.layers.Layer):
    """Heatmap logits (B, h, w, 1) -> expected (x, y) and spread, in input-image pixels.

    Cell (i, j) of a heatmap at stride (sy, sx) covers input pixels [j*sx, (j+1)*sx); its
    centre is x = j*sx + (sx - 1)/2 in the pixel-centre convention.
    """

    def __init__(self, input_height: int, input_width: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.input_height = input_height
        self.input_width = input_width

    def call(self, logits):
        shape = tf.shape(logits)
        h, w = shape[1], shape[2]
        sy = tf.cast(self.input_height, tf.float32) / tf.cast(h, tf.float32)
        sx = tf.cast(self.input_width, tf.float32) / tf.cast(w, tf.float32)
        flat = tf.reshape(logits, [shape[0], h * w])
        prob = tf.reshape(tf.nn.softmax(flat, axis=-1), [shape[0], h, w])
        xs = tf.cast(tf.range(w), tf.float32) * sx + (sx - 1.0) / 2.0
        ys = tf.cast(tf.range(h), tf.float32) * sy + (sy - 1.0) / 2.0
        px = tf.reduce_sum(prob, axis=1)  # (B, w)
        py = tf.reduce_sum(prob, axis=2)  # (B, h)
        x = tf.reduce_sum(px * xs, axis=-1)
        y = tf.reduce_sum(py * ys, axis=-1)
        var = tf.reduce_sum(px * tf.square(xs[None] - x[:, None]), axis=-1) + tf.reduce_sum(
            py * tf.square(ys[None] - y[:, None]), axis=-1
        )
        return tf.stack([x, y], axis=-1), tf.sqrt(var + 1e-6)[:, None]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "input_height": self.input_height,
            "input_width": self.input_width,
        }


def _conv(x, filters: int, stride: int = 1, name: str = ""):
    x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=name)(
        x
    )
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _compact_heatmap(x, widths: tuple[int, ...]):
    """U-Net: full-resolution stem, down to 1/8, back up to 1/2 with skips; 1/2 heatmap."""
    skips = []
    x = _conv(x, widths[0], name="stem")
    for level, width in enumerate(widths[1:], start=1):
        x = _conv(x, width, stride=2, name=f"down{level}")
        x = _conv(x, width, name=f"down{level}_b")
        skips.append(x)
    skips.pop()  # the deepest level is x itself
    for level, skip in reversed(list(enumerate(skips, start=1))):
        x = keras.layers.UpSampling2D(interpolation="bilinear", name=f"up{level}")(x)
        x = keras.layers.Concatenate(name=f"up{level}_cat")([x, skip])
        x = _conv(x, int(skip.shape[-1]), name=f"up{level}_b")
    return keras.layers.Conv2D(1, 1, name="heatmap")(x)


def _hub_features(x, config: NetworkConfig):
    import tensorflow_hub as hub

    rgb = keras.layers.Resizing(*config.hub_input_size, name="hub_resize")(x)
    rgb = keras.layers.Concatenate(name="hub_rgb")([rgb, rgb, rgb])
    rgb = keras.layers.Rescaling(1.0 / 255.0, name="hub_unit")(rgb)
    return hub.KerasLayer(config.backbone, trainable=config.hub_trainable, name="hub")(rgb)


def build_network(config: NetworkConfig) -> keras.Model:
    """A fresh, untrained network for `config` (weights are loaded separately)."""
    h, w = config.input_height, config.input_width
    crops = keras.Input((h, w, 1), name="crop")
    if config.backbone == COMPACT:
        logits = _compact_heatmap(Standardise(name="standardise")(crops), config.widths)
        xy, spread = SoftArgmax(h, w, name="soft_argmax")(logits)
    else:
        features = _hub_features(crops, config)
        if len(features.shape) == 4:  # a feature MAP: keep the heatmap head
            hidden = _conv(features, 64, name="hub_head")
            logits = keras.layers.Conv2D(1, 1, name="heatmap")(hidden)
            xy, spread = SoftArgmax(h, w, name="soft_argmax")(logits)
        elif len(features.shape) == 2:  # a feature VECTOR: all a dense head can do
            hidden = keras.layers.Dense(128, activation="relu", name="hub_dense")(features)
            unit = keras.layers.Dense(2, activation="sigmoid", name="hub_xy")(hidden)
            xy = keras.layers.Lambda(lambda t: t * [w - 1.0, h - 1.0], name="hub_pixels")(unit)
            # No spatial distribution to measure: a constant spread (TTA still ranks faces).
            spread = keras.layers.Lambda(lambda t: tf.ones_like(t[:, :1]), name="spread")(xy)
        else:
            raise ValueError(
                f"TF-Hub module {config.backbone!r} returns shape {features.shape}; expected a "
                "feature vector (batch, d) or a feature map (batch, h, w, c)"
            )
    xy = keras.layers.Activation("linear", name="xy", dtype="float32")(xy)
    spread = keras.layers.Activation("linear", name="spread_px", dtype="float32")(spread)
    return keras.Model(crops, {"xy": xy, "spread": spread}, name="pupil_regressor")
