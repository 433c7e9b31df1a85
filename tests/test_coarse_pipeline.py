"""The coarse pipeline end to end: encoded bytes -> load_image -> CoarseDetector -> keypoints.

Every input is built here from tests/data/astronaut.png, in memory or in tmp_path.
"""

from __future__ import annotations

import io
import resource
import struct
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.coarse import DEFAULT_VARIANT, VARIANTS, CoarseDetector
from backend.images import ImageError, load_image
from backend.keypoints import KEYPOINT_NAMES, FaceKeypoints

# Pupils: the visually checked positions are good to ~1 px; 1.5 px (0.08 eye widths, under half
# the ~3.5 px iris radius) catches any drift off the pupil.
PUPIL_TOL = 1.5
# Same photo through another lossless container: identical pixels, so essentially identical.
SAME_PIXELS_TOL = 0.25
# Same photo re-encoded as JPEG (quality 92): measured differences are under 0.3 px.
JPEG_TOL = 1.0


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def detect_bytes(detector: CoarseDetector, data: bytes) -> list[FaceKeypoints]:
    return detector.detect(load_image(data).grey)


def main_face(faces: list[FaceKeypoints]) -> FaceKeypoints:
    """The most confident face (the mission patch sometimes scores as a weak second face)."""
    assert faces, "no face found"
    return max(faces, key=lambda f: f.confidence)


def pupils(face: FaceKeypoints) -> np.ndarray:
    return face.points[:2]


def assert_pupils_at(face: FaceKeypoints, expected: dict[str, np.ndarray], tol: float) -> None:
    for name in ("left_pupil", "right_pupil"):
        err = np.linalg.norm(face.point(name) - expected[name])
        assert err <= tol, (name, face.point(name), expected[name])


def assert_well_formed(face: FaceKeypoints) -> None:
    assert face.points.shape == (6, 2) and face.points.dtype == np.float64
    assert np.all(np.isfinite(face.points))
    assert face.confidences.shape == (6,)
    assert np.all((face.confidences >= 0) & (face.confidences <= 1))
    assert 0.0 <= face.confidence <= 1.0
    assert face.confidence == pytest.approx(face.confidences[0] * face.confidences[1])
    assert face.box.shape == (4,) and face.box[0] < face.box[2] and face.box[1] < face.box[3]


@pytest.fixture(scope="module")
def upright(coarse_detector, astronaut_path) -> FaceKeypoints:
    (face,) = coarse_detector.detect(load_image(astronaut_path).grey)
    return face


# ---------------------------------------------------------------------------------------------
# The astronaut


def test_astronaut_gives_one_face_with_six_named_keypoints(
    coarse_detector, astronaut_path, astronaut_pupils
):
    faces = coarse_detector.detect(load_image(astronaut_path).grey)
    assert len(faces) == 1
    face = faces[0]
    assert_well_formed(face)
    assert face.method == f"coarse/{DEFAULT_VARIANT}"
    assert KEYPOINT_NAMES == (
        "left_pupil",
        "right_pupil",
        "left_eye_outer",
        "left_eye_inner",
        "right_eye_inner",
        "right_eye_outer",
    )
    assert_pupils_at(face, astronaut_pupils, PUPIL_TOL)
    np.testing.assert_array_equal(face.image_right_pupil, face.point("left_pupil"))
    np.testing.assert_array_equal(face.image_left_pupil, face.point("right_pupil"))
    # subject's left eye on the image's right: outer corner rightmost, then inwards
    x = {name: face.point(name)[0] for name in KEYPOINT_NAMES}
    assert x["left_eye_outer"] > x["left_eye_inner"] > x["right_eye_inner"] > x["right_eye_outer"]
    # each pupil between its own eye's corners, and the corners at eye height
    assert x["left_eye_inner"] < x["left_pupil"] < x["left_eye_outer"]
    assert x["right_eye_outer"] < x["right_pupil"] < x["right_eye_inner"]
    assert np.all(np.abs(face.points[2:, 1] - 103) < 6)
    # a clear frontal photo: the pipeline should be sure of its pupils
    assert face.confidences[0] > 0.7 and face.confidences[1] > 0.7


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_runs(coarse_detector, astronaut_grey, upright, variant):
    detector = CoarseDetector(variant, face_detector=coarse_detector.faces)
    (face,) = detector.detect(astronaut_grey)
    assert_well_formed(face)
    assert face.method == f"coarse/{variant}"
    # corners come from the landmarks, whatever the pupil method
    np.testing.assert_array_equal(face.points[2:], upright.points[2:])
    # every method lands on the right iris: within 0.25 eye widths (~4.5 px) of the fused pupil
    np.testing.assert_allclose(pupils(face), pupils(upright), atol=4.5)


def test_an_unknown_variant_is_refused(coarse_detector):
    with pytest.raises(ValueError, match="unknown coarse variant"):
        CoarseDetector("no-such-method", face_detector=coarse_detector.faces)


# ---------------------------------------------------------------------------------------------
# Containers, colour modes and EXIF orientation


@pytest.fixture(scope="module")
def wide_astronaut(astronaut_rgb) -> np.ndarray:
    """640x512: the astronaut with a grey band on the right, so a width/height mix-up shows."""
    return cv2.copyMakeBorder(
        np.array(astronaut_rgb), 0, 0, 0, 128, cv2.BORDER_CONSTANT, value=(90, 90, 90)
    )


@pytest.fixture(scope="module")
def wide_upright_jpeg(coarse_detector, wide_astronaut) -> FaceKeypoints:
    return main_face(
        detect_bytes(coarse_detector, encode(Image.fromarray(wide_astronaut), "JPEG", quality=92))
    )


# The stored pixels are the upright photo turned the other way, so that the viewer (and
# load_image) turns them upright: orientation 6 means "rotate 90 deg clockwise to display",
# so the camera stored the photo rotated 90 deg counter-clockwise.
STORED_AS = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # counter-clockwise
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_rotated_jpeg_gives_the_upright_pupils(
    coarse_detector, wide_astronaut, wide_upright_jpeg, astronaut_pupils, orientation
):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(wide_astronaut).transpose(STORED_AS[orientation])
    assert stored.size == ((512, 640) if orientation in (6, 8) else (640, 512))
    image = load_image(encode(stored, "JPEG", quality=92, exif=exif))
    assert image.exif_orientation == orientation
    assert (image.width, image.height) == (640, 512)  # coordinates are in the transposed image
    face = main_face(coarse_detector.detect(image.grey))
    assert_well_formed(face)
    np.testing.assert_allclose(face.points, wide_upright_jpeg.points, atol=JPEG_TOL)
    assert_pupils_at(face, astronaut_pupils, PUPIL_TOL)


def test_exif_mirrored_png_mirrors_the_points_and_swaps_the_names(
    coarse_detector, wide_astronaut, astronaut_pupils
):
    """Orientation 2 displays the stored pixels mirrored. A mirrored face looks like any face,
    and names follow the displayed image: `left_pupil` (still on the image's right) is the
    mirror image of the upright `right_pupil`, in the transposed image's coordinates."""
    exif = Image.Exif()
    exif[0x0112] = 2
    image = load_image(encode(Image.fromarray(wide_astronaut), "PNG", exif=exif))
    assert image.exif_orientation == 2
    face = main_face(coarse_detector.detect(image.grey))
    w = image.width
    mirrored = {
        "left_pupil": np.array(
            [w - 1 - astronaut_pupils["right_pupil"][0], astronaut_pupils["right_pupil"][1]]
        ),
        "right_pupil": np.array(
            [w - 1 - astronaut_pupils["left_pupil"][0], astronaut_pupils["left_pupil"][1]]
        ),
    }
    assert_pupils_at(face, mirrored, PUPIL_TOL)
    assert face.point("left_pupil")[0] > face.point("right_pupil")[0]


def _grey_png(rgb: np.ndarray) -> bytes:
    return encode(Image.fromarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)), "PNG")


def _rgba_png(rgb: np.ndarray) -> bytes:
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :60] = 0  # transparent far from the face: composited over white
    alpha[400:] = 128
    return encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")


def _grey16_png(rgb: np.ndarray) -> bytes:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257  # full 16-bit range
    im = Image.fromarray(grey)
    assert im.mode == "I;16"
    return encode(im, "PNG")


@pytest.mark.parametrize("build", [_grey_png, _rgba_png, _grey16_png], ids=["L", "RGBA", "I16"])
def test_other_png_modes_give_the_same_pupils(coarse_detector, astronaut_rgb, upright, build):
    face = main_face(detect_bytes(coarse_detector, build(np.array(astronaut_rgb))))
    np.testing.assert_allclose(pupils(face), pupils(upright), atol=SAME_PIXELS_TOL)


# ---------------------------------------------------------------------------------------------
# Hard and hopeless faces


def test_a_tiny_face_is_not_found(coarse_detector, astronaut_grey):
    tiny = cv2.resize(astronaut_grey, (64, 64), interpolation=cv2.INTER_AREA)  # face ~11 px
    assert coarse_detector.detect(tiny) == []


def test_a_half_face_is_missed_or_less_confident(coarse_detector, astronaut_grey, upright):
    cut = np.ascontiguousarray(astronaut_grey[:, :225])  # through the nose, between the pupils
    for face in coarse_detector.detect(cut):
        assert_well_formed(face)
        assert face.confidence < upright.confidence
        assert np.all(face.points[:, 0] < 225 + 10)


def test_closed_eyes_lower_the_pupil_confidence(
    coarse_detector, astronaut_rgb, astronaut_pupils, upright
):
    """Eyes painted over with the surrounding skin (inpainting): the landmarks still place an
    eye, but there is no pupil to see, so the pipeline must trust its pupils less."""
    mask = np.zeros(astronaut_rgb.shape[:2], np.uint8)
    for centre in astronaut_pupils.values():
        cv2.ellipse(mask, tuple(int(round(v)) for v in centre), (12, 6), 0, 0, 360, 255, -1)
    closed = cv2.inpaint(np.array(astronaut_rgb), mask, 5, cv2.INPAINT_TELEA)
    face = main_face(coarse_detector.detect(cv2.cvtColor(closed, cv2.COLOR_RGB2GRAY)))
    assert_well_formed(face)
    assert np.all(face.confidences[:2] < upright.confidences[:2] - 0.2)
    assert face.confidence < upright.confidence


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_has_no_face(coarse_detector, seed):
    noise = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert detect_bytes(coarse_detector, encode(Image.fromarray(noise), "PNG")) == []


# ---------------------------------------------------------------------------------------------
# Broken and hostile files


@pytest.fixture(scope="module")
def astronaut_jpeg(astronaut_rgb) -> bytes:
    return encode(Image.fromarray(np.array(astronaut_rgb)), "JPEG", quality=90)


@pytest.mark.parametrize("keep", [0.5, 0.9, 100], ids=["half", "90pct", "header"])
def test_a_truncated_jpeg_is_an_image_error(astronaut_jpeg, keep):
    n = int(len(astronaut_jpeg) * keep) if keep < 1 else keep
    with pytest.raises(ImageError):
        load_image(astronaut_jpeg[:n])


def test_an_empty_file_is_an_image_error(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _black_1bit_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, ~110 kB for 30000x30000, compressed without ever holding
    the raw pixels (Pillow would need the whole image in memory to write it)."""
    comp = zlib.compressobj(9)
    rows = b"\x00" * (1 + (width + 7) // 8) * 1000
    body = b"".join(comp.compress(rows) for _ in range(height // 1000))
    body += comp.compress(b"\x00" * (1 + (width + 7) // 8) * (height % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def test_a_30000_square_png_is_refused_fast_with_bounded_memory():
    data = _black_1bit_png(30_000, 30_000)
    assert len(data) < 2_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageError, match="too large"):
            load_image(data)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5.0
    assert peak < 100 * 2**20
    # tracemalloc misses C allocations; decoding would take 900 MB of resident memory
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024


# ---------------------------------------------------------------------------------------------
# Large photos


def _canvas_with_astronaut(astronaut_rgb: np.ndarray, factor: int, origin=(3100, 900)) -> bytes:
    """6000x4000 JPEG: grey canvas with the astronaut, scaled by `factor`, pasted at `origin`."""
    face = np.array(astronaut_rgb)
    if factor != 1:
        face = cv2.resize(face, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    canvas = np.full((4000, 6000, 3), 120, np.uint8)
    x, y = origin
    canvas[y : y + face.shape[0], x : x + face.shape[1]] = face
    return encode(Image.fromarray(canvas), "JPEG", quality=90)


def _expected_pupils(pupils_512: dict, factor: int, origin=(3100, 900)) -> dict:
    return {k: (v + 0.5) * factor - 0.5 + np.array(origin) for k, v in pupils_512.items()}


def test_a_6000x4000_photo_maps_points_back_to_full_resolution(
    coarse_detector, astronaut_rgb, astronaut_pupils
):
    """A 24 Mpx photo with a portrait-sized face (~350 px): HOG runs on a 1280 px copy, the
    landmarks and pupils come back in full-resolution pixels."""
    image = load_image(_canvas_with_astronaut(astronaut_rgb, 4))
    assert (image.width, image.height) == (6000, 4000)
    face = main_face(coarse_detector.detect(image.grey))
    assert_well_formed(face)
    assert_pupils_at(face, _expected_pupils(astronaut_pupils, 4), 4 * PUPIL_TOL)
    assert 3100 < face.box[0] < face.box[2] < 3100 + 2048


def test_a_6000x4000_photo_with_a_native_size_face(
    coarse_detector, astronaut_rgb, astronaut_pupils
):
    image = load_image(_canvas_with_astronaut(astronaut_rgb, 1))
    face = main_face(coarse_detector.detect(image.grey))
    assert_pupils_at(face, _expected_pupils(astronaut_pupils, 1), PUPIL_TOL)
