"""backend.faces: the mirror table and dlib detection on the committed astronaut photo."""

from __future__ import annotations

import copy
import dataclasses

import cv2
import numpy as np
import pytest

from backend.faces import DetectionSettings, score_to_confidence

# Face box of the astronaut at 512x512 (dlib HOG, no upsampling): 87 px wide.
ASTRONAUT_BOX = np.array([179.0, 83.0, 266.0, 170.0])
# Eye-outline centres may sit a little off the pupil; within 2 px (0.11 eye widths, well inside
# the ~3.5 px iris radius) they are on the right iris.
EYE_TOL = 2.0


def rescaled(points: np.ndarray, factor: float) -> np.ndarray:
    """Image coordinates after resizing by `factor` (pixel centres at integers)."""
    return (np.asarray(points) + 0.5) * factor - 0.5


def eye_centres(face) -> tuple[np.ndarray, np.ndarray]:
    """(subject's left eye, subject's right eye) outline centres."""
    return face.landmarks[42:48].mean(axis=0), face.landmarks[36:42].mean(axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(hi - lo, 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


# ---------------------------------------------------------------------------------------------
# Detection on the astronaut


def test_astronaut_has_one_face_with_eyes_at_the_pupils(
    face_detector, astronaut_grey, astronaut_pupils
):
    faces = face_detector.detect(astronaut_grey)
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (68, 2)
    assert np.all(np.isfinite(face.landmarks))
    assert iou(face.box, ASTRONAUT_BOX) > 0.9
    assert face.score > 0 and face.confidence == pytest.approx(score_to_confidence(face.score))
    assert face.scale == 1.0
    left, right = eye_centres(face)
    assert np.linalg.norm(left - astronaut_pupils["left_pupil"]) <= EYE_TOL
    assert np.linalg.norm(right - astronaut_pupils["right_pupil"]) <= EYE_TOL
    # the subject's left eye is on the image's right
    assert face.landmarks[42:48, 0].min() > face.landmarks[36:42, 0].max()


def test_a_small_face_is_found_only_thanks_to_upsampling(
    face_detector, astronaut_grey, astronaut_pupils
):
    factor = 0.52  # face ~45 px wide; HOG's smallest is ~80 px
    small = cv2.resize(astronaut_grey, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    (face,) = face_detector.detect(small)
    assert face.scale > 1
    assert 40 <= face.box[2] - face.box[0] <= 60
    left, right = eye_centres(face)
    assert np.linalg.norm(left - rescaled(astronaut_pupils["left_pupil"], factor)) <= EYE_TOL
    assert np.linalg.norm(right - rescaled(astronaut_pupils["right_pupil"], factor)) <= EYE_TOL

    no_upsampling = copy.copy(face_detector)  # shares the loaded models
    no_upsampling.settings = dataclasses.replace(face_detector.settings, max_upsample=0)
    assert no_upsampling.detect(small) == []


def test_a_huge_photo_is_scanned_shrunk_but_reported_in_full_pixels(
    face_detector, astronaut_grey, astronaut_pupils
):
    factor = 4000 / 512
    big = cv2.resize(astronaut_grey, (4000, 4000), interpolation=cv2.INTER_LINEAR)
    (face,) = face_detector.detect(big)
    assert face.scale == pytest.approx(1280 / 4000)
    expected_box = ASTRONAUT_BOX * factor
    # HOG works on a 1280 px copy (3.1 px per working pixel) and its box snaps to a coarse grid
    assert iou(face.box, expected_box) > 0.9
    np.testing.assert_allclose(
        face.box, expected_box, atol=0.03 * (expected_box[2] - expected_box[0])
    )
    left, right = eye_centres(face)
    tol = EYE_TOL * factor
    assert np.linalg.norm(left - rescaled(astronaut_pupils["left_pupil"], factor)) <= tol
    assert np.linalg.norm(right - rescaled(astronaut_pupils["right_pupil"], factor)) <= tol


@pytest.mark.parametrize("kind", ["black", "grey", "white", "noise", "smooth_noise", "gradient"])
def test_no_face_in_a_faceless_image(face_detector, kind):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (512, 512), dtype=np.uint8)
    image = {
        "black": np.zeros((512, 512), np.uint8),
        "grey": np.full((512, 512), 128, np.uint8),
        "white": np.full((512, 512), 255, np.uint8),
        "noise": noise,
        "smooth_noise": cv2.GaussianBlur(noise, (0, 0), 2.0),
        "gradient": np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1)),
    }[kind]
    assert face_detector.detect(image) == []


def test_two_astronauts_side_by_side_are_two_faces(face_detector, astronaut_grey, astronaut_pupils):
    pair = np.hstack([astronaut_grey, astronaut_grey])
    faces = face_detector.detect(pair)
    # On the pair HOG also scores the mission patch (box ~(123, 330, 227, 434)) just above 0;
    # only the two real faces are confident.
    confident = sorted((f for f in faces if f.confidence > 0.75), key=lambda f: f.box[0])
    assert len(confident) == 2
    for face, shift in zip(confident, (0, 512), strict=True):
        assert iou(face.box, ASTRONAUT_BOX + [shift, 0, shift, 0]) > 0.7
        left, right = eye_centres(face)
        assert np.linalg.norm(left - astronaut_pupils["left_pupil"] - (shift, 0)) <= EYE_TOL
        assert np.linalg.norm(right - astronaut_pupils["right_pupil"] - (shift, 0)) <= EYE_TOL
    others = [f for f in faces if f.confidence <= 0.75]
    assert all(max(iou(o.box, c.box) for c in confident) < 0.1 for o in others)


def test_score_to_confidence_is_the_documented_logistic():
    assert score_to_confidence(0.0) == pytest.approx(0.5)
    assert score_to_confidence(1.0) == pytest.approx(0.88, abs=0.005)
    assert score_to_confidence(-0.5) == pytest.approx(0.27, abs=0.005)
    values = [score_to_confidence(s) for s in np.linspace(-3, 3, 13)]
    assert np.all(np.diff(values) > 0) and 0 < values[0] and values[-1] < 1


def test_face_detector_accepts_a_non_contiguous_view(face_detector, astronaut_grey):
    view = np.asarray(np.hstack([astronaut_grey, astronaut_grey]))[:, 256:768]  # not contiguous
    assert not view.flags.c_contiguous
    (face,) = [f for f in face_detector.detect(view) if f.confidence > 0.75]
    # only the right copy's face is in the view, 512 - 256 px right of the original
    assert iou(face.box, ASTRONAUT_BOX + [256, 0, 256, 0]) > 0.9


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((250, 250), [1.0, 2.0, 4.0]),  # small crops: upsampled to find ~20-40 px faces
        ((480, 640), [1.0, 2.0]),  # 4x would be 4.9 Mpx
        ((4000, 6000), [1280 / 6000, 2560 / 6000, 1.0]),  # shrunk first, full res last
        ((30000, 30000), [1280 / 30000, 2560 / 30000]),  # never more than 25 Mpx scanned
    ],
)
def test_scan_scales_go_coarse_to_fine_within_the_pixel_caps(shape, expected):
    assert DetectionSettings().scan_scales(*shape) == pytest.approx(expected)
