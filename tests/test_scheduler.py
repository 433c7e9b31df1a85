"""When a project trains (backend/scheduler.py): the policy, one queue slot per project, lost
slots, an unreachable queue, and the background thread. A recording fake stands in for the
queue; the training lock is a real file lock held by the test."""

from __future__ import annotations

import threading
import time

import pytest

from backend.jobs import TRAIN, QueueUnavailable
from backend.label_store import LabelStore, label_store
from backend.project_dirs import training_lock
from backend.scheduler import LOST_AFTER_S, Scheduler
from backend.settings import Settings

PROJECT = 3


class FakeQueue:
    """Records what it is given; `waiting` is what it would report as still queued."""

    owner = "fake"

    def __init__(self) -> None:
        self.jobs: list[tuple[str, int, str]] = []
        self.waiting: set[str] = set()
        self.down = False
        self._lock = threading.Lock()

    def enqueue(self, kind: str, project: int, job_id: str) -> None:
        if self.down:
            raise QueueUnavailable("Redis refused the job: connection refused")
        with self._lock:
            self.jobs.append((kind, project, job_id))
            self.waiting.add(job_id)

    def is_waiting(self, job_id: str) -> bool:
        if self.down:
            raise QueueUnavailable("Redis cannot be asked")
        return job_id in self.waiting

    def depth(self) -> int:
        return len(self.waiting)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path) -> LabelStore:
    return LabelStore(tmp_path)


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scheduler(tmp_path, store, queue, clock):
    def make(train_every: int = 3) -> Scheduler:
        settings = Settings(model_dir=tmp_path, train_every=train_every)
        return Scheduler(settings, store=store, queue=queue, clock=clock)

    return make


def add_labels(store: LabelStore, count: int, first: int = 1) -> None:
    for annotation_id in range(first, first + count):
        annotation = {"id": annotation_id, "task": 42, "result": [], "was_cancelled": False}
        assert store.upsert(PROJECT, 42, annotation, {"image": "face.jpg"})


def due(scheduler: Scheduler, clock: Clock, store: LabelStore) -> str | None:
    return scheduler.due(store.project(PROJECT), clock())


def test_a_project_is_due_at_train_every_labels_not_before(scheduler, store, queue, clock):
    s = scheduler(train_every=3)
    add_labels(store, 2)
    assert due(s, clock, store) is None
    assert s.kick() == [] and queue.jobs == []
    add_labels(store, 1, first=3)
    assert due(s, clock, store) == "3 new labels (TRAIN_EVERY_N_LABELS=3)"
    [job] = s.kick()
    assert queue.jobs == [(TRAIN, PROJECT, job)]
    assert job.startswith(f"{TRAIN}-p{PROJECT}-fake-")
    assert store.project(PROJECT).queued_job == job


def test_labels_count_from_the_last_finished_run(scheduler, store, clock):
    s = scheduler(train_every=3)
    add_labels(store, 4)
    seen, started = store.start_run(PROJECT, "train-p3-fake-1")
    store.finish_run(PROJECT, seen, started, {"outcome": "promoted"})
    add_labels(store, 2, first=5)
    assert due(s, clock, store) is None
    add_labels(store, 1, first=7)
    assert due(s, clock, store) is not None


@pytest.mark.parametrize("train_every", [0, 3, 1000])
def test_start_training_is_due_whatever_the_count(scheduler, store, queue, train_every):
    s = scheduler(train_every=train_every)
    store.request_training(PROJECT, None)
    [job] = s.kick(PROJECT)
    assert queue.jobs == [(TRAIN, PROJECT, job)]


def test_train_every_zero_never_trains_on_labels_alone(scheduler, store, queue, clock):
    s = scheduler(train_every=0)
    add_labels(store, 50)
    assert due(s, clock, store) is None and s.kick() == [] and queue.jobs == []


@pytest.mark.parametrize("why", ["labels", "request"])
def test_a_failed_run_waits_for_its_retry_time(scheduler, store, queue, clock, why):
    s = scheduler(train_every=3)
    if why == "labels":
        add_labels(store, 3)
    else:
        store.request_training(PROJECT, None)
    store.fail_run(PROJECT, clock.now + 60.0, {"outcome": "failed"})
    assert s.kick() == []
    clock.now += 59.0
    assert s.kick() == [] and queue.jobs == []
    clock.now += 2.0
    assert len(s.kick()) == 1 and len(queue.jobs) == 1


def test_labels_a_running_run_took_do_not_count_again(tmp_path, scheduler, store, clock):
    s = scheduler(train_every=3)
    add_labels(store, 3)
    store.start_run(PROJECT, "train-p3-fake-1")  # took labels 1-3
    with training_lock(tmp_path, PROJECT, timeout_s=1):
        assert due(s, clock, store) is None
        add_labels(store, 2, first=4)
        assert due(s, clock, store) is None
        add_labels(store, 1, first=6)
        assert due(s, clock, store) == "3 new labels (TRAIN_EVERY_N_LABELS=3)"
    # Not running any more and never finished: everything since the last finished run counts.
    assert due(s, clock, store) == "6 new labels (TRAIN_EVERY_N_LABELS=3)"


def test_a_burst_of_events_makes_one_job_while_it_waits(scheduler, store, queue):
    s = scheduler(train_every=1)
    for i in range(1, 201):
        add_labels(store, 1, first=i)
        s.kick(PROJECT)
    assert len(queue.jobs) == 1
    [(_, _, job)] = queue.jobs
    assert store.project(PROJECT).queued_job == job

    store.start_run(PROJECT, job)  # the job starts: the slot is free again
    assert store.project(PROJECT).queued_job is None
    for i in range(201, 401):
        add_labels(store, 1, first=i)
        s.kick()
    assert len(queue.jobs) == 2
    assert queue.jobs[1][2] != job and store.project(PROJECT).queued_job == queue.jobs[1][2]


def test_an_unavailable_queue_loses_nothing(scheduler, store, queue):
    s = scheduler(train_every=3)
    queue.down = True
    add_labels(store, 3)
    assert s.kick() == [] and s.kick() == []
    state = store.project(PROJECT)
    assert state.queued_job is None and state.queued_at is None  # the slot was given back
    assert state.label_seq == 3 and len(store.annotations(PROJECT)) == 3
    queue.down = False
    [job] = s.kick()
    assert queue.jobs == [(TRAIN, PROJECT, job)]
    assert s.kick() == [] and len(queue.jobs) == 1


def test_a_lost_slot_is_replaced_but_not_a_waiting_one(tmp_path, scheduler, store, queue, clock):
    s = scheduler(train_every=1)
    add_labels(store, 1)
    [first] = s.kick()
    clock.now = time.time() + LOST_AFTER_S + 5.0
    assert s.kick() == []  # still waiting in its queue
    queue.waiting.clear()  # the queue forgot it (Redis flushed, process restarted)
    with training_lock(tmp_path, PROJECT, timeout_s=1):
        assert s.kick() == []  # a run is training: maybe the lost job's predecessor
    [second] = s.kick()
    assert second != first
    assert store.project(PROJECT).queued_job == second
    assert [job for _, _, job in queue.jobs] == [first, second]


def test_a_young_slot_is_kept_even_if_the_queue_forgot_it(scheduler, store, queue, clock):
    s = scheduler(train_every=1)
    add_labels(store, 1)
    [first] = s.kick()
    queue.waiting.clear()
    clock.now = time.time() + LOST_AFTER_S - 10.0
    assert s.kick() == [] and store.project(PROJECT).queued_job == first


def test_a_slot_is_kept_while_the_queue_cannot_be_asked(scheduler, store, queue, clock):
    s = scheduler(train_every=1)
    add_labels(store, 1)
    [first] = s.kick()
    clock.now = time.time() + LOST_AFTER_S + 5.0
    queue.down = True
    assert s.kick() == [] and store.project(PROJECT).queued_job == first


def test_kick_for_one_project_leaves_the_others(scheduler, store, queue):
    s = scheduler(train_every=1)
    add_labels(store, 1)
    store.request_training(8, None)
    assert s.kick(99) == []
    [job] = s.kick(8)
    assert queue.jobs == [(TRAIN, 8, job)]
    assert len(s.kick()) == 1 and [p for _, p, _ in queue.jobs] == [8, PROJECT]


def test_the_thread_starts_once_there_is_a_store_and_wakes_on_notify(tmp_path, queue):
    s = Scheduler(Settings(model_dir=tmp_path, train_every=1), queue=queue)
    assert not s.has_work()
    s.ensure_started()
    assert s._thread is None  # no label store yet: nothing to look at

    store = label_store(tmp_path)  # the first event creates the store file
    assert s.has_work()
    s.ensure_started()
    thread = s._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    s.ensure_started()
    assert s._thread is thread

    add_labels(store, 1)
    s.notify()
    deadline = time.monotonic() + 3.0  # well inside the 5 s of its own interval
    while not queue.jobs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(kind, project) for kind, project, _ in queue.jobs] == [(TRAIN, PROJECT)]
