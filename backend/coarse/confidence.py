"""Confidence of a coarse pupil: the probability that it lies within 0.05 eye distances.

A logistic model over cues every detection has: how strongly the image shows a dark blob
where we put the pupil, how far that is from where the landmarks alone would put it, how open
the eye is, how big the eye is, how sure the face detector was, and how turned the head is.
The coefficients were fitted on half of MTFL and checked on the other half by
`scripts/calibrate_confidence.py` (docs/benchmarks.md); rerun it to refit after changing the
detector.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import numpy as np


@dataclass(frozen=True)
class EyeCues:
    """What we know about one eye's pupil estimate besides its position."""

    evidence: float  # z-scored dark-blob response at the pupil (0 where the method has none)
    offset: float  # distance from the outline centre, in eye widths
    openness: float  # eye aspect ratio: lid-to-lid height over corner-to-corner width
    eye_width_px: float  # corner-to-corner width in the image
    face_score: float  # dlib HOG score of the face
    asymmetry: float  # |log(this eye's width / the other eye's)|: head turn

    def vector(self) -> np.ndarray:
        """Feature vector (with intercept) in FEATURE_NAMES order, clipped to sane ranges."""
        e, o, op, w, fs, asym = astuple(self)
        return np.array(
            [
                1.0,
                float(np.clip(e, -3.0, 6.0)),
                float(np.clip(o, 0.0, 1.0)),
                float(np.clip(op, 0.0, 1.0)),
                math.log(max(w, 1.0)),
                float(np.clip(fs, -1.0, 4.0)),
                float(np.clip(asym, 0.0, 2.0)),
            ]
        )


FEATURE_NAMES = (
    "intercept",
    "evidence",
    "offset",
    "openness",
    "log_eye_width",
    "face_score",
    "asymmetry",
)

# Fitted by scripts/calibrate_confidence.py (see the module docstring).
COEFFICIENTS = np.array([-3.9996, 0.8308, 0.1649, 0.4907, 1.1970, 0.3306, -1.7486])


def pupil_confidence(cues: EyeCues, coefficients: np.ndarray = COEFFICIENTS) -> float:
    """P(pupil error <= 0.05 eye distances | cues), from the logistic model."""
    z = float(cues.vector() @ coefficients)
    return float(1.0 / (1.0 + math.exp(-np.clip(z, -30.0, 30.0))))


def eye_openness(outline: np.ndarray) -> float:
    """Eye aspect ratio of a 6-point dlib eye outline (Soukupova & Cech 2016)."""
    width = float(np.linalg.norm(outline[3] - outline[0]))
    if width <= 1e-6:
        return 0.0
    height = np.linalg.norm(outline[1] - outline[5]) + np.linalg.norm(outline[2] - outline[4])
    return float(height / (2.0 * width))
