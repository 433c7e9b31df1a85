"""Eye crops placed by the face landmarks.

Every pupil method (and later the regressor) sees the eye the same way: rotated so the
eye corners are horizontal and scaled so the eye is a fixed number of pixels wide. That
makes the methods independent of face size and roll, and gives one affine transform to
map any point found in the crop back to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# dlib 68-point indices. Points 36-41 outline the eye on the image's left (the subject's
# right eye), 42-47 the eye on the image's right (the subject's left eye). In both, the
# first point is the image-leftmost corner and the fourth the image-rightmost corner.
SUBJECT_RIGHT_EYE = slice(36, 42)
SUBJECT_LEFT_EYE = slice(42, 48)


@dataclass(frozen=True)
class CropGeometry:
    """Size of the canonical eye crop, in units of the eye's corner-to-corner width."""

    eye_width_px: float = 32.0  # the eye's corner-to-corner width inside the crop
    width_factor: float = 1.75  # crop width / eye width
    height_factor: float = 1.0  # crop height / eye width

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the crop in pixels."""
        return (
            int(round(self.eye_width_px * self.width_factor)),
            int(round(self.eye_width_px * self.height_factor)),
        )


@dataclass(frozen=True)
class EyeCrop:
    """One eye, resampled into the canonical frame.

    `pixels` is float32 grey in [0, 255]; `outline` holds the six landmark points in crop
    coordinates (same order as dlib's); `to_image` is the 2x3 affine that maps crop
    coordinates back to image coordinates; `scale` is crop pixels per image pixel.
    """

    pixels: np.ndarray
    outline: np.ndarray
    to_image: np.ndarray
    scale: float

    def map_to_image(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) crop coordinates to image coordinates."""
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return pts @ self.to_image[:, :2].T + self.to_image[:, 2]

    def map_to_crop(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) image coordinates into this crop."""
        inv = cv2.invertAffineTransform(self.to_image)
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return pts @ inv[:, :2].T + inv[:, 2]

    @property
    def outline_centre(self) -> np.ndarray:
        """Mean of the six outline points (crop coordinates)."""
        return self.outline.mean(axis=0)


def crop_eye(
    grey: np.ndarray, outline: np.ndarray, geometry: CropGeometry = CropGeometry()
) -> EyeCrop:
    """Resample the eye outlined by six landmark points into the canonical frame.

    Large faces are first shrunk with area averaging so the crop is not aliased; the final
    rotation and scale are one `warpAffine` with bilinear interpolation and replicated border.
    """
    outline = np.asarray(outline, dtype=np.float64)
    left_corner, right_corner = outline[0], outline[3]
    delta = right_corner - left_corner
    eye_width = float(np.hypot(*delta))
    if not np.isfinite(eye_width) or eye_width < 1e-3:
        eye_width = max(float(np.ptp(outline[:, 0])), 1.0)
        delta = np.array([1.0, 0.0])
    angle = float(np.arctan2(delta[1], delta[0]))
    scale = geometry.eye_width_px / eye_width
    centre = outline.mean(axis=0)
    width, height = geometry.size

    # Region of the image that the crop covers, to pre-shrink large eyes with INTER_AREA.
    cos, sin = np.cos(angle), np.sin(angle)
    half = np.array([width, height]) / (2 * scale)
    corners = np.array([[sx * half[0], sy * half[1]] for sx in (-1, 1) for sy in (-1, 1)])
    rot = np.array([[cos, -sin], [sin, cos]])
    img_corners = corners @ rot.T + centre
    pad = 2.0 / scale + 2
    x0 = int(np.floor(img_corners[:, 0].min() - pad))
    y0 = int(np.floor(img_corners[:, 1].min() - pad))
    x1 = int(np.ceil(img_corners[:, 0].max() + pad))
    y1 = int(np.ceil(img_corners[:, 1].max() + pad))
    region = _padded_region(grey, x0, y0, x1, y1)
    pre = 1.0
    if scale < 0.5:
        pre = min(1.0, 2.0 * scale)
        new_size = (
            max(1, int(round(region.shape[1] * pre))),
            max(1, int(round(region.shape[0] * pre))),
        )
        pre_x = new_size[0] / region.shape[1]
        pre_y = new_size[1] / region.shape[0]
        region = cv2.resize(region, new_size, interpolation=cv2.INTER_AREA)
    else:
        pre_x = pre_y = 1.0

    # crop = S R^T (p - centre) + crop_centre ; p = region_to_image(q)
    a = scale * np.array([[cos, sin], [-sin, cos]])
    crop_centre = np.array([width / 2.0, height / 2.0])
    image_to_crop = np.hstack([a, (crop_centre - a @ centre)[:, None]])
    # INTER_AREA puts shrunk pixel j at source coordinate (j + 0.5) / pre - 0.5.
    region_to_image = np.array(
        [[1.0 / pre_x, 0.0, x0 + 0.5 / pre_x - 0.5], [0.0, 1.0 / pre_y, y0 + 0.5 / pre_y - 0.5]]
    )
    region_to_crop = _compose(image_to_crop, region_to_image)
    pixels = cv2.warpAffine(
        region.astype(np.float32),
        region_to_crop,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    to_image = cv2.invertAffineTransform(image_to_crop)
    crop_outline = outline @ a.T + (crop_centre - a @ centre)
    return EyeCrop(pixels=pixels, outline=crop_outline, to_image=to_image, scale=scale)


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """outer ∘ inner for 2x3 affine matrices."""
    o = np.vstack([outer, [0.0, 0.0, 1.0]])
    i = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (o @ i)[:2]


def _padded_region(grey: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """grey[y0:y1, x0:x1] with the nearest edge pixel repeated where the box leaves the image."""
    h, w = grey.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return grey[y0:y1, x0:x1]
    rows = np.clip(np.arange(y0, y1), 0, h - 1)
    cols = np.clip(np.arange(x0, x1), 0, w - 1)
    return grey[np.ix_(rows, cols)]
