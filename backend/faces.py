"""Faces and their 68 landmarks, from dlib's HOG detector and shape predictor.

Detection runs on a working copy of the image: shrunk when the image is large (HOG cost grows
with pixels and faces in big photos are big), upsampled step by step when nothing is found
(HOG's smallest face is ~80 px). Landmarks are fitted on the full-resolution image from a few
boxes, each on the image and on its mirror, and averaged: the extra fits cancel part of the
shape predictor's error and their spread measures it, at ~1 ms a fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from backend.model_files import dlib_model_path

# Where each of the 68 iBUG points goes when the face is mirrored left-right.
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46]  # eye on the image's left <- right one
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48]  # outer lips
    + [59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60]  # inner lips
    + [67, 66, 65]
)


@dataclass(frozen=True)
class DetectionSettings:
    """How hard to look for faces; the defaults were measured on MTFL (docs/benchmarks.md)."""

    max_side: int = 1280  # longest side of the working copy that HOG scans
    max_upsample: int = 2  # at most this many 2x pyramid-up steps when nothing is found
    max_upsampled_pixels: int = 1_400_000  # ... and never beyond this many working pixels
    fallback_threshold: float = -0.5  # HOG score accepted (with low confidence) as a last try
    # Landmarks are fitted on boxes of these relative sizes, each on the image and its mirror,
    # and averaged; the spread of the fits says how sure the fit is. More sizes gain ~0.5 pt of
    # e10 on MTFL for ~1.5 ms each (docs/benchmarks.md), so one is the default.
    landmark_box_scales: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class Face:
    """A detected face: box (x0, y0, x1, y1) and (68, 2) landmarks in image pixels.

    `score` is dlib's HOG score (0 is its default threshold), `confidence` that score mapped
    into [0, 1], `upsample` the pyramid step at which it was found. `spread` is the (68,)
    RMS distance of the individual landmark fits from their mean, in pixels.
    """

    box: np.ndarray
    landmarks: np.ndarray
    spread: np.ndarray
    score: float
    confidence: float
    upsample: int


def score_to_confidence(score: float) -> float:
    """Logistic map of a HOG score: 0 (dlib's threshold) -> 0.5, 1 -> 0.88, -0.5 -> 0.27."""
    return float(1.0 / (1.0 + math.exp(-2.0 * score)))


class FaceDetector:
    """dlib HOG frontal faces + 68-point landmarks; loads its model files once."""

    def __init__(
        self, settings: DetectionSettings = DetectionSettings(), landmarks_path: Path | None = None
    ) -> None:
        self.settings = settings
        self._hog = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(landmarks_path or dlib_model_path()))

    def detect(self, grey: np.ndarray) -> list[Face]:
        """Every face in a grey uint8 image, with landmarks; [] when there is none."""
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        boxes = self.detect_boxes(grey)
        return [self._with_landmarks(grey, *b) for b in boxes]

    def detect_boxes(self, grey: np.ndarray) -> list[tuple[np.ndarray, float, int]]:
        """(box, score, upsample) for each face, boxes in full-image pixels."""
        s = self.settings
        h, w = grey.shape[:2]
        factor = min(1.0, s.max_side / max(h, w))
        work = grey
        if factor < 1.0:
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            work = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        fallback: list[tuple[np.ndarray, float, int]] = []
        for up in range(0, s.max_upsample + 1):
            if up > 0 and work.size * 4**up > s.max_upsampled_pixels:
                break
            rects, scores, _ = self._hog.run(work, up, s.fallback_threshold)
            found = [
                (np.array([r.left(), r.top(), r.right(), r.bottom()], float) / factor, sc, up)
                for r, sc in zip(rects, scores, strict=True)
            ]
            confident = [f for f in found if f[1] >= 0.0]
            if confident:
                return confident
            if found:
                fallback = found
        return fallback[:1] if fallback else []

    def _with_landmarks(self, grey: np.ndarray, box: np.ndarray, score: float, up: int) -> Face:
        # Fit on a region around the face only: mirroring a 12 MP photo per face is wasteful.
        centre = 0.5 * (box[:2] + box[2:])
        half = 0.5 * (box[2:] - box[:2])
        reach = half * max(self.settings.landmark_box_scales) * 1.5 + 2
        x0, y0 = np.maximum(np.floor(centre - reach), 0).astype(int)
        x1 = int(min(np.ceil(centre[0] + reach[0]), grey.shape[1]))
        y1 = int(min(np.ceil(centre[1] + reach[1]), grey.shape[0]))
        region = np.ascontiguousarray(grey[y0:y1, x0:x1])
        mirror = np.ascontiguousarray(region[:, ::-1])
        w = region.shape[1]
        local = centre - (x0, y0)
        fits = []
        for scale in self.settings.landmark_box_scales:
            b = np.concatenate([local - scale * half, local + scale * half])
            fits.append(self._fit(region, b))
            mirrored = self._fit(mirror, np.array([w - 1 - b[2], b[1], w - 1 - b[0], b[3]]))
            mirrored[:, 0] = w - 1 - mirrored[:, 0]
            fits.append(mirrored[MIRROR_68])
        stack = np.stack(fits)
        landmarks = stack.mean(axis=0)
        spread = np.sqrt(((stack - landmarks) ** 2).sum(axis=2).mean(axis=0))
        return Face(
            box=box,
            landmarks=landmarks + (x0, y0),
            spread=spread,
            score=float(score),
            confidence=score_to_confidence(score),
            upsample=up,
        )

    def _fit(self, grey: np.ndarray, box: np.ndarray) -> np.ndarray:
        rect = dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(grey, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
