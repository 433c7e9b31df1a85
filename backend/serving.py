"""Which model answers predictions: the promoted regressor version, else the coarse detector.

Every process (gunicorn workers, job workers) looks at MODEL_DIR/serving.json itself, at most
once per prediction (one `stat`); when the pointer changes it loads the new version once and
keeps it. A version that cannot be loaded is logged and the coarse detector serves instead,
so a bad promotion never stops predictions. TensorFlow is imported only when a regressor is
promoted, so a coarse-only server stays small.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.keypoints import FaceKeypoints
from backend.model_store import SERVING, ModelStore, ModelStoreError

log = logging.getLogger(__name__)

Detect = Callable[[np.ndarray], list[FaceKeypoints]]


@dataclass(frozen=True)
class Served:
    """The model that answers now: the name predictions are stamped with, and its detector."""

    model_version: str
    detect: Detect


class RegressorServing:
    """The promoted regressor of one model directory, reloaded when the pointer changes."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._lock = threading.Lock()
        self._pointer_key: tuple | None = None
        self._served: Served | None = None

    def current(self) -> Served | None:
        """The promoted regressor, or None when none is promoted or it cannot be loaded."""
        try:
            stat = (self.model_dir / SERVING).stat()
        except OSError:
            return None
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key == self._pointer_key:
            return self._served
        with self._lock:
            if key != self._pointer_key:
                self._served = self._load()
                self._pointer_key = key
        return self._served

    def _load(self) -> Served | None:
        store = ModelStore(self.model_dir)
        version = store.serving()
        if version is None:
            return None
        if self._served is not None and self._served.model_version == version.name:
            return self._served
        started = time.perf_counter()
        try:
            from backend.regressor.detector import RegressorDetector
            from backend.regressor.version import load_version

            detector = RegressorDetector(load_version(version))
        except ModelStoreError as e:
            log.error("model version unusable, the coarse detector serves: %s", e)
            return None
        except Exception:
            log.exception(
                "model version %s failed to load; the coarse detector serves", version.name
            )
            return None
        lock = threading.Lock()  # dlib's models are not documented as thread-safe

        def detect(grey: np.ndarray) -> list[FaceKeypoints]:
            with lock:
                return detector.detect(grey)

        log.info(
            "model version loaded name=%s ms=%.0f", version.name,
            (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return Served(model_version=version.name, detect=detect)


_servings: dict[Path, RegressorServing] = {}
_servings_lock = threading.Lock()


def regressor_serving(model_dir: Path) -> RegressorServing:
    """The process's RegressorServing for `model_dir` (one per directory)."""
    key = Path(model_dir).resolve()
    with _servings_lock:
        if key not in _servings:
            _servings[key] = RegressorServing(key)
        return _servings[key]
