"""A full disk under MODEL_DIR while a training run writes its version: a real full filesystem
(a small tmpfs mounted as MODEL_DIR, filled up), a real server under gunicorn running the run
in its job thread, and a Label Studio stand-in for the reconciliation each run does.

Expected: the run fails and its record says why (ENOSPC), no half-written version is left,
the serving version keeps answering /predict; webhooks that cannot be recorded are not
acknowledged as recorded (labels.sqlite3 is on the same disk), the label store stays intact,
and once space is freed the next run brings in the annotations the refused webhooks carried
(from Label Studio's API) and succeeds.

Mounting needs root (the tests run as root here and in CI, as `make test` does).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from face_dataset import write_dataset
from fake_label_studio import FakeServer, Reply, Seen, json_reply
from polling import wait_for
from server_process import running_server
from test_faults import regressor_version, server_env
from test_training_loop import CONFIG, PROJECT, annotation_event, predict_body

from backend.label_store import FILENAME, LabelStore, LabelStoreError
from backend.model_store import ModelStore
from backend.project_dirs import project_dir
from backend.webhooks import record_event

DISK_KB = 4096  # MODEL_DIR's whole disk
HEADROOM_KB = 192  # room left for the label store's small writes, not for a version (~500 KB)
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # a legacy token's shape


@contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted at `path` (root only), always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test runs as root, as in CI): {mounted.stderr}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy: detach it


def fill(directory: Path, leave_kb: int = 0) -> Path:
    """Fill the filesystem of `directory` with a file until ENOSPC, then give back `leave_kb`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        block = b"\xff" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    finally:
        os.close(fd)
    if leave_kb:
        os.truncate(filler, max(filler.stat().st_size - leave_kb * 1024, 0))
    return filler


class LabelStudio:
    """Plays the Label Studio API a training run reconciles with: the project, its tasks with
    their annotations (what the test says exists there), and the prediction import."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.events: dict[int, dict] = {}  # annotation id -> its ANNOTATION_CREATED event
        self.fake = FakeServer()
        self.fake.route(f"/api/projects/{PROJECT}", self._project)
        self.fake.route("/api/tasks", self._tasks)
        self.fake.route(f"/api/projects/{PROJECT}/import/predictions", self._import)

    def annotate(self, i: int) -> dict:
        event = annotation_event(self.rows, i)
        self.events[event["annotation"]["id"]] = event
        return event

    def _project(self, seen: Seen) -> Reply:
        return json_reply({"id": PROJECT, "title": "Pupils", "label_config": CONFIG})

    def _tasks(self, seen: Seen) -> Reply:
        tasks = [
            {**e["task"], "annotations": [e["annotation"]], "predictions": []}
            for e in self.events.values()
        ]  # fmt: skip
        return json_reply({"tasks": tasks, "total": len(tasks)})

    def _import(self, seen: Seen) -> Reply:
        return json_reply({"created": len(json.loads(seen.body or b"[]"))}, status=201)


def stored_ids(model_dir: Path) -> set[int]:
    """Live annotation ids in the label store, read straight from its file (read-only)."""
    db = sqlite3.connect(f"file:{model_dir / FILENAME}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id FROM annotations WHERE project=? AND deleted=0", (PROJECT,))
        return {row[0] for row in rows}
    finally:
        db.close()


def integrity(model_dir: Path) -> str:
    db = sqlite3.connect(f"file:{model_dir / FILENAME}?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def training(base: str) -> dict:
    (state,) = requests.get(f"{base}/versions?project={PROJECT}", timeout=30).json()["training"]
    return state


def start_training(base: str) -> requests.Response:
    body = {"action": "START_TRAINING", "project": {"id": PROJECT, "label_config": CONFIG}}
    return requests.post(f"{base}/webhook", json=body, timeout=10)


def run_after(base: str, asked: float) -> dict | None:
    """The project's last run, once a run that ended after `asked` (a Unix time) is recorded."""
    state = training(base)
    run = state["last_run"]
    return run if run is not None and run["at"] > asked and not state["running"] else None


@pytest.mark.slow
def test_a_full_disk_fails_the_run_saying_why_and_loses_nothing(tmp_path):
    images = tmp_path / "faces"
    rows = list(csv.DictReader(open(write_dataset(images, 13, seed=5))))
    label_studio = LabelStudio(rows)
    label_studio.fake.start()
    with tmpfs(tmp_path / "models", DISK_KB) as model_dir:
        serving_store = ModelStore(project_dir(model_dir, PROJECT))
        serving = regressor_version(serving_store, f"p{PROJECT}-good-")
        serving_store.promote(serving, "the last good version")
        env = server_env(
            tmp_path, model_dir, LOCAL_FILES_DOCUMENT_ROOT=str(images),
            LABEL_STUDIO_URL=label_studio.fake.url, LABEL_STUDIO_API_KEY=API_KEY,
            TRAIN_EVERY_N_LABELS="0", TRAIN_MIN_LABELS="10", TRAIN_DEBOUNCE_S="0",
            TRAIN_EPOCHS="2", TRAIN_COARSE_WEIGHT="0",
        )  # fmt: skip
        base = f"http://127.0.0.1:{env['PORT']}"
        try:
            with running_server(env, tmp_path / "server.log"):
                for i in range(12):
                    response = requests.post(f"{base}/webhook", json=label_studio.annotate(i),
                                             timeout=10)  # fmt: skip
                    assert response.status_code == 200 and response.json()["stored"] == 1
                assert stored_ids(model_dir) == set(label_studio.events)
                body = predict_body(rows)
                assert requests.post(f"{base}/predict", json=body, timeout=120).json()[
                    "results"][0]["model_version"] == serving  # fmt: skip

                # 1. Room for the label store's writes, not for a version: the run fails.
                filler = fill(model_dir, leave_kb=HEADROOM_KB)
                asked = time.time()
                assert start_training(base).status_code == 200
                run = wait_for("the run on a full disk", lambda: run_after(base, asked), 300)
                assert run["outcome"] == "failed", run
                assert "ENOSPC" in run["reason"] and "No space left on device" in run["reason"]
                state = training(base)
                assert state["failures"] == 1 and state["trained_on"] == 0
                assert [v.name for v in serving_store.versions()] == [serving]
                assert list(serving_store.root.glob(".tmp-*")) == []  # nothing half-written
                assert serving_store.serving().name == serving
                answer = requests.post(f"{base}/predict", json=body, timeout=120).json()
                assert answer["results"][0]["model_version"] == serving
                assert len(answer["results"][0]["result"]) == 6

                # 2. Nothing left at all: an annotation cannot be recorded, so it is not
                # acknowledged as recorded; reading (predictions, reports, health) goes on.
                fill(model_dir)
                lost = label_studio.annotate(12)
                lost_id = lost["annotation"]["id"]
                refused = requests.post(f"{base}/webhook", json=lost, timeout=10)
                assert refused.status_code == 503, refused.text
                assert "the event was not recorded" in refused.json()["error"]
                assert "Traceback" not in refused.text
                assert lost_id not in stored_ids(model_dir)
                assert requests.get(f"{base}/health", timeout=10).status_code == 200
                answer = requests.post(f"{base}/predict", json=body, timeout=120).json()
                assert answer["results"][0]["model_version"] == serving
                assert integrity(model_dir) == "ok"
                assert stored_ids(model_dir) == set(label_studio.events) - {lost_id}

                # 3. Space freed: the next run reconciles the refused annotation from Label
                # Studio's API and trains on all 13.
                filler.unlink()
                asked = time.time()
                assert start_training(base).status_code == 200
                run = wait_for("the run after space was freed", lambda: run_after(base, asked),
                               300)  # fmt: skip
                assert run["outcome"] in ("promoted", "rejected"), run
                assert run["human_faces"] == 13
                state = training(base)
                assert state["failures"] == 0 and state["trained_on"] == state["label_changes"]
                assert stored_ids(model_dir) == set(label_studio.events)
                names = {v.name for v in serving_store.versions()}
                assert names == {serving, run["version"]}
                assert list(serving_store.root.glob(".tmp-*")) == []
                now = run["version"] if run["outcome"] == "promoted" else serving
                assert serving_store.serving().name == now
            log = (tmp_path / "server.log").read_text()
            assert "outcome=failed retry_in_s=60 reason=OSError: ENOSPC (No space left" in log
            assert "cannot be written, nothing was recorded: SQLITE_FULL" in log
        finally:
            label_studio.fake.stop()


def test_a_full_disk_refuses_label_store_writes_whole_and_recovers_when_freed(tmp_path):
    with tmpfs(tmp_path / "models", 512) as model_dir:
        store = LabelStore(model_dir)
        for i in range(5):
            event = annotation_event([{"file": "a.png", "left_x": 1, "left_y": 1, "right_x": 9,
                                       "right_y": 1}], i)  # fmt: skip
            record_event(store, event["action"], event)
        filler = fill(model_dir)
        refused = 0
        for i in range(5, 40):  # enough to outgrow what SQLite had allocated before
            event = annotation_event([{"file": "a.png", "left_x": 1, "left_y": 1, "right_x": 9,
                                       "right_y": 1}], i)  # fmt: skip
            try:
                record_event(store, event["action"], event)
            except LabelStoreError as e:
                assert "SQLITE_FULL" in str(e) and str(model_dir / FILENAME) in str(e)
                refused += 1
        assert refused > 0
        kept = store.annotation_ids(PROJECT)
        assert {5000 + i for i in range(5)} <= kept and len(kept) == 40 - refused
        assert integrity(model_dir) == "ok"
        filler.unlink()
        store.upsert(PROJECT, 1, {"id": 99, "task": 1, "result": []}, None)  # same thread
        assert 99 in store.annotation_ids(PROJECT)


def test_a_promotion_on_a_full_disk_fails_whole(tmp_path):
    with tmpfs(tmp_path / "models", 256) as root:
        store = ModelStore(root)
        first, second = (store.create(lambda d: (d / "w").write_bytes(b"w"), {}).name
                         for _ in range(2))  # fmt: skip
        store.promote(first, "good")
        fill(root)
        with pytest.raises(OSError) as failed:
            store.promote(second, "better")
        assert failed.value.errno == errno.ENOSPC
        assert list(root.glob("*.tmp")) == []  # no half-written pointer beside the real one
        assert store.serving().name == first
        assert [d["version"] for d in store.decisions()] == [first]
