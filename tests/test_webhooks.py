"""Label Studio's webhook events recorded in the label store (backend/webhooks.py).

Payloads follow docs label-studio-protocol.md §3.2: the annotation and task are all their
fields with integer foreign keys, the project is ProjectWebhookSerializer's object, and
START_TRAINING carries only the project.
"""

from __future__ import annotations

import copy

import pytest

from backend.annotations import SKIPPED, parse_annotation
from backend.label_store import LabelStore
from backend.webhooks import (
    ANNOTATION_CREATED,
    ANNOTATION_UPDATED,
    ANNOTATIONS_CREATED,
    ANNOTATIONS_DELETED,
    START_TRAINING,
    EventOutcome,
    WebhookError,
    record_event,
)

CONFIG = """<View>
  <KeyPointLabels name="keypoints" toName="image">
    <Label value="left_pupil"/><Label value="right_pupil"/>
  </KeyPointLabels>
  <Image name="image" value="$image"/>
  <Choices name="verdict" toName="image"><Choice value="correct"/><Choice value="wrong"/></Choices>
</View>"""
PROJECT = {
    "id": 3,
    "title": "Pupils",
    "label_config": CONFIG,
    "model_version": "pupil-0.1",
    "sampling": "Sequential sampling",
    "task_number": 500,
    "num_tasks_with_annotations": 12,
}
EARLY, LATE = "2025-05-01T10:00:00.000000Z", "2025-05-01T11:00:00.000000Z"


def task(task_id=42):
    return {
        "id": task_id,
        "data": {"image": f"/data/upload/3/2bd44c48-face_{task_id:03d}.jpg"},
        "meta": {},
        "project": 3,
        "is_labeled": True,
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": 1,
        "cancelled_annotations": 0,
        "total_predictions": 1,
        "file_upload": 4,
    }


def region(label, x, y, origin="manual"):
    return {
        "id": f"{label[0]}{x}",
        "from_name": "keypoints",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": 1280,
        "original_height": 960,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        "origin": origin,
    }


def annotation(annotation_id=17, task_id=42, x=60.0, updated=EARLY, **fields):
    return {
        "id": annotation_id,
        "task": task_id,
        "project": 3,
        "completed_by": 1,
        "updated_by": 1,
        "result": [region("left_pupil", x, 40.0), region("right_pupil", 40.0, 40.0)],
        "was_cancelled": False,
        "ground_truth": False,
        "lead_time": 12.4,
        "result_count": 2,
        "parent_prediction": 55,
        "parent_annotation": None,
        "created_at": EARLY,
        "updated_at": updated,
        "draft_created_at": None,
        "prediction": {},
        "unique_id": "7c1a",
        "import_id": None,
        "last_action": None,
        "last_created_by": None,
        "bulk_created": False,
        **fields,
    }


def event(action, **body):
    return {"action": action, **body}


@pytest.fixture
def store(tmp_path) -> LabelStore:
    return LabelStore(tmp_path)


def test_annotation_created_is_stored_with_its_task_data_and_config(store):
    sent = annotation()
    body = event(ANNOTATION_CREATED, annotation=sent, task=task(), project=PROJECT)
    outcome = record_event(store, ANNOTATION_CREATED, body)
    assert outcome.to_json() == {
        "status": "recorded",
        "event": ANNOTATION_CREATED,
        "project": 3,
        "stored": 1,
        "deleted": 0,
    }
    [stored] = store.annotations(3)
    assert (stored.id, stored.task, stored.project) == (17, 42, 3)
    assert stored.annotation == sent and stored.task_data == task()["data"]
    state = store.project(3)
    assert state.label_config == CONFIG and state.label_seq == 1 and state.requested is None


def test_the_same_event_twice_is_stored_once(store):
    body = event(ANNOTATION_CREATED, annotation=annotation(), task=task(), project=PROJECT)
    record_event(store, ANNOTATION_CREATED, body)
    again = record_event(store, ANNOTATION_CREATED, copy.deepcopy(body))
    assert again.status == "recorded" and again.stored == 0 and again.skipped == []
    assert store.project(3).label_seq == 1


def test_annotation_updated_replaces_the_annotation(store):
    created = event(ANNOTATION_CREATED, annotation=annotation(), task=task(), project=PROJECT)
    record_event(store, ANNOTATION_CREATED, created)
    moved = annotation(x=62.5, updated=LATE)
    updated = event(ANNOTATION_UPDATED, annotation=moved, task=task(), project=PROJECT)
    outcome = record_event(store, ANNOTATION_UPDATED, updated)
    assert outcome.stored == 1 and outcome.action == ANNOTATION_UPDATED
    [stored] = store.annotations(3)
    assert stored.annotation == moved
    assert stored.annotation["result"][0]["value"]["x"] == 62.5
    assert store.project(3).label_seq == 2


def test_a_late_created_event_does_not_undo_an_update(store):
    moved = annotation(x=62.5, updated=LATE)
    updated = event(ANNOTATION_UPDATED, annotation=moved, task=task(), project=PROJECT)
    record_event(store, ANNOTATION_UPDATED, updated)
    late = event(ANNOTATION_CREATED, annotation=annotation(), task=task(), project=PROJECT)
    assert record_event(store, ANNOTATION_CREATED, late).stored == 0
    assert store.annotations(3)[0].annotation == moved


@pytest.mark.parametrize(
    "task_field", [{"id": 42}, None], ids=["task-object", "no-task-uses-the-events-task"]
)
def test_the_task_id_may_be_an_object_or_come_from_the_event(store, task_field):
    sent = annotation()
    if task_field is None:
        del sent["task"]
    else:
        sent["task"] = task_field
    outcome = record_event(
        store,
        ANNOTATION_CREATED,
        event(ANNOTATION_CREATED, annotation=sent, task=task(), project=PROJECT),
    )
    assert outcome.stored == 1
    [stored] = store.annotations(3)
    assert stored.task == 42 and stored.task_data == task()["data"]


MALFORMED = {
    "string": "annotation 18",
    "null": None,
    "no-id": annotation(18) | {"id": None},
    "id-string": annotation(18) | {"id": "18"},
    "id-bool": annotation(18) | {"id": True},
    "id-negative": annotation(-18),
    "id-float": annotation(18) | {"id": 18.0},
    "no-task": {k: v for k, v in annotation(18).items() if k != "task"},
    "task-string": annotation(18, task_id="43"),
    "task-object-without-id": annotation(18) | {"task": {"data": {}}},
    "id-past-64-bits": annotation(2**63),
    "task-past-64-bits": annotation(18, task_id=2**63),
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_annotations_created_skips_a_malformed_item_and_keeps_the_rest(store, bad):
    body = event(
        ANNOTATIONS_CREATED,
        annotation=[annotation(17, 42), bad, annotation(19, 44)],
        task=[task(42), task(44), "junk"],
        project=PROJECT,
    )
    outcome = record_event(store, ANNOTATIONS_CREATED, body)
    assert outcome.status == "recorded" and outcome.stored == 2
    assert len(outcome.skipped) == 1 and outcome.to_json()["skipped"] == outcome.skipped
    assert store.annotation_ids(3) == {17, 19}
    data = {a.id: a.task_data for a in store.annotations(3)}
    assert data == {17: task(42)["data"], 19: task(44)["data"]}


def test_annotations_created_without_tasks_stores_the_annotations(store):
    body = event(ANNOTATIONS_CREATED, annotation=[annotation(17), annotation(18)], project=3)
    outcome = record_event(store, ANNOTATIONS_CREATED, body)
    assert outcome.stored == 2 and outcome.skipped == []
    assert [a.task_data for a in store.annotations(3)] == [{}, {}]


def test_annotations_deleted_tombstones_the_listed_ids(store):
    body = event(
        ANNOTATIONS_CREATED,
        annotation=[annotation(17), annotation(19, 44)],
        task=[task(42), task(44)],
        project=PROJECT,
    )
    record_event(store, ANNOTATIONS_CREATED, body)
    deleted = event(ANNOTATIONS_DELETED, annotations=[{"id": 17}], project=PROJECT)
    outcome = record_event(store, ANNOTATIONS_DELETED, deleted)
    assert outcome.to_json() == {
        "status": "recorded",
        "event": ANNOTATIONS_DELETED,
        "project": 3,
        "stored": 0,
        "deleted": 1,
    }
    assert store.annotation_ids(3) == {19}
    # A late copy of the deleted annotation stays deleted.
    late = event(ANNOTATION_UPDATED, annotation=annotation(17, updated=LATE), project=3)
    assert record_event(store, ANNOTATION_UPDATED, late).stored == 0
    assert store.annotation_ids(3) == {19}


def test_deletions_without_an_integer_id_are_reported(store):
    items = [{"id": 19}, {"id": "20"}, "21", {}]
    outcome = record_event(
        store, ANNOTATIONS_DELETED, event(ANNOTATIONS_DELETED, annotations=items, project=3)
    )
    assert outcome.deleted == 1
    assert outcome.skipped == ["3 deletions without an integer id"]
    assert store.project(3).label_seq == 1


def test_start_training_with_only_a_project_requests_training(store):
    outcome = record_event(store, START_TRAINING, event(START_TRAINING, project=PROJECT))
    assert outcome.training_requested
    assert outcome.to_json() == {
        "status": "recorded",
        "event": START_TRAINING,
        "project": 3,
        "stored": 0,
        "deleted": 0,
        "training": "requested",
    }
    state = store.project(3)
    assert state.requested is not None and state.label_config == CONFIG
    assert state.label_seq == 0 and store.annotations(3) == []


@pytest.mark.parametrize(
    "project", [3, {"id": 3}, {"id": 3, "label_config": "  "}], ids=["int", "object", "blank"]
)
def test_a_project_without_a_config_keeps_the_known_one(store, project):
    record_event(store, START_TRAINING, event(START_TRAINING, project=PROJECT))
    outcome = record_event(store, START_TRAINING, event(START_TRAINING, project=project))
    assert outcome.project == 3
    assert store.project(3).label_config == CONFIG


@pytest.mark.parametrize(
    "action", ["TASKS_CREATED", "PROJECT_UPDATED", "ANNOTATION_DELETED", "annotation_created", ""]
)
def test_other_actions_are_ignored_and_store_nothing(store, action):
    body = event(action, annotation=annotation(), task=task(), project=PROJECT, tasks=[task()])
    outcome = record_event(store, action, body)
    assert outcome.status == "ignored"
    assert outcome.to_json() == {"status": "ignored", "event": action}
    assert store.projects() == [] and store.annotations(3) == []


NO_PROJECT = {k: v for k, v in annotation().items() if k != "project"}
UNREADABLE = {
    "created-no-project": (
        ANNOTATION_CREATED,
        {"annotation": NO_PROJECT, "task": task()},
        "no project",
    ),
    "start-training-empty": (START_TRAINING, {}, "no project"),
    "project-without-id": (START_TRAINING, {"project": {"title": "Pupils"}}, "no project"),
    "project-id-string": (START_TRAINING, {"project": "3"}, "no project"),
    "project-id-bool": (START_TRAINING, {"project": True}, "no project"),
    "project-id-past-64-bits": (START_TRAINING, {"project": 2**63}, "project"),
    "created-list": (
        ANNOTATION_CREATED,
        {"annotation": [annotation()], "task": task(), "project": PROJECT},
        "an object",
    ),
    "updated-string": (ANNOTATION_UPDATED, {"annotation": "17", "project": 3}, "an object"),
    "created-missing": (ANNOTATION_CREATED, {"project": PROJECT}, "an object"),
    "deleted-no-list": (ANNOTATIONS_DELETED, {"project": 3}, "list"),
    "deleted-object": (ANNOTATIONS_DELETED, {"project": 3, "annotations": {"id": 17}}, "list"),
    "bulk-object": (ANNOTATIONS_CREATED, {"annotation": annotation(), "project": 3}, "a list"),
}


@pytest.mark.parametrize(("action", "body", "match"), UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_events_are_webhook_errors(store, action, body, match):
    with pytest.raises(WebhookError, match=match):
        record_event(store, action, event(action, **body))
    assert store.annotations(3) == []
    assert all(p.requested is None for p in store.projects())


def test_a_webhook_error_is_a_value_error():
    assert issubclass(WebhookError, ValueError)


@pytest.mark.parametrize(
    "body",
    [
        {"project": 3},
        {"project": {"id": 3, "title": "Pupils"}},
        {},
        {"project": {"title": "Pupils"}},
        {"project": None},
    ],
    ids=["int", "object", "absent", "object-without-id", "null"],
)
def test_the_project_is_an_id_an_object_or_the_annotations(store, body):
    single = event(ANNOTATION_CREATED, annotation=annotation(), task=task(), **body)
    assert record_event(store, ANNOTATION_CREATED, single).project == 3
    bulk = event(ANNOTATIONS_CREATED, annotation=[annotation(18)], task=[task()], **body)
    assert record_event(store, ANNOTATIONS_CREATED, bulk).project == 3
    assert store.annotation_ids(3) == {17, 18}


def test_an_events_project_wins_over_the_annotations(store):
    body = event(ANNOTATION_CREATED, annotation=annotation(), task=task(), project={"id": 5})
    assert record_event(store, ANNOTATION_CREATED, body).project == 5
    assert store.annotation_ids(5) == {17} and store.annotation_ids(3) == set()


def test_a_cancelled_annotation_is_kept_but_teaches_nothing(store):
    skipped = annotation(was_cancelled=True, result=[])
    body = event(ANNOTATION_CREATED, annotation=skipped, task=task(), project=PROJECT)
    assert record_event(store, ANNOTATION_CREATED, body).stored == 1
    [stored] = store.annotations(3)
    assert stored.annotation["was_cancelled"] is True
    label = parse_annotation(stored.annotation)
    assert label.kind == SKIPPED and not label.teaches
    assert store.project(3).label_seq == 1


def test_an_odd_region_field_does_not_fail_a_stored_event(store):
    """json.loads can give a list where Label Studio puts a string; the event is still kept
    and answered (the annotation is written before it is parsed for the log line)."""
    odd = annotation()
    odd["result"][0]["origin"] = ["manual"]
    body = event(ANNOTATION_CREATED, annotation=odd, task=task(), project=PROJECT)
    assert record_event(store, ANNOTATION_CREATED, body).stored == 1
    assert store.annotation_ids(3) == {17}


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (
            EventOutcome("X", "ignored", project=3),
            {"status": "ignored", "event": "X", "project": 3},
        ),
        (EventOutcome("X", "ignored", stored=2), {"status": "ignored", "event": "X"}),
        (
            EventOutcome("X", "recorded", project=1, stored=2, skipped=["why"]),
            {"status": "recorded", "event": "X", "project": 1, "stored": 2, "deleted": 0,
             "skipped": ["why"]},
        ),
        (
            EventOutcome("X", "recorded", deleted=4, training_requested=True),
            {"status": "recorded", "event": "X", "stored": 0, "deleted": 4,
             "training": "requested"},
        ),
    ],
)  # fmt: skip
def test_outcome_json_shapes(outcome, expected):
    assert outcome.to_json() == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [("original_width", 1e308), ("original_width", True), ("x", True), ("x", 10**400)],
    ids=["pixels-past-float", "bool-width", "bool-x", "huge-int-x"],
)
def test_a_keypoint_whose_pixels_are_not_finite_numbers_is_no_label(store, field, value):
    """Found by tests/test_api_fuzz.py: 60 % of a 1e308 px wide image is inf pixels, which
    became a training label; True counted as a 1 px width."""
    odd = annotation()
    for point in odd["result"]:
        (point["value"] if field == "x" else point)[field] = value
    label = parse_annotation(odd)
    assert label.kind != "points" and label.pairs == ()
    body = event(ANNOTATION_CREATED, annotation=odd, task=task(), project=PROJECT)
    assert record_event(store, ANNOTATION_CREATED, body).stored == 1  # kept, teaches nothing
