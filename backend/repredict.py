"""The "predict" job: after a promotion, predict every task of the project again and push the
predictions to Label Studio, so its "Prediction score" column and task order follow the model.

Predictions go through the same `PupilModel.predict` as /predict (the project's serving version,
loaded in this process), are imported in batches of IMPORT_BATCH with the version and their
scores, and then the project's model version is set to that version: Label Studio computes
`predictions_score` and shows predictions only for the project's model version. A task that
cannot be predicted gets the empty, score-0 prediction, as from /predict: it sorts first.

Tasks that already carry a prediction of the serving version are left alone, so the job is
safe to run again: after a promotion (a new version) every task is predicted; when requested
for pre-annotation (`POST /jobs/predict`, scripts/import_images.py) only the tasks imported
since are, with the coarse detector while no regressor is promoted.
"""

from __future__ import annotations

import logging
import time

from backend.label_studio import LabelStudioClient
from backend.model import PupilModel, shared_image_source
from backend.settings import Settings

log = logging.getLogger(__name__)

PREDICT_BATCH = 16  # tasks per predict() call (one log line per task either way)
IMPORT_BATCH = 100  # predictions per import request


def repredict_project(settings: Settings, project: int) -> dict:
    """Predict all of `project`'s tasks with its serving model and push them to Label Studio."""
    client = LabelStudioClient.from_settings(settings)
    if client is None:
        log.warning("project=%s predict job skipped: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                    "are needed to push predictions", project)  # fmt: skip
        return {"outcome": "skipped", "reason": "LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY not set"}
    started = time.perf_counter()
    info = client.project(project)
    model = PupilModel(
        info.get("label_config"), settings, source=shared_image_source(settings), project=project
    )
    version = model.model_version
    every = list(client.tasks(project))
    tasks = [task for task in every if not _has_prediction(task, version)]
    pending: list[dict] = []
    created = 0
    for i in range(0, len(tasks), PREDICT_BATCH):
        chunk = tasks[i : i + PREDICT_BATCH]
        for task, prediction in zip(chunk, model.predict(chunk), strict=True):
            pending.append({"task": task["id"], **prediction})
        if len(pending) >= IMPORT_BATCH:
            created += client.import_predictions(project, pending, batch_size=IMPORT_BATCH)
            pending = []
    if pending:
        created += client.import_predictions(project, pending, batch_size=IMPORT_BATCH)
    already = len(every) - len(tasks)
    if (created or already) and info.get("model_version") != version:
        client.set_model_version(project, version)
    seconds = time.perf_counter() - started
    log.info("project=%s predict job outcome=done version=%s tasks=%d created=%d "
             "already_predicted=%d seconds=%.1f",
             project, version, len(tasks), created, already, seconds)  # fmt: skip
    return {"outcome": "done", "version": version, "tasks": len(tasks), "created": created,
            "already_predicted": already, "seconds": round(seconds, 1)}  # fmt: skip


def _has_prediction(task: dict, version: str) -> bool:
    """Whether Label Studio already holds a prediction of `version` for `task`."""
    predictions = task.get("predictions") or []
    return any(isinstance(p, dict) and p.get("model_version") == version for p in predictions)
