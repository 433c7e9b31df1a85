"""The model Label Studio talks to: label config in, one prediction per task out.

`PupilModel` has the shape users of label-studio-ml know (`__init__(label_config, ...)`,
`setup()`, `predict(tasks, context=None, **kwargs)`, `fit(event, data, **kwargs)`) and, like
there, an instance is cheap and may be made per request: the label config is parsed into
`LabelTargets` once per distinct config, and the detector is built once per process.

Tags are found by TYPE, never by name: the first `<KeyPointLabels>` attached to an `<Image>`
receives the keypoints, only for the labels it declares; a `<RectangleLabels>` with a `face`
label (or a plain `<Rectangle>` whose name mentions "face") on the same image receives the face
boxes. Anything else in the config (choices, text areas, ...) is left to the annotator.

Images are read where Label Studio says they are (the task data field the `<Image>` tag's
`value` names) by `backend.image_source.ImageSource`. A task that cannot be predicted gets an
empty prediction, one log line `task=<id> outcome=failed reason=<class> detail=...` and a count
in the failure metric under that reason (backend/metrics.py FAILURE_REASONS); the rest of the
batch goes on.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from backend import results
from backend.coarse import VARIANTS, CoarseDetector
from backend.image_source import IMAGE_TOO_LARGE, ImageSource, ImageSourceError
from backend.images import ImageError, ImageTooLarge, load_image
from backend.keypoints import KEYPOINT_NAMES, FaceKeypoints
from backend.label_store import label_store
from backend.metrics import IMAGE_UNREADABLE, INTERNAL, NO_IMAGE_FIELD, Metrics
from backend.project_dirs import serving_roots
from backend.serving import Served, regressor_serving
from backend.settings import Settings
from backend.webhooks import record_event

log = logging.getLogger(__name__)

PACKAGE = "pupil-backend"


# How load_image's own messages start when an image is over the byte or pixel limit.
class ConfigError(ValueError):
    """The label config cannot be used by this backend; the message names what is missing."""


class TaskError(ValueError):
    """One task is not a task this backend can read (not an object, no image field)."""

    reason = NO_IMAGE_FIELD


# ---------------------------------------------------------------------------------------------
# Versions


@functools.cache
def package_version() -> str:
    """The installed version of this package ("0.0.0" when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def model_version(variant: str) -> str:
    """What predictions are stamped with, e.g. "coarse-fused-0.1.0"."""
    return f"coarse-{variant}-{package_version()}"


# ---------------------------------------------------------------------------------------------
# The detector: built once per process, used under a lock


_detectors_lock = threading.Lock()
_detectors: dict[str, tuple[CoarseDetector, threading.Lock]] = {}


def _detector_entry(variant: str) -> tuple[CoarseDetector, threading.Lock]:
    entry = _detectors.get(variant)
    if entry is not None:
        return entry
    with _detectors_lock:
        entry = _detectors.get(variant)
        if entry is None:
            started = time.perf_counter()
            entry = (CoarseDetector(variant), threading.Lock())
            _detectors[variant] = entry
            log.info(
                "detector built variant=%s ms=%.0f",
                variant,
                (time.perf_counter() - started) * 1000,
            )
    return entry


def get_detector(variant: str) -> CoarseDetector:
    """The process's CoarseDetector for `variant`, built on first use (thread-safe)."""
    return _detector_entry(variant)[0]


def detect_faces(variant: str, grey: np.ndarray) -> list[FaceKeypoints]:
    """Run the shared detector. dlib's detector and shape predictor are not documented as
    thread-safe, so calls are serialised per process; downloads and decoding still overlap
    (scale CPU-bound throughput with WORKERS)."""
    detector, lock = _detector_entry(variant)
    with lock:
        return detector.detect(grey)


def warm_up(variant: str) -> None:
    """Build the detector and run it once, so the first request pays for nothing."""
    detect_faces(variant, np.zeros((64, 64), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# The label config


# Label Studio configs are a few KB (a big taxonomy: hundreds of KB); 64 cached parses of this
# size hold at most ~128 MB, whatever a client sends.
MAX_LABEL_CONFIG_CHARS = 2_000_000


@dataclass(frozen=True)
class LabelTargets:
    """What the backend fills in a project's label config."""

    image_name: str  # the <Image> tag's name (results' to_name)
    data_key: str  # the task data field holding the image reference ("image" for $image)
    spec: results.ResultSpec


def parse_label_config(label_config: str) -> LabelTargets:
    """Find the Image tag and the KeyPointLabels control (by type); raise ConfigError if the
    config lacks them or they cannot be used. Cached per distinct config string."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise ConfigError("the label config is empty; it needs an <Image> and a <KeyPointLabels>")
    if len(label_config) > MAX_LABEL_CONFIG_CHARS:
        raise ConfigError(
            f"the label config has {len(label_config):,} characters; at most "
            f"{MAX_LABEL_CONFIG_CHARS:,} are read"
        )
    return _parse_label_config(label_config)


@functools.lru_cache(maxsize=64)
def _parse_label_config(label_config: str) -> LabelTargets:
    try:
        interface = LabelInterface(label_config)
    except Exception as e:  # the SDK raises its own XML/validation errors
        raise ConfigError(f"the label config cannot be parsed: {e}") from None
    objects = list(interface.objects or [])
    controls = list(interface.controls or [])
    images = {tag.name: tag for tag in objects if _tag_type(tag) == "image"}
    keypoint_controls = [tag for tag in controls if _tag_type(tag) == "keypointlabels"]

    missing = []
    if not images:
        missing.append("<Image> tag")
    if not keypoint_controls:
        missing.append("<KeyPointLabels> control")
    if missing:
        raise ConfigError(
            f"the label config has no {' and no '.join(missing)}: this backend predicts "
            f"keypoints ({', '.join(KEYPOINT_NAMES)}) with <KeyPointLabels toName=...> on an "
            "<Image>"
        )

    attached = [
        (control, images[name])
        for control in keypoint_controls
        for name in (control.to_name or [])
        if name in images
    ]
    if not attached:
        names = ", ".join(
            f"{c.name!r} (toName={','.join(c.to_name or [])})" for c in keypoint_controls
        )
        raise ConfigError(
            f"no <KeyPointLabels> is attached to an <Image>: {names}; set toName to the "
            f"<Image> tag's name ({', '.join(repr(n) for n in images)})"
        )
    control, image = attached[0]

    declared = set(control.labels or [])
    labels = tuple(name for name in KEYPOINT_NAMES if name in declared)
    if not labels:
        raise ConfigError(
            f"<KeyPointLabels name={control.name!r}> declares none of the labels this backend "
            f"predicts ({', '.join(KEYPOINT_NAMES)}); it declares "
            f"{sorted(declared) or 'no labels'}"
        )
    if image.attr and image.attr.get("valueList"):
        raise ConfigError(
            f"<Image name={image.name!r}> uses valueList; image lists are not supported"
        )
    if not image.value or not image.value_is_variable:
        raise ConfigError(
            f'<Image name={image.name!r}> value must name a task data field like "$image", '
            f"got {image.value!r}"
        )

    face_from, face_type, face_label = _face_control(controls, image.name)
    spec = results.ResultSpec(
        to_name=image.name,
        keypoints_from_name=control.name,
        keypoint_labels=labels,
        face_from_name=face_from,
        face_type=face_type,
        face_label=face_label,
    )
    return LabelTargets(image_name=image.name, data_key=image.value_name, spec=spec)


def _tag_type(tag: object) -> str:
    return str(getattr(tag, "tag", "") or "").lower()


def _face_control(controls: Sequence, image_name: str) -> tuple[str | None, str | None, str | None]:
    """(from_name, type, label) of the control for face boxes on `image_name`, if any."""
    on_image = [c for c in controls if image_name in (c.to_name or [])]
    for control in on_image:
        if _tag_type(control) == "rectanglelabels":
            label = next((lbl for lbl in control.labels or [] if lbl.lower() == "face"), None)
            if label is not None:
                return control.name, "rectanglelabels", label
    for control in on_image:
        if _tag_type(control) == "rectangle" and "face" in (control.name or "").lower():
            return control.name, "rectangle", None
    return None, None, None


# ---------------------------------------------------------------------------------------------
# Images


@functools.lru_cache(maxsize=8)
def shared_image_source(settings: Settings) -> ImageSource:
    """One ImageSource (cache, connection pools, access token) per settings, per process."""
    return ImageSource(settings)


# ---------------------------------------------------------------------------------------------
# The model


class PupilModel:
    """Pre-annotates pupil centres and eye corners for Label Studio.

    Cheap to construct: `setup()` only parses the label config (cached). `predict` returns one
    prediction per task, in order, also for tasks that fail (empty result, score 0). `metrics`,
    when given, counts every task's outcome.
    """

    def __init__(
        self,
        label_config: str | None = None,
        settings: Settings | None = None,
        *,
        source: ImageSource | None = None,
        metrics: Metrics | None = None,
        project: int | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if self.settings.coarse_variant not in VARIANTS:
            raise ValueError(
                f"COARSE_VARIANT={self.settings.coarse_variant!r} is unknown; choose one of "
                f"{sorted(VARIANTS)}"
            )
        self.label_config = label_config
        self.source = source or shared_image_source(self.settings)
        self.metrics = metrics
        self.project = project
        self._targets: LabelTargets | None = None
        self.setup()

    def setup(self) -> None:
        """Parse the label config; raises ConfigError naming what is missing. No model work."""
        if self.label_config is not None:
            self._targets = parse_label_config(self.label_config)

    def served(self) -> Served:
        """The model answering now: the project's promoted regressor (trained from its
        annotations), else the one promoted in MODEL_DIR (scripts/train.py), else the coarse
        detector."""
        for root in serving_roots(self.settings.model_dir, self.project):
            regressor = regressor_serving(root).current()
            if regressor is not None:
                return regressor
        variant = self.settings.coarse_variant
        return Served(model_version(variant), lambda grey: detect_faces(variant, grey))

    @property
    def model_version(self) -> str:
        """What this model's predictions are stamped with now."""
        return self.served().model_version

    @property
    def targets(self) -> LabelTargets:
        if self._targets is None:
            raise ConfigError("no label config given; it needs an <Image> and a <KeyPointLabels>")
        return self._targets

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One {"result", "score", "model_version"} per task, in order.

        `context` (interactive pre-annotation) is accepted and ignored: every call predicts the
        whole image. Raises ConfigError only when there is no usable label config.
        """
        targets = self.targets
        if context:
            log.debug("predict context ignored (interactive mode is not used)")
        return [self._predict_task(task, targets) for task in tasks]

    def _predict_task(self, task: object, targets: LabelTargets) -> dict:
        task_id = task.get("id") if isinstance(task, dict) else None
        started = time.perf_counter()
        try:
            data = self.source.fetch(_image_reference(task, targets), _presign_id(task_id))
            image = load_image(data, self.source.limits)
            served = self.served()
            faces = served.detect(image.grey)
            prediction = results.prediction(
                faces,
                image.width,
                image.height,
                targets.spec,
                served.model_version,
                results.region_id_prefix(task_id),
            )
        except (TaskError, ImageSourceError) as e:
            return self._failed(task_id, e.reason, str(e), started)
        except ImageError as e:
            reason = IMAGE_TOO_LARGE if isinstance(e, ImageTooLarge) else IMAGE_UNREADABLE
            return self._failed(task_id, reason, str(e), started)
        except Exception:
            log.exception(
                "task=%s outcome=failed reason=%s detail=unexpected error ms=%.0f",
                _shown_id(task_id),
                INTERNAL,
                _ms(started),
            )
            return self._failed(task_id, INTERNAL, None, started)
        if self.metrics is not None:
            self.metrics.prediction_ok(len(faces))
        log.info(
            "task=%s outcome=ok faces=%d regions=%d score=%.3f size=%dx%d ms=%.0f",
            _shown_id(task_id),
            len(faces),
            len(prediction["result"]),
            prediction["score"],
            image.width,
            image.height,
            _ms(started),
        )
        return prediction

    def _failed(self, task_id: object, reason: str, detail: str | None, started: float) -> dict:
        """Log and count a failed task; its empty prediction keeps the batch aligned."""
        if detail is not None:
            log.warning(
                "task=%s outcome=failed reason=%s detail=%s ms=%.0f",
                _shown_id(task_id),
                reason,
                " ".join(detail.split()),  # one line per task, whatever the message holds
                _ms(started),
            )
        if self.metrics is not None:
            self.metrics.prediction_failed(reason)
        return results.empty_prediction(self.model_version)

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Record a Label Studio event (annotation created/updated/deleted, START_TRAINING) in
        the label store; training happens later in a job (backend/scheduler.py decides when).
        Raises WebhookError for an event that cannot be read."""
        outcome = record_event(label_store(self.settings.model_dir), event, data)
        return outcome.to_json()


def _image_reference(task: object, targets: LabelTargets) -> object:
    if not isinstance(task, dict):
        raise TaskError(f"task must be a JSON object, got {type(task).__name__}")
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError("task has no 'data' object")
    if targets.data_key not in data:
        raise TaskError(
            f"task data has no {targets.data_key!r} field (the <Image name="
            f"{targets.image_name!r}> value ${targets.data_key})"
        )
    return data[targets.data_key]


def _presign_id(task_id: object) -> int | None:
    """The task id as Label Studio's presign URL needs it: a non-negative integer, or None."""
    if isinstance(task_id, int) and not isinstance(task_id, bool) and task_id >= 0:
        return task_id
    if isinstance(task_id, str) and task_id.isascii() and task_id.isdigit():
        return int(task_id)
    return None


def _shown_id(task_id: object) -> str:
    """A task id for a log line: one short token, whatever the caller sent."""
    return loggable(task_id, 40).replace(" ", "_")


def loggable(value: object, limit: int = 80) -> str:
    """What a client sent, for a log line: printable ASCII on one line (control characters and
    other characters escaped, so no value can break or forge a line), at most about `limit`
    characters."""
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__}>"  # never a container's text: it may be huge or deep
    text = value if isinstance(value, str) else str(value)
    shown = text[:limit].encode("unicode_escape").decode("ascii")
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    elif len(text) > limit:
        shown += "..."
    return shown


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
