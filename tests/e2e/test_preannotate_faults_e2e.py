"""Pre-annotation when Label Studio fails under it: a real Label Studio behind a fault-injecting
proxy (tests/fault_proxy.py), this backend and one `python -m backend.worker` on a real Redis.

The backend and the worker reach Label Studio only through the proxy; the tests check Label
Studio's state directly. Eight faces per project, one chunk job each.

- Image downloads answer 500 for half the tasks: those get no prediction (an empty one would be
  kept for good), the others do, and the job's status names the missing tasks while the chunk
  waits for its retry; once the proxy heals, the retry predicts exactly the missing ones.
- The push fails: answered 500 without reaching Label Studio, or after Label Studio created the
  predictions (the answer lost). The import request is never repeated in place; the chunk's
  retry reads what Label Studio holds and pushes only what is missing, so every task ends with
  exactly one prediction of the version either way.
- Label Studio unreachable for the whole job: the job fails with a clear error at once (no
  retry), nothing is pushed, and a later request completes the project.
- The task listing the chunks use (`ids=`, the Data Manager's selectedItems) lists only those
  tasks in Label Studio 1.23.2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fault_proxy import FaultProxy
from polling import wait_for
from redis_server import RedisServer
from test_import_images_e2e import Api

from backend.label_studio import LabelStudioClient
from backend.ls_auth import LabelStudioAuth

REPO = Path(__file__).resolve().parents[2]
LABEL_CONFIG = (REPO / "label_config" / "pupils.xml").read_text(encoding="utf-8")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

N_FACES = 8
JOB_TIMEOUT_S = 240  # a chunk's retries come after 5 s, then 30 s


def e2e_conftest(config: pytest.Config):
    """tests/e2e/conftest.py as pytest loaded it: its running_backend takes any Label Studio
    address (here the proxy's), which the start_backend fixture does not."""
    path = str(Path(__file__).with_name("conftest.py"))
    return next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", "") == path)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> list[Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from face_dataset import write_dataset

    root = tmp_path_factory.mktemp("fault-faces")
    write_dataset(root, N_FACES, seed=5)
    return sorted(root.glob("*.png"))


@pytest.fixture(scope="module")
def proxy(label_studio) -> Iterator[FaultProxy]:
    server = FaultProxy(label_studio.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(e2e_dir, label_studio, proxy, pytestconfig) -> Iterator[object]:
    """The backend and one worker on a Redis of their own, reaching Label Studio through the
    proxy; the backend's Server."""
    e2e = e2e_conftest(pytestconfig)
    redis = RedisServer(e2e_dir / "faults-redis")
    redis.start()
    via_proxy = dataclasses.replace(label_studio, url=proxy.url)
    try:
        with e2e.running_backend(e2e_dir, via_proxy, "faults-backend", REDIS_URL=redis.url) as (
            backend
        ):
            worker = start_worker(e2e, e2e_dir, via_proxy, redis.url)
            try:
                yield backend
            finally:
                worker.stop()
    finally:
        redis.stop()


def start_worker(e2e, e2e_dir: Path, label_studio, redis_url: str):
    """`python -m backend.worker` with the backend's environment; once it is registered."""
    from redis import Redis
    from rq import Worker

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH", "REDIS_", "TRAIN_"))}  # fmt: skip
    env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
               REDIS_URL=redis_url, MODEL_DIR=str(e2e_dir / "faults-backend-models"),
               LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")  # fmt: skip
    log_path = e2e_dir / "faults-worker.log"
    proc = e2e._start([sys.executable, "-m", "backend.worker"], env, log_path, cwd=REPO)
    worker = e2e.Server(name="faults-worker", url="", proc=proc, log_path=log_path)
    e2e._SERVERS.append(worker)
    connection = Redis.from_url(redis_url)

    def registered() -> bool:
        assert proc.poll() is None, f"the worker exited:\n{worker.log_tail()}"
        return bool(Worker.all(connection=connection))

    wait_for("the worker to register", registered, 120, 0.5)
    return worker


class Studio(Api):
    """Label Studio's API, directly (not through the proxy), with the legacy token."""

    def new_project(self, title: str, faces: list[Path]) -> tuple[int, dict[int, str]]:
        """A project with the faces as tasks; (its id, {task id: image path})."""
        body = {"title": title, "label_config": LABEL_CONFIG}
        pid = self("POST", "/api/projects", json=body).json()["id"]
        files = {f"file{i}": (p.name, p.read_bytes(), "image/png") for i, p in enumerate(faces)}
        self("POST", f"/api/projects/{pid}/import", files=files)
        return pid, {t["id"]: t["data"]["image"] for t in self.tasks(pid)}

    def tasks(self, pid: int) -> list[dict]:
        params = {"project": pid, "fields": "all", "page_size": 1000}
        return self("GET", "/api/tasks", params=params).json()["tasks"]

    def predictions(self, pid: int, version: str) -> dict[int, int]:
        """Predictions of `version` per task."""
        return {t["id"]: sum(p["model_version"] == version for p in t["predictions"])
                for t in self.tasks(pid)}  # fmt: skip

    def model_version(self, pid: int) -> str:
        return self("GET", f"/api/projects/{pid}").json()["model_version"]


class Backend:
    def __init__(self, server) -> None:
        self.url, self.auth = server.url, server.auth

    def predict(self, pid: int) -> tuple[str, str]:
        """POST /jobs/predict; (job id, model version)."""
        r = requests.post(f"{self.url}/jobs/predict", json={"project": pid}, auth=self.auth,
                          timeout=60)  # fmt: skip
        assert r.status_code == 202, r.text
        return r.json()["job"], r.json()["model_version"]

    def status(self, job_id: str) -> dict:
        r = requests.get(f"{self.url}/jobs/{job_id}", auth=self.auth, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def until(self, job_id: str, what: str, check, *, may_fail: bool = False) -> dict:
        """The job's status once `check(status)` holds; a failure ends the wait unless
        `may_fail`."""

        def look() -> dict | None:
            body = self.status(job_id)
            assert may_fail or body["status"] != "failed", body
            return body if check(body) else None

        return wait_for(what, look, JOB_TIMEOUT_S, 0.2)


def image_paths(paths: list[str]) -> str:
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def test_tasks_listed_by_id_are_those_tasks(label_studio, faces):
    studio = Studio(label_studio)
    pid, images = studio.new_project("Listing by id", faces[:4])
    client = LabelStudioClient(label_studio.url, LabelStudioAuth(label_studio.url,
                                                                 label_studio.token))  # fmt: skip
    some = sorted(images)[1:3]
    assert [t["id"] for t in client.tasks(pid, ids=some, page_size=1)] == some
    assert list(client.tasks(pid, ids=[])) == []


def test_images_label_studio_fails_to_give_are_predicted_by_the_retry(
    label_studio, stack, proxy, faces
):
    studio, backend = Studio(label_studio), Backend(stack)
    pid, images = studio.new_project("Faults: images", faces)
    failing = sorted(images)[::2]
    proxy.fail(image_paths([images[t] for t in failing]), 500, method="GET")
    try:
        job_id, version = backend.predict(pid)
        waiting = backend.until(job_id, "the chunk's failed attempt", lambda s: s.get("last_error"))
    finally:
        proxy.heal()
    assert waiting["status"] == "started" and waiting["chunks"]["retrying"] == 1
    shown = ", ".join(map(str, failing))
    assert (
        f"4 of 8 tasks got no prediction, their images could not be had now (tasks {shown};"
        in (waiting["last_error"])
    )
    assert "Label Studio answered HTTP 500" in waiting["last_error"]
    before = studio.predictions(pid, version)
    assert {t for t, n in before.items() if n == 0} == set(failing)
    assert all(n == 1 for t, n in before.items() if t not in failing)

    done = backend.until(job_id, "the job", lambda s: s["status"] == "finished")
    assert studio.predictions(pid, version) == {t: 1 for t in images}
    assert studio.model_version(pid) == version
    assert (done["result"]["predicted"], done["result"]["skipped"]) == (4, 4)
    assert all(p["score"] > 0 and len(p["result"]) == 6
               for t in studio.tasks(pid) for p in t["predictions"])  # fmt: skip


def test_a_failed_push_is_not_repeated_and_the_retry_pushes_only_what_is_missing(
    label_studio, stack, proxy, faces
):
    studio, backend = Studio(label_studio), Backend(stack)
    lost, _ = studio.new_project("Faults: answer lost", faces)  # created, but answered 500
    refused, _ = studio.new_project("Faults: push refused", faces)  # answered 500, not created
    push = "^/api/projects/{}/import/predictions"
    proxy.fail(push.format(lost), 500, method="POST", forward=True)
    proxy.fail(push.format(refused), 500, method="POST")
    try:
        jobs = {pid: backend.predict(pid) for pid in (lost, refused)}
        for pid, (job_id, _) in jobs.items():
            waiting = backend.until(job_id, f"project {pid}'s failed push",
                                    lambda s: s.get("last_error"))  # fmt: skip
            assert "-> HTTP 500" in waiting["last_error"], waiting
    finally:
        proxy.heal()
    version = jobs[lost][1]
    assert set(studio.predictions(lost, version).values()) == {1}  # Label Studio has them
    assert set(studio.predictions(refused, version).values()) == {0}

    for pid, (job_id, _) in jobs.items():
        done = backend.until(job_id, f"project {pid}'s job", lambda s: s["status"] == "finished")
        assert studio.predictions(pid, version) == {t["id"]: 1 for t in studio.tasks(pid)}
        assert studio.model_version(pid) == version
        pushes = proxy.hits_of(push.format(pid), "POST")
        if pid == lost:  # the retry found them all: nothing pushed again
            assert [h.action for h in pushes] == ["forwarded, failed 500"]
            assert (done["result"]["predicted"], done["result"]["skipped"]) == (0, N_FACES)
        else:
            assert [h.action for h in pushes] == ["failed 500", "forwarded"]
            assert done["result"]["created"] == N_FACES


def test_label_studio_unreachable_fails_the_job_and_a_later_run_completes(
    label_studio, stack, proxy, faces
):
    studio, backend = Studio(label_studio), Backend(stack)
    pid, images = studio.new_project("Faults: unreachable", faces)
    proxy.stop()
    try:
        job_id, version = backend.predict(pid)
        failed = backend.until(job_id, "the failure", lambda s: s["status"] == "failed",
                               may_fail=True)  # fmt: skip
    finally:
        proxy.start()
    assert failed["error"].startswith(f"GET {proxy.url}/api/projects/{pid}: no answer from "
                                      "Label Studio (ConnectionError: ")  # fmt: skip
    assert "\n" not in failed["error"] and "chunks" not in failed
    assert studio.predictions(pid, version) == {t: 0 for t in images}

    job_id, version = backend.predict(pid)
    done = backend.until(job_id, "the later run", lambda s: s["status"] == "finished")
    assert studio.predictions(pid, version) == {t: 1 for t in images}
    assert done["result"]["created"] == N_FACES and studio.model_version(pid) == version
