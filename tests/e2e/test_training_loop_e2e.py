"""The loop runs by itself against a real Label Studio: annotate, train, promote, re-predict.

What a team does, through Label Studio's API: create a project with label_config/pupils.xml,
upload twelve face photos, label two of them before any model is connected, connect this
backend (basic auth; the auto-created webhook is given the same credentials), label six more.
Label Studio's webhooks reach the backend, which trains in the background (in-process queue),
reconciles the two earlier labels through the API, promotes the new version because it beats
the coarse detector on the people-labelled validation faces, predicts every task again and
pushes the predictions into Label Studio with their scores and the project's model version.
Then a deletion arrives as ANNOTATIONS_DELETED, and "Start Training" (START_TRAINING) runs again.

People's points are the true pupils moved SHIFT_PX right (a labelling convention the coarse
detector does not follow), so the promoted model must have learned something.
"""

from __future__ import annotations

import base64
import csv
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from polling import wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

LABEL_CONFIG = (REPO / "label_config" / "pupils.xml").read_text(encoding="utf-8")
SHIFT_PX = 2.0
BEFORE_CONNECTING = 2
AFTER_CONNECTING = 6  # = TRAIN_EVERY_N_LABELS: the sixth webhook starts a run


def _dataset(tmp: Path) -> tuple[Path, list[dict]]:
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from face_dataset import write_dataset

    rows = list(csv.DictReader(open(write_dataset(tmp, 12, seed=11))))
    return tmp, rows


def _keypoints(row: dict, size: int) -> list[dict]:
    def point(label: str, x: float, y: float) -> dict:
        return {
            "from_name": "keypoints", "to_name": "image", "type": "keypointlabels",
            "original_width": size, "original_height": size, "image_rotation": 0,
            "origin": "manual",
            "value": {"x": x / size * 100, "y": y / size * 100, "width": 0.5,
                      "keypointlabels": [label]},
        }  # fmt: skip

    return [  # the subject's left pupil is on the image's right
        point("left_pupil", float(row["right_x"]) + SHIFT_PX, float(row["right_y"])),
        point("right_pupil", float(row["left_x"]) + SHIFT_PX, float(row["left_y"])),
        {"from_name": "verdict", "to_name": "image", "type": "choices",
         "value": {"choices": ["wrong"]}},
    ]  # fmt: skip


def test_annotations_train_promote_and_repredict_by_themselves(
    label_studio, start_backend, tmp_path
):
    root, rows = _dataset(tmp_path / "faces")
    from face_dataset import SIZE

    ls, headers = label_studio.url, label_studio.headers

    def api(method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, f"{ls}{path}", headers=headers, timeout=60, **kwargs)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response

    pid = api("POST", "/api/projects", json={"title": "Loop e2e", "label_config": LABEL_CONFIG}
              ).json()["id"]  # fmt: skip
    files = {f"file{i}": (r["file"], (root / r["file"]).read_bytes(), "image/png")
             for i, r in enumerate(rows)}  # fmt: skip
    api("POST", f"/api/projects/{pid}/import", files=files)
    tasks = api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]
    by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t["id"] for t in tasks}
    assert len(by_name) == len(rows)
    task_of = [by_name[r["file"]] for r in rows]

    def annotate(i: int) -> int:
        body = {"result": _keypoints(rows[i], SIZE), "was_cancelled": False}
        return api("POST", f"/api/tasks/{task_of[i]}/annotations", json=body).json()["id"]

    early = [annotate(i) for i in range(BEFORE_CONNECTING)]  # no model, no webhook yet

    with start_backend(
        "loop-backend", TRAIN_EVERY_N_LABELS=str(AFTER_CONNECTING), TRAIN_MIN_LABELS="6",
        TRAIN_DEBOUNCE_S="1", TRAIN_EPOCHS="3",
    ) as backend:  # fmt: skip
        auth = backend.auth
        user, password = auth
        ml = api("POST", "/api/ml", json={
            "project": pid, "url": backend.url, "title": "pupil-backend",
            "auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password,
        }).json()  # fmt: skip
        # Label Studio's auto-created webhook sends no credentials: give it the model's.
        hooks = [h for h in api("GET", f"/api/webhooks/?project={pid}").json()
                 if h["url"].rstrip("/") == f"{backend.url}/webhook"]  # fmt: skip
        assert len(hooks) == 1, hooks
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        api("PATCH", f"/api/webhooks/{hooks[0]['id']}/",
            json={"headers": {"Authorization": f"Basic {token}"}})  # fmt: skip
        before = api("GET", f"/api/projects/{pid}").json()["model_version"]

        for i in range(BEFORE_CONNECTING, BEFORE_CONNECTING + AFTER_CONNECTING):
            annotate(i)
        last_annotation_at = time.monotonic()

        def promoted_in_ls() -> str | None:
            version = api("GET", f"/api/projects/{pid}").json()["model_version"]
            return version if version and version.startswith(f"p{pid}-") else None

        version = wait_for("new predictions in Label Studio", promoted_in_ls, 600)
        seconds = time.monotonic() - last_annotation_at
        print(
            f"\n[e2e] annotation {BEFORE_CONNECTING + AFTER_CONNECTING} -> new predictions "
            f"in Label Studio: {seconds:.1f} s (version {version}; was {before!r})"
        )

        report = requests.get(f"{backend.url}/versions?project={pid}", auth=auth, timeout=30)
        (state,) = report.json()["training"]
        run = state["last_run"]
        assert run["outcome"] == "promoted" and run["version"] == version
        # The two labels made before connecting came in through reconciliation.
        assert run["human_faces"] == BEFORE_CONNECTING + AFTER_CONNECTING
        assert run["annotations"] == {"points": BEFORE_CONNECTING + AFTER_CONNECTING}
        assert run["coarse_faces"] == len(rows) - BEFORE_CONNECTING - AFTER_CONNECTING
        status = {d["name"]: d["status"] for d in report.json()["details"]}
        assert status[version] == "serving"

        # Every task has the new version's prediction, with its score in Label Studio's column.
        tasks = api("GET", f"/api/tasks?project={pid}&fields=all&page_size=100").json()["tasks"]
        for task in tasks:
            mine = [p for p in task["predictions"] if p["model_version"] == version]
            assert len(mine) == 1, task["id"]
            assert 0.0 <= mine[0]["score"] <= 1.0 and len(mine[0]["result"]) == 6
            assert task["predictions_score"] is not None
        # The learned convention shows on the faces nobody labelled.
        unlabelled = range(BEFORE_CONNECTING + AFTER_CONNECTING, len(rows))
        dx = []
        for i in unlabelled:
            task = next(t for t in tasks if t["id"] == task_of[i])
            (prediction,) = [p for p in task["predictions"] if p["model_version"] == version]
            point = next(r for r in prediction["result"]
                         if r["value"]["keypointlabels"] == ["left_pupil"])  # fmt: skip
            dx.append(point["value"]["x"] / 100 * SIZE - float(rows[i]["right_x"]))
        assert abs(float(np.median(dx)) - SHIFT_PX) < 1.5, dx

        # A deletion in Label Studio reaches the label store (ANNOTATIONS_DELETED).
        api("DELETE", f"/api/annotations/{early[0]}/")

        def label_changes() -> int:
            r = requests.get(f"{backend.url}/versions?project={pid}", auth=auth, timeout=30)
            return r.json()["training"][0]["label_changes"]

        changes = state["label_changes"]
        wait_for("the deletion to be recorded", lambda: label_changes() > changes, 30)

        # "Start Training" in the model card: START_TRAINING, a second run on 7 labels.
        api("POST", f"/api/ml/{ml['id']}/train", json={})

        def second_run() -> dict | None:
            r = requests.get(f"{backend.url}/versions?project={pid}", auth=auth, timeout=30)
            run = r.json()["training"][0]["last_run"]
            return run if run and run.get("version") != version else None

        run = wait_for("the START_TRAINING run", second_run, 600)
        assert run["outcome"] in ("promoted", "rejected"), run
        assert run["human_faces"] == BEFORE_CONNECTING + AFTER_CONNECTING - 1
        log = backend.log_path.read_text()
        assert "event=START_TRAINING" in log and "event=ANNOTATIONS_DELETED" in log
