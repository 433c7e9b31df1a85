"""backend.eyes.crop_eye on synthetic images where every pixel value is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend.eyes import CropGeometry, crop_eye

GEOMETRY = CropGeometry()
WIDTH, HEIGHT = GEOMETRY.size  # 56 x 32


def rotate(points: np.ndarray, centre: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (N, 2) image points about `centre` (positive: clockwise on screen, y down)."""
    a = np.deg2rad(degrees)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (np.asarray(points, np.float64) - centre) @ r.T + centre


def eye_outline(centre, width: float, degrees: float = 0.0, openness: float = 0.3) -> np.ndarray:
    """Six dlib-ordered outline points of an eye `width` px wide, rolled by `degrees`."""
    centre = np.asarray(centre, np.float64)
    hw, hh = width / 2.0, openness * width / 2.0
    base = np.array([(-hw, 0), (-hw / 3, -hh), (hw / 3, -hh), (hw, 0), (hw / 3, hh), (-hw / 3, hh)])
    return rotate(base + centre, centre, degrees)


def ramp(height: int, width: int) -> np.ndarray:
    """uint8 image with value 10 + x + y: linear, so bilinear resampling reproduces it exactly."""
    assert 10 + height + width - 2 <= 255
    yy, xx = np.mgrid[0:height, 0:width]
    return (10 + xx + yy).astype(np.uint8)


def disc_image(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    """White uint8 image with a black disc whose edge is a 1-px linear ramp (anti-aliased)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    d = np.hypot(xx - centre[0], yy - centre[1]) - radius
    return np.round(np.clip(d + 0.5, 0.0, 1.0) * 255).astype(np.uint8)


def dark_centroid(pixels: np.ndarray) -> np.ndarray:
    weight = np.clip(255.0 - pixels, 0, None)
    weight[weight < 5] = 0
    yy, xx = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    return np.array([(xx * weight).sum(), (yy * weight).sum()]) / weight.sum()


@pytest.mark.parametrize("degrees", [0.0, 25.0, -40.0, 180.0])
@pytest.mark.parametrize("eye_width", [18.0, 120.0])
def test_crop_frame_is_the_canonical_one(degrees, eye_width):
    outline = eye_outline((60.3, 55.8), eye_width, degrees)
    crop = crop_eye(ramp(120, 120), outline)

    assert crop.pixels.shape == (HEIGHT, WIDTH) and crop.pixels.dtype == np.float32
    assert crop.scale == pytest.approx(GEOMETRY.eye_width_px / eye_width)
    # corners horizontal, the configured width apart, outline centred in the crop
    np.testing.assert_allclose(
        crop.outline[3] - crop.outline[0], [GEOMETRY.eye_width_px, 0.0], atol=1e-9
    )
    np.testing.assert_allclose(crop.outline_centre, [WIDTH / 2, HEIGHT / 2], atol=1e-9)
    # the outline is the image outline mapped into the crop, and back
    np.testing.assert_allclose(crop.outline, crop.map_to_crop(outline), atol=1e-9)
    np.testing.assert_allclose(crop.map_to_image(crop.outline), outline, atol=1e-9)


@pytest.mark.parametrize("degrees", [0.0, 25.0, -40.0])
def test_map_round_trip(degrees):
    crop = crop_eye(ramp(120, 120), eye_outline((60.3, 55.8), 30.0, degrees))
    points = np.random.default_rng(1).uniform(-50, 200, size=(50, 2))
    np.testing.assert_allclose(crop.map_to_image(crop.map_to_crop(points)), points, atol=1e-9)
    np.testing.assert_allclose(crop.map_to_crop(crop.map_to_image(points)), points, atol=1e-9)
    # a single point comes back as (1, 2)
    assert crop.map_to_image(np.array([1.0, 2.0])).shape == (1, 2)


@pytest.mark.parametrize("degrees", [0.0, 25.0, -40.0])
def test_crop_pixels_are_the_image_sampled_through_the_mapping(degrees):
    """On a linear ramp every crop pixel must equal the ramp at map_to_image(pixel)."""
    grey = ramp(120, 120)
    crop = crop_eye(grey, eye_outline((60.3, 55.8), 30.0, degrees))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    where = crop.map_to_image(np.column_stack([xx.ravel(), yy.ravel()]))
    expected = 10 + where[:, 0] + where[:, 1]
    np.testing.assert_allclose(crop.pixels.ravel(), expected, atol=0.05)


@pytest.mark.parametrize(
    "eye_width",
    [
        18.0,
        40.0,
        64.0,  # largest eye without pre-shrink (scale 0.5)
        100.0,  # pre-shrunk with INTER_AREA
        400.0,
    ],
)
def test_a_dark_disc_lands_where_the_mapping_says(eye_width):
    """Crop content and map_to_crop must agree to 0.06 crop px, pre-shrunk or not.

    Fails for eyes over 64 px: the INTER_AREA pre-shrink in crop_eye maps region pixel j to
    image x0 + j/pre, but cv2.resize puts its centre at x0 + (j + 0.5)/pre - 0.5, so the
    content is shifted by 0.5/pre - 0.5 image px per axis (2.6 px for a 400 px eye).
    """
    size = int(3 * eye_width) + 40
    centre = np.array([size / 2 + 0.3, size / 2 - 0.2])
    outline = eye_outline(centre, eye_width, 20.0)
    disc = rotate([centre + (0.1 * eye_width, 0.05 * eye_width)], centre, 20.0)[0]
    crop = crop_eye(disc_image((size, size), disc, 0.12 * eye_width), outline)
    np.testing.assert_allclose(dark_centroid(crop.pixels), crop.map_to_crop(disc)[0], atol=0.06)


@pytest.mark.parametrize(
    "pattern", ["checker", "stripes", "stripes3"], ids=["checker", "stripes", "stripes3"]
)
def test_a_large_eye_is_pre_shrunk_without_aliasing(pattern):
    """A 400 px eye over 1-px detail: the crop must show its mean, not a moire of it."""
    yy, xx = np.mgrid[0:1400, 0:1400]
    grey = {
        "checker": ((xx + yy) % 2) * 255,
        "stripes": (xx % 2) * 255,
        "stripes3": (xx % 3 == 0) * 255,
    }[pattern].astype(np.uint8)
    outline = eye_outline((700.3, 699.6), 400.0, 15.0)
    crop = crop_eye(grey, outline)
    assert crop.scale < 0.5  # the pre-shrink path
    assert crop.pixels.mean() == pytest.approx(grey.mean(), abs=1.5)
    assert crop.pixels.std() < 8.0
    # Sanity: the same warp without the pre-shrink aliases badly, so the test can tell.
    naive = cv2.warpAffine(
        grey.astype(np.float32),
        cv2.invertAffineTransform(crop.to_image),
        (WIDTH, HEIGHT),
        flags=cv2.INTER_LINEAR,
    )
    assert naive.std() > 30.0


@pytest.mark.parametrize(
    "centre", [(3.0, 60.0), (0.0, 0.0), (119.0, 119.0), (60.0, 119.5)], ids=str
)
def test_an_outline_at_the_image_border_replicates_the_edge(centre):
    grey = ramp(120, 120)
    crop = crop_eye(grey, eye_outline(centre, 40.0, 10.0))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    where = crop.map_to_image(np.column_stack([xx.ravel(), yy.ravel()]))
    clamped = np.clip(where, 0, 119)  # replicated border = nearest edge pixel
    assert (np.abs(where - clamped) > 2).any()  # part of the crop really is outside
    expected = 10 + clamped[:, 0] + clamped[:, 1]
    np.testing.assert_allclose(crop.pixels.ravel(), expected, atol=0.05)


def test_an_outline_entirely_outside_the_image_replicates_the_nearest_edge():
    grey = np.full((100, 100), 180, np.uint8)
    crop = crop_eye(grey, eye_outline((-200.0, 50.0), 30.0))
    np.testing.assert_allclose(crop.pixels, 180.0)


@pytest.mark.parametrize("point", [(50.0, 50.0), (0.0, 0.0), (99.0, 20.5)])
def test_a_degenerate_outline_gives_a_finite_crop(point):
    grey = ramp(100, 100)
    outline = np.tile(point, (6, 1))
    crop = crop_eye(grey, outline)
    assert crop.pixels.shape == (HEIGHT, WIDTH)
    assert np.all(np.isfinite(crop.pixels)) and np.all(np.isfinite(crop.to_image))
    assert np.isfinite(crop.scale) and crop.scale > 0
    assert crop.pixels.min() >= grey.min() and crop.pixels.max() <= grey.max()
    np.testing.assert_allclose(crop.map_to_image(crop.outline_centre)[0], point, atol=1e-9)
