"""Faults around model versions: a serving version damaged on disk, with the backend under
gunicorn (`python -m backend.server`), started twice.

- A damaged serving version (weights truncated, metadata.json garbage, weights deleted): the
  running server keeps serving the copy it loaded and says so (log, /versions `problems`);
  a restarted server serves the last good version promoted before it, never a rejected one,
  and falls back to the coarse detector only when no good regressor is left, saying why.
- The store's rules for that choice, and for writes that must not leave a torn record: a
  damaged version is never promoted, a torn decisions line never swallows the next one, and a
  START_TRAINING that a running run answers queues no second run.

The other faults: tests/test_faults_race.py (two promotions racing), tests/test_faults_disk.py
(disk full), tests/test_faults_redis.py (Redis restarted mid-job), tests/test_faults_storm.py
(1,000 webhooks); and in tests/test_training_loop.py, a worker SIGKILLed mid-training and Redis
down between jobs.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from face_dataset import write_dataset
from server_process import ROOT, free_port, running_server
from test_scheduler import FakeQueue
from test_training_loop import CONFIG, PROJECT

from backend.label_store import LabelStore
from backend.model_store import DECISIONS, METADATA, SERVING, ModelStore, ModelStoreError
from backend.project_dirs import project_dir, training_lock
from backend.scheduler import Scheduler
from backend.settings import Settings

DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple[Path, list[dict]]:
    """12 warped astronauts with known pupils (tests/face_dataset.py) and their rows."""
    root = tmp_path_factory.mktemp("faces")
    rows = list(csv.DictReader(open(write_dataset(root, 12, seed=5))))
    return root, rows


def regressor_version(store: ModelStore, prefix: str) -> str:
    """A real regressor version (untrained network: what it predicts does not matter here)."""
    from backend.regressor.network import NetworkConfig, build_network
    from backend.regressor.version import write_version

    network = NetworkConfig()
    version = write_version(
        store, build_network(network), network, np.zeros(6), np.zeros(2), {"metrics": {}},
        prefix=prefix,
    )  # fmt: skip
    return version.name


def server_env(tmp_path: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAIN_", "REDIS_"))}
    return {
        **env, "HOST": "127.0.0.1", "PORT": str(free_port()), "MODEL_DIR": str(model_dir),
        "LOCAL_FILES_DOCUMENT_ROOT": str(DATA), "LOG_LEVEL": "INFO", **extra,
    }  # fmt: skip


def predicted_by(base: str, project: int) -> str:
    task = {"id": 1, "data": {"image": "/data/local-files/?d=astronaut.png"}}
    body = {"tasks": [task], "label_config": CONFIG, "project": f"{project}.1763700000"}
    response = requests.post(f"{base}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert len(result["result"]) == 6, result  # a real prediction: both eyes' points
    return result["model_version"]


def versions(base: str, project: int) -> dict:
    response = requests.get(f"{base}/versions?project={project}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def detail(report: dict, name: str) -> dict:
    return next(d for d in report["details"] if d["name"] == name)


# ---------------------------------------------------------------------------------------------
# A damaged serving version


def truncate_weights(path: Path) -> str:
    weights = path / "weights.h5"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 3)
    return f"weights.h5 has {size // 3} bytes, {size} when written"


def garbage_metadata(path: Path) -> str:
    (path / METADATA).write_text("{\x00 not json")
    return f"unreadable {METADATA}"


def delete_weights(path: Path) -> str:
    (path / "weights.h5").unlink()
    return "weights.h5 is missing"


DAMAGES = {21: truncate_weights, 22: garbage_metadata, 23: delete_weights}
BOTH_BAD = 24  # its previous good version is damaged too: only then does the coarse detector serve


@pytest.fixture(scope="module")
def promoted_twice(tmp_path_factory) -> tuple[Path, dict[int, tuple[str, str]]]:
    """A MODEL_DIR where projects 21-24 each promoted an "old" version, then a "new" one (and
    rejected a third, which must never serve)."""
    model_dir = tmp_path_factory.mktemp("promoted") / "models"
    names = {}
    for project in (*DAMAGES, BOTH_BAD):
        store = ModelStore(project_dir(model_dir, project))
        old = regressor_version(store, f"p{project}-old-")
        store.promote(old, "better than the coarse detector")
        rejected = regressor_version(store, f"p{project}-rejected-")
        store.reject(rejected, "not better than the serving model")
        new = regressor_version(store, f"p{project}-new-")
        store.promote(new, "better than the serving model")
        names[project] = (old, new)
    return model_dir, names


@pytest.mark.slow
def test_a_damaged_serving_version_keeps_serving_from_memory_then_the_last_good_one_serves(
    tmp_path, promoted_twice
):
    template, names = promoted_twice
    model_dir = tmp_path / "models"
    shutil.copytree(template, model_dir)
    env = server_env(tmp_path, model_dir)
    base = f"http://127.0.0.1:{env['PORT']}"
    expected: dict[int, str] = {}
    with running_server(env, tmp_path / "server1.log"):
        for project, (_, new) in names.items():
            assert predicted_by(base, project) == new
        for project, damage in DAMAGES.items():
            expected[project] = damage(project_dir(model_dir, project) / "versions" /
                                       names[project][1])  # fmt: skip
        for name in names[BOTH_BAD]:
            truncate_weights(project_dir(model_dir, BOTH_BAD) / "versions" / name)

        # The running server keeps serving the copy it loaded, and says why it should not.
        for project, (old, new) in names.items():
            assert predicted_by(base, project) == new
            report = versions(base, project)
            assert report["serving"] == new
            (problem,) = report["problems"]
            assert problem["promoted"] == new and problem["serving"] == new
            (reason,) = problem["reasons"]
            assert f"{new!r} was damaged on disk after it was loaded" in reason
            assert "served from memory" in reason
            if project in DAMAGES:
                assert expected[project] in reason
                assert problem["after_restart"] == old and f"a restart would serve {old}" in reason
            else:
                assert problem["after_restart"] is None
            assert detail(report, new)["status"] == "serving"
            assert detail(report, new)["problem"]
        log = (tmp_path / "server1.log").read_text()
        for _, new in names.values():
            assert f"model version {new} damaged on disk after it was loaded" in log

    with running_server(env, tmp_path / "server2.log"):
        for project, (old, new) in names.items():
            served = predicted_by(base, project)
            report = versions(base, project)
            (problem,) = report["problems"]
            assert problem["promoted"] == new
            if project in DAMAGES:  # the last good version, not the coarse detector
                assert served == old and report["serving"] == old
                assert problem["serving"] == old and problem["after_restart"] == old
                assert detail(report, old)["status"] == "serving"
                assert expected[project] in problem["reasons"][0]
            else:
                assert served.startswith("coarse-") and report["serving"] == served
                assert len(problem["reasons"]) == 2  # why the new, then why the old
                assert problem["serving"] is None
            assert detail(report, new)["status"] == "unusable"
            assert new in detail(report, new)["problem"]
            assert all(d["status"] != "serving" for d in report["details"]
                       if "-rejected-" in d["name"])  # fmt: skip
        log = (tmp_path / "server2.log").read_text()
        for project in DAMAGES:
            old, new = names[project]
            assert f"serving {old}, the last good promoted version" in log
            assert expected[project] in log
        assert "no good promoted version is left here" in log


# ---------------------------------------------------------------------------------------------
# The store's rules for what serves when the promoted version cannot (no model loaded)


def weights(directory: Path) -> None:
    (directory / "weights.bin").write_bytes(bytes(range(256)) * 4)


def test_the_last_good_version_promoted_before_serves_never_a_rejected_one(tmp_path):
    store = ModelStore(tmp_path)
    first, second, rejected, third = (store.create(weights, {}).name for _ in range(4))
    store.promote(first, "better than coarse")
    store.promote(second, "better than first")
    store.reject(rejected, "not better than second")
    store.promote(third, "better than second")
    assert store.resolve_serving().version.name == third and store.resolve_serving().problems == ()

    (tmp_path / "versions" / third / "weights.bin").write_bytes(b"torn")
    choice = store.resolve_serving()
    assert (choice.pointer, choice.version.name) == (third, second)
    assert choice.passed_over == (
        (third, f"model version {third!r} is damaged: weights.bin has 4 bytes, 1024 when written"),
    )
    # Same size, other bytes: the manifest's sha256 tells.
    (tmp_path / "versions" / second / "weights.bin").write_bytes(bytes(1024))
    choice = store.resolve_serving()
    assert choice.version.name == first
    assert "weights.bin differs from what was written (sha256)" in choice.problems[1]
    (tmp_path / "versions" / first / "weights.bin").unlink()
    choice = store.resolve_serving()
    assert choice.version is None and len(choice.problems) == 3  # never `rejected`
    assert "weights.bin is missing" in choice.problems[2]
    assert store.serving() is None


def test_an_unreadable_pointer_serves_the_newest_good_promotion_and_no_pointer_none(tmp_path):
    store = ModelStore(tmp_path)
    first, second = (store.create(weights, {}).name for _ in range(2))
    store.promote(first, "a")
    store.promote(second, "b")
    (tmp_path / SERVING).write_text('{"version": ')  # torn by hand: os.replace never tears it
    choice = store.resolve_serving()
    assert choice.pointer is None and choice.version.name == second
    assert choice.problems[0].startswith("serving pointer unreadable")
    (tmp_path / SERVING).unlink()  # an operator's way back to the coarse detector
    assert store.resolve_serving().version is None and store.resolve_serving().problems == ()


def test_a_damaged_version_cannot_be_promoted(tmp_path):
    store = ModelStore(tmp_path)
    good, bad = (store.create(weights, {}).name for _ in range(2))
    store.promote(good, "good")
    (tmp_path / "versions" / bad / "weights.bin").unlink()
    with pytest.raises(ModelStoreError, match="weights.bin is missing"):
        store.promote(bad, "would be better")
    assert store.serving().name == good
    assert [d["version"] for d in store.decisions()] == [good]


def test_a_torn_decision_line_does_not_swallow_the_next_one(tmp_path):
    store = ModelStore(tmp_path)
    first, second = (store.create(weights, {}).name for _ in range(2))
    store.promote(first, "a")
    with open(tmp_path / DECISIONS, "a") as f:
        f.write('{"at": "2026-11-21T10:00:00+00:00", "decision": "prom')  # the disk filled up
    store.reject(second, "b")
    assert [(d["decision"], d["version"]) for d in store.decisions()] == [
        ("promoted", first), ("rejected", second),
    ]  # fmt: skip


def test_a_run_started_after_start_training_answers_it_no_second_job(tmp_path):
    """START_TRAINING before a run started: that run answers it; the scheduler must not queue
    a second run for the same request while it trains (it did, once per request)."""
    store = LabelStore(tmp_path)
    store.request_training(PROJECT, CONFIG)
    queue = FakeQueue()
    scheduler = Scheduler(Settings(model_dir=tmp_path, train_every=0), store=store, queue=queue)
    (job,) = scheduler.kick()
    with training_lock(tmp_path, PROJECT, timeout_s=5):
        store.start_run(PROJECT, job)  # the job runs: its slot is free again
        queue.waiting.clear()
        assert scheduler.kick() == []
        assert scheduler.due(store.project(PROJECT), time.time()) is None
    # The run died without finishing: the request is still there, and due again.
    state = store.project(PROJECT)
    assert scheduler.due(state, time.time()) == "training requested (START_TRAINING)"
    assert len(scheduler.kick()) == 1 and len(queue.jobs) == 2
