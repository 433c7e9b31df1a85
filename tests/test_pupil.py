"""backend.coarse.pupil and backend.coarse.confidence on synthetic eye crops.

Every crop is drawn here with a known iris centre, in the canonical frame that `crop_eye`
produces (default CropGeometry: 56x32 px, eye 32 px corner to corner, outline centre at the
crop centre). Pixel (row i, column j) has its centre at (x=j, y=i), as in OpenCV's warps.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from backend.coarse import pupil
from backend.coarse.confidence import EyeCues, eye_openness, pupil_confidence
from backend.eyes import CropGeometry, EyeCrop, crop_eye

GEOMETRY = CropGeometry()
WIDTH, HEIGHT = GEOMETRY.size  # 56 x 32
EYE_W = GEOMETRY.eye_width_px  # 32
CENTRE = np.array([WIDTH / 2.0, HEIGHT / 2.0])  # where crop_eye puts the outline centre

SKIN, SCLERA, IRIS, PUPIL, GLINT = 150.0, 200.0, 60.0, 20.0, 240.0
IRIS_R = 0.2 * EYE_W  # 6.4 px
SUPERSAMPLE = 4


def eye_outline(half_height: float = 5.0, centre: np.ndarray = CENTRE) -> np.ndarray:
    """Six dlib-ordered points of an almond: corner, two upper lid, corner, two lower lid."""
    hw = EYE_W / 2.0
    pts = [(-hw, 0), (-hw / 3, -half_height), (hw / 3, -half_height)]
    pts += [(hw, 0), (hw / 3, half_height), (-hw / 3, half_height)]
    return np.array(pts, dtype=np.float64) + centre


def render_eye(
    iris_centre: np.ndarray | None,
    *,
    outline: np.ndarray | None = None,
    open_eye: bool = True,
    pupil_radius: float = 0.45 * IRIS_R,
    glint: bool = True,
    seed: int = 0,
    noise: float = 3.0,
) -> EyeCrop:
    """An EyeCrop: skin, sclera inside the outline polygon, iris + pupil disc clipped to it.

    Drawn at 4x and area-averaged (anti-aliased edges), then Gaussian noise with a fixed seed.
    `glint` adds a small specular highlight up and to the right of the iris centre.
    """
    outline = eye_outline() if outline is None else outline
    shape = (HEIGHT * SUPERSAMPLE, WIDTH * SUPERSAMPLE)
    yy, xx = (np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5) / SUPERSAMPLE - 0.5
    img = np.full(shape, SKIN, np.float32)
    if open_eye:
        poly = np.round(((outline + 0.5) * SUPERSAMPLE - 0.5) * 16).astype(np.int32)
        inside = np.zeros(shape, np.uint8)
        cv2.fillPoly(inside, [poly], 1, shift=4)
        eye = inside.astype(bool)
        img[eye] = SCLERA
        if iris_centre is not None:
            d = np.hypot(xx - iris_centre[0], yy - iris_centre[1])
            img[eye & (d <= IRIS_R)] = IRIS
            img[eye & (d <= pupil_radius)] = PUPIL
            if glint:
                g = np.hypot(xx - iris_centre[0] - 1.5, yy - iris_centre[1] + 1.5)
                img[eye & (g <= 1.0)] = GLINT
    small = cv2.resize(img, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    small = np.clip(small + rng.normal(0.0, noise, small.shape), 0, 255).astype(np.float32)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return EyeCrop(pixels=small, outline=outline.copy(), to_image=identity, scale=1.0)


def mirrored(crop: EyeCrop) -> EyeCrop:
    """The crop flipped left-right, outline re-ordered so point 0 is again the left corner."""
    w = crop.pixels.shape[1]
    outline = np.column_stack([w - 1 - crop.outline[:, 0], crop.outline[:, 1]])
    return dataclasses.replace(
        crop,
        pixels=np.ascontiguousarray(crop.pixels[:, ::-1]),
        outline=outline[[3, 2, 1, 0, 5, 4]],
    )


def error(estimate: pupil.PupilEstimate, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate.xy - truth))


# Iris offsets (px, eye is 32 px wide) from the outline centre. NEAR: a roughly frontal gaze.
NEAR = [(0, 0), (2, 0), (-2, 0), (1.5, 0.5), (-1, -0.5), (0, 0.8)]
FAR = [(4, 1), (-4, -1), (5, 0), (-5, 0)]


# ---------------------------------------------------------------------------------------------
# Individual methods


def test_outline_mean_is_the_mean_of_the_six_points():
    outline = eye_outline() + np.array([[0, 0], [1, -1], [0.5, 0], [2, 1], [0, 0.5], [-1, 0]])
    crop = render_eye(CENTRE + (4, 0), outline=outline)
    np.testing.assert_allclose(pupil.outline_mean(crop).xy, outline.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(pupil.outline_mean(render_eye(CENTRE)).xy, CENTRE, atol=1e-12)


@pytest.mark.parametrize("offset", NEAR)
def test_fused_finds_the_iris_centre(offset):
    truth = CENTRE + offset
    for seed in range(3):
        estimate = pupil.fused(render_eye(truth, seed=seed))
        assert error(estimate, truth) <= 1.0, (seed, estimate.xy)
        assert estimate.evidence > 3.0  # a clear dark blob


@pytest.mark.parametrize("dx", [-6, -4, 4, 6])
def test_fused_follows_large_offsets_but_is_pulled_toward_the_outline_centre(dx):
    """The landmark prior (sigma 0.12 eye widths) shrinks large offsets by about a third.

    Measured: 4 px -> 2.8 px found, 6 px -> 3.9 px. Without the prior the blob term alone is
    within 0.4 px (checked below), so the shrink comes from the prior, by design.
    """
    truth = CENTRE + (dx, 0)
    crop = render_eye(truth)
    found = pupil.fused(crop).xy - CENTRE
    assert 0.55 <= found[0] / dx <= 1.0
    assert abs(found[1]) <= 1.0
    flat_prior = pupil.FusionParams(prior_sigma_x=100.0, prior_sigma_y=100.0)
    assert error(pupil.fused(crop, flat_prior), truth) <= 0.5


@pytest.mark.parametrize(
    ("method", "tolerance"),
    [(pupil.means_of_gradients, 2.0), (pupil.projection_meanshift, 2.5)],
    ids=["means_of_gradients", "projection_meanshift"],
)
@pytest.mark.parametrize("offset", NEAR + FAR)
def test_classical_methods_find_the_iris_centre(method, tolerance, offset):
    truth = CENTRE + offset
    for seed in range(3):
        estimate = method(render_eye(truth, seed=seed))
        assert error(estimate, truth) <= tolerance, (seed, estimate.xy)


@pytest.mark.parametrize("offset", NEAR + FAR)
def test_projection_reference_bug_never_leaves_its_start(offset):
    crop = render_eye(CENTRE + offset)
    start = pupil.projection_meanshift(crop, iterations=0).xy
    buggy = pupil.projection_meanshift(crop, integer_division_bug=True).xy
    np.testing.assert_array_equal(buggy, start)


def test_projection_reference_bug_stays_on_a_dark_speck_that_the_fix_leaves():
    """A dark speck (lash shadow) at the iris edge draws the start; mean-shift must leave it."""
    truth = CENTRE + (-3, 0)
    crop = render_eye(truth, pupil_radius=0.0, glint=False)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = crop.pixels.copy()
    pixels[np.hypot(xx - truth[0] - 4, yy - truth[1]) <= 2.5] = 0.0
    crop = dataclasses.replace(crop, pixels=pixels)

    start = pupil.projection_meanshift(crop, iterations=0).xy
    fixed = pupil.projection_meanshift(crop).xy
    buggy = pupil.projection_meanshift(crop, integer_division_bug=True).xy
    assert start[0] - truth[0] >= 2.5  # the test is meaningful: the start is off the iris centre
    assert buggy[0] == start[0]
    assert abs(fixed[0] - truth[0]) <= 1.0
    assert abs(fixed[0] - buggy[0]) >= 2.0


# ---------------------------------------------------------------------------------------------
# Closed eyes, mirror symmetry, degenerate crops


@pytest.mark.parametrize("seed", range(6))
def test_fused_on_a_closed_eye_stays_near_the_outline_centre_with_low_evidence(seed):
    closed = pupil.fused(render_eye(None, open_eye=False, seed=seed))
    open_ = pupil.fused(render_eye(CENTRE + (2, 0), seed=seed))
    assert np.linalg.norm(closed.xy - CENTRE) <= 0.1 * EYE_W
    assert closed.evidence < 3.0
    assert closed.evidence < open_.evidence - 2.0


@pytest.mark.parametrize("offset", [(0, 0), (3, 1), (-4, 0.5), (1.5, -0.8)])
def test_fused_is_mirror_equivariant(offset):
    crop = render_eye(CENTRE + offset, seed=3)  # noise and glint make the crop asymmetric
    found = pupil.fused(crop).xy
    flipped = pupil.fused(mirrored(crop)).xy
    # measured agreement is ~1e-6 px; 0.25 px leaves room for ties in the pixel argmax
    np.testing.assert_allclose([WIDTH - 1 - flipped[0], flipped[1]], found, atol=0.25)


@pytest.mark.parametrize(
    "method",
    [
        pupil.outline_mean,
        pupil.means_of_gradients,
        pupil.projection_meanshift,
        pupil.fused,
    ],
)
def test_pupil_methods_survive_a_degenerate_outline(method):
    """All six landmarks on one point (crop_eye accepts it); the answer must be finite."""
    grey = np.random.default_rng(0).integers(0, 256, (100, 100), dtype=np.uint8)
    crop = crop_eye(grey, np.full((6, 2), 50.0))
    estimate = method(crop)
    assert np.all(np.isfinite(estimate.xy))


# ---------------------------------------------------------------------------------------------
# Confidence

TYPICAL = EyeCues(
    evidence=3.0,
    offset=0.05,
    openness=0.3,
    eye_width_px=20.0,
    face_score=1.0,
    asymmetry=0.05,
)


def test_confidence_rises_with_evidence():
    values = [
        pupil_confidence(dataclasses.replace(TYPICAL, evidence=e)) for e in np.linspace(-3, 6, 10)
    ]
    assert np.all(np.diff(values) > 0)
    beyond = pupil_confidence(dataclasses.replace(TYPICAL, evidence=50.0))
    assert values[-1] <= beyond <= 1.0


def test_confidence_falls_as_the_head_turns():
    values = [
        pupil_confidence(dataclasses.replace(TYPICAL, asymmetry=a)) for a in np.linspace(0, 2, 6)
    ]
    assert np.all(np.diff(values) < 0)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(EyeCues)])
@pytest.mark.parametrize("value", [-np.inf, -1e9, -1.0, 0.0, 1e-9, 1.0, 1e9, np.inf])
def test_confidence_is_a_probability_for_any_cue(field, value):
    c = pupil_confidence(dataclasses.replace(TYPICAL, **{field: value}))
    assert 0.0 <= c <= 1.0


def test_open_eye_crop_gives_higher_confidence_than_a_closed_one():
    """End to end on the synthetic crops: evidence from `fused` feeds the confidence."""
    outline = eye_outline()
    cues = {}
    for name, crop in {
        "open": render_eye(CENTRE + (1, 0)),
        "closed": render_eye(None, open_eye=False),
    }.items():
        estimate = pupil.fused(crop)
        cues[name] = dataclasses.replace(
            TYPICAL, evidence=estimate.evidence, openness=eye_openness(outline)
        )
    assert pupil_confidence(cues["open"]) > pupil_confidence(cues["closed"]) + 0.2


def test_eye_openness_of_the_synthetic_almond():
    # lid-to-lid 10 px over 32 px corner to corner
    assert eye_openness(eye_outline(half_height=5.0)) == pytest.approx(10 / 32)
    assert eye_openness(np.full((6, 2), 3.0)) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_fused_stays_inside_the_eye_outline(seed):
    """A dark blob just below a nearly closed eye (lash shadow, mole) must not be taken:
    the answer stays in the grown eye polygon."""
    outline = eye_outline(half_height=1.5)
    crop = render_eye(None, outline=outline, open_eye=False, seed=seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = crop.pixels.copy()
    pixels[np.hypot(xx - CENTRE[0] - 1, yy - CENTRE[1] - 5) <= 3.0] = PUPIL
    found = pupil.fused(dataclasses.replace(crop, pixels=pixels)).xy
    mask = pupil.eye_mask(crop, pupil.FusionParams().mask_dilation)
    assert mask[int(round(found[1])), int(round(found[0]))]
    assert abs(found[1] - CENTRE[1]) <= 1.5 + 2 + 0.5  # lid + dilation + sub-pixel refinement
