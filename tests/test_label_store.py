"""The label store (backend/label_store.py): annotations by id, tombstones, the training state
of each project, the queue slot, and writes from many threads and processes at once."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from backend.label_store import FILENAME, LabelStore, StoredAnnotation, label_store

PROJECT = 3
TASK_DATA = {"image": "/data/upload/3/2bd44c48-face_001.jpg"}
CONFIG = "<View><Image name='image' value='$image'/></View>"
EARLY, LATE = "2025-05-01T10:00:00.000000Z", "2025-05-01T11:00:00.000000Z"


def annotation(annotation_id=17, x=41.2, updated=EARLY, task=42, **extra):
    return {
        "id": annotation_id,
        "task": task,
        "project": PROJECT,
        "completed_by": 1,
        "result": [
            {
                "id": "a1",
                "from_name": "keypoints",
                "to_name": "image",
                "type": "keypointlabels",
                "original_width": 1280,
                "original_height": 960,
                "image_rotation": 0,
                "value": {"x": x, "y": 37.9, "width": 0.5, "keypointlabels": ["left_pupil"]},
                "origin": "manual",
            }
        ],
        "was_cancelled": False,
        "parent_prediction": 55,
        "created_at": EARLY,
        "updated_at": updated,
        **extra,
    }


@pytest.fixture
def store(tmp_path) -> LabelStore:
    return LabelStore(tmp_path)


def test_an_upserted_annotation_is_listed_with_its_task_data(store):
    sent = annotation()
    assert store.upsert(PROJECT, 42, sent, TASK_DATA, CONFIG) is True
    assert store.annotations(PROJECT) == [StoredAnnotation(17, PROJECT, 42, TASK_DATA, sent)]
    assert store.annotation_ids(PROJECT) == {17}
    assert store.annotations(PROJECT + 1) == [] and store.annotation_ids(PROJECT + 1) == set()
    state = store.project(PROJECT)
    assert state.label_seq == 1 and state.new_labels == 1 and state.label_config == CONFIG
    assert state.last_event is not None and state.trained_seq == 0
    assert [p.id for p in store.projects()] == [PROJECT]
    assert store.project(PROJECT + 1) is None


def test_annotations_are_listed_by_id(store):
    for annotation_id in (30, 10, 20):
        store.upsert(PROJECT, annotation_id, annotation(annotation_id), None)
    assert [a.id for a in store.annotations(PROJECT)] == [10, 20, 30]
    assert all(a.task_data == {} for a in store.annotations(PROJECT))


def test_a_copy_differing_only_in_extra_fields_is_no_new_label(store):
    store.upsert(PROJECT, 42, annotation(), TASK_DATA)
    copy = annotation(updated=LATE, created_username="ann@example.com", lead_time=99.0)
    assert store.upsert(PROJECT, 42, copy, TASK_DATA) is False
    assert store.project(PROJECT).label_seq == 1


def test_a_copy_with_task_data_fills_in_missing_task_data_without_a_new_label(store):
    store.upsert(PROJECT, 42, annotation(), None)
    assert store.upsert(PROJECT, 42, annotation(), TASK_DATA) is False
    assert store.annotations(PROJECT)[0].task_data == TASK_DATA
    assert store.project(PROJECT).label_seq == 1


def test_a_changed_result_replaces_the_annotation_and_keeps_its_task_data(store):
    store.upsert(PROJECT, 42, annotation(), TASK_DATA)
    moved = annotation(x=45.0, updated=LATE)
    assert store.upsert(PROJECT, 42, moved, None) is True
    [stored] = store.annotations(PROJECT)
    assert stored.annotation == moved and stored.task_data == TASK_DATA
    assert store.project(PROJECT).label_seq == 2


@pytest.mark.parametrize("field", ["was_cancelled", "parent_prediction", "task"])
def test_a_change_in_any_content_field_is_a_new_label(store, field):
    store.upsert(PROJECT, 42, annotation(), None)
    changed = {**annotation(updated=LATE), field: 7}
    assert store.upsert(PROJECT, 42, changed, None) is True
    assert store.project(PROJECT).label_seq == 2


def test_an_older_copy_does_not_replace_a_newer_one(store):
    newer = annotation(x=45.0, updated=LATE)
    store.upsert(PROJECT, 42, newer, None)
    assert store.upsert(PROJECT, 42, annotation(x=41.2, updated=EARLY), None) is False
    assert store.annotations(PROJECT)[0].annotation == newer
    assert store.project(PROJECT).label_seq == 1


def test_a_deleted_annotation_leaves_a_tombstone(store):
    store.upsert(PROJECT, 42, annotation(), TASK_DATA)
    assert store.delete(PROJECT, [17]) == 1
    assert store.annotations(PROJECT) == [] and store.annotation_ids(PROJECT) == set()
    assert store.project(PROJECT).label_seq == 2
    # A late update of the deleted annotation does not bring it back.
    assert store.upsert(PROJECT, 42, annotation(x=50.0, updated=LATE), TASK_DATA) is False
    assert store.annotations(PROJECT) == []
    # Deleting it again changes nothing.
    assert store.delete(PROJECT, [17]) == 0
    assert store.project(PROJECT).label_seq == 2


def test_reconciliation_revives_a_tombstoned_id_that_label_studio_lists(store):
    # Label Studio's database was reset and gave the id to a new annotation.
    store.upsert(PROJECT, 42, annotation(), TASK_DATA)
    store.delete(PROJECT, [17])
    assert store.upsert(PROJECT, 43, annotation(x=60.0, task=43), TASK_DATA) is False
    assert store.upsert(PROJECT, 43, annotation(x=60.0, task=43), TASK_DATA, revive=True)
    (kept,) = store.annotations(PROJECT)
    assert kept.task == 43 and kept.annotation["result"][0]["value"]["x"] == 60.0
    assert store.project(PROJECT).label_seq == 3


def test_deleting_an_unknown_annotation_counts_and_blocks_its_late_creation(store):
    assert store.delete(PROJECT, [99, 100]) == 2
    assert store.project(PROJECT).label_seq == 1  # one change per delete call
    assert store.upsert(PROJECT, 42, annotation(99), TASK_DATA) is False
    assert store.annotations(PROJECT) == []


def test_deleting_nothing_changes_nothing(store):
    assert store.delete(PROJECT, []) == 0
    assert store.project(PROJECT) is None


def test_runs_count_the_labels_they_took(store):
    for annotation_id in range(1, 4):
        store.upsert(PROJECT, 42, annotation(annotation_id), None)
    seen, started = store.start_run(PROJECT, "train-p3-q-1")
    assert seen == 3
    assert store.project(PROJECT).running_seq == 3
    assert store.project(PROJECT).running_since == started
    for annotation_id in range(4, 6):  # arrive while the run trains
        store.upsert(PROJECT, 42, annotation(annotation_id), None)
    store.finish_run(PROJECT, seen, started, {"outcome": "promoted", "labels": 3})
    state = store.project(PROJECT)
    assert (state.label_seq, state.trained_seq, state.new_labels) == (5, 3, 2)
    assert state.last_run == {"outcome": "promoted", "labels": 3}
    # A slower, older run finishing later does not move trained_seq back.
    store.finish_run(PROJECT, 1, started, {"outcome": "too few labels"})
    assert store.project(PROJECT).trained_seq == 3


def test_a_run_for_a_project_never_seen_starts_from_zero(store):
    seen, _ = store.start_run(7, "train-p7-q-1")
    assert seen == 0
    state = store.project(7)
    assert state.running_seq == 0 and state.label_seq == 0


@pytest.mark.parametrize(
    ("run_start_after_request_s", "cleared"), [(1.0, True), (0.0, True), (-1.0, False)]
)
def test_finish_run_clears_a_request_only_if_the_run_started_after_it(
    store, run_start_after_request_s, cleared
):
    store.request_training(PROJECT, CONFIG)
    requested = store.project(PROJECT).requested
    assert requested is not None and store.project(PROJECT).label_config == CONFIG
    started = requested + run_start_after_request_s
    store.finish_run(PROJECT, 0, started, {"outcome": "too few labels"})
    assert store.project(PROJECT).requested == (None if cleared else requested)


def test_a_real_run_after_a_request_clears_it(store):
    store.request_training(PROJECT, None)
    seen, started = store.start_run(PROJECT, "train-p3-q-1")
    store.finish_run(PROJECT, seen, started, {})
    assert store.project(PROJECT).requested is None


def test_a_second_request_keeps_the_first_time(store):
    store.request_training(PROJECT, CONFIG)
    first = store.project(PROJECT).requested
    store.request_training(PROJECT, None)
    state = store.project(PROJECT)
    assert state.requested == first and state.label_config == CONFIG


def test_failed_runs_back_off_and_a_finished_run_resets(store):
    store.upsert(PROJECT, 42, annotation(), None)
    store.fail_run(PROJECT, 1000.0, {"outcome": "failed", "error": "out of memory"})
    store.fail_run(PROJECT, 2000.0, {"outcome": "failed", "error": "disk full"})
    state = store.project(PROJECT)
    assert state.failures == 2 and state.retry_at == 2000.0
    assert state.last_run == {"outcome": "failed", "error": "disk full"}
    assert state.trained_seq == 0 and state.new_labels == 1  # the labels stay pending
    seen, started = store.start_run(PROJECT, "train-p3-q-1")
    store.finish_run(PROJECT, seen, started, {"outcome": "promoted"})
    state = store.project(PROJECT)
    assert state.failures == 0 and state.retry_at is None and state.new_labels == 0


def test_a_training_request_lifts_the_retry_wait(store):
    store.upsert(PROJECT, 42, annotation(), None)
    store.fail_run(PROJECT, 1000.0, {})
    store.request_training(PROJECT, None)
    state = store.project(PROJECT)
    assert state.retry_at is None and state.failures == 1 and state.requested is not None


def test_the_queue_slot_is_compare_and_swap(store):
    assert store.claim_queue(PROJECT, "a", None) is False  # no such project yet
    store.note_project(PROJECT, None)
    assert store.claim_queue(PROJECT, "a", None) is True
    claimed_at = store.project(PROJECT).queued_at
    assert store.project(PROJECT).queued_job == "a" and claimed_at is not None
    assert store.claim_queue(PROJECT, "b", None) is False  # someone holds it
    assert store.claim_queue(PROJECT, "b", "x") is False  # not held by "x"
    assert store.project(PROJECT).queued_job == "a"
    assert store.claim_queue(PROJECT, "b", "a") is True  # replacing the holder
    assert store.project(PROJECT).queued_job == "b"
    store.unmark_queued(PROJECT, "a")  # "a" no longer holds it: no effect
    assert store.project(PROJECT).queued_job == "b"
    store.unmark_queued(PROJECT, "b")
    state = store.project(PROJECT)
    assert state.queued_job is None and state.queued_at is None
    assert store.claim_queue(PROJECT, "c", None) is True


def test_only_a_concurrent_claim_wins(store):
    store.note_project(PROJECT, None)
    barrier = threading.Barrier(8)
    wins = []

    def claim(i):
        barrier.wait()
        if store.claim_queue(PROJECT, f"job-{i}", None):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1
    assert store.project(PROJECT).queued_job == f"job-{wins[0]}"


def test_start_run_frees_only_its_own_slot(store):
    store.note_project(PROJECT, None)
    store.claim_queue(PROJECT, "waiting", None)
    store.start_run(PROJECT, "another")
    assert store.project(PROJECT).queued_job == "waiting"
    store.start_run(PROJECT, "waiting")
    assert store.project(PROJECT).queued_job is None


def test_note_project_keeps_a_known_label_config(store):
    store.note_project(PROJECT, CONFIG)
    store.note_project(PROJECT, None)
    assert store.project(PROJECT).label_config == CONFIG
    store.upsert(PROJECT, 42, annotation(), None, label_config=None)
    assert store.project(PROJECT).label_config == CONFIG
    store.note_project(PROJECT, "<View/>")
    assert store.project(PROJECT).label_config == "<View/>"


def test_everything_survives_a_new_store_on_the_same_directory(tmp_path):
    first = LabelStore(tmp_path)
    first.upsert(PROJECT, 42, annotation(17), TASK_DATA, CONFIG)
    first.upsert(PROJECT, 43, annotation(18, task=43), None)
    first.delete(PROJECT, [18])
    first.request_training(PROJECT, None)
    first.claim_queue(PROJECT, "train-p3-q-1", None)
    first.fail_run(PROJECT, 1234.0, {"outcome": "failed"})
    assert (tmp_path / FILENAME).exists()

    second = LabelStore(tmp_path)
    assert second.annotations(PROJECT) == first.annotations(PROJECT)
    assert [a.id for a in second.annotations(PROJECT)] == [17]
    assert second.project(PROJECT) == first.project(PROJECT)
    state = second.project(PROJECT)
    assert (state.label_seq, state.queued_job, state.failures) == (3, "train-p3-q-1", 1)
    assert state.label_config == CONFIG and state.requested is not None
    assert second.upsert(PROJECT, 43, annotation(18, task=43, updated=LATE), None) is False


def test_one_store_per_directory_in_a_process(tmp_path):
    assert label_store(tmp_path) is label_store(tmp_path / "sub" / "..")
    assert label_store(tmp_path) is not label_store(tmp_path / "other")


def test_concurrent_upserts_from_threads_all_land(store):
    threads_n, each = 8, 50
    barrier = threading.Barrier(threads_n)
    errors = []

    def write(thread):
        barrier.wait()
        try:
            for i in range(each):
                annotation_id = thread * 1000 + i
                store.upsert(PROJECT, annotation_id, annotation(annotation_id), TASK_DATA)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert store.project(PROJECT).label_seq == threads_n * each
    assert len(store.annotations(PROJECT)) == threads_n * each


def upsert_many(model_dir: str, first_id: int, count: int) -> None:
    """Runs in a spawned process: its own LabelStore on the shared file."""
    store = LabelStore(Path(model_dir))
    for annotation_id in range(first_id, first_id + count):
        store.upsert(PROJECT, annotation_id, annotation(annotation_id), TASK_DATA)


def test_concurrent_upserts_from_processes_all_land(store, tmp_path):
    context = multiprocessing.get_context("spawn")
    each = 100
    processes = [
        context.Process(target=upsert_many, args=(str(tmp_path), first, each))
        for first in (1000, 2000)
    ]
    for p in processes:
        p.start()
    upsert_many(str(tmp_path), 3000, each)  # and this process at the same time
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert store.project(PROJECT).label_seq == 3 * each
    assert len(store.annotation_ids(PROJECT)) == 3 * each
