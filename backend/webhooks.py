"""Label Studio's webhook events, recorded in the label store before they are answered.

Handled (protocol doc §3.2): ANNOTATION_CREATED / ANNOTATION_UPDATED (one annotation),
ANNOTATIONS_CREATED (lists), ANNOTATIONS_DELETED (plural: what Label Studio sends), and
START_TRAINING (only `project`). Every other action is answered as ignored. Nothing here trains:
`record_event` only writes, so the answer goes back well inside Label Studio's one second, and
the scheduler (backend/scheduler.py) decides later whether the project should train.

A malformed event is a WebhookError (400) naming what is wrong; within a list, a malformed
annotation is skipped with a log line and the rest is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from backend.annotations import parse_annotation
from backend.label_store import LabelStore

log = logging.getLogger(__name__)

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
START_TRAINING = "START_TRAINING"
HANDLED = (
    ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED, ANNOTATIONS_DELETED,
    START_TRAINING,
)  # fmt: skip


class WebhookError(ValueError):
    """The event cannot be read; the message says what is missing."""


@dataclass
class EventOutcome:
    """What recording one event did."""

    action: str
    status: str  # "recorded", "ignored"
    project: int | None = None
    stored: int = 0  # annotations added or changed
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)  # why annotations were left out
    training_requested: bool = False

    def to_json(self) -> dict:
        out = {"status": self.status, "event": self.action}
        if self.project is not None:
            out["project"] = self.project
        if self.status == "recorded":
            out.update(stored=self.stored, deleted=self.deleted)
            if self.skipped:
                out["skipped"] = self.skipped
            if self.training_requested:
                out["training"] = "requested"
        return out


def record_event(store: LabelStore, action: str, body: Mapping) -> EventOutcome:
    """Write what the event says into `store`; raises WebhookError for an unreadable event."""
    if action not in HANDLED:
        return EventOutcome(action, "ignored")
    project, label_config = _project(body)
    outcome = EventOutcome(action, "recorded", project=project)
    if action == START_TRAINING:
        store.request_training(project, label_config)
        outcome.training_requested = True
    elif action == ANNOTATIONS_DELETED:
        items = body.get("annotations")
        if not isinstance(items, list):
            raise WebhookError("ANNOTATIONS_DELETED needs 'annotations': a list of {'id': ...}")
        ids = [i["id"] for i in items if isinstance(i, Mapping) and _is_id(i.get("id"))]
        if len(ids) != len(items):
            outcome.skipped.append(f"{len(items) - len(ids)} deletions without an integer id")
        outcome.deleted = store.delete(project, ids)
    else:
        annotations, tasks = body.get("annotation"), body.get("task")
        if action == ANNOTATIONS_CREATED:
            if not isinstance(annotations, list):
                raise WebhookError(f"{action} needs 'annotation': a list of annotations")
            tasks_by_id = {
                t["id"]: t for t in tasks or [] if isinstance(t, Mapping) and _is_id(t.get("id"))
            } if isinstance(tasks, list) else {}  # fmt: skip
        else:
            if not isinstance(annotations, Mapping):
                raise WebhookError(f"{action} needs 'annotation': an object")
            annotations = [annotations]
            tasks_by_id = {}
            if isinstance(tasks, Mapping) and _is_id(tasks.get("id")):
                tasks_by_id[tasks["id"]] = tasks
        store.note_project(project, label_config)
        for annotation in annotations:
            why = _store_one(store, project, annotation, tasks_by_id, label_config)
            if why is None:
                outcome.stored += 1
            elif why:
                outcome.skipped.append(why)
    log.info(
        "webhook event=%s project=%s outcome=%s stored=%d deleted=%d skipped=%d",
        action, project, outcome.status, outcome.stored, outcome.deleted, len(outcome.skipped),
    )  # fmt: skip
    for why in outcome.skipped:
        log.warning("webhook event=%s project=%s skipped: %s", action, project, why)
    return outcome


def _store_one(
    store: LabelStore,
    project: int,
    annotation: object,
    tasks_by_id: Mapping[int, Mapping],
    label_config: str | None,
) -> str | None:
    """None when stored, "" when unchanged, else why the annotation was left out."""
    if not isinstance(annotation, Mapping) or not _is_id(annotation.get("id")):
        return "an annotation without an integer 'id'"
    task_id = annotation.get("task")
    if isinstance(task_id, Mapping):
        task_id = task_id.get("id")
    if task_id is None and len(tasks_by_id) == 1:  # the event's one task
        task_id = next(iter(tasks_by_id))
    if not _is_id(task_id):
        return f"annotation {annotation['id']} has no integer 'task'"
    task = tasks_by_id.get(task_id)
    data = task.get("data") if isinstance(task, Mapping) else None
    changed = store.upsert(
        project, task_id, annotation, data if isinstance(data, Mapping) else None, label_config
    )
    if changed:
        label = parse_annotation(annotation)
        log.info(
            "annotation=%s task=%s project=%s label=%s faces=%d",
            annotation["id"], task_id, project, label.kind, len(label.pairs),
        )  # fmt: skip
    return None if changed else ""


def _project(body: Mapping) -> tuple[int, str | None]:
    """The project id and label config, from `project` (an object or an id) or the annotation."""
    project = body.get("project")
    config = None
    if isinstance(project, Mapping):
        config = project.get("label_config")
        project = project.get("id")
    if not _is_id(project):
        annotation = body.get("annotation")
        if isinstance(annotation, list) and annotation:
            annotation = annotation[0]
        if isinstance(annotation, Mapping):
            project = annotation.get("project")
    if not _is_id(project):
        raise WebhookError("the event names no project ('project' with an integer 'id')")
    return int(project), config if isinstance(config, str) and config.strip() else None


def _is_id(value: object) -> bool:
    """A Label Studio id: a non-negative integer SQLite can hold."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
