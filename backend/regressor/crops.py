"""Eye crops as the regressor sees them: one canonical frame for both eyes.

Both eyes are cut out by `backend.eyes.crop_eye` (corners horizontal, a fixed eye width), and the
subject's LEFT eye (on the image's right) is mirrored left-to-right, so every crop looks like a
subject's right eye: one model serves both eyes and sees twice the examples.

Coordinates: a crop pixel (row i, column j) has its centre at (x, y) = (j, i), as in
`cv2.warpAffine`. Mirroring a crop of width W maps x to (W - 1) - x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.eyes import SUBJECT_LEFT_EYE, SUBJECT_RIGHT_EYE, CropGeometry, EyeCrop, crop_eye

# The model's input: 32 px per eye width, 2 eye widths across and 1.25 down, so a pupil the
# landmarks missed by up to half an eye width is still inside.
MODEL_GEOMETRY = CropGeometry(eye_width_px=32.0, width_factor=2.0, height_factor=1.25)
# Training cuts a larger crop around the same centre, so augmentation (shift, rotation, zoom
# out) never samples outside it.
SOURCE_GEOMETRY = CropGeometry(eye_width_px=32.0, width_factor=4.0, height_factor=3.0)

# Row order of a face's two crops; KEYPOINT_NAMES order (left_pupil first).
EYES = (SUBJECT_LEFT_EYE, SUBJECT_RIGHT_EYE)
MIRRORED = (True, False)


@dataclass(frozen=True)
class FaceCrops:
    """A face's two eye crops in the canonical frame, and how to map points back.

    `pixels` is (2, H, W) float32 grey in [0, 255], rows in KEYPOINT_NAMES order (left_pupil's
    eye, then right_pupil's); row 0 is mirrored. `crops` are the unmirrored `EyeCrop`s.
    """

    pixels: np.ndarray
    crops: tuple[EyeCrop, EyeCrop]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    def to_canonical(self, row: int, xy: np.ndarray) -> np.ndarray:
        """Points in crop `row`'s unmirrored coordinates -> the canonical (maybe mirrored) frame."""
        return mirror_points(xy, self.width) if MIRRORED[row] else np.asarray(xy, np.float64)

    def to_image(self, row: int, xy: np.ndarray) -> np.ndarray:
        """(N, 2) points in crop `row`'s canonical frame -> image pixels."""
        return self.crops[row].map_to_image(self.to_canonical(row, xy))

    def linear_to_image(self, row: int) -> np.ndarray:
        """The 2x2 linear part of crop `row`'s canonical frame -> image map (scale, roll, mirror).

        It turns a canonical displacement into an image displacement: an offset that labels
        make in image pixels is the same for both eyes only in image axes.
        """
        linear = self.crops[row].to_image[:, :2]
        return linear @ np.diag([-1.0, 1.0]) if MIRRORED[row] else linear.copy()

    def from_image(self, row: int, xy: np.ndarray) -> np.ndarray:
        """(N, 2) image pixels -> crop `row`'s canonical frame."""
        return self.to_canonical(row, self.crops[row].map_to_crop(xy))


def mirror_points(xy: np.ndarray, width: int) -> np.ndarray:
    """Mirror (N, 2) crop points left-to-right in a crop `width` pixels wide."""
    out = np.array(xy, dtype=np.float64, copy=True).reshape(-1, 2)
    out[:, 0] = (width - 1) - out[:, 0]
    return out


def face_crops(
    grey: np.ndarray, landmarks: np.ndarray, geometry: CropGeometry = MODEL_GEOMETRY
) -> FaceCrops:
    """The two canonical eye crops of a face from its 68 landmarks."""
    crops = tuple(crop_eye(grey, landmarks[eye], geometry) for eye in EYES)
    pixels = np.stack(
        [c.pixels[:, ::-1] if m else c.pixels for c, m in zip(crops, MIRRORED, strict=True)]
    )
    return FaceCrops(pixels=np.ascontiguousarray(pixels, dtype=np.float32), crops=crops)


def centre_offset(source: CropGeometry, target: CropGeometry) -> np.ndarray:
    """Where a `target` crop's origin sits inside a `source` crop with the same centre/scale."""
    if source.eye_width_px != target.eye_width_px:
        raise ValueError("source and target crops must share the eye width")
    sw, sh = source.size
    tw, th = target.size
    return np.array([(sw - tw) / 2.0, (sh - th) / 2.0])
