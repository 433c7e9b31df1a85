"""Pupil localisers that work on one canonical eye crop (see `backend.eyes`).

Each method takes an `EyeCrop` and returns a `PupilEstimate` in crop coordinates. They are
pure numpy/OpenCV and know nothing about faces, files or Label Studio.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from backend.eyes import EyeCrop


@dataclass(frozen=True)
class PupilEstimate:
    """A pupil position in crop coordinates and the method's own evidence for it.

    `evidence` is method-specific (for `fused`: the z-scored dark-blob response at the
    chosen point; 0 where a method has no such measure). `backend.coarse.confidence` turns it
    and geometric cues into a calibrated confidence.
    """

    xy: np.ndarray
    evidence: float = 0.0


def outline_mean(crop: EyeCrop) -> PupilEstimate:
    """Mean of the six landmark points: the landmark-only baseline."""
    return PupilEstimate(crop.outline_centre)


def _outline_box(crop: EyeCrop, margin: float) -> tuple[int, int, int, int]:
    """Integer box (x0, y0, x1, y1) around the outline, `margin` in eye widths."""
    eye_w = np.linalg.norm(crop.outline[3] - crop.outline[0])
    m = margin * eye_w
    h, w = crop.pixels.shape
    x0 = int(np.clip(np.floor(crop.outline[:, 0].min() - m), 0, w - 2))
    x1 = int(np.clip(np.ceil(crop.outline[:, 0].max() + m), x0 + 2, w))
    y0 = int(np.clip(np.floor(crop.outline[:, 1].min() - m), 0, h - 2))
    y1 = int(np.clip(np.ceil(crop.outline[:, 1].max() + m), y0 + 2, h))
    return x0, y0, x1, y1


def projection_meanshift(
    crop: EyeCrop, *, integer_division_bug: bool = False, iterations: int = 5
) -> PupilEstimate:
    """The reference's projection + 1-D mean-shift detector.

    Smooth (three bilateral filters kill specular highlights), invert so the pupil is
    bright, project onto both axes, take the middle of the row profile's argmax plateau
    for y, and mean-shift along the column profile from the darkest spot for x. With
    `integer_division_bug` the window weights are normalised with floor division, as in
    the reference, so they are all zero and x never leaves its start.
    """
    x0, y0, x1, y1 = _outline_box(crop, margin=0.1)
    patch = np.clip(crop.pixels[y0:y1, x0:x1], 0, 255).astype(np.uint8)
    for _ in range(3):
        patch = cv2.bilateralFilter(patch, 7, 75, 75)
    inv = 255.0 - patch.astype(np.float64)
    cols = _normalise(_box_blur(inv.mean(axis=0)))
    rows = _normalise(_box_blur(inv.mean(axis=1)))

    plateau = np.flatnonzero(rows >= rows.max() - 1e-6)
    y = 0.5 * (plateau[0] + plateau[-1])

    small = cv2.resize(inv, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    sy, sx = np.unravel_index(int(np.argmax(small)), small.shape)
    x = float(sx * 2 + 0.5)
    radius = max(2, int(round(0.15 * (x1 - x0))))
    for _ in range(iterations):
        lo, hi = max(0, int(round(x)) - radius), min(len(cols), int(round(x)) + radius + 1)
        idx = np.arange(lo, hi)
        window = cols[lo:hi]
        if integer_division_bug:
            # reference: weights = (window * 255).astype(int) // int(sum); all zero -> no move
            ints = (window * 255).astype(np.int64)
            weights = ints // max(int(ints.sum()), 1)
            if weights.sum() == 0:
                break
        else:
            weights = window
        if weights.sum() <= 0:
            break
        new_x = float((idx * weights).sum() / weights.sum())
        if abs(new_x - x) < 0.05:
            x = new_x
            break
        x = new_x

    on_border = x <= 0.5 or x >= (x1 - x0) - 1.5 or y <= 0.5 or y >= (y1 - y0) - 1.5
    if on_border:
        return PupilEstimate(crop.outline_centre)
    return PupilEstimate(np.array([x + x0, y + y0]))


def _box_blur(profile: np.ndarray, size: int = 3) -> np.ndarray:
    kernel = np.ones(size) / size
    return np.convolve(np.pad(profile, size // 2, mode="edge"), kernel, mode="valid")


def _normalise(profile: np.ndarray) -> np.ndarray:
    lo, hi = profile.min(), profile.max()
    return (profile - lo) / (hi - lo) if hi > lo else np.zeros_like(profile)


def gradient_objective(pixels: np.ndarray, *, weight_darkness: bool = True) -> np.ndarray:
    """Timm & Barth (2011) means-of-gradients objective for every pixel as a candidate centre.

    For a centre c the objective is the mean over strong-gradient pixels i of
    max(0, d_i . g_i)^2, with d_i the unit vector from c to i and g_i the unit gradient:
    a dark disc's boundary gradients all point away from its centre.
    """
    smooth = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 0.8)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    threshold = mag.mean() + 0.3 * mag.std()
    ys, xs = np.nonzero(mag > threshold)
    h, w = pixels.shape
    if len(xs) == 0:
        return np.zeros((h, w), dtype=np.float64)
    gxn = (gx[ys, xs] / mag[ys, xs]).astype(np.float64)
    gyn = (gy[ys, xs] / mag[ys, xs]).astype(np.float64)
    cy, cx = np.mgrid[0:h, 0:w]
    dx = xs[None, :] - cx.reshape(-1, 1).astype(np.float64)
    dy = ys[None, :] - cy.reshape(-1, 1).astype(np.float64)
    norm = np.hypot(dx, dy)
    norm[norm == 0] = np.inf
    dot = np.maximum((dx * gxn + dy * gyn) / norm, 0.0)
    objective = (dot**2).mean(axis=1).reshape(h, w)
    if weight_darkness:
        dark = 255.0 - cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 1.5)
        objective = objective * dark
    return objective


def means_of_gradients(crop: EyeCrop) -> PupilEstimate:
    """Timm & Barth (2011) on the eye region, with their border post-processing."""
    x0, y0, x1, y1 = _outline_box(crop, margin=0.15)
    objective = gradient_objective(crop.pixels[y0:y1, x0:x1])
    peak = objective.max()
    if peak <= 0:
        return PupilEstimate(crop.outline_centre)
    # Timm & Barth: drop strong maxima connected to the border (eyebrows, hair, shadows).
    strong = (objective >= 0.9 * peak).astype(np.uint8)
    _, labels = cv2.connectedComponents(strong, connectivity=8)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    cleaned = np.where(np.isin(labels, border[border > 0]), 0.0, objective)
    if cleaned.max() <= 0:
        cleaned = objective
    yy, xx = np.unravel_index(int(np.argmax(cleaned)), cleaned.shape)
    return PupilEstimate(np.array([xx + x0, yy + y0], dtype=np.float64))


@dataclass(frozen=True)
class FusionParams:
    """Weights of the fused detector, in eye widths; tuned on MTFL (docs/benchmarks.md).

    The prior is centred on the outline mean and mirror-symmetric, so the detector gives the
    mirrored answer on a mirrored face: no dataset-specific offset is baked in.
    """

    iris_sigma: float = 0.12  # inner Gaussian of the dark-blob (difference of Gaussians) filter
    surround_sigma: float = 0.30  # outer Gaussian
    evidence_weight: float = 0.5  # weight of the normalised blob response against the prior
    prior_sigma_x: float = 0.12  # landmark prior spread along the eye
    prior_sigma_y: float = 0.08  # ... and across it
    mask_dilation: int = 2  # px the eye-outline polygon is grown before searching inside it


def fused(crop: EyeCrop, params: FusionParams = FusionParams()) -> PupilEstimate:
    """Landmark prior + dark-blob evidence inside the eye outline (the default).

    Maximises  w * DoG(inverted crop) + log N(x; outline mean, prior)  over the eye polygon,
    then refines the peak to sub-pixel by a local centroid.
    """
    pixels = crop.pixels
    h, w = pixels.shape
    eye_w = max(float(np.linalg.norm(crop.outline[3] - crop.outline[0])), 1.0)
    inverted = 255.0 - pixels
    blob = cv2.GaussianBlur(inverted, (0, 0), params.iris_sigma * eye_w) - cv2.GaussianBlur(
        inverted, (0, 0), params.surround_sigma * eye_w
    )
    blob = blob / (blob.std() + 1e-6)
    centre = crop.outline_centre
    yy, xx = np.mgrid[0:h, 0:w]
    log_prior = -0.5 * (
        ((xx - centre[0]) / (params.prior_sigma_x * eye_w)) ** 2
        + ((yy - centre[1]) / (params.prior_sigma_y * eye_w)) ** 2
    )
    score = params.evidence_weight * blob + log_prior
    mask = eye_mask(crop, params.mask_dilation)
    score = np.where(mask, score, -np.inf)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    xy = _local_centroid(score, x, y)
    return PupilEstimate(xy, float(blob[y, x]))


def eye_mask(crop: EyeCrop, dilation: int) -> np.ndarray:
    """Boolean mask of the eye-outline polygon, grown by `dilation` pixels."""
    mask = np.zeros(crop.pixels.shape, np.uint8)
    cv2.fillPoly(mask, [np.round(crop.outline * 4).astype(np.int32)], 1, shift=2)
    if dilation > 0:
        mask = cv2.dilate(mask, np.ones((2 * dilation + 1, 2 * dilation + 1), np.uint8))
    if not mask.any():  # degenerate outline (closed eye fitted as a line)
        c = np.clip(np.round(crop.outline_centre).astype(int), 0, np.array(mask.shape[::-1]) - 1)
        mask[c[1], c[0]] = 1
    return mask.astype(bool)


def _local_centroid(score: np.ndarray, x: int, y: int, radius: int = 1) -> np.ndarray:
    """Sub-pixel peak: centroid of (score - local minimum) in a small window."""
    y0, y1 = max(y - radius, 0), min(y + radius + 1, score.shape[0])
    x0, x1 = max(x - radius, 0), min(x + radius + 1, score.shape[1])
    window = score[y0:y1, x0:x1]
    finite = np.isfinite(window)
    weights = np.where(finite, window - window[finite].min(), 0.0)
    total = weights.sum()
    if total <= 0:
        return np.array([x, y], dtype=np.float64)
    gy, gx = np.mgrid[y0:y1, x0:x1]
    return np.array([(gx * weights).sum() / total, (gy * weights).sum() / total])
