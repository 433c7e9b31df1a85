"""scripts/import_images.py without Label Studio, and the backend route it calls.

- Finding images (a folder at any depth, a glob, a list of URLs), checking and hashing them,
  de-duplicating against the project and within the run, batching, the summary and its exit
  status, and the options (command line over environment) -- all on real files.
- Label Studio's failures as the user sees them: one `error:` line, no traceback, for a port
  nobody listens on, a server that is not Label Studio, a refused key (a local HTTP server plays
  those answers); and a batch Label Studio refuses is imported file by file, so one bad file is
  reported and the others still go in.
- `POST /jobs/predict`: 400 for a bad body, 503 without Label Studio settings or with Redis
  down, 202 and the job queued. Queued on the in-process queue, the job really runs: with no
  regressor promoted the coarse detector predicts every task that has no prediction of its
  version yet, the predictions are imported and the project's model version set. On RQ (a real
  redis-server) the job lands in the queue and a worker runs it and the chunk it queues.
- Waiting for the predictions watches the job too (GET /jobs/<id>): a failed job ends the wait
  at once with its error, a finished one with tasks still unpredicted too; a job the backend
  does not know is said once and Label Studio watched; a part being retried is said once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from fake_label_studio import FakeServer, Reply, Seen, json_reply
from PIL import Image
from polling import wait_for
from script_module import script_module
from server_process import free_port
from tqdm import tqdm
from urllib3.util.retry import Retry

from backend import jobs
from backend.ls_auth import LabelStudioAuth
from backend.model import model_version
from backend.server import create_app
from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "import_images.py"
ASTRONAUT = REPO / "tests" / "data" / "astronaut.png"
CONFIG = (REPO / "label_config" / "pupils.xml").read_text(encoding="utf-8")
COARSE = model_version("fused")


@pytest.fixture(scope="module")
def script():
    with script_module("import_images") as module:
        yield module


def write_png(path: Path, shade: int = 128, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), shade, np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder: images at several depths with mixed-case extensions, plus non-images."""
    root = tmp_path / "photos"
    write_png(root / "a.png", 10)
    (root / "sub").mkdir()
    Image.open(write_png(root / "b.png", 20)).convert("RGB").save(root / "sub" / "c.JPG")
    write_png(root / "sub" / "deeper" / "d.Png", 30)
    write_png(root / "sub" / "e.webp", 40)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "eyes.csv").write_text("file,x\n")
    (root / "sub" / "f.tif").write_bytes(b"II*\x00")  # Label Studio takes no .tif uploads
    return root


# ---------------------------------------------------------------------------------------------
# Finding images


def test_a_folder_is_searched_at_every_depth_by_extension_in_any_case(script, photos):
    found = script.discover(str(photos))
    assert [s.name for s in found] == ["a.png", "b.png", "sub/c.JPG", "sub/deeper/d.Png",
                                       "sub/e.webp"]  # fmt: skip
    assert all(Path(s.ref).is_file() and not s.is_url for s in found)


def test_a_glob_takes_every_file_it_matches_so_refused_ones_are_reported(script, photos):
    found = script.discover(str(photos / "sub" / "*"))
    assert [Path(s.ref).name for s in found] == ["c.JPG", "e.webp", "eyes.csv", "f.tif"]
    deep = script.discover(str(photos / "**" / "*.png"))
    assert [Path(s.ref).name for s in deep] == ["a.png", "b.png"]
    assert script.discover(str(photos / "*.gif")) == []


def test_a_url_list_skips_blank_lines_and_comments(script, tmp_path):
    listing = tmp_path / "urls.txt"
    listing.write_text(
        "\ufeff# faces from the bucket\n\nhttps://img.example.com/1.jpg\n"
        "  s3://bucket/2.png  \n# https://img.example.com/old.jpg\nnot a url\n",
        encoding="utf-8",
    )
    found = script.discover(str(listing))
    assert [s.ref for s in found] == ["https://img.example.com/1.jpg", "s3://bucket/2.png",
                                      "not a url"]  # fmt: skip
    assert all(s.is_url for s in found)


def test_one_image_file_is_its_own_list(script, photos):
    (found,) = script.discover(str(photos / "a.png"))
    assert found.name == "a.png" and found.ref == str(photos / "a.png")


def test_a_missing_images_path_is_a_usage_error(script, tmp_path):
    with pytest.raises(script.Fatal, match="images path not found") as raised:
        script.discover(str(tmp_path / "nowhere"))
    assert raised.value.code == script.EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# Checking, hashing, de-duplicating


def test_a_file_is_hashed_by_its_bytes_and_a_url_by_its_text(script, photos):
    source = script.Source(str(photos / "a.png"), "a.png")
    item = script.prepare(source)
    data = (photos / "a.png").read_bytes()
    assert item.sha256 == hashlib.sha256(data).hexdigest() and item.data == data
    url = "https://img.example.com/1.jpg"
    remote = script.prepare(script.Source(url, url, is_url=True))
    assert remote.sha256 == hashlib.sha256(url.encode()).hexdigest() and remote.data is None


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "not a usable image"),
        ("empty.png", b"", "not a usable image: empty file"),
        ("text.png", b"hello, world", "not a usable image"),
        ("photo.tif", None, "Label Studio does not take .tif uploads"),
        ("README", b"text", "does not take extension-less uploads"),
    ],
)
def test_files_that_cannot_be_imported_say_why(script, tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        Image.open(ASTRONAUT).save(path)  # a real TIFF: the backend could read it, LS not
    else:
        path.write_bytes(content)
    with pytest.raises(script.SourceError, match=re.escape(reason)):
        script.prepare(script.Source(str(path), name))


def test_an_unreadable_file_and_a_bad_url_say_why(script, tmp_path):
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "missing.png")
    with pytest.raises(script.SourceError, match="cannot read"):
        script.prepare(script.Source(str(dangling), "gone.png"))
    with pytest.raises(script.SourceError, match="not an image URL"):
        script.prepare(script.Source("ftp://host/x.jpg", "ftp://host/x.jpg", is_url=True))


def test_known_and_repeated_images_are_skipped_and_bad_ones_fail_alone(script, photos):
    (photos / "copy-of-a.png").write_bytes((photos / "a.png").read_bytes())
    (photos / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sources = script.discover(str(photos))
    b_hash = hashlib.sha256((photos / "b.png").read_bytes()).hexdigest()
    known = {b_hash}
    summary = script.Summary()
    done = []
    new = list(script.new_images(sources, known, summary, on_done=lambda: done.append(1)))
    assert [i.source.name for i in new] == ["a.png", "sub/c.JPG", "sub/deeper/d.Png",
                                            "sub/e.webp"]  # fmt: skip
    assert summary.skipped == ["b.png", "copy-of-a.png"]  # in the project; earlier in the run
    assert [name for name, _ in summary.failed] == ["zz-broken.png"]
    assert len(done) == 3 and known == {b_hash}  # the caller's set is left alone


def test_batches_hold_at_most_n_files_and_about_max_bytes(script):
    def item(n: int, size: int):
        return script.Prepared(script.Source(f"{n}.png", f"{n}.png"), str(n), b"x" * size)

    items = [item(i, 10) for i in range(7)]
    assert [len(b) for b in script.batched(items, 3)] == [3, 3, 1]
    assert [len(b) for b in script.batched(items, 100, max_bytes=25)] == [3, 3, 1]
    assert list(script.batched([], 3)) == []


def test_task_data_keeps_the_image_the_hash_and_where_it_came_from(script):
    item = script.Prepared(script.Source("/x/sub/a.png", "sub/a.png"), "ab" * 32, b"")
    assert script.task_data(item, "/data/upload/3/1f2e3d4c-a.png", "photo") == {
        "photo": "/data/upload/3/1f2e3d4c-a.png", "sha256": "ab" * 32, "source": "sub/a.png",
    }  # fmt: skip


def test_the_summary_lists_failures_and_fails_only_when_nothing_is_in(script):
    summary = script.Summary(imported=["a.png"], skipped=["b.png"],
                             failed=[("c.jpg", "not a usable image: damaged")])  # fmt: skip
    text = summary.render()
    assert "imported: 1" in text and "skipped (already in the project): 1" in text
    assert "failed: 1\n  c.jpg: not a usable image: damaged" in text
    assert summary.exit_code() == script.EXIT_OK
    assert script.Summary(skipped=["b.png"]).exit_code() == script.EXIT_OK  # a second run
    assert script.Summary(failed=[("c", "x")]).exit_code() == script.EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Options


def test_url_key_and_basic_auth_come_from_the_environment_unless_given(script):
    env = {"LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "env-key",
           "BASIC_AUTH_USER": "ml", "BASIC_AUTH_PASS": "pass word "}  # fmt: skip
    options = script.parse_options(["--project", "P", "--images", "x"], env)
    assert (options.url, options.api_key, options.backend_auth) == (
        "http://ls:8080", "env-key", ("ml", "pass word "))  # fmt: skip
    given = script.parse_options(
        ["--project", "P", "--images", "x", "--url", "https://ls.example.com", "--api-key", "k-42",
         "--backend-url", "http://ml:9090/", "--backend-user", "u", "--backend-password", "pw-7",
         "--preannotate", "--no-progress"], env,
    )  # fmt: skip
    assert (given.url, given.api_key, given.backend_auth) == ("https://ls.example.com", "k-42",
                                                              ("u", "pw-7"))  # fmt: skip
    assert given.backend_url == "http://ml:9090" and given.preannotate and given.progress is False
    assert "k-42" not in repr(given) and "pw-7" not in repr(given)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "Label Studio's URL is needed"),
        ([], {"LABEL_STUDIO_URL": "http://ls"}, "an API key is needed"),
        (["--url", "ls:8080", "--api-key", "k"], {}, "--url must be an http(s) URL"),
        (["--url", "http://ls", "--api-key", "k", "--backend-user", "u"], {},
         "needs both a user and a password"),
        (["--url", "http://ls", "--api-key", "k"], {"BASIC_AUTH_PASS": "p"},
         "needs both a user and a password"),
        (["--url", "http://ls", "--api-key", "k", "--preannotate"], {},
         "--preannotate needs --backend-url"),
        (["--url", "http://ls", "--api-key", "k", "--backend-url", "ml:9090"], {},
         "--backend-url must be an http(s) URL"),
        (["--url", "http://ls", "--api-key", "k", "--batch-size", "101"], {}, "--batch-size"),
    ],
)  # fmt: skip
def test_bad_options_are_usage_errors(script, args, env, message):
    with pytest.raises(script.Fatal, match=re.escape(message)) as raised:
        script.parse_options(["--project", "P", "--images", "x", *args], env)
    assert raised.value.code == script.EXIT_USAGE


def run_main(script, capsys, *args: str) -> tuple[int, str, str]:
    code = script.main(["--project", "P", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_empty_glob_and_a_missing_path_stop_before_any_network_call(script, capsys, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_main(script, capsys, "--url", closed, "--api-key", "k",
                            "--images", str(tmp_path / "*.png"))  # fmt: skip
    assert code == script.EXIT_USAGE and "no images found" in one_error_line(err)
    code, _, err = run_main(script, capsys, "--url", closed, "--api-key", "k",
                            "--images", str(tmp_path / "missing"))  # fmt: skip
    assert code == script.EXIT_USAGE and "images path not found" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# Label Studio's failures, as the user sees them


@pytest.fixture
def fake():
    server = FakeServer().start()
    yield server
    server.stop()


def test_nobody_listening_is_one_clear_line(script, capsys, photos):
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_main(script, capsys, "--url", closed, "--api-key", "k",
                            "--images", str(photos))  # fmt: skip
    line = one_error_line(err)
    assert code == script.EXIT_FAILED
    assert f"cannot connect to Label Studio at {closed}" in line and "refused" in line


def test_a_server_that_is_not_label_studio_is_named_so(script, capsys, photos, fake):
    fake.route(
        "/api/current-user/whoami",
        Reply(200, b"<!doctype html><html>hello</html>", {"Content-Type": "text/html"}),
    )
    code, _, err = run_main(script, capsys, "--url", fake.url, "--api-key", "k",
                            "--images", str(photos))  # fmt: skip
    assert code == script.EXIT_FAILED
    assert "does not look like Label Studio" in one_error_line(err)
    assert "an HTML page" in one_error_line(err)


def test_a_refused_key_is_one_clear_line(script, capsys, photos, fake):
    fake.route("/api/current-user/whoami", json_reply({"detail": "Invalid token."}, 401))
    code, _, err = run_main(script, capsys, "--url", fake.url, "--api-key", "wrong",
                            "--images", str(photos))  # fmt: skip
    line = one_error_line(err)
    assert code == script.EXIT_FAILED
    assert "refused the API key" in line and "Invalid token." in line
    (seen,) = fake.seen("/api/current-user/whoami")
    assert seen.authorization == "Token wrong"


class FakeUploads:
    """Label Studio's three upload calls; a batch holding `bad` is refused (400) whole."""

    def __init__(self, server: FakeServer, project: int, bad: str) -> None:
        self.uploads: dict[int, str] = {}
        self.tasks: list[dict] = []
        self.bad = bad
        server.route(f"/api/projects/{project}/import", self.import_)
        server.route(f"/api/projects/{project}/file-uploads", self.file_uploads)

    def import_(self, seen: Seen) -> Reply:
        if "commit_to_project=false" not in seen.path:
            tasks = json.loads(seen.body)
            first = len(self.tasks) + 1
            self.tasks += tasks
            ids = list(range(first, first + len(tasks)))
            return json_reply({"task_count": len(tasks), "task_ids": ids}, 201)
        names = re.findall(rb'filename="([^"]+)"', seen.body)
        if self.bad.encode() in names:
            return json_reply({"detail": f"{self.bad}: cannot store it"}, 400)
        ids = []
        for name in names:
            ids.append(len(self.uploads) + 1)
            self.uploads[ids[-1]] = f"upload/1/0a1b2c3d-{name.decode()}"
        return json_reply({"file_upload_ids": ids}, 201)

    def file_uploads(self, seen: Seen) -> Reply:
        ids = json.loads(parse_qs(urlsplit(seen.path).query)["ids"][0])
        return json_reply([{"id": i, "file": self.uploads[i]} for i in ids])


def studio_on(script, fake: FakeServer):
    uploads = script.UploadClient(fake.url, LabelStudioAuth(fake.url, "k"), retry=Retry(0))
    return script.Studio(fake.url, sdk=None, uploads=uploads)


def test_a_refused_batch_is_sent_file_by_file_so_only_the_bad_file_fails(script, photos, fake):
    studio = studio_on(script, fake)
    project = script.Project(1, "P", "image", created=False)
    uploads = FakeUploads(fake, 1, bad="b.png")
    items = [script.prepare(s) for s in script.discover(str(photos))]
    summary = script.Summary()
    with tqdm(disable=True) as bar:
        script.send_batch(studio, project, items, summary, bar)
    assert summary.imported == ["a.png", "sub/c.JPG", "sub/deeper/d.Png", "sub/e.webp"]
    assert [(name, "cannot store it" in why) for name, why in summary.failed] == [("b.png", True)]
    assert summary.task_ids == [1, 2, 3, 4]
    data = [t["data"] for t in uploads.tasks]
    assert [d["source"] for d in data] == summary.imported
    assert data[0]["image"] == "/data/upload/1/0a1b2c3d-a.png"
    assert data[0]["sha256"] == hashlib.sha256((photos / "a.png").read_bytes()).hexdigest()
    assert all(s.authorization == "Token k" for s in fake.requests)


def test_label_studio_going_away_mid_import_stops_the_run(script, photos, fake):
    studio = studio_on(script, fake)
    project = script.Project(1, "P", "image", created=False)
    items = [script.prepare(s) for s in script.discover(str(photos))][:2]
    fake.stop()
    with (
        pytest.raises(script.Fatal, match="no answer from Label Studio"),
        tqdm(disable=True) as bar,
    ):
        script.send_batch(studio, project, items, script.Summary(), bar)


def test_urls_become_tasks_without_an_upload(script, fake):
    studio = studio_on(script, fake)
    uploads = FakeUploads(fake, 1, bad="-")
    url = "https://img.example.com/1.jpg"
    item = script.prepare(script.Source(url, url, is_url=True))
    assert script.import_batch(studio, script.Project(1, "P", "image", False), [item]) == [1]
    assert uploads.tasks == [{"data": {"image": url, "sha256": item.sha256, "source": url}}]
    assert uploads.uploads == {}


def test_the_webhook_header_is_basic_auth_of_the_backend_credentials(script):
    backend = script.Backend("http://ml:9090", "http://ml:9090", ("ml", "s3cret:x"))
    token = base64.b64decode(backend.authorization.removeprefix("Basic ")).decode()
    assert token == "ml:s3cret:x"
    assert script.Backend("http://ml:9090", "http://ml:9090").authorization is None


# ---------------------------------------------------------------------------------------------
# POST /jobs/predict


@pytest.fixture
def ls_fake(fake):
    """A Label Studio project 5 with two tasks; task 2 already has a coarse prediction."""
    state = {"model_version": "", "imported": [], "patched": []}
    image = ASTRONAUT.read_bytes()
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/5/face.png"}, "annotations": [],
         "predictions": []},
        {"id": 2, "data": {"image": "/data/upload/5/face.png"}, "annotations": [],
         "predictions": [{"model_version": COARSE, "result": [], "score": 0.5}]},
    ]  # fmt: skip

    def project(seen: Seen) -> Reply:
        if seen.method == "PATCH":
            state["patched"].append(json.loads(seen.body))
            state["model_version"] = state["patched"][-1]["model_version"]
        return json_reply({"id": 5, "label_config": CONFIG,
                           "model_version": state["model_version"]})  # fmt: skip

    def import_predictions(seen: Seen) -> Reply:
        body = json.loads(seen.body)
        state["imported"] += body
        return json_reply({"created": len(body)}, 201)

    fake.route("/api/projects/5", project)
    fake.route("/api/tasks", json_reply({"tasks": tasks, "total": len(tasks)}))
    fake.route("/api/projects/5/import/predictions", import_predictions)
    fake.route("/data/upload/5/face.png", Reply(200, image, {"Content-Type": "image/png"}))
    return fake, state


def job_settings(tmp_path: Path, url: str | None, **extra) -> Settings:
    key = "k" if url else None
    return Settings(model_dir=tmp_path / "models", label_studio_url=url,
                    label_studio_api_key=key, **extra)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the request body is empty"),
        (b"[5]", "must be a JSON object"),
        (b"{}", "'project' is required: the Label Studio project id (a positive integer)"),
        (b'{"project": "five"}', 'got a string "five"'),
        (b'{"project": 0}', "got a number 0"),
        (b'{"project": -3}', "got a number -3"),
        (b'{"project": 2.5}', "got a number 2.5"),
        (b'{"project": true}', "got a boolean true"),
        (b'{"project": null}', "'project' is required"),
    ],
)
def test_predict_job_requests_with_a_bad_body_are_400s(tmp_path, body, message):
    client = create_app(job_settings(tmp_path, "http://ls:8080")).test_client()
    response = client.post("/jobs/predict", data=body, content_type="application/json")
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_without_label_studio_settings_the_route_is_a_503(tmp_path):
    client = create_app(job_settings(tmp_path, None)).test_client()
    response = client.post("/jobs/predict", json={"project": 5})
    assert response.status_code == 503
    assert "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in response.get_json()["error"]


def test_the_route_needs_basic_auth_when_the_backend_has_it(tmp_path):
    settings = job_settings(tmp_path, "http://ls:8080", basic_auth_user="u", basic_auth_pass="p")
    client = create_app(settings).test_client()
    assert client.post("/jobs/predict", json={"project": 5}).status_code == 401


def wait_for_job(state: dict) -> None:
    wait_for("the predict job's model version in Label Studio", lambda: state["patched"], 120)


def check_predicted_task_1_only(state: dict) -> None:
    (prediction,) = state["imported"]  # task 2 already had a prediction of this version
    assert prediction["task"] == 1 and prediction["model_version"] == COARSE
    assert len(prediction["result"]) == 6 and 0.0 < prediction["score"] <= 1.0
    assert state["patched"] == [{"model_version": COARSE}]


def test_a_queued_predict_job_runs_in_process_with_the_coarse_detector(tmp_path, ls_fake):
    fake, state = ls_fake
    client = create_app(job_settings(tmp_path, fake.url)).test_client()
    response = client.post("/jobs/predict", json={"project": "5"})
    assert response.status_code == 202
    body = response.get_json()
    assert body["kind"] == "predict" and body["project"] == 5 and body["model_version"] == COARSE
    assert body["job"].startswith("predict-p5-pid")
    wait_for_job(state)
    check_predicted_task_1_only(state)
    assert all(s.authorization == "Token k" for s in fake.requests)


def test_a_predict_job_goes_to_rq_and_a_worker_runs_it(tmp_path, ls_fake, redis_server,
                                                       monkeypatch):  # fmt: skip
    from redis import Redis
    from rq import Queue, SimpleWorker
    from rq.job import Job

    fake, state = ls_fake
    settings = job_settings(tmp_path, fake.url, redis_url=redis_server.url)
    response = create_app(settings).test_client().post("/jobs/predict", json={"project": 5})
    assert response.status_code == 202
    job_id = response.get_json()["job"]
    assert job_id.startswith("predict-p5-rq-")
    connection = Redis.from_url(redis_server.url)
    job = Job.fetch(job_id, connection=connection)
    assert job.func is jobs.run_job and job.args == ("predict", 5, job_id)
    assert state["imported"] == []  # queued, not run by the server

    # A worker reads its settings from its environment, as `python -m backend.worker` does.
    monkeypatch.setenv("LABEL_STUDIO_URL", fake.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    jobs.worker_settings.cache_clear()
    try:
        queue = Queue(jobs.QUEUE_NAME, connection=connection)
        SimpleWorker([queue], connection=connection).work(burst=True)  # the job, then its chunk
    finally:
        jobs.worker_settings.cache_clear()
    assert Job.fetch(job_id, connection=connection).get_status() == "finished"
    chunk = Job.fetch(f"{job_id}-c001", connection=connection)
    assert chunk.get_status() == "finished" and chunk.kwargs == {"tasks": [1]}
    check_predicted_task_1_only(state)


def test_with_redis_down_the_route_is_a_503_naming_the_queue(tmp_path):
    settings = job_settings(tmp_path, "http://ls:8080",
                            redis_url=f"redis://127.0.0.1:{free_port()}/0")  # fmt: skip
    response = create_app(settings).test_client().post("/jobs/predict", json={"project": 5})
    assert response.status_code == 503
    assert "job queue is unavailable" in response.get_json()["error"]


# ---------------------------------------------------------------------------------------------
# Waiting for the predictions, and personal access tokens


@pytest.fixture
def one_of_three(script, fake):
    """Project 1 (three tasks) where one task has a prediction of COARSE, and the backend (the
    same local server) with job JOB; the Studio and the Project."""
    from label_studio_sdk import LabelStudio

    fake.route("/api/projects/1/", json_reply({"id": 1, "task_number": 3, "model_version": ""}))
    fake.route("/api/projects/1/model-versions", json_reply({COARSE: 1}))
    uploads = script.UploadClient(fake.url, LabelStudioAuth(fake.url, "k"), retry=Retry(0))
    studio = script.Studio(fake.url, LabelStudio(base_url=fake.url, api_key="k"), uploads)
    return studio, script.Project(1, "P", "image", created=False)


JOB = "predict-p1-rq-0123abcd"


def test_waiting_for_predictions_times_out_with_what_is_missing(script, one_of_three):
    with pytest.raises(
        script.Fatal,
        match=r"timed out after 1 s: 1 of 3 tasks have a "
        rf"prediction of {re.escape(COARSE)} \(project model version ''\)",
    ):
        script.wait_for_predictions(*one_of_three, COARSE, timeout_s=0.6, progress=False)


def test_a_failed_job_ends_the_wait_at_once_with_its_error(script, fake, one_of_three):
    error = "1 of 2 chunks failed; predict-p1-rq-0123abcd-c001: GET http://ls/api/tasks: no answer"
    fake.route(f"/jobs/{JOB}", json_reply({"job": JOB, "kind": "predict", "project": 1,
                                           "status": "failed", "error": error}))  # fmt: skip
    job = script.JobWatch(script.Backend(fake.url, fake.url, ("u", "p")), JOB)
    with pytest.raises(script.Fatal) as raised:
        script.wait_for_predictions(*one_of_three, COARSE, timeout_s=600, progress=False, job=job)
    assert str(raised.value).startswith(f"pre-annotation failed: the backend's job {JOB} failed: "
                                        f"{error}; see the backend's")  # fmt: skip
    (asked,) = fake.seen(f"/jobs/{JOB}")
    assert asked.authorization == "Basic " + base64.b64encode(b"u:p").decode()
    assert fake.seen("/api/projects/1/model-versions") == []  # the job is asked first


def test_a_job_that_finished_with_tasks_left_unpredicted_ends_the_wait(script, fake, one_of_three):
    fake.route(f"/jobs/{JOB}", json_reply({"job": JOB, "kind": "predict", "project": 1,
                                           "status": "finished", "result": {}}))  # fmt: skip
    job = script.JobWatch(script.Backend(fake.url, fake.url), JOB)
    with pytest.raises(script.Fatal, match=rf"job {JOB} finished, but 1 of 3 tasks have a "):
        script.wait_for_predictions(*one_of_three, COARSE, timeout_s=600, progress=False, job=job)


def test_a_job_the_backend_does_not_know_leaves_label_studio_to_watch(script, fake, one_of_three,
                                                                      caplog):  # fmt: skip
    fake.route(f"/jobs/{JOB}", json_reply({"error": "no job in this process", "status": 404}, 404))
    job = script.JobWatch(script.Backend(fake.url, fake.url), JOB)
    with pytest.raises(script.Fatal, match="timed out after 1 s: 1 of 3 tasks"):
        script.wait_for_predictions(*one_of_three, COARSE, timeout_s=1.2, progress=False, job=job)
    assert len(fake.seen(f"/jobs/{JOB}")) > 1  # asked again: another process may know it
    assert caplog.text.count(f"the backend does not know job {JOB} (no job in this process)") == 1


def test_a_retrying_job_is_said_once_and_waited_for(script, fake, one_of_three, caplog):
    body = {"job": JOB, "kind": "predict", "project": 1, "status": "started",
            "chunks": {"total": 4, "queued": 1, "started": 0, "finished": 2, "failed": 0,
                       "retrying": 1},
            "last_error": "predict-p1-rq-0123abcd-c003 (retried, 3 retries left): 5 of 100 "
                          "tasks got no prediction"}  # fmt: skip
    fake.route(f"/jobs/{JOB}", json_reply(body))
    job = script.JobWatch(script.Backend(fake.url, fake.url), JOB)
    with pytest.raises(script.Fatal, match="timed out after 1 s"):
        script.wait_for_predictions(*one_of_three, COARSE, timeout_s=1.2, progress=False, job=job)
    assert len(fake.seen(f"/jobs/{JOB}")) > 1
    assert (
        caplog.text.count("the backend retries part of the job: predict-p1-rq-0123abcd-c003") == 1
    )
    assert script._job_postfix(body) == "job started, chunks 2/4 done, 1 retrying"


def test_a_personal_access_token_is_refreshed_when_its_access_token_expires(script, fake):
    """Both clients (the SDK's and the backend's) exchange the PAT for short-lived access
    tokens and get a new one once it expires, as Label Studio's do after about 5 minutes."""
    from fake_label_studio import unsigned_jwt

    pat = unsigned_jwt({"token_type": "refresh", "exp": time.time() + 3600, "user_id": 1})
    issued: list[str] = []

    def refresh(seen: Seen) -> Reply:
        assert json.loads(seen.body) == {"refresh": pat}
        issued.append(unsigned_jwt({"token_type": "access", "exp": time.time() + 1.5,
                                    "n": len(issued)}))  # fmt: skip
        return json_reply({"access": issued[-1]})

    def current_only(body: object) -> Callable[[Seen], Reply]:
        def answer(seen: Seen) -> Reply:
            if seen.authorization not in {f"Bearer {a}" for a in issued[-2:]}:
                return json_reply({"detail": "Token is invalid or expired"}, 401)
            return json_reply(body)

        return answer

    fake.route("/api/token/refresh/", refresh)
    fake.route("/api/current-user/whoami", current_only({"id": 1, "email": "me@example.com"}))
    fake.route("/api/projects/1/model-versions", current_only({}))
    studio = script.connect(fake.url, pat)
    assert studio.uploads.model_versions(1) == {}
    assert len(issued) == 2  # one access token per client
    time.sleep(1.6)
    assert studio.sdk.users.whoami().email == "me@example.com"
    assert studio.uploads.model_versions(1) == {}
    assert len(issued) == 4
    assert [s.authorization for s in fake.seen("/api/current-user/whoami")] == [
        f"Bearer {issued[0]}", f"Bearer {issued[2]}"]  # fmt: skip
