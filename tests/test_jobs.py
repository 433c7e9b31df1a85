"""The job queues, GET /jobs/<id>, and the predict job split into chunks.

- Job ids: what new_job_id and chunk_job_id make is accepted, anything else is a 400 before any
  queue is asked; an unknown id is a 404 that says what the queue remembers; Redis down, 503.
- The in-process queue retries a chunk after each of its intervals, shows the failed attempt's
  error while it waits, fails for good with a one-line error when they are used up, and runs
  jobs without retries once. A predict job's status adds its chunks up: started while one is
  left, failed as soon as one failed for good, finished with their counts summed.
- With a Label Studio played by a local HTTP server: the predict job queues its tasks in
  chunks and the chunks push their predictions; a task whose image Label Studio answers 500 for
  gets no prediction (an empty one would be kept for good), the others do, and the retry
  predicts only that one; an image Label Studio does not have (404) gets the empty, score-0
  prediction at once. On RQ (a real redis-server) a failing chunk is scheduled for a retry
  with the error kept, and a job without retries fails with a one-line error.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fake_label_studio import FakeServer, Reply, Seen, json_reply
from polling import wait_for
from server_process import free_port

from backend import jobs
from backend.jobs import CHUNK, PREDICT, ThreadQueue, chunk_job_id, is_job_id, new_job_id
from backend.model import model_version
from backend.repredict import chunk_size
from backend.server import create_app
from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = (REPO / "tests" / "data" / "astronaut.png").read_bytes()
CONFIG = (REPO / "label_config" / "pupils.xml").read_text(encoding="utf-8")
COARSE = model_version("fused")


def settings_for(tmp_path: Path, url: str | None = None, **extra) -> Settings:
    return Settings(model_dir=tmp_path / "models", label_studio_url=url,
                    label_studio_api_key="k" if url else None, **extra)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Job ids and the route's errors


@pytest.mark.parametrize(
    "job_id",
    [new_job_id("train", 3, "rq"), new_job_id(PREDICT, 12345, "pid4242"),
     chunk_job_id(new_job_id(PREDICT, 1, "rq"), 7),
     chunk_job_id(new_job_id(PREDICT, 1, "q"), 1200)],
)  # fmt: skip
def test_ids_the_queues_make_are_job_ids(job_id):
    assert is_job_id(job_id)


@pytest.mark.parametrize(
    "text",
    ["predict", "predict-p0-rq-1a2b3c4d", "predict-p3-rq-1a2b3c4", "predict-p3-rq-1a2b3c4g",
     "Predict-p3-rq-1a2b3c4d", "predict-p3-rq-1a2b3c4d-c", "predict-p3--1a2b3c4d",
     "predict-p3-rq-1a2b3c4d\n", "predict-p3-rq-1a2b3c4d-c001-c002", "x" * 120],
)  # fmt: skip
def test_anything_else_is_not(text):
    assert not is_job_id(text)


def test_a_bad_id_is_a_400_and_an_unknown_one_a_404_saying_what_the_queue_remembers(tmp_path):
    client = create_app(settings_for(tmp_path)).test_client()
    bad = client.get("/jobs/not-a-job")
    assert bad.status_code == 400 and bad.get_json()["status"] == 400
    assert '"not-a-job" is not a job id' in bad.get_json()["error"]
    unknown = client.get(f"/jobs/{new_job_id(PREDICT, 5, 'pid1')}")
    assert unknown.status_code == 404 and unknown.get_json()["status"] == 404
    assert "without REDIS_URL each server process" in unknown.get_json()["error"]


def test_the_route_needs_basic_auth_when_the_backend_has_it(tmp_path):
    client = create_app(
        settings_for(tmp_path, basic_auth_user="u", basic_auth_pass="p")
    ).test_client()
    job_id = new_job_id(PREDICT, 5, "pid1")
    assert client.get(f"/jobs/{job_id}").status_code == 401
    assert client.get(f"/jobs/{job_id}", auth=("u", "p")).status_code == 404


def test_with_redis_down_the_route_is_a_503(tmp_path):
    settings = settings_for(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    response = create_app(settings).test_client().get(f"/jobs/{new_job_id(PREDICT, 5, 'rq')}")
    assert response.status_code == 503
    assert "job queue is unavailable" in response.get_json()["error"]


# ---------------------------------------------------------------------------------------------
# The in-process queue: retries and the status of a job split into chunks


class Script:
    """A stand-in for run_job whose attempts the test releases one by one (the queue is what is
    tested here): each attempt waits for `step()`, then fails while `failures` are left."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts: list[str] = []
        self._go = threading.Semaphore(0)

    def step(self) -> None:
        self._go.release()

    def __call__(self, kind, project, job_id, settings, tasks=(), queue=None) -> dict:
        assert self._go.acquire(timeout=30), "the test never released this attempt"
        self.attempts.append(job_id)
        if len(self.attempts) <= self.failures:
            raise RuntimeError(f"Label Studio answered HTTP 500\nattempt {len(self.attempts)}")
        return {"outcome": "done", "predicted": len(tasks)}


def status(queue: ThreadQueue, job_id: str) -> dict:
    body = jobs.job_status(queue, job_id)
    assert body is not None
    return body


def until(queue: ThreadQueue, job_id: str, what: str, check, timeout_s: float = 10) -> dict:
    """The job's status once `check(status)` holds."""

    def look() -> dict | None:
        body = status(queue, job_id)
        return body if check(body) else None

    return wait_for(what, look, timeout_s, poll_s=0.02)


def test_a_chunk_is_retried_after_each_interval_and_the_failed_attempt_is_shown(tmp_path):
    script = Script(failures=2)
    queue = ThreadQueue(settings_for(tmp_path), run=script, retry_intervals={CHUNK: (0.01, 0.01)})
    job_id = chunk_job_id(new_job_id(PREDICT, 5, queue.owner), 1)
    queue.enqueue(CHUNK, 5, job_id, [11, 12])
    assert status(queue, job_id) == {"job": job_id, "kind": CHUNK, "project": 5,
                                     "status": "queued"}  # fmt: skip
    assert queue.is_waiting(job_id)
    script.step()  # attempt 1 fails
    second = until(queue, job_id, "the failed attempt", lambda s: s.get("last_error"))
    assert second["retries_left"] == 1
    assert second["last_error"] == "Label Studio answered HTTP 500 attempt 1"  # one line
    script.step()  # attempt 2 fails
    until(queue, job_id, "the 2nd failed attempt", lambda s: s.get("retries_left") == 0)
    script.step()  # attempt 3 succeeds
    done = until(queue, job_id, "the job", lambda s: s["status"] == "finished")
    assert done["result"] == {"outcome": "done", "predicted": 2} and "last_error" not in done
    assert script.attempts == [job_id] * 3


def test_a_chunk_fails_for_good_when_its_retries_are_used_up(tmp_path):
    script = Script(failures=3)
    queue = ThreadQueue(settings_for(tmp_path), run=script, retry_intervals={CHUNK: (0.01, 0.01)})
    job_id = chunk_job_id(new_job_id(PREDICT, 5, queue.owner), 1)
    queue.enqueue(CHUNK, 5, job_id, [11])
    for _ in range(3):
        script.step()
    failed = until(queue, job_id, "the failure", lambda s: s["status"] == "failed")
    assert failed == {"job": job_id, "kind": CHUNK, "project": 5, "status": "failed",
                      "error": "Label Studio answered HTTP 500 attempt 3"}  # fmt: skip
    assert len(script.attempts) == 3 and not queue.is_waiting(job_id)


def test_a_kind_without_retries_fails_at_once(tmp_path):
    script = Script(failures=1)
    queue = ThreadQueue(settings_for(tmp_path), run=script, retry_intervals={CHUNK: (0.01,)})
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)
    script.step()
    until(queue, job_id, "the failure", lambda s: s["status"] == "failed")
    assert script.attempts == [job_id]


def test_the_queue_forgets_its_oldest_finished_jobs_first(tmp_path):
    script = Script()
    queue = ThreadQueue(settings_for(tmp_path), run=script)
    queue.MAX_RECORDS = 2
    first, second, third = (new_job_id(PREDICT, 5, queue.owner) for _ in range(3))
    queue.enqueue(PREDICT, 5, first)
    script.step()
    until(queue, first, "the first job", lambda s: s["status"] == "finished")
    queue.enqueue(PREDICT, 5, second)
    queue.enqueue(PREDICT, 5, third)  # over the limit: the finished one goes, the waiting stay
    assert queue.reports([first, second, third])[0] is None
    assert [r.status for r in queue.reports([second, third])] == ["queued", "queued"]
    script.step()
    script.step()


class Planner(Script):
    """A predict job that queues three chunks on its queue; chunk `failing` always fails."""

    def __init__(self, failing: int | None = None) -> None:
        super().__init__()
        self.failing = failing

    def __call__(self, kind, project, job_id, settings, tasks=(), queue=None) -> dict:
        if kind == PREDICT:
            ids = [chunk_job_id(job_id, n) for n in (1, 2, 3)]
            for n, chunk_id in enumerate(ids):
                queue.enqueue(CHUNK, project, chunk_id, [10 * n + 1, 10 * n + 2])
            return {"outcome": "queued", "version": "v1", "tasks": 6, "chunks": ids}
        if job_id.endswith(f"-c{self.failing:03d}" if self.failing else "never"):
            self.attempts.append(job_id)
            raise RuntimeError("chunk broke")
        result = super().__call__(kind, project, job_id, settings, tasks, queue)
        return {**result, "created": len(tasks), "tasks": len(tasks), "seconds": 1.5}


def test_a_predict_job_is_finished_when_all_its_chunks_are(tmp_path):
    planner = Planner()
    queue = ThreadQueue(settings_for(tmp_path), run=planner, retry_intervals={})
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)
    planner.step()  # chunk 1
    working = until(queue, job_id, "chunk 1", lambda s: s.get("chunks", {}).get("finished"))
    assert working["status"] == "started" and "result" not in working
    assert working["chunks"] == {"total": 3, "queued": 1, "started": 1, "finished": 1,
                                 "failed": 0, "retrying": 0}  # fmt: skip
    planner.step()
    planner.step()
    done = until(queue, job_id, "the job", lambda s: s["status"] == "finished")
    assert done["result"] == {"outcome": "queued", "version": "v1", "tasks": 6,
                              "chunks": [chunk_job_id(job_id, n) for n in (1, 2, 3)],
                              "predicted": 6, "created": 6, "failed_tasks": 0, "skipped": 0,
                              "gone": 0, "taken": 0}  # fmt: skip


def test_a_predict_job_fails_as_soon_as_one_chunk_failed_for_good(tmp_path):
    planner = Planner(failing=1)
    queue = ThreadQueue(settings_for(tmp_path), run=planner, retry_intervals={})
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)
    failed = until(queue, job_id, "the failure", lambda s: s["status"] == "failed")
    assert failed["error"] == f"1 of 3 chunks failed; {chunk_job_id(job_id, 1)}: chunk broke"
    assert failed["chunks"]["failed"] == 1 and "result" not in failed
    planner.step()
    planner.step()


def test_chunks_are_up_to_100_tasks_and_a_small_project_is_still_cut_for_8_workers():
    assert [chunk_size(n) for n in (1, 10, 80, 81, 200, 800, 2000, 10**6)] == [
        10, 10, 10, 11, 25, 100, 100, 100]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The predict job against a Label Studio played by a local server


class Studio:
    """Project 5 with tasks 1-4 (task 4 already has a coarse prediction); the image of task 3
    is missing (404); `failing` task images answer 500 (Label Studio failing)."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.model_version = ""
        self.imported: list[dict] = []
        self.switches: list[tuple[str, int]] = []  # (version, predictions imported by then)
        self.failing: set[int] = set()
        self.tasks = [
            {"id": i, "data": {"image": f"/data/upload/5/face{i}.png"}, "annotations": [],
             "predictions": []} for i in (1, 2, 3, 4)
        ]  # fmt: skip
        self.tasks[3]["predictions"] = [{"model_version": COARSE, "result": [], "score": 0.5}]
        fake.route("/api/projects/5", self.project)
        fake.route("/api/tasks", self.list_tasks)
        fake.route("/api/projects/5/import/predictions", self.import_predictions)
        for i in (1, 2, 4):
            fake.route(f"/data/upload/5/face{i}.png", lambda seen, i=i: self.image(i))

    def project(self, seen: Seen) -> Reply:
        if seen.method == "PATCH":
            self.model_version = json.loads(seen.body)["model_version"]
            self.switches.append((self.model_version, len(self.imported)))
        return json_reply({"id": 5, "label_config": CONFIG, "model_version": self.model_version})

    def list_tasks(self, seen: Seen) -> Reply:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(seen.path).query).get("query")
        wanted = json.loads(query[0])["selectedItems"]["included"] if query else None
        tasks = [t for t in self.tasks if wanted is None or t["id"] in wanted]
        return json_reply({"tasks": tasks, "total": len(tasks)})

    def import_predictions(self, seen: Seen) -> Reply:
        body = json.loads(seen.body)
        for item in body:
            self.imported.append(item)
            task = next(t for t in self.tasks if t["id"] == item["task"])
            task["predictions"].append(item)
        return json_reply({"created": len(body)}, 201)

    def image(self, task: int) -> Reply:
        if task in self.failing:
            return Reply(500, b"Server Error")
        return Reply(200, ASTRONAUT, {"Content-Type": "image/png"})

    def predicted(self) -> dict[int, int]:
        return {t["id"]: len([p for p in t["predictions"] if p["model_version"] == COARSE])
                for t in self.tasks}  # fmt: skip


@pytest.fixture
def studio():
    fake = FakeServer().start()
    yield Studio(fake)
    fake.stop()


def test_a_task_whose_image_label_studio_fails_to_give_gets_no_prediction_until_the_retry(
    tmp_path, studio
):
    studio.failing = {2}
    queue = ThreadQueue(
        settings_for(tmp_path, studio.fake.url), retry_intervals={CHUNK: (0.5, 0.5, 0.5)}
    )
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)

    waiting = until(queue, job_id, "the chunk's failed attempt", lambda s: s.get("last_error"), 60)
    studio.failing = set()
    assert waiting["status"] == "started" and waiting["chunks"]["retrying"] == 1
    assert "1 of 3 tasks got no prediction" in waiting["last_error"]
    assert (
        "(tasks 2; task 2: download_failed: Label Studio answered HTTP 500" in waiting["last_error"]
    )
    # Task 1 was pushed; task 3 (no such image) got the empty score-0 prediction at once.
    first = {p["task"]: p for p in studio.imported}
    assert sorted(first) == [1, 3] and first[3]["result"] == [] and first[3]["score"] == 0
    done = until(queue, job_id, "the job", lambda s: s["status"] == "finished", 60)
    assert studio.predicted() == {1: 1, 2: 1, 3: 1, 4: 1}
    assert [p["task"] for p in studio.imported] == [1, 3, 2]
    assert studio.model_version == COARSE
    assert done["chunks"] == {"total": 1, "queued": 0, "started": 0, "finished": 1, "failed": 0,
                              "retrying": 0}  # fmt: skip
    result = done["result"]
    assert (result["tasks"], result["already_predicted"], result["predicted"],
            result["skipped"]) == (3, 1, 1, 2)  # fmt: skip


@pytest.fixture
def one_task_chunks(monkeypatch):
    """Cut the studio's 3 tasks to predict into 3 chunks of one."""
    from backend import repredict

    monkeypatch.setattr(repredict, "MIN_CHUNK_TASKS", 1)
    assert chunk_size(3) == 1


def test_the_version_is_switched_once_after_the_last_chunk_even_while_one_is_retried(
    tmp_path, studio, one_task_chunks
):
    """Annotators must never see a half-predicted version: the first chunks are done long
    before the retried one, and the project keeps its old version until that one is."""
    studio.failing = {2}
    queue = ThreadQueue(
        settings_for(tmp_path, studio.fake.url), retry_intervals={CHUNK: (1.0, 1.0)}
    )
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)
    waiting = until(queue, job_id, "chunks 1 and 3 done, 2 retrying",
                    lambda s: s.get("chunks", {}).get("finished") == 2, 60)  # fmt: skip
    assert waiting["chunks"]["retrying"] == 1
    assert sorted(p["task"] for p in studio.imported) == [1, 3]
    assert studio.switches == [] and studio.model_version == ""
    studio.failing = set()
    until(queue, job_id, "the job", lambda s: s["status"] == "finished", 60)
    assert studio.switches == [(COARSE, 3)]  # once, when all three were in
    assert studio.predicted() == {1: 1, 2: 1, 3: 1, 4: 1}


def test_a_chunk_failed_for_good_still_lets_the_version_switch_for_the_others(
    tmp_path, studio, one_task_chunks
):
    studio.failing = {2}
    queue = ThreadQueue(settings_for(tmp_path, studio.fake.url), retry_intervals={CHUNK: (0.2,)})
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)
    failed = until(queue, job_id, "the job", lambda s: s["status"] == "failed", 60)
    assert failed["chunks"]["finished"] == 2 and failed["chunks"]["failed"] == 1
    assert studio.switches == [(COARSE, 2)]
    assert studio.predicted() == {1: 1, 2: 0, 3: 1, 4: 1}


def test_nothing_predicted_switches_nothing(tmp_path, studio, one_task_chunks):
    """Every image failing for good (and no task predicted before): the old version stays."""
    studio.failing = {1, 2, 4}
    studio.tasks[3]["predictions"] = []
    studio.fake.route("/data/upload/5/face3.png", Reply(500, b"Server Error"))
    queue = ThreadQueue(settings_for(tmp_path, studio.fake.url), retry_intervals={CHUNK: ()})
    job_id = new_job_id(PREDICT, 5, queue.owner)
    queue.enqueue(PREDICT, 5, job_id)
    until(queue, job_id, "the job", lambda s: s["status"] == "failed", 60)
    assert studio.imported == [] and studio.switches == []


def test_a_version_no_longer_serving_is_not_switched_to(tmp_path, studio):
    """A promotion while an older job's chunks ran: its last chunk leaves the newer job to
    switch (to the newer version), never back to the older one."""
    from backend.repredict import switch_version

    settings = settings_for(tmp_path, studio.fake.url)
    assert not switch_version(settings, 5, "p5-20260101T000000000000Z-aaaaaa")
    assert switch_version(settings, 5, COARSE)
    assert not switch_version(settings, 5, COARSE)  # already
    assert studio.switches == [(COARSE, 0)]


@pytest.mark.parametrize("kind", ["thread", "redis"])
def test_of_chunks_ending_together_exactly_one_is_the_last(tmp_path, kind, request):
    if kind == "redis":
        queue = jobs.RedisQueue(request.getfixturevalue("redis_server").url, 60)
    else:
        queue = ThreadQueue(settings_for(tmp_path))
    parents = [new_job_id(PREDICT, 5, "rq") for _ in range(20)]
    for parent in parents:
        queue.open_chunks(parent, 8, "v1", 0)
    lasts: list[str] = []
    start = threading.Barrier(8)

    def end(n: int) -> None:
        start.wait()
        for parent in parents:
            if queue.chunk_ended(chunk_job_id(parent, n), 1) is not None:
                lasts.append(parent)

    threads = [threading.Thread(target=end, args=(n,)) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(lasts) == sorted(parents)
    assert queue.chunk_ended(chunk_job_id(parents[0], 9), 1) is None  # past the last: nothing


def test_a_task_claimed_by_one_job_is_not_predicted_by_another_until_released(redis_server):
    queue = jobs.RedisQueue(redis_server.url, 60)
    a, b = new_job_id(PREDICT, 5, "rq") + "-c001", new_job_id(PREDICT, 5, "rq") + "-c001"
    assert queue.claim(5, "v1", a, [1, 2, 3]) == {1, 2, 3}
    assert queue.claim(5, "v1", b, [2, 3, 4]) == {4}
    assert queue.claim(5, "v2", b, [2, 3]) == {2, 3}  # another version: another prediction
    assert queue.claim(6, "v1", b, [1]) == {1}  # another project
    assert queue.claim(5, "v1", a, [1]) == {1}  # its own retry keeps them
    queue.release(5, "v1", b, [2, 3])  # not b's: left alone
    assert queue.claim(5, "v1", b, [2]) == set()
    assert 0 < queue.connection.ttl(f"{jobs.QUEUE_NAME}:claim:p5:v1:2") <= 60 + 60
    queue.release(5, "v1", a, [1, 2, 3])
    assert queue.claim(5, "v1", b, [1, 2, 3]) == {1, 2, 3}


def test_two_predict_jobs_at_once_give_each_task_one_prediction(tmp_path, studio, redis_server):
    """Two imports pre-annotating the same project at the same moment, two workers: their
    chunks read the same tasks before either pushed; without claims every task got two."""
    entered = threading.Barrier(2, timeout=30)
    listings = []

    def list_both_first(seen: Seen) -> Reply:
        listings.append(seen.path)
        if len(listings) <= 2:
            entered.wait()  # both chunks have read their tasks before either predicts
        return studio.list_tasks(seen)

    studio.fake.route("/api/tasks", list_both_first)
    queue = jobs.RedisQueue(redis_server.url, 60)
    settings = settings_for(tmp_path, studio.fake.url, redis_url=redis_server.url)
    results: dict[str, dict] = {}

    def chunk(job_id: str) -> None:
        results[job_id] = jobs.run_job(CHUNK, 5, job_id, settings, tasks=[1, 2, 3], queue=queue)

    ids = [chunk_job_id(new_job_id(PREDICT, 5, "rq"), 1) for _ in range(2)]
    threads = [threading.Thread(target=chunk, args=(job_id,)) for job_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert studio.predicted() == {1: 1, 2: 1, 3: 1, 4: 1}
    first, second = (results[job_id] for job_id in ids)
    assert first["predicted"] + second["predicted"] == 3
    assert first["taken"] + second["taken"] == 3 and len(studio.imported) == 3
    # Claims were released: a third job later sees the predictions in Label Studio and skips.
    third = jobs.run_job(CHUNK, 5, chunk_job_id(new_job_id(PREDICT, 5, "rq"), 1), settings,
                         tasks=[1, 2, 3], queue=queue)  # fmt: skip
    assert (third["skipped"], third["taken"], third["predicted"]) == (3, 0, 0)


def test_on_rq_the_last_attempt_is_known(redis_server):
    from redis import Redis
    from rq import Queue, Retry, SimpleWorker

    connection = Redis.from_url(redis_server.url)
    queue = Queue("attempts", connection=connection)
    seen = queue.enqueue(_last_attempt_seen, redis_server.url, retry=Retry(max=1, interval=0),
                         job_id="attempts-1")  # fmt: skip
    SimpleWorker([queue], connection=connection).work(burst=True)
    SimpleWorker([queue], connection=connection).work(burst=True)
    assert [x.decode() for x in connection.lrange("attempts-seen", 0, -1)] == ["False", "True"]
    assert seen.get_status(refresh=True) == "failed"


def _last_attempt_seen(redis_url: str) -> None:
    from rq import get_current_job

    queue = jobs.RedisQueue(redis_url, 60)
    job = get_current_job()
    queue.connection.rpush("attempts-seen", str(queue.is_last_attempt(job.id)))
    raise RuntimeError("fails every time")


def test_without_a_queue_the_project_is_predicted_here_chunk_after_chunk(tmp_path, studio):
    """What backend/retrain.py does after a promotion when the queue is unavailable."""
    from backend.repredict import repredict_project

    studio.failing = {2}
    result = repredict_project(settings_for(tmp_path, studio.fake.url), 5)
    assert studio.predicted() == {1: 1, 2: 0, 3: 1, 4: 1}  # task 2 waits for the next run
    assert (result["tasks"], result["predicted"], result["already_predicted"],
            result["chunks_deferred"]) == (3, 2, 1, 1)  # fmt: skip
    studio.failing = set()
    result = repredict_project(settings_for(tmp_path, studio.fake.url), 5)
    assert studio.predicted() == {1: 1, 2: 1, 3: 1, 4: 1} and studio.model_version == COARSE
    assert (result["tasks"], result["predicted"], result["chunks_deferred"]) == (1, 1, 0)


def test_on_rq_a_failing_chunk_is_scheduled_again_and_a_job_without_retries_fails(
    tmp_path, studio, redis_server, monkeypatch
):
    from redis import Redis
    from rq import Queue, SimpleWorker
    from rq.job import Job

    studio.failing = {1}
    settings = settings_for(tmp_path, studio.fake.url, redis_url=redis_server.url)
    client = create_app(settings).test_client()
    job_id = client.post("/jobs/predict", json={"project": 5}).get_json()["job"]
    assert client.get(f"/jobs/{job_id}").get_json() == {
        "job": job_id, "kind": "predict", "project": 5, "status": "queued"}  # fmt: skip

    for name, value in (
        ("LABEL_STUDIO_URL", studio.fake.url),
        ("LABEL_STUDIO_API_KEY", "k"),
        ("MODEL_DIR", str(tmp_path / "models")),
        ("REDIS_URL", redis_server.url),
    ):
        monkeypatch.setenv(name, value)  # fmt: skip
    jobs.worker_settings.cache_clear()
    connection = Redis.from_url(redis_server.url)
    queue = Queue(jobs.QUEUE_NAME, connection=connection)
    try:
        SimpleWorker([queue], connection=connection).work(burst=True)  # the job, then its chunk
    finally:
        jobs.worker_settings.cache_clear()
    body = client.get(f"/jobs/{job_id}").get_json()
    chunk_id = chunk_job_id(job_id, 1)
    assert body["status"] == "started" and body["chunks"]["retrying"] == 1
    assert body["last_error"].startswith(f"{chunk_id} (retried, 3 retries left): 1 of 3 tasks")
    chunk = client.get(f"/jobs/{chunk_id}").get_json()
    assert chunk["status"] == "queued" and chunk["retries_left"] == 3
    assert "task 1: download_failed" in chunk["last_error"]
    assert chunk_id in queue.scheduled_job_registry.get_job_ids()
    assert Job.fetch(chunk_id, connection=connection).kwargs == {"tasks": [1, 2, 3]}
    assert studio.predicted() == {1: 0, 2: 1, 3: 1, 4: 1}

    # A predict job is not retried: Label Studio failing makes it fail, with a one-line error.
    studio.fake.route("/api/projects/5", Reply(500, b"<h1>Server Error (500)</h1>\n"))
    failing_id = client.post("/jobs/predict", json={"project": 5}).get_json()["job"]
    jobs.worker_settings.cache_clear()
    try:
        SimpleWorker([queue], connection=connection).work(burst=True)
    finally:
        jobs.worker_settings.cache_clear()
    failed = client.get(f"/jobs/{failing_id}").get_json()
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert failed["error"].startswith(f"GET {studio.fake.url}/api/projects/5 -> HTTP 500: ")
    assert failing_id not in queue.scheduled_job_registry.get_job_ids()
    unknown = client.get(f"/jobs/{new_job_id(PREDICT, 5, 'rq')}")
    assert (
        unknown.status_code == 404
        and "RQ keeps finished jobs 7 days" in unknown.get_json()["error"]
    )
