"""How sure the regressor is of a pupil: cues per eye, calibrated to a probability.

Cues (all free at inference): the heatmap's spread, the distance between the answers for the
crop and its mirror image (test-time augmentation), the distance from the coarse detector's
answer, the coarse detector's own confidence, and the eye's size in the image. A logistic
model fitted on the validation faces of each training run maps them to P(the pupil is within
0.05 interocular distances); a face's confidence is the product over its two eyes, because the
face's error is its worse eye's. Which cue ranks errors best is measured by `scripts/train.py`
(its summary's `uncertainty` block) and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backend.calibration import fit_logistic, sigmoid
from backend.evaluation import confidence_spearman, low_confidence_failure_share

CUE_NAMES: tuple[str, ...] = (
    "spread",
    "tta",
    "coarse_disagreement",
    "coarse_confidence",
    "eye_width",
)
EYE_FAILURE = 0.05  # an eye is right when its error is at most this many interocular distances


@dataclass(frozen=True)
class EyeCues:
    """Per-eye uncertainty cues, arrays of one shape; distances in eye widths."""

    spread: np.ndarray
    tta: np.ndarray
    coarse_disagreement: np.ndarray
    coarse_confidence: np.ndarray
    eye_width_px: np.ndarray

    def matrix(self) -> np.ndarray:
        """(N, 1 + len(CUE_NAMES)) design matrix: an intercept, then log/logit cues."""
        eps = 1e-3
        conf = np.clip(self.coarse_confidence.ravel(), eps, 1 - eps)
        return np.column_stack(
            [
                np.ones(conf.shape),
                np.log(self.spread.ravel() + eps),
                np.log(self.tta.ravel() + eps),
                np.log(self.coarse_disagreement.ravel() + eps),
                np.log(conf / (1 - conf)),
                np.log(np.maximum(self.eye_width_px.ravel(), 1.0)),
            ]
        )


def eye_confidence(cues: EyeCues, coefficients: np.ndarray) -> np.ndarray:
    """P(eye within EYE_FAILURE), shaped like the cues."""
    shape = np.shape(cues.spread)
    return sigmoid(cues.matrix() @ np.asarray(coefficients)).reshape(shape)


def fit_calibration(cues: EyeCues, eye_errors: np.ndarray) -> np.ndarray:
    """Coefficients (intercept first, then CUE_NAMES order) from eyes with known errors."""
    right = (np.asarray(eye_errors).ravel() <= EYE_FAILURE).astype(np.float64)
    return fit_logistic(cues.matrix(), right)


def ranking_report(cues: EyeCues, coefficients: np.ndarray, face_errors: np.ndarray) -> dict:
    """How well each cue alone, and the calibrated confidence, rank faces by their error.

    Faces are rows of (N, 2) cues. Per cue, the face's uncertainty is its worse eye's (the
    larger spread/distance, the lower coarse confidence). Returns, per name, Spearman between
    uncertainty and error and the share of failures (e > 0.05) among the 20% least sure faces.
    """
    sure = {
        "spread": -cues.spread.max(axis=1),
        "tta": -cues.tta.max(axis=1),
        "coarse_disagreement": -cues.coarse_disagreement.max(axis=1),
        "coarse_confidence": cues.coarse_confidence.min(axis=1),
        "calibrated": eye_confidence(cues, coefficients).prod(axis=1),
    }
    report = {}
    for name, confidence in sure.items():
        report[name] = {
            "spearman": confidence_spearman(confidence, face_errors),
            "worst_20pct_failure_share": low_confidence_failure_share(confidence, face_errors),
        }
    return report


def coefficients_json(coefficients: np.ndarray) -> dict[str, float]:
    names = ("intercept", *CUE_NAMES)
    return {n: round(float(c), 6) for n, c in zip(names, coefficients, strict=True)}


def coefficients_from_json(data: dict[str, float]) -> np.ndarray:
    names = ("intercept", *CUE_NAMES)
    values = [float(data[n]) for n in names]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("calibration coefficients must be finite")
    return np.array(values)
