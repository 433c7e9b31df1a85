"""Synthetic eye crops for regressor tests: dark dots on noisy skin, with known centres."""

from __future__ import annotations

import numpy as np

from backend.regressor.augment import window_origin
from backend.regressor.crops import SOURCE_GEOMETRY
from backend.regressor.dataset import FaceSamples

SRC_W, SRC_H = SOURCE_GEOMETRY.size


def dark_dots(n: int, rng: np.random.Generator, size=(SRC_H, SRC_W), margin=(40, 36)):
    """(n, H, W) uint8 noisy bright crops, each with one dark disk; (n, 2) disk centres."""
    h, w = size
    centres = np.column_stack(
        [rng.uniform(margin[0], w - margin[0], n), rng.uniform(margin[1], h - margin[1], n)]
    )
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((n, h, w), np.uint8)
    for i, (cx, cy) in enumerate(centres):
        radius = rng.uniform(3.0, 5.0)
        disk = np.clip(radius + 0.5 - np.hypot(xx - cx, yy - cy), 0.0, 1.0)
        base = rng.uniform(140, 220) + rng.normal(0, 8, (h, w))
        images[i] = np.clip(base * (1 - 0.8 * disk), 0, 255).astype(np.uint8)
    return images, centres


def dot_samples(n: int, seed: int) -> FaceSamples:
    """Faces whose 'eyes' are dark dots near the crop centre; the truth is the dot."""
    rng = np.random.default_rng(seed)
    ox, oy = window_origin()
    images, centres = dark_dots(
        2 * n, rng, margin=(ox + 10, oy + 8)
    )  # dots well inside the model window
    truth = centres.reshape(n, 2, 2).astype(np.float32)
    return FaceSamples(
        files=np.array([f"dot_{i}.png" for i in range(n)]),
        groups=np.array([f"g{i}" for i in range(n)]),
        pixels=images.reshape(n, 2, SRC_H, SRC_W),
        truth=truth,
        coarse=truth + rng.normal(0, 2.0, truth.shape).astype(np.float32),
        coarse_confidence=np.full((n, 2), 0.5, np.float32),
        scale=np.full((n, 2), 2.0, np.float32),
        # crops at 2 crop px per image px, no roll; row 0 (left_pupil's eye) is mirrored
        to_image=np.tile(
            np.array([np.diag([-0.5, 0.5]), np.diag([0.5, 0.5])], np.float32), (n, 1, 1, 1)
        ),  # fmt: skip
        interocular=np.full(n, 60.0, np.float32),
    )
