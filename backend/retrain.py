"""The training job: reconcile with Label Studio, train a candidate, promote it only if better.

One run of `train_project(settings, project, job_id)`:

1. take the project's training lock (one run per project at a time, across processes);
2. wait until events have been quiet for TRAIN_DEBOUNCE_S, so a burst becomes one run;
3. reconcile the label store with Label Studio's API when it is configured: annotations made
   before the backend was connected (or whose webhook never arrived) are added, ones deleted
   there are tombstoned here;
4. take the labels recorded so far (the run's `label_seq`), build the training set
   (backend/training_set.py), keep a fifth of the people-labelled tasks aside for validation;
5. train a regressor version starting from the serving one, score it and the serving model
   (the coarse detector until a regressor is promoted) on the same validation faces, and
   promote it only if its mean normalised error is lower; either way the decision and its
   reason go to the project's decisions log;
6. after a promotion, queue the "predict" job that pushes the new predictions to Label Studio.

A run that fails leaves its labels pending and is retried with backoff; its reason is recorded
(an OSError with its errno name, e.g. ENOSPC when the disk is full). One killed mid-way or
failing mid-write leaves no version behind (versions appear atomically; a half-written one left
by a killed run is swept by the next run of the project) and the serving model unchanged. The
serving model a candidate must beat is what serves the project: its promoted version, else the
last good one promoted before it (backend/model_store.py), else MODEL_DIR's, else the coarse
detector.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from backend.annotations import prediction_pairs
from backend.evaluation import group_split
from backend.label_store import LabelStore, label_store
from backend.label_studio import LabelStudioClient
from backend.model import ConfigError, model_version, parse_label_config, shared_image_source
from backend.model_store import SERVING, ModelStore
from backend.project_dirs import project_dir, serving_roots, training_lock
from backend.settings import Settings
from backend.training_set import build_training_set, labelled_tasks

log = logging.getLogger(__name__)

VAL_FRACTION = 0.2
SEED = 0
MAX_DEBOUNCE_FACTOR = 10  # a never-quiet stream of events waits at most 10 debounce periods
RETRY_BASE_S = 60.0
RETRY_MAX_S = 3600.0
DEFAULT_DATA_KEY = "image"


def train_project(settings: Settings, project: int, job_id: str = "") -> dict:
    """One training run for `project` (see the module docstring); returns what it did."""
    store = label_store(settings.model_dir)
    with training_lock(settings.model_dir, project, timeout_s=settings.train_timeout_s):
        _sweep(settings, project)
        _wait_for_quiet(store, project, settings.train_debounce_s)
        try:
            client = LabelStudioClient.from_settings(settings)
            tasks = _reconcile(store, client, project) if client is not None else None
            seq, started = store.start_run(project, job_id)
            record = _train(settings, store, client, project, tasks, seq)
        except Exception as e:
            reason = failure_reason(e)
            wait = _record_failure(store, project, job_id, reason)
            log.exception("project=%s job=%s outcome=failed retry_in_s=%s reason=%s", project,
                          job_id, "?" if wait is None else f"{wait:.0f}", reason)  # fmt: skip
            raise
        record = {**record, "job": job_id, "label_seq": seq, "at": time.time(),
                  "seconds": round(time.time() - started, 1)}  # fmt: skip
        store.finish_run(project, seq, started, record)
    log.info("project=%s job=%s outcome=%s reason=%s", project, job_id, record["outcome"],
             record.get("reason"))  # fmt: skip
    if record["outcome"] == "promoted":
        _queue_predictions(settings, project)
    return record


def failure_reason(e: BaseException) -> str:
    """One line saying why a run failed: the exception's type and message, and for an OSError
    its errno's name (ENOSPC: the disk is full), which h5py and friends bury in a long text."""
    text = " ".join(str(e).split())
    code = getattr(e, "errno", None)
    if isinstance(e, OSError) and isinstance(code, int) and code in errno.errorcode:
        name = errno.errorcode[code]
        text = f"{name} ({os.strerror(code)}): {text}"
    return f"{type(e).__name__}: {text}"[:2000]


def _record_failure(store: LabelStore, project: int, job_id: str, reason: str) -> float | None:
    """Record a failed run and its backoff; returns the backoff in seconds. When even that
    cannot be written (the label store's disk is full too), say so in the log, return None and
    leave the run's own error to propagate: its labels stay pending either way."""
    try:
        state = store.project(project)
        failures = (state.failures if state else 0) + 1
        wait = min(RETRY_BASE_S * 2 ** (failures - 1), RETRY_MAX_S)
        store.unmark_queued(project, job_id)
        store.fail_run(project, time.time() + wait, {
            "outcome": "failed", "reason": reason, "at": time.time(), "retry_in_s": wait,
            "job": job_id,
        })  # fmt: skip
        return wait
    except Exception:
        log.exception("project=%s job=%s: the failed run could not be recorded (its labels stay "
                      "pending; the scheduler tries again)", project, job_id)  # fmt: skip
        return None


def _sweep(settings: Settings, project: int) -> None:
    """Remove half-written versions a killed run left in the project's store: under the
    project's training lock nobody else writes there, so any temporary directory is stale."""
    root = project_dir(settings.model_dir, project)
    if root.is_dir():
        removed = ModelStore(root).sweep(older_than_s=0)
        if removed:
            log.warning("project=%s removed half-written versions: %s", project,
                        ", ".join(removed))  # fmt: skip


def _wait_for_quiet(store: LabelStore, project: int, debounce_s: float) -> None:
    deadline = time.time() + debounce_s * MAX_DEBOUNCE_FACTOR
    while True:
        state = store.project(project)
        last = state.last_event if state and state.last_event else 0.0
        quiet_for = time.time() - last
        if quiet_for >= debounce_s or time.time() >= deadline:
            return
        time.sleep(min(debounce_s - quiet_for, max(deadline - time.time(), 0.0)) + 0.05)


def _reconcile(store: LabelStore, client: LabelStudioClient, project: int) -> list[dict]:
    """Make the store agree with Label Studio; returns the project's tasks (with annotations)."""
    info = client.project(project)
    config = info.get("label_config") if isinstance(info, Mapping) else None
    store.note_project(project, config if isinstance(config, str) else None)
    tasks = list(client.tasks(project))
    seen: set[int] = set()
    added = 0
    for task in tasks:
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, Mapping) or not isinstance(annotation.get("id"), int):
                continue
            seen.add(annotation["id"])
            added += store.upsert(project, task["id"], annotation, task.get("data"), revive=True)
    gone = store.annotation_ids(project) - seen
    deleted = store.delete(project, sorted(gone)) if gone else 0
    log.info("project=%s reconciled tasks=%d annotations=%d changed=%d deleted=%d",
             project, len(tasks), len(seen), added, deleted)  # fmt: skip
    return tasks


def _train(
    settings: Settings,
    store: LabelStore,
    client: LabelStudioClient | None,
    project: int,
    tasks: list[dict] | None,
    seq: int,
) -> dict:
    state = store.project(project)
    data_key = _data_key(state.label_config if state else None)

    def prediction(prediction_id: int):
        return prediction_pairs(client.prediction(prediction_id))

    labelled, counts = labelled_tasks(
        store.annotations(project), data_key, prediction if client is not None else None
    )
    base = {"annotations": counts, "labelled_tasks": len(labelled)}
    labelled_faces = sum(len(t.pairs) for t in labelled)
    if labelled_faces < settings.train_min_labels:
        return {**base, "outcome": "waiting", "reason": (
            f"{labelled_faces} people-labelled faces; a run needs "
            f"TRAIN_MIN_LABELS={settings.train_min_labels}")}  # fmt: skip

    unlabelled = _unlabelled(tasks, data_key, settings) if tasks is not None else []
    from backend.coarse import CoarseDetector

    detector = CoarseDetector(settings.coarse_variant)
    data = build_training_set(
        labelled, unlabelled, shared_image_source(settings), detector, progress=False
    )
    human, coarse = data.human, data.coarse
    base.update(human_faces=len(human), coarse_faces=len(coarse), skipped=data.skipped)
    if len(human) < settings.train_min_labels or len(set(human.groups.tolist())) < 2:
        return {
            **base,
            "outcome": "waiting",
            "reason": (
                f"{len(human)} people-labelled faces found in {len(set(human.groups.tolist()))} "
                f"tasks; a run needs TRAIN_MIN_LABELS={settings.train_min_labels} in 2+ tasks"
            ),
        }

    val_mask = group_split(human.groups, VAL_FRACTION, SEED)
    val = human.subset(val_mask)
    train_human = human.subset(~val_mask)
    from backend.regressor.dataset import concatenate
    from backend.regressor.training import TrainConfig, face_errors, predict_samples, train_version
    from backend.regressor.version import load_version

    train = concatenate(train_human, coarse)
    weights = np.concatenate([
        np.ones(len(train_human), np.float32),
        np.full(len(coarse), settings.train_coarse_weight, np.float32),
    ])  # fmt: skip
    config = TrainConfig(labels="truth", epochs=settings.train_epochs, seed=SEED)

    loaded, serving_name = _serving(settings, project, load_version)
    initial = None
    if loaded is None:
        serving_errors = face_errors(val.coarse, val)
        serving_name = model_version(settings.coarse_variant)
    else:
        serving_errors = face_errors(predict_samples(loaded.model, val, loaded.label_offset).xy,
                                     val)  # fmt: skip
        if loaded.network == config.network:
            initial = loaded.model
    pstore = ModelStore(project_dir(settings.model_dir, project))
    source = {"label_studio_project": project, "label_seq": seq, "annotations": counts,
              "people_faces": len(human), "coarse_faces": len(coarse),
              "coarse_weight": settings.train_coarse_weight,
              "started_from": serving_name if initial is not None else None}  # fmt: skip
    version, summary = train_version(
        pstore, train, val, config, source, progress=False, weights=weights, initial=initial,
        prefix=f"p{project}-",
    )  # fmt: skip
    candidate = summary["val_mean_e"]
    current = float(np.mean(serving_errors))
    current_e05 = float(np.mean(serving_errors <= 0.05))
    comparison = (
        f"validation on {len(val)} people-labelled faces: mean e {candidate:.4f} "
        f"(e05 {summary['val_e05']:.3f}) vs serving {serving_name} {current:.4f} "
        f"(e05 {current_e05:.3f})"
    )
    metrics = {"val_mean_e": candidate, "val_e05": summary["val_e05"],
               "val_e10": summary["val_e10"], "serving": serving_name,
               "serving_val_mean_e": current, "serving_val_e05": current_e05}  # fmt: skip
    if candidate < current:
        reason = f"better than the serving model: {comparison}"
        pstore.promote(version.name, reason)
        outcome = "promoted"
    else:
        reason = f"not better than the serving model: {comparison}"
        pstore.reject(version.name, reason)
        outcome = "rejected"
    return {**base, "outcome": outcome, "version": version.name, "reason": reason,
            "train_faces": len(train), "val_faces": len(val), "metrics": metrics}  # fmt: skip


def _serving(settings: Settings, project: int, load) -> tuple[Any, str | None]:
    """The regressor serving this project, loaded with `load` (its own promoted version, else
    the last good one promoted before it, else the global one), or (None, None)."""
    for root in serving_roots(settings.model_dir, project):
        if (root / SERVING).exists():
            choice = ModelStore(root).resolve_serving(load=load)
            if choice.problems:
                log.warning("project=%s serving model for comparison: %s (%s)", project,
                            choice.version.name if choice.version else "none here",
                            "; ".join(choice.problems))  # fmt: skip
            if choice.version is not None:
                return choice.loaded, choice.version.name
    return None, None


def _data_key(label_config: str | None) -> str:
    if not label_config:
        return DEFAULT_DATA_KEY
    try:
        return parse_label_config(label_config).data_key
    except ConfigError as e:
        log.warning("label config unusable (%s); reading images from $%s", e, DEFAULT_DATA_KEY)
        return DEFAULT_DATA_KEY


def _unlabelled(tasks: list[dict], data_key: str, settings: Settings) -> list[tuple[int, Any]]:
    """(task id, image) of tasks nobody has annotated (skips and rejections count as
    annotated: the detector is suspect there), at most TRAIN_MAX_COARSE_TASKS."""
    if settings.train_coarse_weight <= 0 or settings.train_max_coarse_tasks <= 0:
        return []
    out = []
    for task in sorted(tasks, key=lambda t: t.get("id", 0)):
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, Mapping)]
        if annotations or not isinstance(task.get("data"), Mapping):
            continue
        if data_key in task["data"]:
            out.append((task["id"], task["data"][data_key]))
        if len(out) >= settings.train_max_coarse_tasks:
            break
    return out


def _queue_predictions(settings: Settings, project: int) -> None:
    """Queue the re-prediction of the project; run it here when the queue is unavailable."""
    from backend.jobs import PREDICT, QueueUnavailable, job_queue, new_job_id

    queue = job_queue(settings)
    try:
        queue.enqueue(PREDICT, project, new_job_id(PREDICT, project, getattr(queue, "owner", "q")))
    except QueueUnavailable as e:
        log.warning("project=%s predict job not queued (%s); predicting now", project, e)
        from backend.repredict import repredict_project

        repredict_project(settings, project)
