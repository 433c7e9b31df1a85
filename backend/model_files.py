"""Locate the dlib model files shipped by the `face_recognition_models` package.

Importing that package needs `pkg_resources`, which new setuptools no longer ships, so we
find its directory with `importlib.util.find_spec` and never import it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"


class ModelFileError(RuntimeError):
    """A model file the detector needs is missing."""


def dlib_model_path(name: str = LANDMARKS_68) -> Path:
    """Path of one of the .dat files in `face_recognition_models/models/`."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "package 'face_recognition_models' is not installed; it ships the dlib model "
            f"{name!r} (run `make venv`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise ModelFileError(f"dlib model file not found: {path}")
    return path
