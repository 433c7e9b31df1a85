"""A project's training data: people's labels, accepted predictions, and the detector's labels.

Following coarse-to-fine.md: every task with a teaching annotation (backend/annotations.py)
gives its faces with people's pupils as the truth; tasks nobody labelled give their faces with
the coarse detector's pupils as the truth, weighted lower (TRAIN_COARSE_WEIGHT). Validation uses
people's labels only, so the score that decides a promotion is never the detector grading
itself.

Faces are found by the coarse pipeline, as when predicting, and a labelled pair of pupils
belongs to the face whose box holds their midpoint. One image that cannot be read, or whose
labelled face is not found, skips that task (logged, counted) and never the run.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from backend.annotations import ACCEPTED, AnnotationLabel, PupilPair, parse_annotation
from backend.coarse.detector import CoarseDetector
from backend.evaluation import TruthRow
from backend.image_source import ImageSource, ImageSourceError
from backend.images import ImageError, load_image
from backend.label_store import StoredAnnotation
from backend.regressor.dataset import FaceSamples, face_fields, face_sample, stack_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledTask:
    """A task people labelled: where its image is and its faces' pupils (image pixels)."""

    task: int
    image: object  # the reference in the task's data (a URL or path Label Studio gave)
    pairs: tuple[PupilPair, ...]
    annotation: int


@dataclass
class TrainingSet:
    """Faces to learn from: `human` (people's labels) and `coarse` (the detector's)."""

    human: FaceSamples
    coarse: FaceSamples
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> tasks


def labelled_tasks(
    stored: Sequence[StoredAnnotation],
    data_key: str,
    prediction: Callable[[int], Sequence[PupilPair]] | None,
) -> tuple[list[LabelledTask], dict[str, int]]:
    """One LabelledTask per task, from its latest teaching annotation.

    `prediction(id)` gives the pupils of a prediction an ACCEPTED verdict refers to (None: no
    Label Studio to ask, such verdicts are counted as skipped). Returns the tasks and counts of
    annotations by what they were ("points", "rejected", ...).
    """
    counts: Counter[str] = Counter()
    latest: dict[int, tuple[tuple, StoredAnnotation, AnnotationLabel]] = {}
    for item in stored:
        label = parse_annotation(item.annotation)
        counts[label.kind] += 1
        if not label.teaches:
            continue
        order = (str(item.annotation.get("updated_at") or ""), item.id)
        if item.task not in latest or order > latest[item.task][0]:
            latest[item.task] = (order, item, label)
    tasks = []
    for task_id, (_, item, label) in sorted(latest.items()):
        pairs = label.pairs
        if label.kind == ACCEPTED:
            pairs = _accepted_pairs(label, prediction)
            if pairs is None:
                counts["accepted, prediction unavailable"] += 1
                pairs = ()
        image = item.task_data.get(data_key) if isinstance(item.task_data, Mapping) else None
        if image is None:
            counts["no image in task data"] += 1
            continue
        if pairs:
            tasks.append(LabelledTask(task_id, image, tuple(pairs), item.id))
    return tasks, dict(counts)


def _accepted_pairs(
    label: AnnotationLabel, prediction: Callable[[int], Sequence[PupilPair]] | None
) -> Sequence[PupilPair] | None:
    """The accepted prediction's pupils; None when it cannot be had."""
    if prediction is None or label.parent_prediction is None:
        return None
    try:
        return prediction(label.parent_prediction)
    except Exception as e:  # Label Studio unreachable, prediction deleted, ...
        log.warning("prediction=%s unavailable for an accepted verdict: %s",
                    label.parent_prediction, e)  # fmt: skip
        return None


def build_training_set(
    labelled: Sequence[LabelledTask],
    unlabelled: Iterable[tuple[int, object]],
    source: ImageSource,
    detector: CoarseDetector,
    progress: bool = True,
) -> TrainingSet:
    """Faces of the labelled tasks (people's truth) and of `unlabelled` (task id, image
    reference) pairs (the detector's truth)."""
    skipped: dict[str, int] = {}
    human: list[dict] = []
    coarse: list[dict] = []
    bar = tqdm(labelled, desc="labelled tasks", unit="task", file=sys.stderr, disable=not progress)
    for item in bar:
        grey = _grey(source, item.task, item.image, skipped)
        if grey is None:
            continue
        for i, pair in enumerate(item.pairs):
            row = TruthRow(f"task-{item.task}", pair.right_pupil, pair.left_pupil)
            if float(np.linalg.norm(row.left - row.right)) < 2.0:
                _skip(skipped, item.task, "pupils coincide")
                continue
            found = face_sample(detector, grey, row)
            if found is None:
                _skip(skipped, item.task, f"no detected face holds labelled face {i + 1}")
                continue
            human.append(found)
    unlabelled = list(unlabelled)
    bar = tqdm(
        unlabelled, desc="unlabelled tasks", unit="task", file=sys.stderr, disable=not progress
    )
    for task, image in bar:
        grey = _grey(source, task, image, skipped)
        if grey is None:
            continue
        for face in detector.faces.detect(grey):
            keypoints, _ = detector.keypoints_for(grey, face)
            row = TruthRow(f"task-{task}", keypoints.image_left_pupil, keypoints.image_right_pupil)
            if float(np.linalg.norm(row.left - row.right)) >= 2.0:
                coarse.append(face_fields(grey, face, keypoints, row))
    return TrainingSet(stack_samples(human), stack_samples(coarse), skipped)


def _grey(source: ImageSource, task: int, image: object, skipped: dict[str, int]):
    try:
        return load_image(source.fetch(image, task), source.limits).grey
    except (ImageSourceError, ImageError) as e:
        _skip(skipped, task, f"image unreadable: {e}")
        return None


def _skip(skipped: dict[str, int], task: int, why: str) -> None:
    log.info("task=%s outcome=skipped-for-training reason=%s", task, why)
    key = why.split(":")[0]
    skipped[key] = skipped.get(key, 0) + 1
