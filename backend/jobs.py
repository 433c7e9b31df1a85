"""Background jobs and the two queues that run them: RQ on Redis, or a thread in this process.

A job is `run_job(kind, project)`: "train" (backend/retrain.py) or "predict" (re-predict a
project after a promotion). The job code never knows which queue ran it: with REDIS_URL set,
jobs go to the RQ queue `pupil-backend` and an `rq` worker process (`python -m backend.worker`)
runs them, reading its settings from its own environment; without it, a daemon thread of the
server process runs them with the server's settings (the embedded default of `make run`).

Both queues answer the same three questions: enqueue this, is that job still waiting, how many
are waiting. A queue that cannot be reached raises QueueUnavailable; callers keep the work
pending (in the label store) and try again later, so nothing is lost when Redis is down.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import threading
from collections.abc import Callable
from typing import Protocol

from backend.settings import Settings

log = logging.getLogger(__name__)

QUEUE_NAME = "pupil-backend"
TRAIN = "train"
PREDICT = "predict"
_REDIS_TIMEOUT_S = 2.0  # a Redis that does not answer must not hold up a webhook thread


class QueueUnavailable(RuntimeError):
    """The queue cannot take or report jobs now (Redis down); the message says why."""


class JobQueue(Protocol):
    def enqueue(self, kind: str, project: int, job_id: str) -> None: ...
    def is_waiting(self, job_id: str) -> bool: ...
    def depth(self) -> int: ...


def new_job_id(kind: str, project: int, owner: str) -> str:
    """Unique, and says what it is: "train-p3-rq-1a2b3c4d"."""
    return f"{kind}-p{project}-{owner}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------------------------------------
# The job


def run_job(kind: str, project: int, job_id: str, settings: Settings | None = None) -> dict:
    """Run one job. RQ calls it with (kind, project, job_id) and the worker's settings are read
    from its environment; the in-process queue passes the server's settings."""
    settings = settings or worker_settings()
    if kind == TRAIN:
        from backend.retrain import train_project

        return train_project(settings, project, job_id)
    if kind == PREDICT:
        from backend.repredict import repredict_project

        return repredict_project(settings, project)
    raise ValueError(f"unknown job kind {kind!r}")


@functools.cache
def worker_settings() -> Settings:
    """A job worker's settings, read once from its environment (the worker's edge)."""
    return Settings.from_env()


# ---------------------------------------------------------------------------------------------
# RQ


class RedisQueue:
    """Jobs on the RQ queue `pupil-backend` at `redis_url`."""

    owner = "rq"

    def __init__(self, redis_url: str, job_timeout_s: int) -> None:
        from redis import Redis
        from rq import Queue

        self.connection = Redis.from_url(
            redis_url, socket_connect_timeout=_REDIS_TIMEOUT_S, socket_timeout=_REDIS_TIMEOUT_S
        )
        self.queue = Queue(QUEUE_NAME, connection=self.connection)
        self.job_timeout_s = job_timeout_s

    def enqueue(self, kind: str, project: int, job_id: str) -> None:
        from redis.exceptions import RedisError

        try:
            self.queue.enqueue_call(
                run_job, args=(kind, project, job_id), job_id=job_id, timeout=self.job_timeout_s,
                result_ttl=7 * 24 * 3600, failure_ttl=30 * 24 * 3600,
                description=f"{kind} project {project}",
            )  # fmt: skip
        except RedisError as e:
            raise QueueUnavailable(f"Redis refused the job: {e}") from None

    def is_waiting(self, job_id: str) -> bool:
        from redis.exceptions import RedisError
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        try:
            status = Job.fetch(job_id, connection=self.connection).get_status()
        except NoSuchJobError:
            return False
        except RedisError as e:
            raise QueueUnavailable(f"Redis cannot be asked about job {job_id}: {e}") from None
        return status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)

    def depth(self) -> int:
        from redis.exceptions import RedisError

        try:
            return self.queue.count
        except RedisError:
            return 0


# ---------------------------------------------------------------------------------------------
# In-process


class ThreadQueue:
    """A daemon thread running jobs one at a time, in this process, with `settings`."""

    def __init__(self, settings: Settings, run: Callable[..., dict] = run_job) -> None:
        self.settings = settings
        self.owner = f"pid{os.getpid()}"
        self._run = run
        self._queue: queue.Queue[tuple[str, int, str]] = queue.Queue()
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="pupil-jobs", daemon=True)
        self._thread.start()

    def enqueue(self, kind: str, project: int, job_id: str) -> None:
        with self._lock:
            self._waiting.add(job_id)
        self._queue.put((kind, project, job_id))

    def is_waiting(self, job_id: str) -> bool:
        owner = job_id.split("-")[2] if job_id.count("-") >= 3 else ""
        if owner != self.owner:
            # Another process's thread queue: waiting as long as that process lives.
            return owner.startswith("pid") and _alive(owner[3:])
        with self._lock:
            return job_id in self._waiting

    def depth(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        while True:
            kind, project, job_id = self._queue.get()
            with self._lock:
                self._waiting.discard(job_id)
            log.info("job=%s kind=%s project=%s outcome=started", job_id, kind, project)
            try:
                result = self._run(kind, project, job_id, self.settings)
                log.info("job=%s outcome=done result=%s", job_id, result)
            except Exception:
                log.exception("job=%s kind=%s project=%s outcome=failed", job_id, kind, project)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


_queues: dict[tuple, JobQueue] = {}
_queues_lock = threading.Lock()


def job_queue(settings: Settings) -> JobQueue:
    """This process's queue for `settings`: RQ when REDIS_URL is set, else a thread (made on
    first use, so a forked gunicorn worker gets its own)."""
    key = (os.getpid(), settings.redis_url, settings.model_dir)
    with _queues_lock:
        found = _queues.get(key)
        if found is None:
            if settings.redis_url:
                found = RedisQueue(settings.redis_url, settings.train_timeout_s)
            else:
                found = ThreadQueue(settings)
            _queues[key] = found
        return found
