"""When a project trains: the policy, the one queue slot per project, and retries.

A project is due when START_TRAINING asked for it, or when TRAIN_EVERY_N_LABELS label changes
arrived since the labels the last (or the running) run took. Each project has one queue slot
in the label store: a due project whose slot is free gets one job; while that job waits, later
events add nothing (they are in the label store, and the job reads the store when it starts:
a burst of events becomes one run). A run in progress plus one waiting is the most a project
ever has, and the training lock (backend/project_dirs.py) lets only one of them train at once.
A START_TRAINING is answered by the first run that starts after it: while that run trains, the
request queues nothing more.

The scheduler is woken by every webhook and also looks every `interval_s` by itself, so work
left pending by a Redis outage, a failed run (retried with backoff) or a killed worker is
picked up without anyone sending another event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from backend.jobs import TRAIN, JobQueue, QueueUnavailable, job_queue, new_job_id
from backend.label_store import FILENAME, LabelStore, ProjectState, label_store
from backend.project_dirs import training_running
from backend.settings import Settings

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
# A queue slot whose job is neither waiting in its queue nor training after this long was lost
# (Redis flushed, process restarted) and is given to a new job.
LOST_AFTER_S = 60.0


class Scheduler:
    """Decides and enqueues training runs for the projects in `store`."""

    def __init__(
        self,
        settings: Settings,
        store: LabelStore | None = None,
        queue: JobQueue | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._store = store
        self._queue = queue
        self.clock = clock
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_pid: int | None = None
        self._start_lock = threading.Lock()

    @property
    def store(self) -> LabelStore:
        """The given store, else the process's store under MODEL_DIR (opened on first use)."""
        return self._store if self._store is not None else label_store(self.settings.model_dir)

    @property
    def queue(self) -> JobQueue:
        """The given queue, else this process's (made on first use, after any fork)."""
        return self._queue if self._queue is not None else job_queue(self.settings)

    def due(self, state: ProjectState, now: float) -> str | None:
        """Why `state`'s project should train now, or None."""
        if state.retry_at is not None and now < state.retry_at:
            return None
        running = state.running_seq is not None and training_running(
            self.settings.model_dir, state.id
        )
        if state.requested is not None and not (
            running and state.running_since is not None and state.running_since >= state.requested
        ):  # a run that started after the request answers it: no second run for it
            return "training requested (START_TRAINING)"
        every = self.settings.train_every
        if every <= 0:
            return None
        base = state.trained_seq
        if running:
            base = max(base, state.running_seq)
        new = state.label_seq - base
        return f"{new} new labels (TRAIN_EVERY_N_LABELS={every})" if new >= every else None

    def kick(self, project: int | None = None) -> list[str]:
        """Enqueue a run for every due project (or just `project`); returns the job ids."""
        now = self.clock()
        states = self.store.projects() if project is None else [self.store.project(project)]
        started = []
        for state in states:
            if state is None:
                continue
            why = self.due(state, now)
            if why is None or not self._slot_free(state, now):
                continue
            job_id = new_job_id(TRAIN, state.id, self.queue_owner)
            if not self.store.claim_queue(state.id, job_id, state.queued_job):
                continue  # another process claimed it first
            try:
                self.queue.enqueue(TRAIN, state.id, job_id)
            except QueueUnavailable as e:
                self.store.unmark_queued(state.id, job_id)
                log.warning(
                    "project=%s outcome=deferred reason=queue unavailable detail=%s "
                    "(labels are kept; retrying every %.0f s)", state.id, e, INTERVAL_S,
                )  # fmt: skip
                continue
            log.info("project=%s job=%s outcome=enqueued reason=%s", state.id, job_id, why)
            started.append(job_id)
        return started

    @property
    def queue_owner(self) -> str:
        return getattr(self.queue, "owner", "q")

    def _slot_free(self, state: ProjectState, now: float) -> bool:
        """True when the project has no job waiting (or the one it had was lost)."""
        if state.queued_job is None:
            return True
        if state.queued_at is not None and now - state.queued_at < LOST_AFTER_S:
            return False
        try:
            if self.queue.is_waiting(state.queued_job):
                return False
        except QueueUnavailable:
            return False
        if training_running(self.settings.model_dir, state.id):
            return False  # it may be the waiting job's predecessor; wait for it
        log.warning("project=%s job=%s lost (not queued, not running): replaced",
                    state.id, state.queued_job)  # fmt: skip
        return True

    # -- background ---------------------------------------------------------------------------

    def notify(self) -> None:
        """Something changed: look now (in the background thread)."""
        self._wake.set()

    def has_work(self) -> bool:
        """Whether there is a label store to look at (none until the first event arrives)."""
        return self._store is not None or (self.settings.model_dir / FILENAME).exists()

    def ensure_started(self) -> None:
        """Start the background thread in this process if there is work and it is not running
        (cheap: called on every request)."""
        thread = self._thread
        if thread is not None and self._thread_pid == os.getpid() and thread.is_alive():
            return
        if self.has_work():
            self.start()

    def start(self, interval_s: float = INTERVAL_S) -> None:
        """Run `kick()` every `interval_s` and whenever notified, in a daemon thread: once per
        process (a forked worker starts its own; threads do not survive a fork)."""
        with self._start_lock:
            alive = self._thread is not None and self._thread.is_alive()
            if alive and self._thread_pid == os.getpid():
                return
            self._wake = threading.Event()
            self._thread = threading.Thread(
                target=self._loop, args=(interval_s,), name="pupil-scheduler", daemon=True
            )
            self._thread_pid = os.getpid()
            self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while True:
            self._wake.wait(interval_s)
            self._wake.clear()
            try:
                self.kick()
            except Exception:
                log.exception("scheduler pass failed; trying again in %.0f s", interval_s)
