"""Pre-annotating a project: predict its tasks with the serving model and push the predictions
to Label Studio, so its "Prediction score" column and task order follow the model.

Two job kinds (backend/jobs.py) share the work, so that every job worker takes part:

- "predict" (`plan_predictions`): lists the project's tasks, keeps those without a prediction
  of the serving version and queues them as "predict_chunk" jobs on the same queue: 100 task
  ids each (CHUNK_TASKS), fewer for a small project so that up to 8 workers still share it
  (`chunk_size`); its result names the chunks, and GET /jobs/<id> adds their statuses up.
- "predict_chunk" (`run_chunk`): reads its tasks again from Label Studio (what it holds
  now), predicts those that still have no prediction of the version and imports the
  predictions (IMPORT_BATCH per request). The last chunk of the job to end (done, or failed
  for good) sets the project's model version when it is another one and still the serving
  one: Label Studio computes `predictions_score` and shows predictions only for the project's
  model version, so it is switched once every task that could be predicted has its prediction
  (a killed work horse never ends its chunk: the next predict job switches then).

Predictions go through the same `PupilModel.predict` as /predict. A task that cannot be
predicted because of the task itself (a bad reference, an image Label Studio does not have
(404), a file that is not an image) gets the empty, score-0 prediction, as from /predict: it
sorts first, for a person to look at. A task whose image could not be had for a reason that is
not the task's (Label Studio unreachable, a timeout, a 5xx, a refused key: RETRYABLE) gets no
prediction now -- an empty one would be kept for good, since tasks holding a prediction of the
version are skipped -- and its chunk fails after pushing the others, naming those tasks; the
queue retries the chunk with backoff (jobs.RETRY_INTERVALS_S), which predicts only what is
still missing. A failed import request is not repeated in place (Label Studio may have created
the predictions before failing: a blind retry could duplicate them); the chunk fails, and its
retry re-reads the tasks and pushes only what Label Studio lacks.

Everything is safe to run again: after a promotion (a new version) every task is predicted;
when requested for pre-annotation (`POST /jobs/predict`, scripts/import_images.py) only the
tasks imported since are, with the coarse detector while no regressor is promoted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from backend.image_source import AUTH_FAILED, DOWNLOAD_FAILED, ImageSource, ImageSourceError
from backend.jobs import CHUNK, JobQueue, chunk_job_id, one_line
from backend.label_studio import LabelStudioClient
from backend.model import PupilModel, shared_image_source
from backend.settings import Settings

log = logging.getLogger(__name__)

CHUNK_TASKS = 100  # at most, per chunk job: ~5-10 s of work, one import request
MIN_CHUNK_TASKS = 10  # at least (unless fewer are left): per-chunk costs stay small
SPREAD = 8  # a smaller project is still cut into up to this many chunks, for as many workers
IMPORT_BATCH = 100  # predictions per import request
# Image failures that say nothing about the task: the task is predicted again later.
RETRYABLE = frozenset({DOWNLOAD_FAILED, AUTH_FAILED})
SHOWN_TASKS = 20  # task ids named in a chunk's error


class TasksNotPredicted(RuntimeError):
    """Some tasks of a chunk got no prediction for now (RETRYABLE image failures); the others
    were pushed (`result` says what was done). The queue retries the chunk."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


def _client(settings: Settings) -> LabelStudioClient | None:
    client = LabelStudioClient.from_settings(settings)
    if client is None:
        log.warning("predict job skipped: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed "
                    "to read tasks and push predictions")  # fmt: skip
    return client


_SKIPPED = {"outcome": "skipped", "reason": "LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY not set"}


# ---------------------------------------------------------------------------------------------
# The "predict" job


def plan_predictions(settings: Settings, project: int, job_id: str, queue: JobQueue) -> dict:
    """Queue the project's tasks that lack a prediction of the serving version as chunk jobs;
    the chunks' ids are in the result ("chunks")."""
    client = _client(settings)
    if client is None:
        return dict(_SKIPPED)
    started = time.perf_counter()
    info, version, missing, already = _missing(client, settings, project)
    size = chunk_size(len(missing))
    chunks = [missing[i : i + size] for i in range(0, len(missing), size)]
    chunk_ids = [chunk_job_id(job_id, n) for n in range(1, len(chunks) + 1)]
    if chunks:
        queue.open_chunks(job_id, len(chunks), version, already)
    for chunk_id, tasks in zip(chunk_ids, chunks, strict=True):
        queue.enqueue(CHUNK, project, chunk_id, tasks)
    if not missing and already and info.get("model_version") != version:
        client.set_model_version(project, version)
    seconds = time.perf_counter() - started
    log.info("project=%s job=%s outcome=planned version=%s tasks=%d already_predicted=%d "
             "chunks=%d seconds=%.1f", project, job_id, version, len(missing), already,
             len(chunks), seconds)  # fmt: skip
    return {"outcome": "queued" if chunks else "done", "version": version,
            "tasks": len(missing), "already_predicted": already, "chunks": chunk_ids,
            "seconds": round(seconds, 1)}  # fmt: skip


def _missing(
    client: LabelStudioClient, settings: Settings, project: int
) -> tuple[dict, str, list[int], int]:
    """(the project, the serving version, ids of the tasks without a prediction of it, how many
    have one). The label config is checked here: an unsuitable one fails the job at once."""
    info = client.project(project)
    model = PupilModel(info.get("label_config"), settings, project=project)
    version = model.model_version
    every = list(client.tasks(project))
    missing = [t["id"] for t in every if not _has_prediction(t, version)]
    return info, version, missing, len(every) - len(missing)


def chunk_size(tasks: int) -> int:
    """Tasks per chunk: CHUNK_TASKS for a big project, fewer for a small one so that SPREAD
    workers still share it, but at least MIN_CHUNK_TASKS."""
    return min(CHUNK_TASKS, max(MIN_CHUNK_TASKS, -(-tasks // SPREAD)))


# ---------------------------------------------------------------------------------------------
# The "predict_chunk" job


def run_chunk(
    settings: Settings, project: int, task_ids: Sequence[int], job_id: str, queue: JobQueue
) -> dict:
    """One "predict_chunk" job: predict_chunk, then count the chunk as ended when it is done or
    failed for good; the last of its predict job switches the project's model version."""
    try:
        result = predict_chunk(settings, project, task_ids, job_id, queue)
    except Exception as e:
        if queue.is_last_attempt(job_id):
            done = e.result if isinstance(e, TasksNotPredicted) else {}
            _end_chunk(settings, project, job_id, queue, done)
        raise
    _end_chunk(settings, project, job_id, queue, result)
    return result


def _end_chunk(
    settings: Settings, project: int, job_id: str, queue: JobQueue, result: dict
) -> None:
    """Count the chunk as ended; the last one switches the version. Never raises: the chunk's
    own outcome stands, and a version left unswitched is switched by the next predict job."""
    predicted = result.get("created", 0) + result.get("skipped", 0)
    try:
        version = queue.chunk_ended(job_id, predicted)
        if version is not None:
            switch_version(settings, project, version, job_id)
    except Exception as e:
        log.error("project=%s job=%s outcome=version_not_switched reason=%s", project, job_id,
                  one_line(e))  # fmt: skip


def switch_version(settings: Settings, project: int, version: str, job_id: str = "-") -> bool:
    """Set the project's model version to `version` (its predictions are all pushed) unless it
    is already, or no longer the serving one (a newer promotion's job switches then)."""
    client = LabelStudioClient.from_settings(settings)
    if client is None:
        return False
    info = client.project(project)
    serving = PupilModel(info.get("label_config"), settings, project=project).model_version
    if serving != version or info.get("model_version") == version:
        log.info("project=%s job=%s outcome=version_kept version=%s serving=%s", project, job_id,
                 info.get("model_version"), serving)  # fmt: skip
        return False
    client.set_model_version(project, version)
    log.info("project=%s job=%s outcome=version_switched version=%s was=%s", project, job_id,
             version, info.get("model_version"))  # fmt: skip
    return True


def predict_chunk(
    settings: Settings,
    project: int,
    task_ids: Sequence[int],
    job_id: str = "-",
    queue: JobQueue | None = None,
) -> dict:
    """Predict those of `task_ids` that have no prediction of the serving version yet and push
    the predictions; TasksNotPredicted (after pushing the rest) when some images could not be
    had for a RETRYABLE reason. Deleted tasks are left out, and so are tasks another job of the
    `queue` is predicting with the version ("taken")."""
    client = LabelStudioClient.from_settings(settings)
    if client is None:
        raise RuntimeError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set for the job "
                           "worker: it cannot read tasks or push predictions")  # fmt: skip
    started = time.perf_counter()
    info = client.project(project)
    source = RetryableFailures(shared_image_source(settings))
    model = PupilModel(info.get("label_config"), settings, source=source, project=project)
    version = model.model_version
    wanted = set(task_ids)
    tasks = [t for t in client.tasks(project, ids=task_ids) if t.get("id") in wanted]
    todo = [t for t in tasks if not _has_prediction(t, version)]
    skipped = len(tasks) - len(todo)
    mine = [t["id"] for t in todo]
    if queue is not None and mine:
        claimed = queue.claim(project, version, job_id, mine)
        todo, mine = [t for t in todo if t["id"] in claimed], sorted(claimed)
    taken = len(tasks) - skipped - len(todo)
    try:
        pushed = []
        for task, prediction in zip(todo, model.predict(todo), strict=True):
            if task["id"] not in source.failures:
                pushed.append({"task": task["id"], **prediction})
        created = (
            client.import_predictions(project, pushed, batch_size=IMPORT_BATCH) if pushed else 0
        )
    finally:
        if queue is not None and mine:  # pushed (Label Studio shows them) or failed: free them
            queue.release(project, version, job_id, mine)
    result = {
        "outcome": "done", "version": version, "tasks": len(task_ids), "predicted": len(pushed),
        "created": created, "failed_tasks": sum(1 for p in pushed if not p.get("result")),
        "skipped": skipped, "gone": len(wanted) - len(tasks), "taken": taken,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    for task_id, error in source.failures.items():
        log.warning("project=%s job=%s task=%s outcome=deferred reason=%s detail=%s", project,
                    job_id, task_id, error.reason, " ".join(str(error).split()))  # fmt: skip
    log.info("project=%s job=%s outcome=%s version=%s tasks=%d predicted=%d created=%d "
             "deferred=%d skipped=%d gone=%d taken=%d seconds=%.1f", project, job_id,
             "partial" if source.failures else "done", version, len(task_ids), len(pushed),
             created, len(source.failures), skipped, result["gone"], taken,
             result["seconds"])  # fmt: skip
    if source.failures:
        message = _not_predicted(source.failures, len(task_ids), len(pushed))
        raise TasksNotPredicted(message, result)
    return result


def _not_predicted(failures: dict[int, ImageSourceError], tasks: int, pushed: int) -> str:
    """The chunk's error: how many tasks, which (the first SHOWN_TASKS), the first reason."""
    ids = sorted(failures)
    shown = ", ".join(map(str, ids[:SHOWN_TASKS])) + (", ..." if len(ids) > SHOWN_TASKS else "")
    first = failures[ids[0]]
    why = " ".join(str(first).split())
    return (f"{len(ids)} of {tasks} tasks got no prediction, their images could not be had now "
            f"(tasks {shown}; task {ids[0]}: {first.reason}: {why}); {pushed} predictions "
            "pushed")  # fmt: skip


class RetryableFailures:
    """The job's image source: the process's ImageSource, noting the tasks whose image failed
    for a RETRYABLE reason (their empty prediction is then not pushed)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source
        self.limits = source.limits
        self.failures: dict[int, ImageSourceError] = {}

    def fetch(self, value: object, task_id: int | None = None) -> bytes:
        try:
            return self.source.fetch(value, task_id)
        except ImageSourceError as e:
            if e.reason in RETRYABLE and task_id is not None:
                self.failures[task_id] = e
            raise


# ---------------------------------------------------------------------------------------------
# Everything in this process


def repredict_project(settings: Settings, project: int) -> dict:
    """Predict all of `project`'s tasks that lack a prediction of the serving version here,
    chunk after chunk, without a queue (backend/retrain.py does this when the queue is
    unavailable). Tasks deferred by RETRYABLE failures are counted, not retried."""
    client = _client(settings)
    if client is None:
        return dict(_SKIPPED)
    started = time.perf_counter()
    info, version, missing, already = _missing(client, settings, project)
    predicted = created = deferred = skipped = 0
    for i in range(0, len(missing), CHUNK_TASKS):
        tasks = missing[i : i + CHUNK_TASKS]
        try:
            result = predict_chunk(settings, project, tasks)
        except TasksNotPredicted as e:
            log.warning("project=%s outcome=partial reason=%s", project, e)
            deferred += 1
            result = e.result
        predicted += result["predicted"]
        created += result["created"]
        skipped += result["skipped"]
    if (created or skipped or already) and info.get("model_version") != version:
        client.set_model_version(project, version)  # every chunk is pushed: switch now
    seconds = time.perf_counter() - started
    log.info("project=%s predict outcome=done version=%s tasks=%d created=%d "
             "already_predicted=%d seconds=%.1f", project, version, len(missing), created,
             already, seconds)  # fmt: skip
    return {"outcome": "done", "version": version, "tasks": len(missing), "predicted": predicted,
            "created": created, "already_predicted": already, "chunks_deferred": deferred,
            "seconds": round(seconds, 1)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Helpers


def _has_prediction(task: dict, version: str) -> bool:
    """Whether Label Studio already holds a prediction of `version` for `task`."""
    predictions = task.get("predictions") or []
    return any(isinstance(p, dict) and p.get("model_version") == version for p in predictions)
