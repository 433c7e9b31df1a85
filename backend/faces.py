"""Faces and their 68 landmarks, from dlib's HOG detector and shape predictor.

Detection runs on working copies of the image, coarse to fine, until a face is found: first
shrunk so its longest side is 1280 px (HOG cost grows with pixels and faces in big photos are
usually big), then doubled up to full resolution and, for small images, upsampled by dlib's
pyramid (HOG's smallest face is ~80 px). A cap on scanned pixels bounds time and memory.

Landmarks are fitted once, on the full-resolution image. A second fit on the mirrored image,
averaged, gains ~1 pt of e05 on MTFL but costs ~2.3 ms, which the speed target (pipeline
<= 1.3x dlib's detection alone) cannot afford (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from backend.model_files import dlib_model_path


@dataclass(frozen=True)
class DetectionSettings:
    """How hard to look for faces; the defaults were measured on MTFL (docs/benchmarks.md)."""

    max_side: int = 1280  # the first scan sees the image shrunk to this longest side
    max_upsample: int = 2  # small images: at most this many 2x steps beyond full resolution
    max_upsampled_pixels: int = 1_400_000  # ... and only while the upsampled copy is this small
    max_scan_pixels: int = 25_000_000  # never scan a copy with more pixels than this
    # A face counts as found at this HOG score (dlib's default is 0; logos and patches on
    # clothing score 0-0.1, real faces rarely do). Weaker ones, down to `fallback_threshold`,
    # are returned (the best one, with a low confidence) only when nothing reaches it.
    accept_threshold: float = 0.1
    fallback_threshold: float = -0.5

    def scan_scales(self, height: int, width: int) -> list[float]:
        """Scales to scan, coarse to fine, until a face is found.

        Start from a copy whose longest side is `max_side`, double until full resolution,
        then upsample small images; stop before a copy would exceed `max_scan_pixels` (or
        `max_upsampled_pixels` when upsampled: more false faces, little gain on MTFL).
        """
        first = min(1.0, self.max_side / max(height, width))
        scales = []
        s = first
        while s < 0.75:
            scales.append(s)
            s *= 2
        scales += [2.0**k for k in range(self.max_upsample + 1)]
        pixels = height * width
        fits = [
            s
            for s in scales
            if pixels * s * s <= (self.max_upsampled_pixels if s > 1 else self.max_scan_pixels)
        ]
        return fits or [scales[0]]


@dataclass(frozen=True)
class Face:
    """A detected face: box (x0, y0, x1, y1) and (68, 2) landmarks in image pixels.

    `score` is dlib's HOG score (0 is its default threshold), `confidence` that score mapped
    into [0, 1], `scale` the scan scale at which it was found (2.0: upsampled 2x; 0.25: a
    quarter-size copy).
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    confidence: float
    scale: float


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

    def detect_boxes(self, grey: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
        """(box, HOG score, scale scanned) per face, boxes in full-image pixels."""
        h, w = grey.shape[:2]
        fallback: tuple[np.ndarray, float, float] | None = None
        for scale in self.settings.scan_scales(h, w):
            if scale < 1.0:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                work, upsample = cv2.resize(grey, size, interpolation=cv2.INTER_AREA), 0
                sx, sy = size[0] / w, size[1] / h
            else:  # dlib's own pyramid-up for 2x, 4x
                work, upsample = grey, int(round(math.log2(scale)))
                sx = sy = 1.0
            rects, scores, _ = self._hog.run(work, upsample, self.settings.fallback_threshold)
            found = [
                (np.array([r.left(), r.top(), r.right(), r.bottom()]) / (sx, sy, sx, sy), sc, scale)
                for r, sc in zip(rects, scores, strict=True)
            ]
            confident = [f for f in found if f[1] >= self.settings.accept_threshold]
            if confident:
                return confident
            for f in found:
                if fallback is None or f[1] > fallback[1]:
                    fallback = f
        return [fallback] if fallback is not None else []

    def _with_landmarks(
        self, grey: np.ndarray, box: np.ndarray, score: float, scale: float
    ) -> Face:
        return Face(
            box=box,
            landmarks=self._fit(grey, box),
            score=float(score),
            confidence=score_to_confidence(score),
            scale=scale,
        )

    def _fit(self, grey: np.ndarray, box: np.ndarray) -> np.ndarray:
        rect = dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(grey, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
