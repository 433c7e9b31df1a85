"""What a Label Studio annotation teaches: people's pupil points, a verdict, or nothing.

This is the edge where Label Studio's annotation JSON becomes typed labels; training code sees
only `AnnotationLabel`. Tags are found by TYPE, as in backend/model.py: every `keypointlabels`
region named `left_pupil` / `right_pupil` is a point, every `choices` value `correct` / `wrong`
(any case) is the verdict.

Following coarse-to-fine.md, two kinds of annotation are labels:

- **points**: pupil points a person placed or kept. A `wrong` verdict whose points were moved
  (`origin` "manual" or "prediction-changed") is a correction, and a label too;
- **accepted**: a `correct` verdict with no points in the annotation, so the prediction it was
  made from (`parent_prediction`) is the label; its points are fetched when training.

A `wrong` verdict with nothing corrected marks the task for people (REJECTED) and teaches
nothing; a skipped (cancelled) annotation is SKIPPED. Both are still kept in the label store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

POINTS = "points"
ACCEPTED = "accepted"
REJECTED = "rejected"
SKIPPED = "skipped"
EMPTY = "empty"
TRAINING_KINDS = (POINTS, ACCEPTED)

_PUPILS = ("left_pupil", "right_pupil")
# Region origins that mean a person put the point where it is.
_EDITED = frozenset({"manual", "prediction-changed"})


@dataclass(frozen=True)
class PupilPair:
    """One face's two pupils in image pixels: the subject's left and right (x, y)."""

    left_pupil: np.ndarray
    right_pupil: np.ndarray


@dataclass(frozen=True)
class AnnotationLabel:
    """What one annotation says. `pairs` are in pixels of the image as Label Studio showed it."""

    kind: str  # POINTS, ACCEPTED, REJECTED, SKIPPED or EMPTY
    pairs: tuple[PupilPair, ...] = ()
    verdict: str | None = None  # "correct", "wrong" or None
    parent_prediction: int | None = None  # the prediction an ACCEPTED verdict accepts
    unpaired: int = 0  # pupil points left over (no partner of the other side)
    notes: tuple[str, ...] = field(default=())

    @property
    def teaches(self) -> bool:
        """Whether training can use this annotation."""
        return self.kind in TRAINING_KINDS


def parse_annotation(annotation: Mapping) -> AnnotationLabel:
    """The label in one annotation (or prediction) object: {"result": [...], ...}."""
    if annotation.get("was_cancelled"):
        return AnnotationLabel(SKIPPED)
    result = annotation.get("result")
    regions = result if isinstance(result, list) else []
    verdict = _verdict(regions)
    points, edited = _pupil_points(regions)
    pairs, unpaired = pair_pupils(points)
    parent = annotation.get("parent_prediction")
    parent = parent if isinstance(parent, int) and not isinstance(parent, bool) else None
    if verdict == "wrong" and not edited:
        return AnnotationLabel(REJECTED, verdict=verdict, parent_prediction=parent)
    if pairs:
        return AnnotationLabel(POINTS, tuple(pairs), verdict, parent, unpaired)
    if verdict == "correct" and parent is not None and not points:
        return AnnotationLabel(ACCEPTED, verdict=verdict, parent_prediction=parent)
    notes = ("pupil points without a partner",) if unpaired else ()
    return AnnotationLabel(
        EMPTY, verdict=verdict, parent_prediction=parent, unpaired=unpaired, notes=notes
    )


def prediction_pairs(prediction: Mapping) -> tuple[PupilPair, ...]:
    """The pupil pairs of a prediction (what an ACCEPTED verdict accepted)."""
    result = prediction.get("result")
    points, _ = _pupil_points(result if isinstance(result, list) else [])
    return tuple(pair_pupils(points)[0])


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Point:
    label: str
    xy: np.ndarray  # pixels
    parent: str | None


def _verdict(regions: Sequence) -> str | None:
    for region in regions:
        if not isinstance(region, Mapping) or region.get("type") != "choices":
            continue
        value = region.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, str) and choice.strip().lower() in ("correct", "wrong"):
                return choice.strip().lower()
    return None


def _pupil_points(regions: Sequence) -> tuple[list[_Point], bool]:
    """Pupil points in pixels, and whether any of them was placed or moved by a person."""
    points: list[_Point] = []
    edited = False
    for region in regions:
        if not isinstance(region, Mapping) or region.get("type") != "keypointlabels":
            continue
        value = region.get("value")
        if not isinstance(value, Mapping):
            continue
        labels = value.get("keypointlabels")
        label = labels[0] if isinstance(labels, list) and len(labels) == 1 else None
        if label not in _PUPILS:
            continue
        xy = _pixels(value, region)
        if xy is None:
            continue
        parent = region.get("parentID")
        points.append(_Point(label, xy, parent if isinstance(parent, str) else None))
        origin = region.get("origin")
        edited = edited or (isinstance(origin, str) and origin in _EDITED)
    return points, edited


def _pixels(value: Mapping, region: Mapping) -> np.ndarray | None:
    """A keypoint's (x, y) in pixels from Label Studio's percentages; None when unusable
    (missing, not a number, out of range, or pixels past what a float holds)."""
    fields = (value.get("x"), value.get("y"), region.get("original_width"),
              region.get("original_height"))  # fmt: skip
    if any(isinstance(v, bool) for v in fields):  # float(True) is 1.0: not a coordinate
        return None
    try:
        x, y, width, height = (float(v) for v in fields)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(v) for v in (x, y, width, height)) or width <= 0 or height <= 0:
        return None
    if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
        return None
    pixels = np.array([x * width / 100.0, y * height / 100.0])
    return pixels if bool(np.all(np.isfinite(pixels))) else None


def pair_pupils(points: Sequence[_Point]) -> tuple[list[PupilPair], int]:
    """Pupils grouped into faces: by parentID (one face per parent) when regions have one, else
    the closest left/right pairs first. Returns the pairs and how many points found no partner.
    """
    lefts = [p for p in points if p.label == "left_pupil"]
    rights = [p for p in points if p.label == "right_pupil"]
    pairs: list[PupilPair] = []
    by_parent = {p.parent for p in points}
    if None not in by_parent:
        for parent in by_parent:
            ls = [p for p in lefts if p.parent == parent]
            rs = [p for p in rights if p.parent == parent]
            if len(ls) == 1 and len(rs) == 1:
                pairs.append(PupilPair(ls[0].xy, rs[0].xy))
        return pairs, len(points) - 2 * len(pairs)
    candidates = sorted(
        ((float(np.linalg.norm(a.xy - b.xy)), i, j) for i, a in enumerate(lefts)
         for j, b in enumerate(rights)),
    )  # fmt: skip
    used_l: set[int] = set()
    used_r: set[int] = set()
    for _, i, j in candidates:
        if i in used_l or j in used_r:
            continue
        used_l.add(i)
        used_r.add(j)
        pairs.append(PupilPair(lefts[i].xy, rights[j].xy))
    return pairs, len(points) - 2 * len(pairs)
