"""Detections -> Label Studio prediction JSON. Pure functions: no I/O, no config parsing.

A `ResultSpec` says which tags of the project's label config to fill (the model finds them);
`prediction` turns the faces found in one image into one prediction for one task:

- one `keypointlabels` region per face and per keypoint name the config declares, with x/y as
  percentages of the EXIF-transposed image (what Label Studio displays) and the point's score;
- optionally one face rectangle per face (`rectanglelabels` or plain `rectangle`), which the
  face's keypoints point at with `parentID`;
- a prediction-level `score`: the model's confidence that every pupil of the task is right (the
  product of its faces' confidences), so sorting tasks by score, lowest first, puts the ones
  most worth a label first; 0 for an image without a face (it must be looked at).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from backend.keypoints import KEYPOINT_NAMES, FaceKeypoints

# Drawn size of a predicted point (Label Studio's keypoint `width`, percent of the image width):
# a tenth of the face's eye width, so the dot marks the pupil without hiding the iris at any
# photo resolution; bounded so it stays visible and clickable.
POINT_SIZE_EYE_FRACTION = 0.1
POINT_SIZE_BOUNDS_PCT = (0.05, 1.0)
# Decimal places kept for percentages: 1e-6 % of a 100,000 px side is 0.001 px.
_DECIMALS = 6
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ResultSpec:
    """Which control tags to fill for one Image tag.

    `keypoint_labels` are the names to emit, a subset of KEYPOINT_NAMES in that order.
    `face_type` is "rectanglelabels" (then `face_label` is the label to use), "rectangle",
    or None for no face rectangle.
    """

    to_name: str
    keypoints_from_name: str
    keypoint_labels: tuple[str, ...] = KEYPOINT_NAMES
    face_from_name: str | None = None
    face_type: str | None = None
    face_label: str | None = None

    def __post_init__(self) -> None:
        unknown = [name for name in self.keypoint_labels if name not in KEYPOINT_NAMES]
        if unknown:
            raise ValueError(f"unknown keypoint names {unknown}; known: {list(KEYPOINT_NAMES)}")
        if self.face_type not in (None, "rectanglelabels", "rectangle"):
            raise ValueError(
                f"face_type must be rectanglelabels, rectangle or None, not {self.face_type!r}"
            )
        if (self.face_type is None) != (self.face_from_name is None):
            raise ValueError("face_type and face_from_name must be given together")
        if self.face_type == "rectanglelabels" and not self.face_label:
            raise ValueError("a rectanglelabels face rectangle needs face_label")


def region_id_prefix(task_id: object) -> str:
    """A prefix that makes region ids unique across tasks and safe in HTML ids: "t42-"."""
    if task_id is None:
        return ""
    return "t" + _ID_UNSAFE.sub("_", str(task_id))[:40] + "-"


def face_results(
    faces: Sequence[FaceKeypoints],
    width: int,
    height: int,
    spec: ResultSpec,
    id_prefix: str = "",
) -> list[dict]:
    """The regions for every face: its rectangle (if the spec has one), then its keypoints.

    Ids are stable (same input, same ids) and unique within the result:
    "<prefix>face<i>" and "<prefix>face<i>-<keypoint name>".
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    common = {"original_width": int(width), "original_height": int(height), "image_rotation": 0}
    results: list[dict] = []
    for index, face in enumerate(faces):
        face_id = f"{id_prefix}face{index}"
        parent = None
        if spec.face_type is not None:
            rect = _face_rectangle(face, width, height, spec, face_id, common)
            if rect is not None:
                results.append(rect)
                parent = face_id
        size = point_size(face, width)
        for name in spec.keypoint_labels:
            row = KEYPOINT_NAMES.index(name)
            x, y = (float(v) for v in face.points[row])
            if not (math.isfinite(x) and math.isfinite(y)):
                continue  # a point the detector could not place is left for the annotator
            region = {
                "id": f"{face_id}-{name}",
                "from_name": spec.keypoints_from_name,
                "to_name": spec.to_name,
                "type": "keypointlabels",
                **common,
                "value": {
                    "x": _pct(x, width),
                    "y": _pct(y, height),
                    "width": size,
                    "keypointlabels": [name],
                },
                "score": unit_score(face.confidences[row]),
            }
            if parent is not None:
                region["parentID"] = parent
            results.append(region)
    return results


def prediction_score(faces: Sequence[FaceKeypoints]) -> float:
    """P(every pupil of the task is right): the product of the faces' confidences.

    A face's confidence is already P(both its pupils within 0.05 eye distances); a task needs
    no correction only when all its faces need none. 0 when there is no face (a human must
    look: a missed face is the most expensive error)."""
    if not faces:
        return 0.0
    return unit_score(math.prod(unit_score(face.confidence) for face in faces))


def prediction(
    faces: Sequence[FaceKeypoints],
    width: int,
    height: int,
    spec: ResultSpec,
    model_version: str,
    id_prefix: str = "",
) -> dict:
    """One Label Studio prediction: {"result": [...], "score": s, "model_version": v}."""
    return {
        "result": face_results(faces, width, height, spec, id_prefix),
        "score": prediction_score(faces),
        "model_version": model_version,
    }


def empty_prediction(model_version: str) -> dict:
    """The prediction for a task that could not be predicted: it keeps the batch aligned, and
    its score of 0 puts the task first in a lowest-score-first review."""
    return {"result": [], "score": 0.0, "model_version": model_version}


def unit_score(value: object) -> float:
    """A confidence as a float in [0, 1]; NaN (or anything non-numeric) counts as 0."""
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    if not math.isfinite(score):
        return 0.0 if math.isnan(score) or score < 0 else 1.0
    return min(max(score, 0.0), 1.0)


def _pct(pixels: float, size: int) -> float:
    """`pixels` as a percentage of `size`, clamped to [0, 100]."""
    return round(min(max(pixels / size * 100.0, 0.0), 100.0), _DECIMALS)


def _face_rectangle(
    face: FaceKeypoints, width: int, height: int, spec: ResultSpec, face_id: str, common: dict
) -> dict | None:
    """The face box as a rectangle region clipped to the image, or None if it is unusable."""
    x0, y0, x1, y1 = (float(v) for v in face.box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    left, right = sorted((_pct(x0, width), _pct(x1, width)))
    top, bottom = sorted((_pct(y0, height), _pct(y1, height)))
    value: dict = {
        "x": left,
        "y": top,
        "width": round(right - left, _DECIMALS),
        "height": round(bottom - top, _DECIMALS),
        "rotation": 0,
    }
    if spec.face_type == "rectanglelabels":
        value["rectanglelabels"] = [spec.face_label]
    return {
        "id": face_id,
        "from_name": spec.face_from_name,
        "to_name": spec.to_name,
        "type": spec.face_type,
        **common,
        "value": value,
        "score": unit_score(face.confidence),
    }


def point_size(face: FaceKeypoints, width: int) -> float:
    """Keypoint `width` for one face: POINT_SIZE_EYE_FRACTION of its mean eye width."""
    corners = face.points[2:6]  # left outer, left inner, right inner, right outer
    eye_widths = [
        float(math.dist(corners[0], corners[1])),
        float(math.dist(corners[2], corners[3])),
    ]
    finite = [w for w in eye_widths if math.isfinite(w) and w > 0]
    if not finite:
        return POINT_SIZE_BOUNDS_PCT[1]
    pct = POINT_SIZE_EYE_FRACTION * (sum(finite) / len(finite)) / width * 100.0
    lo, hi = POINT_SIZE_BOUNDS_PCT
    return round(min(max(pct, lo), hi), _DECIMALS)
