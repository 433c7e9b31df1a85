"""The HTTP server, the model behind it, its settings and the prediction JSON.

Flask's test client throughout; downloads go to a throwaway HTTP server on 127.0.0.1, and one
test starts `python -m backend.server` for real. Every prediction is checked with the
Label Studio SDK's own validator (what `import/predictions` runs before storing one).
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface
from server_process import free_port, running_server

from backend import model as model_module
from backend.image_source import ImageSource, ImageSourceError
from backend.images import ImageLimits
from backend.keypoints import KEYPOINT_NAMES, FaceKeypoints
from backend.model import ConfigError, PupilModel, parse_label_config
from backend.results import (
    POINT_SIZE_BOUNDS_PCT,
    ResultSpec,
    face_results,
    point_size,
    prediction,
    prediction_score,
)
from backend.server import create_app, gunicorn_options
from backend.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
ASTRONAUT = DATA / "astronaut.png"
CONFIG = (ROOT / "label_config" / "pupils.xml").read_text(encoding="utf-8")
ASTRONAUT_TASK_IMAGE = "/data/local-files/?d=astronaut.png"
# Pupils of tests/data/astronaut.png (512x512), image pixels.
EXPECTED_PUPILS = {"left_pupil": (246.7, 103.5), "right_pupil": (203.3, 101.1)}
TOLERANCE_PCT = 3.0

CONFIG_WITH_FACE = """
<View>
  <Image name="photo" value="$img"/>
  <RectangleLabels name="boxes" toName="photo"><Label value="Face"/></RectangleLabels>
  <KeyPointLabels name="points" toName="photo">
    <Label value="left_pupil"/><Label value="right_pupil"/><Label value="nose"/>
  </KeyPointLabels>
</View>
"""
CONFIG_NO_KEYPOINTS = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="verdict" toName="image"><Choice value="correct"/></Choices>
</View>
"""


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(local_files_document_root=DATA, model_dir=tmp_path / "models")


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()


def task(task_id, image=ASTRONAUT_TASK_IMAGE, key="image") -> dict:
    return {"id": task_id, "data": {key: image}, "annotations": [], "predictions": []}


def post_predict(client, tasks, label_config=CONFIG, **extra):
    body = {"tasks": tasks, "label_config": label_config, "project": "1.1700000000", **extra}
    return client.post("/predict", json=body)


def assert_valid(prediction_json: dict, config: str = CONFIG) -> None:
    """What Label Studio would check before storing it, plus our own invariants."""
    errors = LabelInterface(config).validate_prediction(prediction_json, return_errors=True)
    assert errors == []
    assert isinstance(prediction_json["model_version"], str) and prediction_json["model_version"]
    assert 0.0 <= prediction_json["score"] <= 1.0
    ids = [region["id"] for region in prediction_json["result"]]
    assert len(ids) == len(set(ids))
    for region in prediction_json["result"]:
        assert 0.0 <= region["score"] <= 1.0
        assert region["image_rotation"] == 0
        for field in ("x", "y", "width", "height"):
            if field in region["value"]:
                assert 0.0 <= region["value"][field] <= 100.0


def points_by_label(prediction_json: dict) -> dict[str, tuple[float, float]]:
    return {
        region["value"]["keypointlabels"][0]: (region["value"]["x"], region["value"]["y"])
        for region in prediction_json["result"]
        if region["type"] == "keypointlabels"
    }


def is_empty(prediction_json: dict) -> bool:
    return prediction_json["result"] == [] and prediction_json["score"] == 0.0


def face(points, confidences=None, confidence=0.8, box=(10.0, 10.0, 60.0, 60.0)) -> FaceKeypoints:
    points = np.asarray(points, dtype=np.float64)
    if confidences is None:
        confidences = np.full(6, 0.9)
    return FaceKeypoints(
        box=np.asarray(box, dtype=np.float64),
        points=points,
        confidences=np.asarray(confidences, dtype=np.float64),
        confidence=confidence,
        method="test",
    )


# ---------------------------------------------------------------------------------------------
# The label config


def test_label_config_parses_and_declares_the_six_keypoints_and_a_verdict():
    interface = LabelInterface(CONFIG)
    interface.validate()  # the SDK's schema, unique names and toName checks
    by_type = {control.tag.lower(): control for control in interface.controls}
    assert by_type["keypointlabels"].labels == list(KEYPOINT_NAMES)
    assert by_type["keypointlabels"].to_name == ["image"]
    assert by_type["keypointlabels"].attr["smart"] == "false"
    assert by_type["choices"].labels == ["correct", "wrong"]
    assert by_type["choices"].attr["choice"] == "single"
    colours = [
        label.attr["background"].lower()
        for label in by_type["keypointlabels"].labels_attrs.values()
    ]
    assert len(set(colours)) == 6
    (image,) = interface.objects
    assert (image.tag, image.name, image.value) == ("Image", "image", "$image")
    targets = parse_label_config(CONFIG)
    assert (targets.image_name, targets.data_key) == ("image", "image")
    assert targets.spec.keypoint_labels == KEYPOINT_NAMES
    assert targets.spec.face_type is None  # the shipped config has no face rectangle


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (CONFIG_NO_KEYPOINTS, "has no <KeyPointLabels> control"),
        (
            '<View><Text name="t" value="$text"/></View>',
            "no <Image> tag and no <KeyPointLabels> control",
        ),
        (
            '<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
            '<KeyPointLabels name="k" toName="b"><Label value="eye"/></KeyPointLabels></View>',
            "declares none of the labels",
        ),
        ("<View><Image", "cannot be parsed"),
        ("", "empty"),
    ],
)
def test_unusable_configs_raise_config_error_naming_what_is_missing(config, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_label_config(config)


# ---------------------------------------------------------------------------------------------
# /health, /versions, errors


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health_is_up_without_model_work(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.get_json() == {"status": "UP", "model_class": "PupilModel"}


def test_versions_lists_the_model_version(client):
    response = client.get("/versions")
    assert response.status_code == 200
    assert response.get_json() == {
        "versions": ["coarse-fused-0.1.0"],
        "serving": "coarse-fused-0.1.0",
        "details": [],
        "training": [],
        "problems": [],
    }


def test_unknown_route_is_a_json_404(client):
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.is_json and response.get_json()["status"] == 404


def test_wrong_method_is_a_json_405_with_allow(client):
    response = client.delete("/predict")
    assert response.status_code == 405
    assert response.is_json and "error" in response.get_json()
    assert "POST" in response.headers["Allow"]


def test_unexpected_errors_are_a_json_500_without_traceback(client, monkeypatch, caplog):
    def explode(self, tasks, context=None, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(PupilModel, "predict", explode)
    with caplog.at_level(logging.ERROR, logger="backend"):
        response = post_predict(client, [task(1)])
    assert response.status_code == 500
    assert response.is_json
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "secret internals" not in text
    assert "secret internals" in caplog.text  # ... but the log has it


# ---------------------------------------------------------------------------------------------
# /setup


def test_setup_accepts_our_config(client):
    response = client.post(
        "/setup",
        json={
            "project": "3.1746612998",
            "schema": CONFIG,
            "hostname": "http://localhost:8080",
            "access_token": "abc",
            "model_version": "whatever",
            "extra_params": None,
        },
    )
    assert response.status_code == 200
    assert response.get_json() == {"model_version": "coarse-fused-0.1.0"}


def test_setup_rejects_a_config_without_keypointlabels(client):
    response = client.post("/setup", json={"project": "3.1", "schema": CONFIG_NO_KEYPOINTS})
    assert response.status_code == 400
    assert "KeyPointLabels" in response.get_json()["error"]


@pytest.mark.parametrize("body", [{}, {"schema": ""}, {"schema": 3}])
def test_setup_requires_a_schema(client, body):
    response = client.post("/setup", json=body)
    assert response.status_code == 400
    assert "schema" in response.get_json()["error"]


# ---------------------------------------------------------------------------------------------
# /predict


def test_predict_finds_the_astronauts_pupils_and_corners(client):
    response = post_predict(client, [task(11), task(12)])
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 2
    for task_id, result in zip((11, 12), results, strict=True):
        assert_valid(result)
        assert result["model_version"] == "coarse-fused-0.1.0"
        assert 0.0 < result["score"] <= 1.0
        points = points_by_label(result)
        assert set(points) == set(KEYPOINT_NAMES)
        for name, (x_px, y_px) in EXPECTED_PUPILS.items():
            x, y = points[name]
            assert abs(x - x_px / 512 * 100) < TOLERANCE_PCT, name
            assert abs(y - y_px / 512 * 100) < TOLERANCE_PCT, name
        for region in result["result"]:
            assert region["from_name"] == "keypoints" and region["to_name"] == "image"
            assert region["type"] == "keypointlabels"
            assert (region["original_width"], region["original_height"]) == (512, 512)
            assert region["id"].startswith(f"t{task_id}-")
    # the same image gives the same regions (ids aside): predictions are deterministic
    strip = [{k: v for k, v in r.items() if k != "id"} for r in results[0]["result"]]
    assert strip == [{k: v for k, v in r.items() if k != "id"} for r in results[1]["result"]]


def test_predict_fills_only_what_the_config_declares_and_finds_tags_by_type(client):
    """Other tag names, another data key, two of the six labels and a face rectangle."""
    response = post_predict(client, [task(5, key="img")], label_config=CONFIG_WITH_FACE)
    assert response.status_code == 200
    (result,) = response.get_json()["results"]
    assert_valid(result, CONFIG_WITH_FACE)
    regions = result["result"]
    rectangles = [r for r in regions if r["type"] == "rectanglelabels"]
    keypoints = [r for r in regions if r["type"] == "keypointlabels"]
    assert len(rectangles) == 1
    assert rectangles[0]["from_name"] == "boxes"
    assert rectangles[0]["value"]["rectanglelabels"] == ["Face"]
    assert sorted(r["value"]["keypointlabels"][0] for r in keypoints) == [
        "left_pupil",
        "right_pupil",
    ]
    assert {r["from_name"] for r in keypoints} == {"points"}
    assert {r["to_name"] for r in regions} == {"photo"}
    assert {r["parentID"] for r in keypoints} == {rectangles[0]["id"]}
    box = rectangles[0]["value"]
    for x, y in points_by_label(result).values():  # the pupils lie inside their face's box
        assert box["x"] <= x <= box["x"] + box["width"]
        assert box["y"] <= y <= box["y"] + box["height"]


def test_predict_without_label_config_uses_the_bundled_one(client):
    response = client.post("/predict", json={"tasks": [task(1)]})
    assert response.status_code == 200
    (result,) = response.get_json()["results"]
    assert_valid(result)
    assert len(result["result"]) == 6


def test_predict_accepts_label_studio_params_and_an_empty_batch(client):
    response = post_predict(
        client, [task(1)], params={"login": None, "password": None, "context": None}
    )
    assert response.status_code == 200 and len(response.get_json()["results"]) == 1
    response = post_predict(client, [])
    assert response.status_code == 200 and response.get_json() == {"results": []}


def test_a_bad_task_fails_alone_and_keeps_the_batch_aligned(tmp_path, caplog):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ASTRONAUT, root / "face.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("hello")
    (root / "escape.png").symlink_to("/etc/passwd")
    (tmp_path / "outside.png").write_bytes(ASTRONAUT.read_bytes())
    client = create_app(
        Settings(local_files_document_root=root, label_studio_url="http://127.0.0.1:9")
    ).test_client()
    good = "/data/local-files/?d=face.png"
    tasks = [
        task(1, good),
        task(2, "/data/local-files/?d=missing.png"),
        task(3, "/data/local-files/?d=../../etc/passwd"),
        task(4, "/data/local-files/?d=../outside.png"),
        task(5, "/data/local-files/?d=escape.png"),
        task(6, "/data/local-files/?d=broken.png"),
        task(7, "/data/local-files/?d=notes.txt"),
        task(8, "http://example.com/face.png"),
        task(9, "s3://bucket/face.png"),
        task(10, "file:///etc/passwd"),
        {"id": 11, "data": {"other": good}},
        "not a task",
        task(13, good),
    ]
    with caplog.at_level(logging.INFO, logger="backend"):
        response = post_predict(client, tasks)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    for index, result in enumerate(results):
        assert_valid(result)
        if index in (0, len(tasks) - 1):
            assert len(result["result"]) == 6 and result["score"] > 0
        else:
            assert is_empty(result), index
            assert result["model_version"] == "coarse-fused-0.1.0"
    log = caplog.text

    def failed(task_id, reason, detail=""):
        lines = [line for line in log.splitlines() if f"task={task_id} outcome=failed" in line]
        assert len(lines) == 1, (task_id, lines)
        assert f"reason={reason} detail=" in lines[0] and detail in lines[0], lines[0]

    failed(2, "not_found", "file not found: 'missing.png'")
    failed(3, "forbidden_source", "contains '..'")
    failed(4, "forbidden_source")
    failed(5, "forbidden_source", "escapes LOCAL_FILES_DOCUMENT_ROOT")  # symlink resolved
    failed(6, "image_unreadable", "damaged PNG")
    failed(7, "image_unreadable")
    failed(8, "forbidden_source", "ALLOWED_IMAGE_HOSTS")
    failed(9, "download_failed", "cannot download 's3://bucket/face.png'")  # nothing on :9
    failed(10, "forbidden_source", "file: URLs are not read")
    failed(11, "no_image_field", "no 'image' field")
    failed(None, "no_image_field", "must be a JSON object")
    assert "task=1 outcome=ok" in log and "task=13 outcome=ok" in log


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "empty"),
        (b"\xff\xfe\xfa", "UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "'tasks'"),
        (b'{"tasks": {"id": 1}}', "must be a list"),
        (b'{"tasks": [], "label_config": 5}', "label_config"),
        (b'{"tasks": [], "params": []}', "params"),
    ],
)
def test_malformed_predict_requests_are_json_400s(client, body, message):
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.is_json
    assert message in response.get_json()["error"]


def test_predict_with_an_unusable_config_is_a_400(client):
    response = post_predict(client, [task(1)], label_config=CONFIG_NO_KEYPOINTS)
    assert response.status_code == 400
    assert "KeyPointLabels" in response.get_json()["error"]


def test_the_detector_is_built_once_per_process(client):
    post_predict(client, [task(1)])
    first = model_module.get_detector("fused")
    post_predict(client, [task(2)])
    create_app(Settings(local_files_document_root=DATA)).test_client()
    assert model_module.get_detector("fused") is first
    seen = []
    threads = [
        threading.Thread(target=lambda: seen.append(model_module.get_detector("fused")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(detector is first for detector in seen)


# ---------------------------------------------------------------------------------------------
# /webhook


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": 1, "result": []},
                "task": {"id": 2, "data": {"image": "x.png"}},
                "project": {"id": 3},
            },
            {"status": "recorded", "stored": 1, "deleted": 0, "project": 3},
        ),
        (
            {"action": "START_TRAINING", "project": {"id": 3, "label_config": CONFIG}},
            {"status": "recorded", "training": "requested", "project": 3},
        ),
        ({"action": "SOMETHING_NEW"}, {"status": "ignored"}),
        (
            {"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": 3}},
            {"status": "ignored"},
        ),  # fmt: skip
    ],
)
def test_webhook_records_or_ignores_every_event(client, event, expected):
    response = client.post("/webhook", json=event)
    assert response.status_code == 200
    body = response.get_json()
    assert body["event"] == event["action"]
    assert {k: body.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    "body",
    [
        b"{oops",
        b"[]",
        b'{"project": {"id": 3}}',
        b'{"action": 7}',
        b'{"action": "START_TRAINING"}',
        b'{"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": [1]}',
        b'{"action": "ANNOTATIONS_DELETED", "project": {"id": 3}}',
    ],
)
def test_malformed_webhooks_are_400s(client, body):
    response = client.post("/webhook", data=body, content_type="application/json")
    assert response.status_code == 400 and response.is_json


# ---------------------------------------------------------------------------------------------
# Downloads from Label Studio (a stand-in on 127.0.0.1)


class _FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    image = ASTRONAUT.read_bytes()
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect-home"):
            self._send(302, b"", {"Location": "/data/upload/1/face.png"})
        elif self.path.startswith("/redirect-away"):
            self._send(302, b"", {"Location": "http://example.com/face.png"})
        elif self.path.startswith("/no-length"):
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            self.wfile.write(self.image)
        elif self.headers.get("Authorization") != "Token s3cret":
            self._send(401, b'{"detail": "Authentication credentials were not provided."}')
        elif self.path == "/data/upload/1/face.png":
            self._send(200, self.image, {"Content-Type": "image/png"})
        else:
            self._send(404, b"not found")

    def _send(self, status, body, headers=None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def label_studio():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeLabelStudio.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_uploads_are_downloaded_from_label_studio_with_the_token(label_studio):
    settings = Settings(label_studio_url=label_studio, label_studio_api_key="s3cret")
    client = create_app(settings).test_client()
    tasks = [
        task(1, "/data/upload/1/face.png"),
        task(2, f"{label_studio}/data/upload/1/face.png"),
        task(3, f"{label_studio}/redirect-home"),
        task(4, "/data/upload/1/gone.png"),
        task(5, f"{label_studio}/redirect-away"),
    ]
    results = post_predict(client, tasks).get_json()["results"]
    assert [len(r["result"]) for r in results] == [6, 6, 6, 0, 0]
    for result in results:
        assert_valid(result)
    assert ("/data/upload/1/face.png", "Token s3cret") in _FakeLabelStudio.seen
    assert all(path != "/face.png" for path, _ in _FakeLabelStudio.seen)  # never left the host
    # Tasks 1 and 2 name the same URL: the second comes from the cache. Task 3 is cached under
    # its own URL (/redirect-home), so its redirect target is downloaded again.
    assert _FakeLabelStudio.seen.count(("/data/upload/1/face.png", "Token s3cret")) == 2


def test_a_refused_download_and_a_missing_url_fail_the_task_with_a_reason(label_studio, caplog):
    wrong_key = Settings(label_studio_url=label_studio, label_studio_api_key="not-the-key-8d1f")
    no_url = Settings()
    with caplog.at_level(logging.WARNING, logger="backend"):
        for settings in (wrong_key, no_url):
            client = create_app(settings).test_client()
            (result,) = post_predict(client, [task(7, "/data/upload/1/face.png")]).get_json()[
                "results"
            ]
            assert is_empty(result)
    assert "task=7 outcome=failed reason=auth_failed" in caplog.text
    assert "HTTP 401" in caplog.text and "LABEL_STUDIO_API_KEY" in caplog.text
    assert "reason=not_configured" in caplog.text and "LABEL_STUDIO_URL is not set" in caplog.text
    assert "not-the-key-8d1f" not in caplog.text  # the key itself is never logged


def test_a_too_large_image_is_a_per_task_failure(label_studio, caplog):
    settings = Settings(label_studio_url=label_studio, label_studio_api_key="s3cret")
    app = create_app(settings)
    app.extensions["pupil_image_source"].limits = ImageLimits(max_bytes=10_000)
    with caplog.at_level(logging.WARNING, logger="backend"):
        (result,) = post_predict(
            app.test_client(), [task(3, "/data/upload/1/face.png")]
        ).get_json()["results"]
    assert is_empty(result)
    assert "task=3 outcome=failed reason=image_too_large detail=file is too large" in caplog.text


def test_model_without_a_source_shares_one_per_settings(settings):
    first = PupilModel(CONFIG, settings)
    assert isinstance(first.source, ImageSource)
    assert PupilModel(CONFIG, settings).source is first.source
    with pytest.raises(ImageSourceError):
        first.source.fetch("http://example.com/x.png")


# ---------------------------------------------------------------------------------------------
# results.py


SPEC = ResultSpec(to_name="image", keypoints_from_name="keypoints")


def test_points_are_clamped_and_scores_are_in_unit_range():
    points = [[-20, -5], [120, 50], [50, 250], [0, 0], [100, 100], [np.nan, 3]]
    confidences = [1.5, -0.2, np.nan, 0.5, 0.5, 0.5]
    regions = face_results([face(points, confidences)], 100, 200, SPEC, "t1-")
    values = {r["value"]["keypointlabels"][0]: r for r in regions}
    assert "right_eye_outer" not in values  # a point that is not finite is left out
    assert (values["left_pupil"]["value"]["x"], values["left_pupil"]["value"]["y"]) == (0, 0)
    assert values["right_pupil"]["value"]["x"] == 100.0
    assert values["left_eye_outer"]["value"]["y"] == 100.0
    assert values["right_eye_inner"]["value"] == {
        "x": 100.0,
        "y": 50.0,
        "width": 1.0,  # a 255 px eye in a 100 px image: capped at the upper bound
        "keypointlabels": ["right_eye_inner"],
    }
    assert [values[n]["score"] for n in KEYPOINT_NAMES[:3]] == [1.0, 0.0, 0.0]
    assert_valid({"result": regions, "score": 0.5, "model_version": "v"})


@pytest.mark.parametrize("scale", [1, 8])
def test_point_size_follows_the_eye_not_the_photo_resolution(scale):
    """A tenth of the eye width: the same relative dot on a 512 px and a 4096 px photo."""
    corners = np.array([[255.5, 104.0], [237.5, 105.0], [212.0, 104.0], [195.0, 101.0]])
    points = np.vstack([[[246.7, 103.5], [203.3, 101.1]], corners]) * scale
    size = point_size(face(points), 512 * scale)
    eye = (np.linalg.norm(corners[0] - corners[1]) + np.linalg.norm(corners[2] - corners[3])) / 2
    assert size == pytest.approx(0.1 * eye / 512 * 100, abs=1e-6)
    assert 0.3 < size < 0.4


def test_point_size_stays_visible_for_tiny_eyes_and_without_corners():
    tiny = np.array([[10, 10], [20, 10], [12, 10], [11, 10], [19, 10], [18, 10]], float)
    assert point_size(face(tiny), 4000) == POINT_SIZE_BOUNDS_PCT[0]
    no_corners = np.array([[10, 10], [20, 10]] + [[np.nan, np.nan]] * 4, float)
    assert point_size(face(no_corners), 400) == POINT_SIZE_BOUNDS_PCT[1]


def test_prediction_score_is_every_face_right_and_zero_without_faces():
    points = [[30, 30]] * 6
    faces = [face(points, confidence=0.9), face(points, confidence=0.5)]
    assert prediction_score(faces) == pytest.approx(0.45)
    assert prediction_score(faces[:1]) == pytest.approx(0.9)
    assert prediction_score([]) == 0.0
    empty = prediction([], 640, 480, SPEC, "v")
    assert empty == {"result": [], "score": 0.0, "model_version": "v"}
    two = prediction(faces, 640, 480, SPEC, "v", "t9-")
    ids = [r["id"] for r in two["result"]]
    assert len(ids) == 12 == len(set(ids))
    assert ids[0] == "t9-face0-left_pupil" and ids[6] == "t9-face1-left_pupil"
    assert_valid(two)


def test_face_rectangles_are_clipped_and_parent_their_keypoints():
    targets = parse_label_config(CONFIG_WITH_FACE)
    faces = [face([[40, 40]] * 6, box=(-10, 20, 90, 260))]
    result = prediction(faces, 100, 200, targets.spec, "v")
    rect, *points = result["result"]
    assert rect["type"] == "rectanglelabels" and rect["from_name"] == "boxes"
    assert rect["value"] == {
        "x": 0.0,
        "y": 10.0,
        "width": 90.0,
        "height": 90.0,
        "rotation": 0,
        "rectanglelabels": ["Face"],
    }
    assert [p["parentID"] for p in points] == [rect["id"]] * 2
    assert_valid(result, CONFIG_WITH_FACE)


def test_a_plain_rectangle_named_for_faces_is_used():
    config = (
        '<View><Image name="i" value="$u"/><Rectangle name="face_box" toName="i"/>'
        '<KeyPointLabels name="k" toName="i"><Label value="left_pupil"/></KeyPointLabels></View>'
    )
    targets = parse_label_config(config)
    assert (targets.spec.face_type, targets.spec.face_from_name) == ("rectangle", "face_box")
    result = prediction([face([[40, 40]] * 6)], 100, 100, targets.spec, "v")
    assert [r["type"] for r in result["result"]] == ["rectangle", "keypointlabels"]
    assert_valid(result, config)


# ---------------------------------------------------------------------------------------------
# Settings


def test_settings_defaults_and_environment():
    assert Settings.from_env({}) == Settings()
    assert Settings() == Settings(
        port=9090,
        host="0.0.0.0",
        model_dir=Path("./models"),
        label_studio_url=None,
        label_studio_api_key=None,
        local_files_document_root=None,
        log_level="INFO",
        coarse_variant="fused",
        workers=1,
        threads=4,
        basic_auth_user=None,
        basic_auth_pass=None,
        allowed_image_hosts=(),
        image_cache_mb=256,
        prometheus_multiproc_dir=None,
    )
    env = {
        "PORT": "8000",
        "HOST": "127.0.0.1",
        "MODEL_DIR": "/data/models",
        "LABEL_STUDIO_URL": "http://label-studio:8080/",
        "LABEL_STUDIO_API_KEY": "key",
        "LOCAL_FILES_DOCUMENT_ROOT": "/data/files",
        "LOG_LEVEL": "debug",
        "COARSE_VARIANT": "projection",
        "WORKERS": "2",
        "THREADS": " 8 ",
        "BASIC_AUTH_USER": "studio",
        "BASIC_AUTH_PASS": " pass word ",
        "ALLOWED_IMAGE_HOSTS": "Images.Example.com, minio:9000,,[::1]:8080 ,minio:9000",
        "IMAGE_CACHE_MB": "0",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/prom",
        "PATH": "/usr/bin",
    }
    settings = Settings.from_env(env)
    assert settings == Settings(
        port=8000,
        host="127.0.0.1",
        model_dir=Path("/data/models"),
        label_studio_url="http://label-studio:8080",
        label_studio_api_key="key",
        local_files_document_root=Path("/data/files"),
        log_level="DEBUG",
        coarse_variant="projection",
        workers=2,
        threads=8,
        basic_auth_user="studio",
        basic_auth_pass=" pass word ",  # verbatim: a password may have spaces
        allowed_image_hosts=("images.example.com", "minio:9000", "[::1]:8080"),
        image_cache_mb=0,
        prometheus_multiproc_dir=Path("/tmp/prom"),
    )
    assert Settings.from_env({"PORT": "", "LABEL_STUDIO_URL": " "}) == Settings()
    blank = {"BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", "ALLOWED_IMAGE_HOSTS": " , "}
    assert Settings.from_env(blank) == Settings()


def test_secrets_stay_out_of_the_settings_repr():
    settings = Settings(
        label_studio_api_key="key-123", basic_auth_user="admin-user-77", basic_auth_pass="pw-456"
    )
    shown = repr(settings)
    assert "key-123" not in shown and "admin-user-77" not in shown and "pw-456" not in shown


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "nine"}, "PORT must be an integer, got 'nine'"),
        ({"PORT": "70000"}, "PORT must be at least 1 and at most 65535"),
        ({"WORKERS": "0"}, "WORKERS must be at least 1"),
        ({"THREADS": "2.5"}, "THREADS must be an integer"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of"),
        ({"LABEL_STUDIO_URL": "label-studio:8080"}, "LABEL_STUDIO_URL must be an absolute"),
        ({"LABEL_STUDIO_URL": "http://ls:port"}, "LABEL_STUDIO_URL must be an absolute"),
        ({"BASIC_AUTH_USER": "studio"}, "BASIC_AUTH_USER is set but BASIC_AUTH_PASS is not"),
        ({"BASIC_AUTH_PASS": "pw"}, "BASIC_AUTH_PASS is set but BASIC_AUTH_USER is not"),
        ({"IMAGE_CACHE_MB": "-1"}, "IMAGE_CACHE_MB must be at least 0"),
        ({"ALLOWED_IMAGE_HOSTS": "https://images.example.com"}, "host or host:port"),
        ({"ALLOWED_IMAGE_HOSTS": "ok.example.com,bad/path"}, "'bad/path'"),
        ({"ALLOWED_IMAGE_HOSTS": "minio:port"}, "host or host:port"),
        ({"ALLOWED_IMAGE_HOSTS": "user@minio"}, "host or host:port"),
    ],
)
def test_bad_settings_raise_a_clear_value_error(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_an_unknown_coarse_variant_stops_the_app_at_creation():
    with pytest.raises(ValueError, match="COARSE_VARIANT='nope'"):
        create_app(Settings(coarse_variant="nope"))


# ---------------------------------------------------------------------------------------------
# The real server


def test_python_m_backend_server_serves_health_and_predictions(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOCAL_FILES_DOCUMENT_ROOT": str(DATA),
        "WORKERS": "1",
        "THREADS": "2",
        "LOG_LEVEL": "INFO",
    }
    env.pop("LABEL_STUDIO_URL", None)
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running_server(env, log_path) as process:
        health = requests.get(f"{url}/health", timeout=5)
        assert health.status_code == 200
        assert health.json() == {"status": "UP", "model_class": "PupilModel"}
        response = requests.post(
            f"{url}/predict", json={"tasks": [task(1)], "label_config": CONFIG}, timeout=30
        )
        (result,) = response.json()["results"]
        assert len(result["result"]) == 6
        assert_valid(result)
    log = log_path.read_text()
    assert f"ready: serving PupilModel on {url}" in log
    assert "detector built variant=fused" in log
    assert process.returncode == 0, log


def test_create_app_reads_the_environment_when_given_no_settings(monkeypatch):
    """What `gunicorn 'backend.server:create_app()'` does."""
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(DATA))
    monkeypatch.setenv("COARSE_VARIANT", "fused")
    app = create_app()
    assert app.config["PUPIL_SETTINGS"].local_files_document_root == DATA
    (result,) = post_predict(app.test_client(), [task(1)]).get_json()["results"]
    assert len(result["result"]) == 6


def test_gunicorn_options_preload_the_model_and_use_the_settings():
    options = gunicorn_options(Settings(host="::", port=9191, workers=3, threads=5))
    assert options["bind"] == "[::]:9191"
    assert (options["workers"], options["threads"]) == (3, 5)
    assert options["timeout"] == 120 and options["preload_app"] is True


def test_oversized_bodies_are_a_json_413(settings):
    app = create_app(settings)
    app.config["MAX_CONTENT_LENGTH"] = 1000
    response = app.test_client().post("/predict", json={"tasks": [task(1)] * 50})
    assert response.status_code == 413 and response.is_json


def test_the_faces_config_gets_a_rectangle_per_face_with_its_points(client):
    faces_config = (ROOT / "label_config" / "pupils-faces.xml").read_text(encoding="utf-8")
    assert client.post("/setup", json={"schema": faces_config, "project": "1"}).status_code == 200
    response = post_predict(client, [task(7)], label_config=faces_config)
    (result,) = response.get_json()["results"]
    assert_valid(result, faces_config)
    kinds = Counter(region["type"] for region in result["result"])
    assert kinds == {"rectanglelabels": 1, "keypointlabels": 6}
    (face_box,) = [r for r in result["result"] if r["type"] == "rectanglelabels"]
    assert face_box["value"]["rectanglelabels"] == ["face"]
    assert all(
        r["parentID"] == face_box["id"] for r in result["result"] if r["type"] == "keypointlabels"
    )


# ---------------------------------------------------------------------------------------------
# Hostile input found by tests/test_api_fuzz.py (issue 8): each was a 500, an answer that was
# not JSON, or a value that reached the label store or the log as it came.


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"tasks": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than 100 levels"),
        (b'{"tasks": [' + b"[" * 150 + b"]" * 150 + b"]}", "nested deeper than 100 levels"),
        (b'{"tasks": [], "x": ' + b"7" * 5000 + b"}", "unreadable JSON"),
    ],
    ids=["past-the-recursion-limit", "deeper-than-100", "5000-digit-integer"],
)
@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup", "/jobs/predict"])
def test_json_too_deep_or_with_a_huge_integer_is_a_400(client, path, body, message):
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == 400 and response.is_json
    assert message in response.get_json()["error"]


def test_a_deep_annotation_that_parses_is_refused_before_the_label_store(client):
    """json.loads reads ~990 levels, but writing them back out (the label store) recursed past
    Python's limit: a 500 after the event was half handled."""
    nested = "[" * 900 + "]" * 900
    body = '{"action": "ANNOTATION_CREATED", "project": 3, "annotation": {"id": 1, "task": 2, '
    body += f'"result": {nested}}}}}'
    response = client.post("/webhook", data=body, content_type="application/json")
    assert response.status_code == 400
    assert "nested deeper" in response.get_json()["error"]


@pytest.mark.parametrize("path", ["/setup", "/predict"])
def test_a_project_past_the_integer_digit_limit_serves_the_global_model(client, path):
    body = {"schema": CONFIG, "tasks": [], "project": "1" * 5000}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    "project", ["9223372036854775808", "1" * 5000, "abc", "-3", "²"], ids=str.__len__
)
def test_versions_for_something_that_is_no_project_id_is_a_400(client, project):
    client.post("/webhook", json={"action": "START_TRAINING", "project": 3})  # a label store
    response = client.get("/versions", query_string={"project": project})
    assert response.status_code == 400
    assert "'project' must be a Label Studio project id" in response.get_json()["error"]
    for fine in ("3", "3.1746612998", "9223372036854775807", ""):
        assert client.get("/versions", query_string={"project": fine}).status_code == 200


@pytest.mark.parametrize(
    "project", ["²", "١٢", 2**63, "9223372036854775808", "0" * 30 + "1" * 20, 0, 1.5, True]
)
def test_jobs_predict_refuses_what_is_no_64_bit_project_id(tmp_path, project):
    settings = Settings(
        model_dir=tmp_path, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k"
    )
    response = create_app(settings).test_client().post("/jobs/predict", json={"project": project})
    assert response.status_code == 400
    assert "'project' must be a Label Studio project id" in response.get_json()["error"]


def test_options_is_a_json_405_and_there_is_no_static_route(client):
    response = client.options("/predict")
    assert response.status_code == 405 and response.is_json
    assert response.headers["Allow"] == "POST"
    assert "error" in response.get_json()
    response = client.get("/static/anything")
    assert response.status_code == 404 and response.is_json


def test_what_clients_send_reaches_the_log_on_one_line(client, caplog):
    forged = "x\n2026-01-01 00:00:00 INFO backend.access method=GET path=/forged status=200"
    with caplog.at_level(logging.INFO, logger="backend"):
        client.post("/setup", json={"schema": CONFIG, "project": forged, "hostname": forged})
        client.post("/setup", json={"schema": "<View", "project": forged})
        client.post("/webhook", json={"action": forged, "project": 3})
        client.post("/predict", json={"tasks": [{"id": forged}, {"id": [[1] * 1000]}]})
        client.get("/no/such/" + "%0A" + "path=/forged")
    assert caplog.text.count("\n") == len(caplog.records)  # one line per record
    assert not any(line.startswith("2026-01-01") for line in caplog.text.splitlines())
    assert "path=/no/such/\\npath=/forged status=404" in caplog.text  # escaped, kept
    assert "task=<list> outcome=failed" in caplog.text


def test_a_label_config_past_two_million_characters_is_a_400(client):
    """Parsed configs are cached (64 of them): a client must not be able to pin gigabytes."""
    huge = CONFIG.replace('value="$image"', 'value="$image" title="' + "x" * 2_000_000 + '"')
    for path, body in (
        ("/setup", {"schema": huge}),
        ("/predict", {"tasks": [], "label_config": huge}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 400
        assert "at most 2,000,000 are read" in response.get_json()["error"]


def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    """glibc's per-thread arenas kept the high-water mark of concurrent photo decodes (memory
    grew 12 MB/min in the soak); the server caps them, and an explicit MALLOC_ARENA_MAX wins."""
    from backend.server import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True  # glibc: mallopt accepted the cap
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # glibc read the variable at start-up
