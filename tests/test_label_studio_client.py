"""backend/label_studio.py against a stand-in Label Studio on 127.0.0.1
(tests/fake_label_studio.py): paging, prediction batches, errors, retries and the 401 refresh.
What the real Label Studio answers is checked in tests/e2e/test_label_studio_client_e2e.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from fake_label_studio import FakeServer, Reply, Seen, json_reply, unsigned_jwt

from backend.label_studio import (
    RETRY_STATUSES,
    LabelStudioClient,
    LabelStudioError,
    default_retry,
)
from backend.ls_auth import REFRESH_PATH, LabelStudioAuth
from backend.settings import Settings

LEGACY_KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
PROJECT = 7
FAST_RETRY = default_retry().new(backoff_factor=0)  # same policy, no sleeping


@pytest.fixture
def server():
    fake = FakeServer().start()
    yield fake
    fake.stop()


def client_for(server: FakeServer, key: str = LEGACY_KEY, **kwargs) -> LabelStudioClient:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout", (2.0, 5.0))
    return LabelStudioClient(server.url, LabelStudioAuth(server.url, key), **kwargs)


def query(seen: Seen) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(seen.path).query).items()}


class TaskPages:
    """Plays GET /api/tasks over `count` tasks. `shape`: "dict" answers like Label Studio 1.23
    ({"tasks", "total", ...}), "list" like older versions (a bare list); a page past the end
    answers 404 "Invalid page" as Django REST framework does."""

    def __init__(self, server: FakeServer, count: int, shape: str = "dict") -> None:
        self.tasks = [
            {"id": 1000 + i, "data": {"image": f"/data/upload/{PROJECT}/{i:08x}-face.png"},
             "annotations": [], "predictions": []}
            for i in range(count)
        ]  # fmt: skip
        self.shape = shape
        server.route("/api/tasks", self)

    def __call__(self, seen: Seen) -> Reply:
        q = query(seen)
        if q.get("project") != str(PROJECT):
            return json_reply({"detail": "Not found."}, 404)
        page, size = int(q["page"]), int(q["page_size"])
        last_page = max(1, -(-len(self.tasks) // size))
        if page > last_page:
            return json_reply({"detail": "Invalid page."}, 404)
        chunk = self.tasks[(page - 1) * size : page * size]
        if self.shape == "list":
            return json_reply(chunk)
        return json_reply(
            {"tasks": chunk, "total": len(self.tasks), "total_annotations": 0,
             "total_predictions": 0}
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Paging


def test_tasks_pages_through_every_task(server: FakeServer) -> None:
    pages = TaskPages(server, 250)
    tasks = list(client_for(server).tasks(PROJECT, page_size=100))
    assert [t["id"] for t in tasks] == [t["id"] for t in pages.tasks]
    asked = [query(s) for s in server.seen("/api/tasks")]
    assert [q["page"] for q in asked] == ["1", "2", "3"]  # "total" says when to stop
    for q in asked:
        assert q["project"] == str(PROJECT)
        assert q["fields"] == "all"
        assert q["page_size"] == "100"


def test_tasks_stops_at_total_without_asking_past_the_end(server: FakeServer) -> None:
    TaskPages(server, 200)
    assert len(list(client_for(server).tasks(PROJECT, page_size=100))) == 200
    assert len(server.seen("/api/tasks")) == 2


def test_tasks_treats_404_past_the_end_as_the_end(server: FakeServer) -> None:
    # A bare list carries no total, so a full last page is followed by a page that is 404.
    pages = TaskPages(server, 200, shape="list")
    tasks = list(client_for(server).tasks(PROJECT, page_size=100))
    assert [t["id"] for t in tasks] == [t["id"] for t in pages.tasks]
    replies = [query(s)["page"] for s in server.seen("/api/tasks")]
    assert replies == ["1", "2", "3"]  # page 3 answered 404: the end, not an error


def test_tasks_stops_at_a_short_page_without_a_total(server: FakeServer) -> None:
    TaskPages(server, 150, shape="list")
    assert len(list(client_for(server).tasks(PROJECT, page_size=100))) == 150
    assert len(server.seen("/api/tasks")) == 2


def test_tasks_of_an_empty_project(server: FakeServer) -> None:
    TaskPages(server, 0)
    assert list(client_for(server).tasks(PROJECT)) == []
    assert len(server.seen("/api/tasks")) == 1


def test_tasks_404_on_the_first_page_is_an_error(server: FakeServer) -> None:
    TaskPages(server, 3)
    with pytest.raises(LabelStudioError, match="404") as raised:
        list(client_for(server).tasks(PROJECT + 1))
    assert raised.value.status == 404


def test_tasks_are_fetched_lazily(server: FakeServer) -> None:
    TaskPages(server, 30)
    first = next(iter(client_for(server).tasks(PROJECT, page_size=10)))
    assert first["id"] == 1000
    assert len(server.seen("/api/tasks")) == 1


def test_tasks_answer_without_a_task_list_is_an_error(server: FakeServer) -> None:
    server.route("/api/tasks", json_reply({"detail": "something else"}))
    with pytest.raises(LabelStudioError, match="no task list"):
        list(client_for(server).tasks(PROJECT))


# ---------------------------------------------------------------------------------------------
# Predictions


def prediction(task: int) -> dict:
    return {
        "task": task,
        "model_version": "test-v1",
        "score": 0.5,
        "result": [
            {"from_name": "keypoints", "to_name": "image", "type": "keypointlabels",
             "original_width": 512, "original_height": 512,
             "value": {"x": 48.2, "y": 20.2, "width": 0.5, "keypointlabels": ["left_pupil"]}}
        ],
    }  # fmt: skip


def import_route(server: FakeServer, reply=None) -> str:
    path = f"/api/projects/{PROJECT}/import/predictions"

    def handler(seen: Seen) -> Reply:
        if reply is not None:
            answer = reply(seen)
            if answer is not None:
                return answer
        return json_reply({"created": len(json.loads(seen.body))}, 201)

    server.route(path, handler)
    return path


def test_import_predictions_in_batches(server: FakeServer) -> None:
    path = import_route(server)
    predictions = [prediction(1 + i) for i in range(250)]
    assert client_for(server).import_predictions(PROJECT, predictions) == 250
    posts = server.seen(path)
    assert [s.method for s in posts] == ["POST"] * 3
    bodies = [json.loads(s.body) for s in posts]
    assert [len(b) for b in bodies] == [100, 100, 50]
    assert [p for b in bodies for p in b] == predictions  # all of them, in order, as given
    assert all(s.headers["content-type"] == "application/json" for s in posts)


def test_import_predictions_sums_what_label_studio_created(server: FakeServer) -> None:
    # Label Studio drops invalid items silently: "created" is what counts.
    path = import_route(server, lambda seen: json_reply({"created": 2}, 201))
    predictions = [prediction(1 + i) for i in range(5)]
    assert client_for(server).import_predictions(PROJECT, predictions, batch_size=3) == 4
    assert len(server.seen(path)) == 2


def test_import_no_predictions_sends_nothing(server: FakeServer) -> None:
    path = import_route(server)
    assert client_for(server).import_predictions(PROJECT, []) == 0
    assert server.seen(path) == []


def test_a_failing_batch_names_its_tasks_and_is_not_retried(server: FakeServer) -> None:
    def second_batch_fails(seen: Seen) -> Reply | None:
        if json.loads(seen.body)[0]["task"] == 101:
            return json_reply({"detail": "Task 150 does not exist"}, 400)
        return None

    path = import_route(server, second_batch_fails)
    predictions = [prediction(1 + i) for i in range(250)]
    with pytest.raises(LabelStudioError) as raised:
        client_for(server).import_predictions(PROJECT, predictions)
    message = str(raised.value)
    assert "batch 2/3" in message and "tasks 101..200" in message
    assert "100 created before it" in message
    assert "HTTP 400" in message and "Task 150 does not exist" in message
    assert raised.value.status == 400
    assert len(server.seen(path)) == 2  # stopped at the failing batch


def test_post_is_not_retried_after_503(server: FakeServer) -> None:
    path = import_route(server, lambda seen: json_reply({"detail": "busy"}, 503))
    with pytest.raises(LabelStudioError, match="503"):
        client_for(server).import_predictions(PROJECT, [prediction(1)])
    assert len(server.seen(path)) == 1  # a retried POST could create the predictions twice


def test_import_answer_without_created_is_an_error(server: FakeServer) -> None:
    import_route(server, lambda seen: json_reply({"ok": True}, 201))
    with pytest.raises(LabelStudioError, match="no 'created' count"):
        client_for(server).import_predictions(PROJECT, [prediction(1)])


def test_prediction_and_project(server: FakeServer) -> None:
    server.route("/api/predictions/55", json_reply({"id": 55, "task": 3, "result": []}))
    server.route(f"/api/projects/{PROJECT}", json_reply({"id": PROJECT, "label_config": "<View/>"}))
    client = client_for(server)
    assert client.prediction(55)["task"] == 3
    assert client.project(PROJECT)["label_config"] == "<View/>"


def test_set_model_version_patches_the_project(server: FakeServer) -> None:
    server.route(f"/api/projects/{PROJECT}", json_reply({"id": PROJECT, "model_version": "v"}))
    client_for(server).set_model_version(PROJECT, "test-v1")
    (seen,) = server.seen(f"/api/projects/{PROJECT}")
    assert seen.method == "PATCH"
    assert json.loads(seen.body) == {"model_version": "test-v1"}


def test_set_model_version_refused(server: FakeServer) -> None:
    refusal = {"model_version": ["Model version doesn't exist either as live model or as ..."]}
    server.route(f"/api/projects/{PROJECT}", json_reply(refusal, 400))
    with pytest.raises(LabelStudioError, match="PATCH .* -> HTTP 400: .*Model version") as raised:
        client_for(server).set_model_version(PROJECT, "nope")
    assert raised.value.status == 400


# ---------------------------------------------------------------------------------------------
# Errors and retries


def test_error_status_names_the_call_status_and_body(server: FakeServer) -> None:
    body = "Internal Server Error: " + "x" * 1000
    server.route(f"/api/projects/{PROJECT}", Reply(500, body.encode()))
    with pytest.raises(LabelStudioError) as raised:
        client_for(server).project(PROJECT)
    message = str(raised.value)
    assert message.startswith(f"GET {server.url}/api/projects/{PROJECT} -> HTTP 500: ")
    assert "Internal Server Error: xxx" in message
    assert len(message) < 400  # the body is cut at 200 characters
    assert raised.value.status == 500
    assert len(server.seen(f"/api/projects/{PROJECT}")) == 1  # 500 is not retried


def test_get_is_retried_after_503(server: FakeServer) -> None:
    answers = iter([Reply(503, b"starting"), Reply(502, b"bad gateway")])

    def flaky(seen: Seen) -> Reply:
        return next(answers, json_reply({"id": PROJECT}))

    server.route(f"/api/projects/{PROJECT}", flaky)
    assert client_for(server).project(PROJECT) == {"id": PROJECT}
    assert len(server.seen(f"/api/projects/{PROJECT}")) == 3


def test_get_gives_up_after_a_few_retries(server: FakeServer) -> None:
    server.route(f"/api/projects/{PROJECT}", Reply(503, b"down for maintenance"))
    with pytest.raises(LabelStudioError, match="HTTP 503: down for maintenance") as raised:
        client_for(server).project(PROJECT)
    assert raised.value.status == 503
    assert len(server.seen(f"/api/projects/{PROJECT}")) == 4  # 1 + 3 retries


def test_default_retry_policy() -> None:
    retry = default_retry()
    assert retry.is_retry("GET", 503) and not retry.is_retry("POST", 503)
    assert not retry.is_retry("PATCH", 502) and not retry.is_retry("GET", 500)
    assert set(RETRY_STATUSES) == {502, 503, 504}
    assert retry.backoff_factor > 0 and not retry.respect_retry_after_header


def test_connection_refused(server: FakeServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"http://127.0.0.1:{port}"
    client = LabelStudioClient(url, LabelStudioAuth(url, LEGACY_KEY), retry=FAST_RETRY)
    with pytest.raises(LabelStudioError, match="no answer from Label Studio") as raised:
        client.project(PROJECT)
    assert f"GET {url}/api/projects/{PROJECT}" in str(raised.value)
    assert raised.value.status is None


def test_read_timeout(server: FakeServer) -> None:
    server.route(f"/api/projects/{PROJECT}", Reply(200, b"{}", delay_s=0.5))
    client = client_for(server, timeout=(2.0, 0.1), retry=FAST_RETRY.new(read=1, total=1))
    with pytest.raises(LabelStudioError, match="no answer from Label Studio .*ReadTimeout"):
        client.project(PROJECT)
    assert len(server.seen(f"/api/projects/{PROJECT}")) == 2  # a GET read error is retried


def test_a_2xx_that_is_not_json(server: FakeServer) -> None:
    server.route(f"/api/projects/{PROJECT}", Reply(200, b"<html>login</html>"))
    with pytest.raises(LabelStudioError, match="not JSON: <html>login</html>"):
        client_for(server).project(PROJECT)


# ---------------------------------------------------------------------------------------------
# Authorization


def test_legacy_key_is_sent_as_token_and_never_logged(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.route(f"/api/projects/{PROJECT}", json_reply({"detail": "Invalid token."}, 401))
    with pytest.raises(LabelStudioError) as raised:
        client_for(server).project(PROJECT)
    assert raised.value.status == 401
    (seen,) = server.seen(f"/api/projects/{PROJECT}")  # a legacy key is not retried
    assert seen.authorization == f"Token {LEGACY_KEY}"
    assert LEGACY_KEY not in caplog.text and LEGACY_KEY not in str(raised.value)


def test_netrc_does_not_replace_the_key(
    server: FakeServer, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server.route(f"/api/projects/{PROJECT}", json_reply({"id": PROJECT}))
    client_for(server).project(PROJECT)
    (seen,) = server.seen(f"/api/projects/{PROJECT}")
    assert seen.authorization == f"Token {LEGACY_KEY}"


class TokenIssuer:
    """/api/token/refresh/ for one PAT, and a project that accepts only the latest access."""

    def __init__(self, server: FakeServer, pat: str) -> None:
        self.pat = pat
        self.issued: list[str] = []
        self._lock = threading.Lock()
        server.route(REFRESH_PATH, self.refresh)
        server.route(f"/api/projects/{PROJECT}", self.project)

    def refresh(self, seen: Seen) -> Reply:
        if json.loads(seen.body or b"{}").get("refresh") != self.pat:
            return json_reply({"detail": "Token is invalid or expired"}, 401)
        with self._lock:
            access = unsigned_jwt({"token_type": "access", "exp": int(time.time() + 300),
                                   "n": len(self.issued)})  # fmt: skip
            self.issued.append(access)
        return json_reply({"access": access})

    def revoke_all(self) -> None:
        with self._lock:
            self.issued.append("revoked")

    def project(self, seen: Seen) -> Reply:
        with self._lock:
            current = self.issued[-1] if self.issued else None
        if current is None or seen.authorization != f"Bearer {current}":
            return json_reply({"detail": "Given token not valid for any token type"}, 401)
        return json_reply({"id": PROJECT})


def pat() -> str:
    claims = {"token_type": "refresh", "exp": int(time.time() + 86400), "jti": uuid.uuid4().hex}
    return unsigned_jwt(claims)


def test_pat_is_refreshed_and_the_call_retried_after_401(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = pat()
    issuer = TokenIssuer(server, key)
    client = client_for(server, key=key)
    assert client.project(PROJECT) == {"id": PROJECT}
    assert len(server.seen(REFRESH_PATH)) == 1

    issuer.revoke_all()  # Label Studio revoked the access token before its exp
    assert client.project(PROJECT) == {"id": PROJECT}
    assert len(server.seen(REFRESH_PATH)) == 2
    calls = server.seen(f"/api/projects/{PROJECT}")
    assert [c.authorization for c in calls] == [
        f"Bearer {issuer.issued[0]}",
        f"Bearer {issuer.issued[0]}",  # 401
        f"Bearer {issuer.issued[2]}",  # after the refresh
    ]
    for secret in [key, *issuer.issued[:1], issuer.issued[2]]:
        assert secret not in caplog.text


def test_pat_retries_only_once(server: FakeServer) -> None:
    key = pat()
    TokenIssuer(server, key)
    server.route(f"/api/projects/{PROJECT}", json_reply({"detail": "nope"}, 401))
    with pytest.raises(LabelStudioError, match="HTTP 401") as raised:
        client_for(server, key=key).project(PROJECT)
    assert raised.value.status == 401
    assert len(server.seen(f"/api/projects/{PROJECT}")) == 2
    assert len(server.seen(REFRESH_PATH)) == 2


def test_refused_pat_is_a_label_studio_error(server: FakeServer) -> None:
    TokenIssuer(server, pat())  # knows another PAT: refuses this one
    with pytest.raises(LabelStudioError, match="refused the personal access token"):
        client_for(server, key=pat()).project(PROJECT)
    assert server.seen(f"/api/projects/{PROJECT}") == []


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("url", "key"), [(None, LEGACY_KEY), ("http://ls:8080", None), (None, None)]
)
def test_from_settings_needs_url_and_key(url: str | None, key: str | None) -> None:
    settings = Settings(label_studio_url=url, label_studio_api_key=key)
    assert LabelStudioClient.from_settings(settings) is None


def test_from_settings() -> None:
    settings = Settings(label_studio_url="http://ls:8080/", label_studio_api_key=LEGACY_KEY)
    client = LabelStudioClient.from_settings(settings)
    assert client is not None
    assert client.base_url == "http://ls:8080"
    assert client.auth.header() == f"Token {LEGACY_KEY}"
