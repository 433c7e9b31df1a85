"""What every detector returns: typed arrays per face, no Label Studio JSON.

Names follow iBUG-300W: left/right are the subject's own, so the subject's left eye appears
on the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEYPOINT_NAMES: tuple[str, ...] = (
    "left_pupil",
    "right_pupil",
    "left_eye_outer",
    "left_eye_inner",
    "right_eye_inner",
    "right_eye_outer",
)
LEFT_PUPIL, RIGHT_PUPIL = 0, 1

# dlib 68-point indices of the four eye corners, in KEYPOINT_NAMES order (after the pupils).
CORNER_LANDMARKS: tuple[int, ...] = (45, 42, 39, 36)


@dataclass(frozen=True)
class FaceKeypoints:
    """One face: its box, six named points in image pixels, and how much to trust them.

    `points` is (6, 2) float64 (x, y) in the EXIF-transposed image, rows in KEYPOINT_NAMES
    order; `confidences` is (6,) in [0, 1]; `confidence` summarises the face (it ranks tasks).
    `box` is (x0, y0, x1, y1) in pixels.
    """

    box: np.ndarray
    points: np.ndarray
    confidences: np.ndarray
    confidence: float
    method: str

    def point(self, name: str) -> np.ndarray:
        """The (x, y) of one named keypoint."""
        return self.points[KEYPOINT_NAMES.index(name)]

    @property
    def image_left_pupil(self) -> np.ndarray:
        """Pupil of the eye on the image's left (the subject's right)."""
        return self.points[RIGHT_PUPIL]

    @property
    def image_right_pupil(self) -> np.ndarray:
        """Pupil of the eye on the image's right (the subject's left)."""
        return self.points[LEFT_PUPIL]
