"""After scripts/active_learning.py, Label Studio serves the task the model is least sure of first.

A project with the backend's predictions (Retrieve Predictions on four photos, one without a
face: score 0, and faces of different confidences), then the script, twice (it must be
idempotent). Checked through Label Studio itself: the project's model version and sampling,
the "Active learning" view's order, the labelling stream of that view ("Label Tasks As Displayed":
POST /api/dm/actions?id=next_task&view=V) and /api/projects/<id>/next (uncertainty sampling).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from test_label_studio import LABEL_CONFIG, build_uploads, predicted_project

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "active_learning.py"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _run(label_studio, backend, *args: str) -> subprocess.CompletedProcess:
    user, password = backend.auth
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--url", label_studio.url, "--api-key", label_studio.token,
         "--backend-url", backend.url, "--backend-user", user, "--backend-password", password,
         *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_the_least_sure_task_is_served_first(label_studio, backend, tmp_path) -> None:
    (tmp_path / "uploads").mkdir()
    uploads = build_uploads(tmp_path / "uploads")
    project = predicted_project(label_studio, backend, "Active learning e2e", LABEL_CONFIG, uploads)
    pid, ls, headers = project.project_id, label_studio.url, label_studio.headers
    scores = {t["id"]: t["predictions"][0]["score"] for t in project.tasks.values()}
    version = next(iter(project.tasks.values()))["predictions"][0]["model_version"]
    least_sure = min(scores, key=scores.get)
    assert least_sure == project.task_ids["no-face.png"]
    assert len(set(scores.values())) >= 3, scores  # a ranking, not a tie

    first = _run(label_studio, backend, "--project", "Active learning e2e", "--next", "3")
    assert first.returncode == 0, first.stderr
    second = _run(label_studio, backend, "--project", str(pid), "--next", "3")
    assert second.returncode == 0, second.stderr
    print(second.stdout)

    settings = requests.get(f"{ls}/api/projects/{pid}", headers=headers, timeout=30).json()
    assert settings["model_version"] == version
    assert settings["sampling"] == "Uncertainty sampling"

    views = requests.get(f"{ls}/api/dm/views?project={pid}", headers=headers, timeout=30).json()
    ours = [v for v in views if v["data"].get("title") == "Active learning"]
    assert len(ours) == 1, views  # the second run updated, not duplicated
    view = ours[0]
    assert view["data"]["ordering"] == ["tasks:predictions_score"]

    listed = requests.get(
        f"{ls}/api/tasks", params={"project": pid, "view": view["id"], "fields": "all"},
        headers=headers, timeout=30,
    ).json()["tasks"]  # fmt: skip
    order = [t["id"] for t in listed]
    assert order == sorted(scores, key=scores.get), (order, scores)

    # The script prints the same queue, least sure first.
    printed = [int(line.split()[1]) for line in second.stdout.splitlines()
               if line.strip().startswith("task ")]  # fmt: skip
    assert printed == order[:3]

    # The browser's labelling stream in that view ("Label Tasks As Displayed").
    stream = requests.post(
        f"{ls}/api/dm/actions", params={"id": "next_task", "view": view["id"], "project": pid},
        json={"selectedItems": {"all": True, "excluded": []}}, headers=headers, timeout=30,
    )  # fmt: skip
    assert stream.status_code == 200, stream.text
    assert stream.json()["id"] == least_sure

    # API consumers: uncertainty sampling without a view.
    nxt = requests.get(f"{ls}/api/projects/{pid}/next", headers=headers, timeout=30)
    assert nxt.status_code == 200, nxt.text
    assert nxt.json()["id"] == least_sure


def test_clear_errors_for_a_wrong_token_and_a_missing_project(label_studio, backend) -> None:
    wrong = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", label_studio.url, "--api-key", "not-a-token",
         "--project", "1"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "401" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr

    missing = _run(label_studio, backend, "--project", "No such project title")
    assert missing.returncode == 1
    assert "no project titled" in missing.stderr and "Traceback" not in missing.stderr
