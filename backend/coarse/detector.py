"""Coarse keypoint detector: the model a brand-new project starts with (zero labels).

image (grey uint8) -> faces + 68 landmarks -> two canonical eye crops -> a pupil per eye
(one of the VARIANTS) -> FaceKeypoints with a confidence per point and per face.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from backend.coarse import pupil
from backend.coarse.confidence import EyeCues, eye_openness, pupil_confidence
from backend.eyes import SUBJECT_LEFT_EYE, SUBJECT_RIGHT_EYE, CropGeometry, EyeCrop, crop_eye
from backend.faces import DetectionSettings, Face, FaceDetector
from backend.keypoints import CORNER_LANDMARKS, FaceKeypoints

PupilMethod = Callable[[EyeCrop], pupil.PupilEstimate]

VARIANTS: dict[str, PupilMethod] = {
    "fused": pupil.fused,
    "outline_mean": pupil.outline_mean,
    "projection": pupil.projection_meanshift,
    "projection_reference": lambda crop: pupil.projection_meanshift(
        crop, integer_division_bug=True
    ),
    "gradients": pupil.means_of_gradients,
}
DEFAULT_VARIANT = "fused"

# KEYPOINT_NAMES order: left_pupil is the subject's left eye (landmarks 42-47), then right.
_EYES = (SUBJECT_LEFT_EYE, SUBJECT_RIGHT_EYE)


class CoarseDetector:
    """Finds every face and its pupils and eye corners; loads dlib's models once."""

    def __init__(
        self,
        variant: str = DEFAULT_VARIANT,
        detection: DetectionSettings = DetectionSettings(),
        geometry: CropGeometry = CropGeometry(),
        face_detector: FaceDetector | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown coarse variant {variant!r}; choose one of {sorted(VARIANTS)}"
            )
        self.variant = variant
        self.geometry = geometry
        self._method = VARIANTS[variant]
        self.faces = face_detector or FaceDetector(detection)

    def detect(self, grey: np.ndarray) -> list[FaceKeypoints]:
        """Keypoints for every face in a grey uint8 image (EXIF already applied)."""
        return [kp for kp, _ in self.analyse(grey)]

    def analyse(self, grey: np.ndarray) -> list[tuple[FaceKeypoints, tuple[EyeCues, EyeCues]]]:
        """Like `detect`, with the cues behind each pupil's confidence (for calibration)."""
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        return [self.keypoints_for(grey, face) for face in self.faces.detect(grey)]

    def keypoints_for(
        self, grey: np.ndarray, face: Face
    ) -> tuple[FaceKeypoints, tuple[EyeCues, EyeCues]]:
        """Pupils and corners of one detected face, and the cues behind their confidences."""
        widths = [_eye_width(face.landmarks[eye]) for eye in _EYES]
        points = np.empty((6, 2), dtype=np.float64)
        confidences = np.empty(6, dtype=np.float64)
        cues = []
        for row, eye in enumerate(_EYES):
            outline = face.landmarks[eye]
            crop = crop_eye(grey, outline, self.geometry)
            estimate = self._method(crop)
            points[row] = crop.map_to_image(estimate.xy)[0]
            eye_cues = EyeCues(
                evidence=estimate.evidence,
                offset=float(
                    np.linalg.norm(estimate.xy - crop.outline_centre)
                    / max(np.linalg.norm(crop.outline[3] - crop.outline[0]), 1e-6)
                ),
                openness=eye_openness(outline),
                eye_width_px=widths[row],
                face_score=face.score,
                asymmetry=abs(math.log(widths[row] / widths[1 - row])),
            )
            cues.append(eye_cues)
            confidences[row] = pupil_confidence(eye_cues)
        points[2:] = face.landmarks[list(CORNER_LANDMARKS)]
        # Corners are plain landmarks: as sure as the face they belong to (no labels to
        # calibrate them against yet).
        confidences[2:] = face.confidence
        keypoints = FaceKeypoints(
            box=face.box,
            points=points,
            confidences=confidences,
            # both pupils right: the face's error e = max over the two eyes
            confidence=float(confidences[0] * confidences[1]),
            method=f"coarse/{self.variant}",
        )
        return keypoints, (cues[0], cues[1])


def _eye_width(outline: np.ndarray) -> float:
    return max(float(np.linalg.norm(outline[3] - outline[0])), 1.0)
