"""Augmentation for eye crops: what changes between two photos of the same eye.

Geometry: the landmarks that place a crop are off by a few pixels, a few degrees and a few
percent of scale, so the model input is re-cut from the larger source crop with a random
shift, rotation and zoom; and half the time mirrored (the label mirrors with it, which is the
"swap" of a left and a right eye in the canonical frame). Photometry: gamma (linear brightness
and contrast are standardised away by the network), blur, sensor noise and low resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from backend.eyes import CropGeometry
from backend.regressor.crops import MODEL_GEOMETRY, SOURCE_GEOMETRY, centre_offset


@dataclass(frozen=True)
class Augmentation:
    """Strength of each augmentation (standard deviations unless said otherwise)."""

    shift_px: tuple[float, float] = (3.0, 2.0)  # (x, y) crop pixels; clipped at 2.5 sigma
    rotation_deg: float = 8.0
    log_scale: float = 0.08
    mirror: float = 0.5  # probability
    gamma_log: float = 0.25
    blur: float = 0.3  # probability of a Gaussian blur, sigma U(0.3, 1.2) px
    noise: float = 0.3  # probability of Gaussian noise, sigma U(1, 6) grey levels
    low_res: float = 0.2  # probability of down- then up-sampling by U(1.5, 3)


NONE = Augmentation(
    shift_px=(0.0, 0.0), rotation_deg=0.0, log_scale=0.0, mirror=0.0, gamma_log=0.0,
    blur=0.0, noise=0.0, low_res=0.0,
)  # fmt: skip


_ROW = np.array([[0.0, 0.0, 1.0]])


def window_origin(
    source: CropGeometry = SOURCE_GEOMETRY, target: CropGeometry = MODEL_GEOMETRY
) -> tuple[int, int]:
    """Top-left pixel of the model-input window inside a source crop (same centre)."""
    ox, oy = centre_offset(source, target)
    return int(round(ox)), int(round(oy))


def centre_crops(
    pixels: np.ndarray,
    points: np.ndarray,
    source: CropGeometry = SOURCE_GEOMETRY,
    target: CropGeometry = MODEL_GEOMETRY,
) -> tuple[np.ndarray, np.ndarray]:
    """The model-input window of (N, H, W) source crops and (N, 2) points moved into it."""
    x0, y0 = window_origin(source, target)
    tw, th = target.size
    crops = pixels[:, y0 : y0 + th, x0 : x0 + tw].astype(np.float32)
    return crops, np.asarray(points, np.float32) - np.array([x0, y0], np.float32)


def augment(
    pixels: np.ndarray,
    points: np.ndarray,
    rng: np.random.Generator,
    settings: Augmentation = Augmentation(),
    source: CropGeometry = SOURCE_GEOMETRY,
    target: CropGeometry = MODEL_GEOMETRY,
) -> tuple[np.ndarray, np.ndarray]:
    """Random model inputs (N, H, W) float32 and their points (N, 2) from source crops."""
    n = len(pixels)
    tw, th = target.size
    sw, sh = source.size
    src_centre = np.array([sw / 2.0, sh / 2.0])
    tgt_centre = np.array([tw / 2.0, th / 2.0])
    shift = np.clip(rng.normal(size=(n, 2)), -2.5, 2.5) * np.array(settings.shift_px)
    angle = np.deg2rad(np.clip(rng.normal(size=n), -2.5, 2.5) * settings.rotation_deg)
    scale = np.exp(np.clip(rng.normal(size=n), -2.5, 2.5) * settings.log_scale)
    mirror = rng.random(n) < settings.mirror
    gamma = np.exp(rng.normal(size=n) * settings.gamma_log)
    blur = np.where(rng.random(n) < settings.blur, rng.uniform(0.3, 1.2, n), 0.0)
    noise = np.where(rng.random(n) < settings.noise, rng.uniform(1.0, 6.0, n), 0.0)
    low_res = np.where(rng.random(n) < settings.low_res, rng.uniform(1.5, 3.0, n), 1.0)

    out = np.empty((n, th, tw), np.float32)
    out_points = np.empty((n, 2), np.float32)
    for i in range(n):
        cos, sin = scale[i] * np.cos(angle[i]), scale[i] * np.sin(angle[i])
        a = np.array([[cos, -sin], [sin, cos]])
        # target = A (p - source centre) + target centre + shift, after an optional mirror
        m = np.vstack([np.hstack([a, (tgt_centre + shift[i] - a @ src_centre)[:, None]]), _ROW])
        if mirror[i]:
            m = m @ np.array([[-1.0, 0.0, sw - 1.0], [0.0, 1.0, 0.0], _ROW[0]])
        m = m[:2]
        image = cv2.warpAffine(
            pixels[i].astype(np.float32), m, (tw, th),
            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        out_points[i] = m[:, :2] @ points[i] + m[:, 2]
        if low_res[i] > 1.0:
            small = (max(2, int(tw / low_res[i])), max(2, int(th / low_res[i])))
            image = cv2.resize(
                cv2.resize(image, small, interpolation=cv2.INTER_AREA),
                (tw, th),
                interpolation=cv2.INTER_LINEAR,
            )
        if blur[i] > 0.0:
            image = cv2.GaussianBlur(image, (0, 0), blur[i])
        image = 255.0 * np.power(np.clip(image, 0.0, 255.0) / 255.0, gamma[i])
        if noise[i] > 0.0:
            image = image + rng.normal(scale=noise[i], size=image.shape).astype(np.float32)
        out[i] = np.clip(image, 0.0, 255.0)
    return out, out_points
