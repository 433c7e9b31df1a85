"""Background jobs and the two queues that run them: RQ on Redis, or a thread in this process.

A job is `run_job(kind, project, job_id)`: "train" (backend/retrain.py), "predict" (list a
project's tasks that lack a prediction of the serving version and queue them as "predict_chunk"
jobs of CHUNK_TASKS tasks, backend/repredict.py) or "predict_chunk" (predict those tasks and
push the predictions). Chunks are what lets a second worker share the pre-annotation of a big
project. The job code never knows which queue ran it: with REDIS_URL set, jobs go to the RQ
queue `pupil-backend` and `rq` worker processes (`python -m backend.worker`) run them, reading
their settings from their own environment; without it, a daemon thread of the server process
runs them one after another with the server's settings (the embedded default of `make run`).

Both queues answer the same questions: enqueue this, is that job still waiting, how many are
waiting, and what became of a job (`report`, for GET /jobs/<id>; `job_status` adds up a
predict job's chunks). A queue that cannot be reached raises QueueUnavailable; callers keep the
work pending (in the label store) or answer 503, so nothing is lost when Redis is down.

A predict job's chunks are counted (`open_chunks`, `chunk_ended`) so that the last one to end
(done, or failed for good) knows it is the last: only then is Label Studio's project switched
to the new model version, so annotators never see a half-predicted version (tasks of the new
version would have scores, the others none, and the queue order would be wrong meanwhile).

Chunks of two predict jobs of the same project and version (two imports pre-annotating at
once, with two workers) may hold the same tasks; a chunk predicts only the tasks it `claim`s
while it works on them (first come; `release`d when its predictions are in Label Studio, where
a later chunk sees them), so no task gets the same version's prediction twice.

Retries: a job kind in RETRY_INTERVALS_S is run again after a failure, after each of those
waits in turn, and fails for good when they are used up (RQ's `Retry`, which the worker's
scheduler carries out; the thread queue uses timers). Only chunks are retried: they are
idempotent (a chunk predicts only its tasks that still lack a prediction), and their failures
are mostly Label Studio being away for a while. The error of the attempt that will be retried
is kept (`last_error`), so a status shows why the job is waiting.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import secrets
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.settings import Settings

log = logging.getLogger(__name__)

QUEUE_NAME = "pupil-backend"
TRAIN = "train"
PREDICT = "predict"
CHUNK = "predict_chunk"
_REDIS_TIMEOUT_S = 2.0  # a Redis that does not answer must not hold up a webhook thread
# Waits before the 1st, 2nd, ... retry of a failed job, per kind: a Label Studio restart or a
# short outage is covered, and a chunk gives up after about 8 minutes.
RETRY_INTERVALS_S: Mapping[str, tuple[int, ...]] = {CHUNK: (5, 30, 120, 300)}
RESULT_TTL_S = 7 * 24 * 3600  # RQ keeps finished jobs (and their status) this long
FAILURE_TTL_S = 30 * 24 * 3600  # and failed ones this long
# What a finished predict job's result adds up from its chunks' (backend/repredict.py).
CHUNK_COUNTS = ("predicted", "created", "failed_tasks", "skipped", "gone", "taken")
MAX_SHOWN_ERROR = 500  # characters of an error kept for a status

# Job statuses as GET /jobs/<id> reports them.
QUEUED, STARTED, FINISHED, FAILED = "queued", "started", "finished", "failed"

_JOB_ID = re.compile(
    r"[a-z][a-z_]{0,30}-p[1-9][0-9]{0,18}-[a-z][a-z0-9]{0,20}-[0-9a-f]{8}(?:-c[0-9]{1,6})?"
)


class QueueUnavailable(RuntimeError):
    """The queue cannot take or report jobs now (Redis down); the message says why."""


@dataclass
class JobReport:
    """What became of one job. `last_error` and `retries_left`: a failed attempt that will be
    retried (the status is then "queued")."""

    job: str
    kind: str
    project: int
    status: str
    result: dict | None = None
    error: str | None = None
    last_error: str | None = None
    retries_left: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"job": self.job, "kind": self.kind, "project": self.project,
                                "status": self.status}  # fmt: skip
        if self.status == FINISHED:
            body["result"] = self.result if isinstance(self.result, dict) else {}
        if self.status == FAILED:
            body["error"] = self.error or "failed (no reason recorded)"
        if self.last_error and self.status in (QUEUED, STARTED):
            body["last_error"] = self.last_error
            body["retries_left"] = self.retries_left
        return body


class JobQueue(Protocol):
    def enqueue(self, kind: str, project: int, job_id: str, tasks: Sequence[int] = ()) -> None: ...
    def is_waiting(self, job_id: str) -> bool: ...
    def depth(self) -> int: ...
    def reports(self, job_ids: Sequence[str]) -> list[JobReport | None]: ...
    def unknown_job(self, job_id: str) -> str: ...
    def open_chunks(self, parent: str, count: int, version: str, predicted: int) -> None: ...
    def chunk_ended(self, chunk_id: str, predicted: int) -> str | None: ...
    def is_last_attempt(self, job_id: str) -> bool: ...
    def claim(
        self, project: int, version: str, job_id: str, task_ids: Sequence[int]
    ) -> set[int]: ...
    def release(self, project: int, version: str, job_id: str, task_ids: Sequence[int]) -> None: ...


def new_job_id(kind: str, project: int, owner: str) -> str:
    """Unique, and says what it is: "train-p3-rq-1a2b3c4d"."""
    return f"{kind}-p{project}-{owner}-{secrets.token_hex(4)}"


def chunk_job_id(parent: str, number: int) -> str:
    """A chunk's id names its predict job: "predict-p3-rq-1a2b3c4d-c007"."""
    return f"{parent}-c{number:03d}"


def parent_job_id(chunk_id: str) -> str:
    """The predict job a chunk belongs to (chunk_job_id undone)."""
    return chunk_id.rsplit("-c", 1)[0]


def is_job_id(text: str) -> bool:
    """Whether `text` has the form new_job_id and chunk_job_id make (checked before Redis is
    asked anything about it)."""
    return len(text) <= 100 and _JOB_ID.fullmatch(text) is not None


def one_line(error: BaseException) -> str:
    """An error as one line for a status (no traceback; that goes to the log)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_SHOWN_ERROR else text[: MAX_SHOWN_ERROR - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The job


def run_job(
    kind: str,
    project: int,
    job_id: str,
    settings: Settings | None = None,
    tasks: Sequence[int] = (),
    queue: JobQueue | None = None,
) -> dict:
    """Run one job. RQ calls it with (kind, project, job_id) (and a chunk's `tasks`), and the
    worker's settings are read from its environment; the in-process queue passes the server's
    settings and itself (where a predict job queues its chunks)."""
    settings = settings or worker_settings()
    try:
        if kind == TRAIN:
            from backend.retrain import train_project

            return train_project(settings, project, job_id)
        if kind == PREDICT:
            from backend.repredict import plan_predictions

            return plan_predictions(settings, project, job_id, queue or job_queue(settings))
        if kind == CHUNK:
            from backend.repredict import run_chunk

            return run_chunk(settings, project, list(tasks), job_id, queue or job_queue(settings))
        raise ValueError(f"unknown job kind {kind!r}")
    except Exception as e:
        _note_rq_error(e)
        raise


def _note_rq_error(error: Exception) -> None:
    """Under RQ, keep the error in the job's meta: RQ stores no result for an attempt it will
    retry, and a status should say why the job waits."""
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return
    try:
        job.meta["error"] = one_line(error)
        job.save_meta()
    except Exception as e:  # Redis gone too: the worker's own failure handling will say so
        log.warning("job=%s error not recorded in Redis: %s", job.id, one_line(e))


@functools.cache
def worker_settings() -> Settings:
    """A job worker's settings, read once from its environment (the worker's edge)."""
    return Settings.from_env()


def job_status(queue: JobQueue, job_id: str) -> dict | None:
    """GET /jobs/<id>'s answer, None for a job the queue does not know. A predict job that
    queued chunks is "finished" only when every chunk is, and "failed" when one failed for good
    (its error is given); its "chunks" counts them by status."""
    (report,) = queue.reports([job_id])
    if report is None:
        return None
    body = report.to_json()
    chunk_ids = (report.result or {}).get("chunks") if report.status == FINISHED else None
    if isinstance(chunk_ids, list) and chunk_ids:
        body.update(_add_up(report, chunk_ids, queue.reports(chunk_ids)))
        if body["status"] != FINISHED:
            body.pop("result", None)
    return body


def _add_up(parent: JobReport, ids: list[str], chunks: list[JobReport | None]) -> dict:
    """The parent's status from its chunks' (see job_status)."""
    counts = Counter(FAILED if c is None else c.status for c in chunks)
    retrying = [
        c for c in chunks if c is not None and c.last_error and c.status in (QUEUED, STARTED)
    ]
    tally = {status: counts[status] for status in (QUEUED, STARTED, FINISHED, FAILED)}
    out: dict[str, Any] = {"chunks": {"total": len(ids), **tally, "retrying": len(retrying)}}
    failed = [(i, c) for i, c in zip(ids, chunks, strict=True) if c is None or c.status == FAILED]
    if failed:
        chunk_id, chunk = failed[0]
        why = (chunk.error if chunk is not None else "the queue no longer knows it (expired, or "
               "the process that ran it restarted)")  # fmt: skip
        out.update(status=FAILED, error=f"{len(failed)} of {len(ids)} chunks failed; "
                   f"{chunk_id}: {why}")  # fmt: skip
    elif counts[FINISHED] < len(ids):
        out["status"] = STARTED
        if retrying:
            first = retrying[0]
            out["last_error"] = (
                f"{first.job} (retried, {first.retries_left} retries left): {first.last_error}"
            )
    else:
        totals = {key: sum(_count(c, key) for c in chunks) for key in CHUNK_COUNTS}
        out["result"] = {**(parent.result or {}), **totals}
    return out


def _count(chunk: JobReport | None, key: str) -> int:
    value = ((chunk.result if chunk is not None else None) or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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
        self._release = self.connection.register_script(_RELEASE)

    def enqueue(self, kind: str, project: int, job_id: str, tasks: Sequence[int] = ()) -> None:
        from redis.exceptions import RedisError
        from rq import Retry

        intervals = RETRY_INTERVALS_S.get(kind)
        retry = Retry(max=len(intervals), interval=list(intervals)) if intervals else None
        try:
            self.queue.enqueue_call(
                run_job, args=(kind, project, job_id),
                kwargs={"tasks": list(tasks)} if tasks else None, job_id=job_id,
                timeout=self.job_timeout_s, result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S,
                retry=retry, description=f"{kind} project {project}",
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

    def reports(self, job_ids: Sequence[str]) -> list[JobReport | None]:
        """What RQ holds about each job (None: unknown, or expired after RESULT_TTL_S or
        FAILURE_TTL_S); QueueUnavailable when Redis does not answer."""
        from redis.exceptions import RedisError
        from rq.job import Job

        try:
            found = Job.fetch_many(list(job_ids), connection=self.connection)
            return [None if job is None else _rq_report(job) for job in found]
        except RedisError as e:
            raise QueueUnavailable(f"Redis cannot be asked about jobs: {e}") from None

    def unknown_job(self, job_id: str) -> str:
        return (f"no job {job_id} in the queue (RQ keeps finished jobs {RESULT_TTL_S // 86400} "
                f"days and failed ones {FAILURE_TTL_S // 86400})")  # fmt: skip

    def open_chunks(self, parent: str, count: int, version: str, predicted: int) -> None:
        """Count `parent`'s chunks before they are queued (a hash that expires with them)."""
        from redis.exceptions import RedisError

        key = _tally_key(parent)
        try:
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"left": count, "predicted": predicted, "version": version})
                pipe.expire(key, FAILURE_TTL_S)
                pipe.execute()
        except RedisError as e:
            raise QueueUnavailable(f"Redis cannot count the chunks of {parent}: {e}") from None

    def chunk_ended(self, chunk_id: str, predicted: int) -> str | None:
        """Count one chunk of its predict job as ended, with the tasks it left predicted; the
        version to switch to when it was the last and any task has a prediction of it. Atomic:
        two chunks ending together cannot both, or neither, be the last."""
        from redis.exceptions import RedisError

        key = _tally_key(parent_job_id(chunk_id))
        try:
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.hincrby(key, "left", -1)
                pipe.hincrby(key, "predicted", predicted)
                pipe.hget(key, "version")
                left, total, version = pipe.execute()
        except RedisError as e:
            raise QueueUnavailable(f"Redis cannot count chunk {chunk_id} as ended: {e}") from None
        return version.decode() if left == 0 and total > 0 and version else None

    def is_last_attempt(self, job_id: str) -> bool:
        """Whether the running attempt of `job_id` is its last (no retry follows a failure)."""
        from rq import get_current_job

        job = get_current_job()
        return job is None or job.id != job_id or not job.retries_left

    def claim(self, project: int, version: str, job_id: str, task_ids: Sequence[int]) -> set[int]:
        """The tasks of `task_ids` that `job_id` may predict with `version` now: those no other
        job holds. A claim outlives a job timeout only if never released (a killed worker)."""
        from redis.exceptions import RedisError

        keys = _claim_keys(project, version, task_ids)
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(key, job_id, nx=True, ex=self.job_timeout_s + 60)
                for key in keys:
                    pipe.get(key)
                holders = pipe.execute()[len(keys) :]
        except RedisError as e:
            raise QueueUnavailable(f"Redis cannot record which job predicts what: {e}") from None
        mine = job_id.encode()
        return {task for task, holder in zip(task_ids, holders, strict=True) if holder == mine}

    def release(self, project: int, version: str, job_id: str, task_ids: Sequence[int]) -> None:
        """Give up `job_id`'s claims on `task_ids` (others' are left alone). With Redis away
        they stay until they expire: the tasks wait for a later job, nothing is lost."""
        from redis.exceptions import RedisError

        keys = _claim_keys(project, version, task_ids)
        try:
            self._release(keys=keys, args=[job_id])
        except RedisError as e:
            log.warning("job=%s project=%s outcome=claims_kept tasks=%d reason=%s", job_id,
                        project, len(keys), one_line(e))  # fmt: skip


# Delete each key that still holds ARGV[1] (the claimer's job id), atomically.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then redis.call('del', key) end
end
"""


def _claim_keys(project: int, version: str, task_ids: Sequence[int]) -> list[str]:
    return [f"{QUEUE_NAME}:claim:p{project}:{version}:{task}" for task in task_ids]


def _tally_key(parent: str) -> str:
    return f"{QUEUE_NAME}:chunks:{parent}"


def _rq_report(job: Any) -> JobReport:
    """One RQ job as a JobReport. RQ's scheduled and deferred jobs are "queued"; stopped and
    canceled ones "failed"."""
    from rq.job import JobStatus

    rq_status = job.get_status(refresh=False)
    status = {
        JobStatus.STARTED: STARTED,
        JobStatus.FINISHED: FINISHED,
        JobStatus.FAILED: FAILED,
        JobStatus.STOPPED: FAILED,
        JobStatus.CANCELED: FAILED,
    }.get(rq_status, QUEUED)
    args = list(job.args or ())
    kind = args[0] if args and isinstance(args[0], str) else "unknown"
    project = args[1] if len(args) > 1 and isinstance(args[1], int) else 0
    report = JobReport(job.id, kind, project, status)
    noted = job.meta.get("error") if isinstance(job.meta, dict) else None
    if status == FINISHED:
        value = job.return_value()
        report.result = value if isinstance(value, dict) else {}
    elif status == FAILED:
        report.error = _rq_failure(job, noted, rq_status)
    elif noted:  # an attempt failed; RQ retries it (scheduled, then queued and started)
        report.last_error = noted
        report.retries_left = job.retries_left
    return report


def _rq_failure(job: Any, noted: str | None, rq_status: object) -> str:
    """Why an RQ job failed: the error run_job noted, unless the failure RQ recorded is another
    one (a work horse killed, a timeout), whose last line is then taken."""
    from rq.results import Result

    result = job.latest_result()
    text = result.exc_string if result is not None and result.type == Result.Type.FAILED else ""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if noted and (not lines or noted in " ".join(lines[-1].split())):
        return noted
    if lines:
        return lines[-1][:MAX_SHOWN_ERROR]
    return noted or f"the job ended as {rq_status} (no reason recorded)"


# ---------------------------------------------------------------------------------------------
# In-process


@dataclass
class _Record:
    """A job of the thread queue, as long as the queue remembers it."""

    kind: str
    project: int
    tasks: tuple[int, ...] = ()
    status: str = QUEUED
    result: dict | None = None
    error: str | None = None
    last_error: str | None = None
    attempts: int = 0
    retries_left: int = 0
    timer: threading.Timer | None = field(default=None, repr=False)


class ThreadQueue:
    """A daemon thread running jobs one at a time, in this process, with `settings`.

    It remembers the last MAX_RECORDS jobs (finished and failed ones are forgotten first), for
    GET /jobs/<id>; it knows nothing of other processes' jobs, and forgets all at a restart.
    `retry_intervals` is RETRY_INTERVALS_S (seconds; tests give shorter ones).
    """

    MAX_RECORDS = 10_000

    def __init__(
        self,
        settings: Settings,
        run: Callable[..., dict] = run_job,
        retry_intervals: Mapping[str, Sequence[float]] = RETRY_INTERVALS_S,
    ) -> None:
        self.settings = settings
        self.owner = f"pid{os.getpid()}"
        self._run = run
        self._intervals = retry_intervals
        self._queue: queue.Queue[str] = queue.Queue()
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._tallies: dict[str, list] = {}  # parent -> [chunks left, tasks predicted, version]
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="pupil-jobs", daemon=True)
        self._thread.start()

    def enqueue(self, kind: str, project: int, job_id: str, tasks: Sequence[int] = ()) -> None:
        retries = len(self._intervals.get(kind, ()))
        with self._lock:
            self._records[job_id] = _Record(kind, project, tuple(tasks), retries_left=retries)
            self._forget_old()
        self._queue.put(job_id)

    def is_waiting(self, job_id: str) -> bool:
        owner = job_id.split("-")[2] if job_id.count("-") >= 3 else ""
        if owner != self.owner:
            # Another process's thread queue: waiting as long as that process lives.
            return owner.startswith("pid") and _alive(owner[3:])
        with self._lock:
            record = self._records.get(job_id)
            return record is not None and record.status == QUEUED

    def depth(self) -> int:
        return self._queue.qsize()

    def reports(self, job_ids: Sequence[str]) -> list[JobReport | None]:
        with self._lock:
            return [self._report(job_id) for job_id in job_ids]

    def unknown_job(self, job_id: str) -> str:
        return (f"no job {job_id} in this process: without REDIS_URL each server process runs "
                f"and remembers only its own jobs (the last {self.MAX_RECORDS}), until it "
                "restarts; with WORKERS > 1 ask again (another worker may have it) or set "
                "REDIS_URL")  # fmt: skip

    def open_chunks(self, parent: str, count: int, version: str, predicted: int) -> None:
        with self._lock:
            self._tallies[parent] = [count, predicted, version]

    def chunk_ended(self, chunk_id: str, predicted: int) -> str | None:
        with self._lock:
            tally = self._tallies.get(parent_job_id(chunk_id))
            if tally is None:
                return None
            tally[0] -= 1
            tally[1] += predicted
            if tally[0] > 0:
                return None
            del self._tallies[parent_job_id(chunk_id)]
            return tally[2] if tally[1] > 0 else None

    def is_last_attempt(self, job_id: str) -> bool:
        with self._lock:
            record = self._records.get(job_id)
            return record is None or record.retries_left <= 0

    def claim(self, project: int, version: str, job_id: str, task_ids: Sequence[int]) -> set[int]:
        """All of them: this queue runs one job at a time, so no other job of this process is
        predicting now (other server processes' queues are not seen: set REDIS_URL)."""
        return set(task_ids)

    def release(self, project: int, version: str, job_id: str, task_ids: Sequence[int]) -> None:
        return None

    def _report(self, job_id: str) -> JobReport | None:
        record = self._records.get(job_id)
        if record is None:
            return None
        return JobReport(job_id, record.kind, record.project, record.status, record.result,
                         record.error, record.last_error, record.retries_left)  # fmt: skip

    def _forget_old(self) -> None:
        """Drop the oldest finished or failed records beyond MAX_RECORDS (under the lock)."""
        excess = len(self._records) - self.MAX_RECORDS
        if excess <= 0:
            return
        done = [j for j, r in self._records.items() if r.status in (FINISHED, FAILED)]
        for job_id in done[:excess]:
            del self._records[job_id]

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            with self._lock:
                record = self._records.get(job_id)
                if record is None:
                    continue
                record.status = STARTED
                record.attempts += 1
            log.info("job=%s kind=%s project=%s outcome=started attempt=%d", job_id, record.kind,
                     record.project, record.attempts)  # fmt: skip
            try:
                result = self._run(record.kind, record.project, job_id, self.settings,
                                   tasks=record.tasks, queue=self)  # fmt: skip
            except Exception as e:
                self._failed(job_id, record, e)
                continue
            with self._lock:
                record.status, record.result = FINISHED, result
            log.info("job=%s outcome=done result=%s", job_id, result)

    def _failed(self, job_id: str, record: _Record, error: Exception) -> None:
        """Retry after the next interval while retries are left, else fail for good."""
        message = one_line(error)
        with self._lock:
            if record.retries_left > 0:
                intervals = list(self._intervals.get(record.kind, ()))
                delay = intervals[max(len(intervals) - record.retries_left, 0)]
                record.retries_left -= 1
                record.status, record.last_error = QUEUED, message
                record.timer = threading.Timer(delay, self._queue.put, args=(job_id,))
                record.timer.daemon = True
                record.timer.start()
                log.warning("job=%s kind=%s project=%s outcome=retrying reason=%s retry_in_s=%g "
                            "retries_left=%d", job_id, record.kind, record.project, message,
                            delay, record.retries_left)  # fmt: skip
                return
            record.status, record.error = FAILED, message
        log.error("job=%s kind=%s project=%s outcome=failed reason=%s", job_id, record.kind,
                  record.project, message, exc_info=error)  # fmt: skip


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
