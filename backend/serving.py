"""Which model answers predictions: the promoted regressor version, else the coarse detector.

Every process (gunicorn workers, job workers) looks at MODEL_DIR/serving.json itself, at most
once per prediction (one `stat`); when the pointer changes it loads the new version once and
keeps it. TensorFlow is imported only when a regressor is promoted, so a coarse-only server
stays small.

A bad promotion never stops predictions, and the server says why it serves what it serves:

- a promoted version that cannot be loaded (damaged or missing files, unreadable metadata) is
  passed over for the last good version promoted before it (`ModelStore.resolve_serving`),
  else the coarse detector serves; the reasons go to the log (ERROR) and `status()`;
- a version damaged on disk *after* it was loaded keeps serving from memory (it is intact
  there); the damage is noticed within CHECK_EVERY_S of the next prediction (or at the next
  `status()`), logged once (WARNING), and `status()` reports it with what a restart would
  serve instead.

`status()` (per model directory) is what GET /versions reports (backend/versions.py); /health
stays free of model work (Label Studio calls it with a 1 s timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.keypoints import FaceKeypoints
from backend.model_store import (
    SERVING,
    ModelStore,
    ModelStoreError,
    ModelVersion,
    ServingChoice,
)

log = logging.getLogger(__name__)

Detect = Callable[[np.ndarray], list[FaceKeypoints]]
CHECK_EVERY_S = 5.0  # how often a serving process re-checks the served version's files


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
        self._version: ModelVersion | None = None  # the served version as it was on disk
        self._pointer: str | None = None  # the version serving.json named at the last load
        self._problems: tuple[str, ...] = ()  # why the pointer's version was passed over
        self._damage: tuple[str, ...] = ()  # what is wrong on disk with the served version
        self._checked = 0.0

    def current(self) -> Served | None:
        """The promoted regressor (or the last good one), or None when none can serve."""
        try:
            stat = (self.model_dir / SERVING).stat()
        except OSError:
            return None
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key == self._pointer_key:
            self._maybe_check()
            return self._served
        with self._lock:
            if key != self._pointer_key:
                self._load()
                self._pointer_key = key
        return self._served

    def status(self) -> dict[str, Any] | None:
        """What this process serves from this directory and why; None when nothing is promoted
        here and nothing was loaded.

        `promoted`: the version serving.json names; `serving`: the one loaded (None: the next
        directory or the coarse detector serves); `problems`: why the promoted one is not
        served, or what is wrong on disk with the served one; `after_restart`: what a process
        started now would serve, when that differs."""
        if self._pointer_key is None and not (self.model_dir / SERVING).exists():
            return None
        self.current()
        self._check()
        problems = list(self._problems)
        after_restart = None
        if self._damage:
            choice = ModelStore(self.model_dir).resolve_serving()
            after_restart = choice.version.name if choice.version is not None else None
            problems.append(
                f"model version {self._version.name!r} was damaged on disk after it was loaded "
                f"({'; '.join(self._damage)}): it is served from memory; a restart would serve "
                f"{after_restart or 'the fallback (no good promoted version is left here)'}"
            )
        return {
            "promoted": self._pointer,
            "serving": self._served.model_version if self._served is not None else None,
            "problems": problems,
            "after_restart": after_restart,
        }

    # -- loading --------------------------------------------------------------------------------

    def _load(self) -> None:
        store = ModelStore(self.model_dir)
        started = time.perf_counter()
        try:
            choice = store.resolve_serving(load=self._served_for)
        except Exception as e:  # e.g. an unreadable decisions log: never stop predictions
            log.exception("model directory %s unreadable; the fallback serves", self.model_dir)
            choice = ServingChoice(None, None, None, ((None, f"{type(e).__name__}: {e}"),))
        self._pointer, self._problems = choice.pointer, choice.problems
        self._served, self._version = choice.loaded, choice.version
        self._damage, self._checked = (), time.monotonic()
        if choice.problems:
            instead = (
                f"serving {choice.version.name}, the last good promoted version"
                if choice.version is not None
                else "no good promoted version is left here: the fallback serves "
                "(MODEL_DIR's promoted version, else the coarse detector)"
            )
            log.error("model version unusable dir=%s: %s; %s", self.model_dir,
                      "; ".join(choice.problems), instead)  # fmt: skip
        if choice.version is not None:
            log.info("model version loaded name=%s promoted=%s ms=%.0f", choice.version.name,
                     choice.pointer, (time.perf_counter() - started) * 1000)  # fmt: skip

    def _served_for(self, version: ModelVersion) -> Served:
        if self._served is not None and self._served.model_version == version.name:
            return self._served  # already in memory (a new pointer to the same version)
        from backend.regressor.detector import RegressorDetector
        from backend.regressor.version import load_version

        detector = RegressorDetector(load_version(version))
        lock = threading.Lock()  # dlib's models are not documented as thread-safe

        def detect(grey: np.ndarray) -> list[FaceKeypoints]:
            with lock:
                return detector.detect(grey)

        return Served(model_version=version.name, detect=detect)

    # -- the served version's files -------------------------------------------------------------

    def _maybe_check(self) -> None:
        if self._version is not None and time.monotonic() - self._checked >= CHECK_EVERY_S:
            self._check()

    def _check(self) -> None:
        """Compare the served version's files with its manifest (cached hashes: a few stats);
        log once when that changes."""
        version = self._version
        if version is None:
            return
        self._checked = time.monotonic()
        store = ModelStore(self.model_dir)
        try:
            damage = tuple(store.verify(store.get(version.name)))
        except ModelStoreError as e:
            damage = (str(e),)
        if damage and damage != self._damage:
            log.warning("model version %s damaged on disk after it was loaded (%s); it keeps "
                        "serving from memory, a restart would not serve it", version.name,
                        "; ".join(damage))  # fmt: skip
        elif self._damage and not damage:
            log.info("model version %s intact on disk again", version.name)
        self._damage = damage


_servings: dict[Path, RegressorServing] = {}
_servings_lock = threading.Lock()


def regressor_serving(model_dir: Path) -> RegressorServing:
    """The process's RegressorServing for `model_dir` (one per directory)."""
    key = Path(model_dir).resolve()
    with _servings_lock:
        if key not in _servings:
            _servings[key] = RegressorServing(key)
        return _servings[key]


def loaded_status(model_dir: Path) -> dict[str, Any] | None:
    """`status()` of this process's RegressorServing for `model_dir`, if it has one (never
    loads a model: a directory this process has not served from reports None)."""
    with _servings_lock:
        serving = _servings.get(Path(model_dir).resolve())
    return serving.status() if serving is not None else None
