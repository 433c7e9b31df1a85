"""Shared fixtures: the committed astronaut photo, the dlib-backed detectors (loaded once) and
a real redis-server of the test's own (tests/redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redis_server import RedisServer

from backend.coarse import CoarseDetector
from backend.faces import FaceDetector
from backend.images import load_image

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    """tests/data/astronaut.png: 512x512 RGB, public domain, one frontal face."""
    return DATA / "astronaut.png"


@pytest.fixture(scope="session")
def astronaut_rgb(astronaut_path: Path) -> np.ndarray:
    """(512, 512, 3) uint8, read-only."""
    return load_image(astronaut_path).rgb


@pytest.fixture(scope="session")
def astronaut_grey(astronaut_path: Path) -> np.ndarray:
    """(512, 512) uint8 luma, read-only: what the detectors see for the PNG."""
    return load_image(astronaut_path).grey


@pytest.fixture(scope="session")
def astronaut_pupils() -> dict[str, np.ndarray]:
    """Pupil centres in the astronaut, image pixels (pixel centres at integers).

    Checked by eye on a 25x nearest-neighbour zoom: the dark iris spans x 244-250, y 99-106
    (image-right eye) and x 200-206, y 98-104 (image-left eye); both points sit within ~1 px of
    the iris centres. Iris radius ~3.5 px, eye width (corner to corner) ~18 px.
    """
    return {
        "left_pupil": np.array([246.7, 103.5]),  # subject's left eye = image's right
        "right_pupil": np.array([203.3, 101.1]),
    }


@pytest.fixture(scope="session")
def face_detector() -> FaceDetector:
    """dlib HOG + 68-point predictor with default settings (model load ~1 s, once)."""
    return FaceDetector()


@pytest.fixture(scope="module")
def coarse_detector(face_detector: FaceDetector) -> CoarseDetector:
    """The default coarse pipeline, sharing the session's face detector."""
    return CoarseDetector(face_detector=face_detector)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on a free port, with its data in `tmp_path`, stopped after the test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
