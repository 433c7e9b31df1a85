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
`value` names): `/data/local-files/?d=REL` from LOCAL_FILES_DOCUMENT_ROOT, other root-relative
paths (`/data/upload/...`) and absolute http(s) URLs on LABEL_STUDIO_URL's host downloaded
from Label Studio with the API key. Anything else fails that one task with a clear reason.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import numpy as np
import requests
from label_studio_sdk.label_interface import LabelInterface

from backend import results
from backend.coarse import VARIANTS, CoarseDetector
from backend.images import ImageError, ImageLimits, LoadedImage, load_image
from backend.keypoints import KEYPOINT_NAMES, FaceKeypoints
from backend.settings import Settings

log = logging.getLogger(__name__)

PACKAGE = "pupil-backend"
TRAINING_REASON = "training arrives with the regressor"

# (connect, read) seconds for one request to Label Studio; a download also has a total budget.
DOWNLOAD_TIMEOUT = (5.0, 30.0)
DOWNLOAD_DEADLINE_S = 60.0
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_LOCAL_FILES_PATH = "/data/local-files"
_SHOWN_CHARS = 200


class ConfigError(ValueError):
    """The label config cannot be used by this backend; the message names what is missing."""


class TaskError(ValueError):
    """One task cannot be predicted (bad image reference, download refused, ...)."""


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


class ImageFetcher:
    """Turns a task's image reference into a LoadedImage (see the module docstring)."""

    def __init__(self, settings: Settings, limits: ImageLimits = ImageLimits()) -> None:
        self.settings = settings
        self.limits = limits
        self._local = threading.local()  # one requests.Session per thread

    # -- public

    def load(self, ref: object) -> LoadedImage:
        """The image `ref` points at; raises TaskError or ImageError with a reason."""
        if not isinstance(ref, str) or not ref.strip():
            raise TaskError(f"image reference must be a non-empty string, got {ref!r}")
        ref = ref.strip()
        parts = urlsplit(ref)
        scheme = parts.scheme.lower()
        if not scheme and not parts.netloc and ref.startswith("/"):
            if self._is_local_files(parts.path):
                if self.settings.local_files_document_root:
                    return self._load_local(parts.query)
                if not self.settings.label_studio_url:
                    raise TaskError(
                        f"cannot read local file {_shown(ref)!r}: LOCAL_FILES_DOCUMENT_ROOT is "
                        "not set, and LABEL_STUDIO_URL is not set either to download it"
                    )
            return self._download(self._label_studio_url(ref), ref)
        if scheme in ("http", "https"):
            self._check_host(ref)
            if self._is_local_files(parts.path) and self.settings.local_files_document_root:
                return self._load_local(parts.query)
            return self._download(ref, ref)
        if not scheme and parts.netloc:
            raise TaskError(f"scheme-relative image URL {_shown(ref)!r} is not supported")
        if scheme:
            raise TaskError(
                f"unsupported image reference {_shown(ref)!r}: {scheme}:// is not supported "
                "(use Label Studio uploads, /data/local-files/?d=..., or http(s) URLs on "
                "LABEL_STUDIO_URL's host)"
            )
        raise TaskError(
            f"unsupported image reference {_shown(ref)!r}: expected a path starting with / "
            "(such as /data/upload/...) or an http(s) URL"
        )

    # -- local files

    @staticmethod
    def _is_local_files(path: str) -> bool:
        return path.rstrip("/") == _LOCAL_FILES_PATH

    def _load_local(self, query: str) -> LoadedImage:
        relative = parse_qs(query, keep_blank_values=True).get("d", [""])[0]
        if not relative:
            raise TaskError("local-files URL has no ?d=<path> parameter")
        configured = self.settings.local_files_document_root
        if configured is None:
            raise TaskError("LOCAL_FILES_DOCUMENT_ROOT is not set")
        try:
            root = Path(configured).resolve()
            target = (root / relative).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops
            raise TaskError(f"invalid local file path {relative!r}: {e}") from None
        if not target.is_relative_to(root):
            raise TaskError(
                f"local file path {relative!r} escapes LOCAL_FILES_DOCUMENT_ROOT "
                "(after resolving '..' and symlinks); refused"
            )
        try:
            return load_image(target, self.limits)
        except ImageError as e:
            # load_image names the absolute path; the relative one is what the user knows.
            raise ImageError(str(e).replace(repr(str(target)), repr(relative))) from None

    # -- downloads

    def _label_studio_url(self, path: str) -> str:
        base = self.settings.label_studio_url
        if not base:
            raise TaskError(
                f"cannot download {_shown(path)!r}: LABEL_STUDIO_URL is not set (set it to the "
                "address this backend can reach Label Studio at, and LABEL_STUDIO_API_KEY)"
            )
        return base.rstrip("/") + path

    def _check_host(self, url: str) -> None:
        base = self.settings.label_studio_url
        target = urlsplit(url)
        if not base:
            raise TaskError(
                f"image URL {_shown(url)!r} refused: absolute URLs are only fetched from "
                "LABEL_STUDIO_URL's host, and LABEL_STUDIO_URL is not set"
            )
        allowed = urlsplit(base)
        try:
            same = (
                target.scheme.lower() in ("http", "https")
                and target.hostname == allowed.hostname
                and _port(target) == _port(allowed)
            )
        except ValueError:  # a port that is not a number
            same = False
        if not same:
            raise TaskError(
                f"image URL {_shown(url)!r} refused: its host {target.netloc!r} is not "
                f"LABEL_STUDIO_URL's host {allowed.netloc!r}"
            )

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = f"{PACKAGE}/{package_version()}"
            self._local.session = session
        return session

    def _download(self, url: str, ref: str) -> LoadedImage:
        headers = {}
        if self.settings.label_studio_api_key:
            headers["Authorization"] = f"Token {self.settings.label_studio_api_key}"
        deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(url)  # also every redirect: the key only ever goes to Label Studio
            try:
                response = self._session().get(
                    url,
                    headers=headers,
                    timeout=DOWNLOAD_TIMEOUT,
                    stream=True,
                    allow_redirects=False,
                )
            except requests.Timeout:
                raise TaskError(f"timed out downloading {_shown(ref)!r}") from None
            except requests.RequestException as e:
                raise TaskError(f"cannot download {_shown(ref)!r}: {_reason(e)}") from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                _check_status(response, ref)
                data = self._read_body(response, ref, deadline)
            return load_image(data, self.limits)
        raise TaskError(f"too many redirects downloading {_shown(ref)!r}")

    def _read_body(self, response: requests.Response, ref: str, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageError(f"file is too large: {int(declared):,} bytes (limit {limit:,} bytes)")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ImageError(f"file is too large: over the limit of {limit:,} bytes")
                if time.monotonic() > deadline:
                    raise TaskError(
                        f"downloading {_shown(ref)!r} took over {DOWNLOAD_DEADLINE_S:.0f} s"
                    )
                chunks.append(chunk)
        except requests.RequestException as e:
            raise TaskError(f"download of {_shown(ref)!r} broke off: {_reason(e)}") from None
        return b"".join(chunks)


@functools.lru_cache(maxsize=8)
def shared_fetcher(settings: Settings) -> ImageFetcher:
    """One fetcher (and so one connection pool per thread) per settings, per process."""
    return ImageFetcher(settings)


def _check_status(response: requests.Response, ref: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise TaskError(
            f"Label Studio refused the download of {_shown(ref)!r} (HTTP {status}): check "
            "LABEL_STUDIO_API_KEY (a legacy token; it needs legacy tokens enabled in the "
            "organization's settings)"
        )
    if status == 404:
        raise TaskError(f"image {_shown(ref)!r} not found on Label Studio (HTTP 404)")
    if status >= 400 or status < 200:
        raise TaskError(f"downloading {_shown(ref)!r} failed with HTTP {status}")


def _port(parts) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def _shown(ref: str) -> str:
    """A reference for messages: no query string or credentials on URLs, bounded length."""
    parts = urlsplit(ref)
    if parts.scheme.lower() in ("http", "https") and not ImageFetcher._is_local_files(parts.path):
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        ref = f"{parts.scheme}://{host}{parts.path}"
    return ref if len(ref) <= _SHOWN_CHARS else ref[: _SHOWN_CHARS - 3] + "..."


def _reason(error: Exception) -> str:
    """A one-line reason for a requests error (its repr nests the whole urllib3 chain)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]


# ---------------------------------------------------------------------------------------------
# The model


class PupilModel:
    """Pre-annotates pupil centres and eye corners for Label Studio.

    Cheap to construct: `setup()` only parses the label config (cached). `predict` returns one
    prediction per task, in order, also for tasks that fail (empty result, score 0).
    """

    def __init__(
        self,
        label_config: str | None = None,
        settings: Settings | None = None,
        *,
        fetcher: ImageFetcher | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if self.settings.coarse_variant not in VARIANTS:
            raise ValueError(
                f"COARSE_VARIANT={self.settings.coarse_variant!r} is unknown; choose one of "
                f"{sorted(VARIANTS)}"
            )
        self.label_config = label_config
        self.model_version = model_version(self.settings.coarse_variant)
        self.fetcher = fetcher or shared_fetcher(self.settings)
        self._targets: LabelTargets | None = None
        self.setup()

    def setup(self) -> None:
        """Parse the label config; raises ConfigError naming what is missing. No model work."""
        if self.label_config is not None:
            self._targets = parse_label_config(self.label_config)

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
            image = self.fetcher.load(_image_reference(task, targets))
            faces = detect_faces(self.settings.coarse_variant, image.grey)
            prediction = results.prediction(
                faces,
                image.width,
                image.height,
                targets.spec,
                self.model_version,
                results.region_id_prefix(task_id),
            )
        except (TaskError, ImageError) as e:
            log.warning("task=%s outcome=failed ms=%.0f reason=%s", task_id, _ms(started), e)
            return results.empty_prediction(self.model_version)
        except Exception:
            log.exception("task=%s outcome=error ms=%.0f", task_id, _ms(started))
            return results.empty_prediction(self.model_version)
        log.info(
            "task=%s outcome=predicted faces=%d regions=%d score=%.3f size=%dx%d ms=%.0f",
            task_id,
            len(faces),
            len(prediction["result"]),
            prediction["score"],
            image.width,
            image.height,
            _ms(started),
        )
        return prediction

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Training is not implemented yet: every event is acknowledged and ignored."""
        project = data.get("project") if isinstance(data, dict) else None
        project_id = project.get("id") if isinstance(project, dict) else project
        log.info("fit event=%s project=%s outcome=ignored", event, project_id)
        return {"status": "ignored", "reason": TRAINING_REASON}


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


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
