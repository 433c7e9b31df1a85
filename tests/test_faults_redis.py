"""Redis restarted while a training job runs on a real RQ worker (a real redis-server without
persistence, so it comes back empty; a real `python -m backend.worker`; the real server under
gunicorn).

The job is held at the project's training lock (as when another run of the project trains)
until Redis has been down for longer than RQ's heartbeat interval, so the worker meets the
outage; then it trains, and Redis comes back on the same port mid-training. Expected: the
server answers /predict and /webhook throughout (events go to the label store, not Redis);
the run finishes with every label, one outcome recorded; the worker is still there and runs
the next job.

Before the fix in backend/worker.py, RQ's worker ended at the heartbeat that met the outage
("found an unhandled exception, quitting"); its work horse finished the run, but nothing ran
the queue afterwards until someone restarted the worker.

Redis stopped *between* jobs and a worker SIGKILLed mid-training are in
tests/test_training_loop.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
from polling import wait_for
from redis import Redis
from rq import Queue
from rq.defaults import DEFAULT_JOB_MONITORING_INTERVAL
from server_process import running_server
from test_faults import faces  # noqa: F401 (fixture)
from test_training_loop import (
    PROJECT,
    loop_env,
    predict_body,
    send_events,
    worker,
)

from backend.jobs import QUEUE_NAME
from backend.model_store import ModelStore
from backend.project_dirs import project_dir, training_lock

pytestmark = pytest.mark.slow


def answering(base: str, rows: list[dict]) -> None:
    """The server answers a prediction (without Redis: it never needs it for that)."""
    started = time.perf_counter()
    body = requests.post(f"{base}/predict", json=predict_body(rows), timeout=60).json()
    assert len(body["results"][0]["result"]) == 6
    assert time.perf_counter() - started < 30


def last_epoch_at(log: Path) -> datetime:
    """When the worker logged its last training epoch (its log's local time)."""
    lines = [line for line in log.read_text().splitlines() if "epoch epoch=" in line]
    return datetime.strptime(lines[-1][:23], "%Y-%m-%d %H:%M:%S,%f")


def kill_all(pids: list[str]) -> None:
    """RQ's work horses run in their own process group: a worker that died leaves its horse
    behind, so the test ends it itself."""
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def finished_after(base: str, label_seq: int) -> dict | None:
    """The project's training state once a run that took `label_seq` labels has ended. (The
    first /versions after a promotion loads the new version: slow on a busy machine.)"""
    response = requests.get(f"{base}/versions?project={PROJECT}", timeout=120)
    (state,) = response.json()["training"]
    run = state["last_run"]
    if run is None or state["running"] or run["label_seq"] < label_seq:
        return None
    return state


def test_redis_restarted_mid_job_the_run_finishes_and_the_worker_goes_on(
    faces,  # noqa: F811
    tmp_path,
    redis_server,  # noqa: F811
):
    root, rows = faces
    env = loop_env(tmp_path, root, redis_server.url, TRAIN_EPOCHS="60")
    base = f"http://127.0.0.1:{env['PORT']}"
    model_dir = Path(env["MODEL_DIR"])
    worker_log = tmp_path / "worker.log"
    horses: list[str] = []
    with running_server(env, tmp_path / "server.log"), worker(env, worker_log) as process:
        try:
            with training_lock(model_dir, PROJECT, timeout_s=10):
                send_events(base, rows, range(12))
                wait_for("the worker to take the job", lambda: f"train project {PROJECT} (" in
                         worker_log.read_text(), 120)  # fmt: skip
                taken = time.monotonic()
                horses += subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                         text=True).stdout.split()  # fmt: skip
                redis_server.stop()
                send_events(base, rows, range(12, 15))  # recorded although Redis is down
                answering(base, rows)
                # RQ's worker heartbeats Redis every DEFAULT_JOB_MONITORING_INTERVAL s while a
                # job runs: let one of them meet the outage.
                wait_for("the worker's heartbeat during the outage",
                         lambda: time.monotonic() - taken > DEFAULT_JOB_MONITORING_INTERVAL + 5,
                         DEFAULT_JOB_MONITORING_INTERVAL + 30)  # fmt: skip
            wait_for("training", lambda: "epoch epoch=" in worker_log.read_text(), 120, 0.1)
            redis_server.start()  # same port, empty
            restarted = datetime.now()
            send_events(base, rows, range(15, 17))
            answering(base, rows)
            state = wait_for("the run to finish", lambda: finished_after(base, 15), 300)
            run = state["last_run"]
            assert run["outcome"] in ("promoted", "rejected"), run
            assert run["label_seq"] == 15 and run["human_faces"] == 15
            assert state["label_changes"] == 17
            store = ModelStore(project_dir(model_dir, PROJECT))
            assert [d["version"] for d in store.decisions()] == [run["version"]]
            assert [v.name for v in store.versions()] == [run["version"]]

            # The last epochs ran after Redis came back: it restarted mid-training.
            assert last_epoch_at(worker_log) > restarted

            # The worker is still there and runs the next job without anyone restarting it.
            assert process.poll() is None, (
                f"the worker exited (status {process.poll()}) after its heartbeat met the Redis "
                f"outage; its log ends:\n{worker_log.read_text()[-3000:]}"
            )
            job = Queue(QUEUE_NAME, connection=Redis.from_url(redis_server.url)).enqueue(
                "os.getpid"
            )
            wait_for("the next job", lambda: job.get_status(refresh=True) == "finished", 60)
            assert job.return_value() not in (process.pid, None)  # ran in a work horse
        finally:
            kill_all(horses)
