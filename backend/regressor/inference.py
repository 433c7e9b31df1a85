"""Running the network on canonical eye crops, with mirror test-time augmentation.

Every crop is also run mirrored (in the same batch); the two answers are averaged, which
cancels a left/right bias of the network, and their disagreement is an uncertainty cue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.regressor.network import keras, tf

CHUNK = 1024  # crops per forward pass (bounds memory on big batches)


@dataclass(frozen=True)
class CropPrediction:
    """Per crop: the point (N, 2) in crop pixels, heatmap spread (N,) and TTA distance (N,)."""

    xy: np.ndarray
    spread: np.ndarray
    tta: np.ndarray


def forward(model: keras.Model):
    """A compiled inference function for `model` (one trace per batch size class)."""
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def predict_crops(model: keras.Model, crops: np.ndarray, call=None) -> CropPrediction:
    """Points for (N, H, W) grey crops in [0, 255], each averaged with its mirror image."""
    call = call or model
    crops = np.asarray(crops, dtype=np.float32)
    n, _, width = crops.shape
    if n == 0:
        empty = np.zeros((0,), np.float64)
        return CropPrediction(np.zeros((0, 2)), empty, empty)
    xy = np.empty((2 * n, 2), np.float64)
    spread = np.empty((2 * n,), np.float64)
    both = np.concatenate([crops, crops[:, :, ::-1]])[..., None]
    for start in range(0, 2 * n, CHUNK):
        out = call(tf.constant(both[start : start + CHUNK]))
        xy[start : start + CHUNK] = out["xy"].numpy()
        spread[start : start + CHUNK] = out["spread"].numpy()[:, 0]
    plain, mirrored = xy[:n], xy[n:].copy()
    mirrored[:, 0] = (width - 1) - mirrored[:, 0]
    return CropPrediction(
        xy=(plain + mirrored) / 2.0,
        spread=(spread[:n] + spread[n:]) / 2.0,
        tta=np.linalg.norm(plain - mirrored, axis=1),
    )
