"""backend/label_studio.py against a real Label Studio 1.23.2 (.venv-ls; tests/e2e/conftest.py).

A project with label_config/pupils.xml and three uploaded photos, one of them annotated through
the API; then the client reads the tasks back (paged), imports predictions, sets the model
version and reads one prediction. The Label Studio facts the client relies on (the paged
answer's shape, 404 past the last page, annotations under `fields=all`, `created` counts) are
asserted here with plain requests, so an upgrade that changes them fails loudly.

(The file is not named test_label_studio_client.py: tests/ has no __init__.py, so two test
modules with one basename cannot be collected in one run.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from backend.keypoints import KEYPOINT_NAMES
from backend.label_studio import LabelStudioClient, LabelStudioError
from backend.ls_auth import PERSONAL, LabelStudioAuth

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LABEL_CONFIG = REPO / "label_config" / "pupils.xml"
ASTRONAUT = REPO / "tests" / "data" / "astronaut.png"
SIZE = 512  # astronaut.png is 512x512
# Pupil centres in tests/data/astronaut.png, image pixels; see tests/conftest.py.
ASTRONAUT_PUPILS = {"left_pupil": (246.7, 103.5), "right_pupil": (203.3, 101.1)}
KEYPOINT_LABELS = set(KEYPOINT_NAMES)
VERSION = "test-v1"


def keypoint(label: str, x_px: float, y_px: float, score: float | None = None) -> dict:
    """One keypoint region as the backend sends it (and as tests/e2e/test_label_studio.py
    checks it): percentages of the upright image, `from_name` keypoints on `image`."""
    region = {
        "id": f"{label}-0",
        "from_name": "keypoints",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": SIZE,
        "original_height": SIZE,
        "image_rotation": 0,
        "value": {
            "x": x_px / SIZE * 100,
            "y": y_px / SIZE * 100,
            "width": 0.5,
            "keypointlabels": [label],
        },
    }
    if score is not None:
        region["score"] = score
    return region


def pupils(score: float | None = None) -> list[dict]:
    return [keypoint(label, x, y, score) for label, (x, y) in ASTRONAUT_PUPILS.items()]


def check_points(result: list[dict]) -> list[tuple[str, float, float]]:
    """(label, x px, y px) per region, after checking its shape (as test_label_studio._points)."""
    points = []
    for region in result:
        assert region["type"] == "keypointlabels", region
        assert region["from_name"] == "keypoints" and region["to_name"] == "image", region
        assert (region["original_width"], region["original_height"]) == (SIZE, SIZE), region
        value = region["value"]
        (label,) = value["keypointlabels"]
        assert label in KEYPOINT_LABELS, region
        assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100, region
        points.append((label, value["x"] / 100 * SIZE, value["y"] / 100 * SIZE))
    return points


@dataclass
class Project:
    id: int
    task_ids: list[int]
    annotated_task: int
    annotation_id: int


@pytest.fixture(scope="module")
def client(label_studio: Any) -> Iterator[LabelStudioClient]:
    """The client with the session's legacy token."""
    ls_client = LabelStudioClient(
        label_studio.url, LabelStudioAuth(label_studio.url, label_studio.token)
    )
    yield ls_client
    ls_client.close()


def _api(label_studio: Any, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A plain request to Label Studio with the session's token (independent of the client)."""
    return requests.request(
        method, label_studio.url + path, headers=label_studio.headers, timeout=60, **kwargs
    )


@pytest.fixture(scope="module")
def project(label_studio: Any) -> Project:
    """A pupils project with three uploaded photos; the first one annotated."""
    r = _api(
        label_studio,
        "POST",
        "/api/projects",
        json={"title": "Client e2e", "label_config": LABEL_CONFIG.read_text(encoding="utf-8")},
    )
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    # one multipart field per file (one name repeated imports only one file)
    data = ASTRONAUT.read_bytes()
    files = {f"file{i}": (f"face-{i}.png", data, "image/png") for i in range(3)}
    r = _api(label_studio, "POST", f"/api/projects/{pid}/import", files=files)
    assert r.status_code == 201 and r.json()["task_count"] == 3, r.text
    r = _api(label_studio, "GET", "/api/tasks", params={"project": pid, "page_size": 10})
    assert r.status_code == 200, r.text
    task_ids = sorted(t["id"] for t in r.json()["tasks"])
    assert len(task_ids) == 3

    r = _api(
        label_studio,
        "POST",
        f"/api/tasks/{task_ids[0]}/annotations",
        json={"result": pupils(), "was_cancelled": False, "ground_truth": False},
    )
    assert r.status_code == 201, r.text
    return Project(pid, task_ids, task_ids[0], r.json()["id"])


# ---------------------------------------------------------------------------------------------
# What Label Studio answers (the client's assumptions)


def test_label_studio_pages_tasks_as_the_client_expects(
    label_studio: Any, project: Project
) -> None:
    params = {"project": project.id, "fields": "all", "page_size": 2}
    r = _api(label_studio, "GET", "/api/tasks", params={**params, "page": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, dict) and {"tasks", "total"} <= set(body), sorted(body)
    assert body["total"] == 3 and len(body["tasks"]) == 2
    for task in body["tasks"]:
        assert isinstance(task["annotations"], list) and isinstance(task["predictions"], list)

    r = _api(label_studio, "GET", "/api/tasks", params={**params, "page": 2})
    assert r.status_code == 200 and len(r.json()["tasks"]) == 1, r.text
    # a page past the end: DRF's "Invalid page"
    r = _api(label_studio, "GET", "/api/tasks", params={**params, "page": 3})
    assert r.status_code == 404, r.text

    # without fields=all the tasks carry no annotation list
    r = _api(label_studio, "GET", "/api/tasks", params={"project": project.id, "page": 1})
    assert r.status_code == 200, r.text
    annotated = next(t for t in r.json()["tasks"] if t["id"] == project.annotated_task)
    assert not annotated.get("annotations"), sorted(annotated)


# ---------------------------------------------------------------------------------------------
# The client


def test_project_has_the_label_config(client: LabelStudioClient, project: Project) -> None:
    got = client.project(project.id)
    assert got["id"] == project.id
    assert got["label_config"].strip() == LABEL_CONFIG.read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("page_size", [100, 2, 1])
def test_tasks_yields_every_task_with_its_annotations(
    client: LabelStudioClient, project: Project, page_size: int
) -> None:
    tasks = list(client.tasks(project.id, page_size=page_size))
    assert sorted(t["id"] for t in tasks) == project.task_ids
    by_id = {t["id"]: t for t in tasks}
    for task_id, task in by_id.items():
        assert task["data"]["image"].startswith(f"/data/upload/{project.id}/"), task["data"]
        annotations = task["annotations"]
        if task_id != project.annotated_task:
            assert annotations == [], annotations
            continue
        (annotation,) = annotations
        assert annotation["id"] == project.annotation_id
        assert not annotation["was_cancelled"]
        points = check_points(annotation["result"])
        assert sorted(p[0] for p in points) == sorted(ASTRONAUT_PUPILS)


def test_tasks_of_a_missing_project(client: LabelStudioClient) -> None:
    with pytest.raises(LabelStudioError, match="HTTP 404") as raised:
        list(client.tasks(987654))
    assert raised.value.status == 404


def test_import_predictions_set_model_version_and_read_one_back(
    client: LabelStudioClient, project: Project
) -> None:
    predictions = [
        {"task": task_id, "result": pupils(score=0.9 - i / 10), "score": 0.9 - i / 10,
         "model_version": VERSION}
        for i, task_id in enumerate(project.task_ids)
    ]  # fmt: skip
    assert client.import_predictions(project.id, predictions, batch_size=2) == 3

    client.set_model_version(project.id, VERSION)
    assert client.project(project.id)["model_version"] == VERSION

    tasks = {t["id"]: t for t in client.tasks(project.id)}
    for i, task_id in enumerate(project.task_ids):
        (predicted,) = [p for p in tasks[task_id]["predictions"] if p["model_version"] == VERSION]
        assert predicted["score"] == pytest.approx(0.9 - i / 10)
        # with the project's model version set, the Prediction score column fills
        assert tasks[task_id]["predictions_score"] == pytest.approx(0.9 - i / 10)

    one = tasks[project.task_ids[1]]["predictions"][0]
    got = client.prediction(one["id"])
    assert got["id"] == one["id"] and got["task"] == project.task_ids[1]
    assert got["model_version"] == VERSION
    points = check_points(got["result"])
    for label, x, y in points:
        ex, ey = ASTRONAUT_PUPILS[label]
        assert abs(x - ex) < 0.01 and abs(y - ey) < 0.01, (label, x, y)


def test_invalid_predictions_are_dropped_silently(
    client: LabelStudioClient, project: Project
) -> None:
    bad = keypoint("left_pupil", 10, 10)
    bad["from_name"] = "no_such_control"
    predictions = [
        {
            "task": project.task_ids[2],
            "result": pupils(),
            "score": 0.5,
            "model_version": "test-drop",
        },
        {"task": project.task_ids[2], "result": [bad], "score": 0.5, "model_version": "test-drop"},
    ]
    assert client.import_predictions(project.id, predictions) == 1


def test_set_model_version_without_predictions_is_refused(
    client: LabelStudioClient, project: Project
) -> None:
    with pytest.raises(LabelStudioError, match="PATCH .* -> HTTP 400") as raised:
        client.set_model_version(project.id, "no-such-version")
    assert raised.value.status == 400


def test_a_missing_task_fails_the_whole_batch(client: LabelStudioClient, project: Project) -> None:
    """Label Studio refuses a batch (400) in which any task is not in the project, creating none
    of it: a task deleted while predictions were made fails its batch."""
    predictions = [
        {
            "task": project.task_ids[1],
            "result": pupils(),
            "score": 0.5,
            "model_version": "test-gone",
        },
        {"task": 987654, "result": pupils(), "score": 0.5, "model_version": "test-gone"},
    ]
    with pytest.raises(LabelStudioError, match=r"tasks \d+\.\.987654") as raised:
        client.import_predictions(project.id, predictions)
    assert raised.value.status == 400
    task = next(t for t in client.tasks(project.id) if t["id"] == project.task_ids[1])
    assert not [p for p in task["predictions"] if p["model_version"] == "test-gone"]


def test_personal_access_token(
    label_studio: Any, project: Project, personal_access_token: str
) -> None:
    """A PAT (JWT refresh token) is exchanged for an access token and works like the legacy key."""
    auth = LabelStudioAuth(label_studio.url, personal_access_token)
    assert auth.kind == PERSONAL
    pat_client = LabelStudioClient(label_studio.url, auth)
    try:
        assert pat_client.project(project.id)["id"] == project.id
        assert auth.header().startswith("Bearer ")
        assert len(list(pat_client.tasks(project.id))) == 3
    finally:
        pat_client.close()
