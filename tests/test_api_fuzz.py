"""Hostile input (issue 8): the OpenAPI description and property-based fuzzing of a real server.

1. The description (backend/openapi.py) validates against the OpenAPI 3.0 meta-schema (the
   copy schemathesis ships), its operations are exactly the Flask app's routes (a new route
   without a description fails here), and GET /openapi.json serves it.
2. Basic auth: every route of the app's url_map, unknown ones and wrong methods included,
   answers 401 without the credentials; the right ones open every route.
3. schemathesis generates requests from the description and sends them over HTTP to a real
   `python -m backend.server` (gunicorn, a free port; it must serve that same description at
   /openapi.json), and checks every answer: no 5xx, no traceback, every 4xx a JSON error with a
   message, status codes, content types, headers and bodies as described. Once without basic
   auth, once with it (no credentials: 401 everywhere; the right ones: the same checks).
4. Hypothesis goes beyond the description: arbitrary JSON in every field of /predict tasks and
   /webhook events (mutated from what Label Studio really sends) over HTTP, and straight into
   annotations.py / webhooks.py.
5. The servers' logs (at DEBUG) never hold the basic-auth user, password or header.

The servers get a LABEL_STUDIO_URL where nothing listens (downloads fail at once, per task),
and an API key, so /jobs/predict queues real jobs on the in-process queue: no 503 is expected
anywhere, and none is allowed. Training never starts a real run (TRAIN_MIN_LABELS is huge).
Generation is derandomized and uses no example database, so CI sees the same cases each run.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30
from server_process import free_port, running_server

from backend import openapi
from backend.annotations import (
    ACCEPTED,
    EMPTY,
    POINTS,
    REJECTED,
    SKIPPED,
    parse_annotation,
)
from backend.label_store import LabelStore
from backend.server import create_app
from backend.settings import Settings
from backend.webhooks import HANDLED, WebhookError, record_event

ROOT = Path(__file__).resolve().parent.parent
CONFIG = (ROOT / "label_config" / "pupils.xml").read_text(encoding="utf-8")
USER = "fuzz-bot-5e1d"
PASSWORD = "fuzz pässwort 9b3c"  # spaces and non-ASCII: sent as UTF-8
LS_KEY = "fuzz-ls-key-0d4e6a"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

# schemathesis: examples per operation, generation mode and phase. Without auth every phase
# runs (the examples written in the description, the coverage phase's boundary values and
# unexpected methods, then fuzzing); with auth, examples and fuzzing (the coverage phase's
# cases are the same as without). Measured on 2 shared CPU cores: ~35 s of CPU, 45-65 s wall
# for the module (~1,050 requests to the two servers).
MAX_EXAMPLES = 15
MAX_EXAMPLES_AUTHENTICATED = 10
MAX_EXAMPLES_UNAUTHENTICATED = 5
HTTP_EXAMPLES = 50  # each of the two beyond-the-schema HTTP fuzzers
PARSER_EXAMPLES = 150  # annotations.py and webhooks.py in-process, each
DEADLINE = timedelta(seconds=10)  # a request taking longer than this is a hang, not a result
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"\n]*", line \d+')


# ---------------------------------------------------------------------------------------------
# 1. The description


def flask_operations(app) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every route the app serves; HEAD is Flask's own answer for
    every GET route, and not described."""
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        found |= {(m, path) for m in rule.methods - {"HEAD"}}
    return found


def test_the_description_is_valid_openapi_3():
    document = openapi.spec()
    assert document["openapi"].startswith("3.0.")
    errors = list(jsonschema.Draft4Validator(OPENAPI_30).iter_errors(document))
    assert errors == [], [e.message for e in errors[:5]]
    json.dumps(document, allow_nan=False)  # plain JSON, as served


def test_the_description_names_exactly_the_apps_routes(tmp_path):
    app = create_app(Settings(model_dir=tmp_path))
    served, described = flask_operations(app), openapi.operations()
    assert served - described == set(), "routes without a description in backend/openapi.py"
    assert described - served == set(), "described in backend/openapi.py but not served"


def json_schema(value: object) -> object:
    """An OpenAPI 3.0 schema as plain JSON Schema: `nullable` becomes a "null" type."""
    if isinstance(value, list):
        return [json_schema(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: json_schema(v) for k, v in value.items() if k != "nullable"}
    if value.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def conforms(document: dict, schema: dict, instance: object) -> None:
    """Validate `instance` against `schema` (which may $ref the document's components)."""
    root = json_schema({**schema, "components": document["components"]})
    jsonschema.Draft4Validator(root).validate(instance)


def test_the_descriptions_examples_conform_to_their_schemas():
    document = openapi.spec()
    checked = 0
    for item in document["paths"].values():
        for operation in item.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                conforms(document, media["schema"], media["example"])
                checked += 1
            for parameter in operation.get("parameters", []):
                conforms(document, parameter["schema"], parameter["example"])
                checked += 1
    assert checked == 6  # four request bodies, two parameters


def test_every_described_error_is_the_json_error_with_www_authenticate_on_401():
    document = openapi.spec()
    responses = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            codes = operation["responses"]
            assert "401" in codes and "500" in codes, (method, path)
            assert any(c.startswith("2") for c in codes), (method, path)
            if method == "post":
                assert {"400", "413"} <= set(codes), (method, path)
    for name, response in responses.items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, name
    assert "WWW-Authenticate" in responses["Unauthorized"]["headers"]


def test_get_openapi_json_serves_the_description(tmp_path):
    client = create_app(Settings(model_dir=tmp_path)).test_client()
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.is_json
    assert response.get_json() == json.loads(json.dumps(openapi.spec()))


# ---------------------------------------------------------------------------------------------
# 2. Basic auth on every route (from the app's url_map, so a new route is covered by itself)


def route_calls(app) -> list[tuple[str, str]]:
    """One (method, concrete path) per route and method, plus an unknown path and a wrong
    method."""
    calls = []
    for method, path in sorted(flask_operations(app)):
        calls.append((method, re.sub(r"\{[^}]+\}", "predict-p3-pid1-0a1b2c3d", path)))
    return [*calls, ("GET", "/no/such/route"), ("DELETE", "/predict"), ("PATCH", "/versions")]


def test_every_route_of_the_url_map_asks_for_basic_auth(tmp_path, caplog):
    app = create_app(Settings(model_dir=tmp_path, basic_auth_user=USER, basic_auth_pass=PASSWORD))
    client = app.test_client()
    calls = route_calls(app)
    assert {("POST", "/webhook"), ("GET", "/metrics")} <= set(calls)  # the url_map was read
    wrong = "Basic " + base64.b64encode(f"{USER}:guess".encode()).decode()
    for method, path in calls:
        for headers in ({}, {"Authorization": wrong}):
            response = client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 401, (method, path)
            assert response.headers["WWW-Authenticate"] == 'Basic realm="pupil-backend"'
            assert "basic auth" in response.get_json()["error"]
        response = client.open(path, method=method, json={}, headers={"Authorization": BASIC})
        assert response.status_code != 401, (method, path)
        assert "WWW-Authenticate" not in response.headers
    for secret in (USER, PASSWORD, BASIC[6:], "guess"):
        assert secret not in caplog.text


# ---------------------------------------------------------------------------------------------
# Real servers


@dataclass
class Server:
    url: str
    log: Path
    auth: bool


_CLEARED = (
    "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS",
    "REDIS_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "LOCAL_FILES_DOCUMENT_ROOT",
    "ALLOWED_IMAGE_HOSTS",
    "LABEL_STUDIO_URL",
    "LABEL_STUDIO_API_KEY",
)


def _server(tmp: Path, auth: bool):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(
        PORT=str(port),
        HOST="127.0.0.1",
        MODEL_DIR=str(tmp / "models"),
        LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        LABEL_STUDIO_API_KEY=LS_KEY,
        WORKERS="1",
        THREADS="4",
        LOG_LEVEL="DEBUG",
        TRAIN_EVERY_N_LABELS="0",
        TRAIN_MIN_LABELS="1000000",
    )
    if auth:
        env.update(BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    log = tmp / "server.log"
    return running_server(env, log), Server(f"http://127.0.0.1:{port}", log, auth)


def _serves_the_description(server: Server) -> None:
    headers = {"Authorization": BASIC} if server.auth else {}
    response = requests.get(f"{server.url}/openapi.json", headers=headers, timeout=10)
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(openapi.spec()))


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    context, server = _server(tmp_path_factory.mktemp("open"), auth=False)
    with context:
        _serves_the_description(server)
        yield server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    context, server = _server(tmp_path_factory.mktemp("auth"), auth=True)
    with context:
        _serves_the_description(server)
        yield server


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        yield session


def header(response, name: str) -> str:
    """A header of a requests or a schemathesis response (lowercase names, list values)."""
    value = response.headers.get(name, response.headers.get(name.lower(), ""))
    return value[0] if isinstance(value, list) else value


def assert_clean_answer(response, path: str, sent: str = "") -> None:
    """What every answer must be: no 5xx, no traceback, JSON (except /metrics' 200), and a 4xx
    is the JSON error with a message. `sent` describes the request for the failure message."""
    body = response.text
    said = f"{response.status_code} {header(response, 'Content-Type')} from {path}: {body[:300]}"
    said += f"\nrequest: {sent}" if sent else ""
    assert response.status_code < 500, said
    assert not TRACEBACK.search(body), said
    media = header(response, "Content-Type").split(";")[0].strip()
    if path == "/metrics" and response.status_code == 200:
        assert media == "text/plain", said
        return
    assert media == "application/json", said
    if response.status_code >= 400:
        error = response.json()
        assert isinstance(error, dict) and set(error) == {"error", "status"}, error
        assert isinstance(error["error"], str) and error["error"].strip(), error
        assert error["status"] == response.status_code, error


# ---------------------------------------------------------------------------------------------
# 3. schemathesis against the description the real server serves

SCHEMATHESIS_CONFIG = {
    "generation": {
        "mode": "all",  # schema-valid requests and deliberately invalid ones
        "deterministic": True,
        "database": "none",
    },
    "phases": {"stateful": {"enabled": False}},
    "cache": {"enabled": False},
}
# Not run: positive_data_acceptance (a schema-valid label config or task can still be unusable,
# a documented 400 or an empty prediction), negative_data_rejection (the server deliberately
# ignores fields it does not use, as Label Studio sends more and other fields than it reads),
# ignored_auth (auth is optional in the description; section 2 and the unauthenticated run
# check it), use_after_free and ensure_resource_availability (nothing is created or deleted).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,
]


def _schema(max_examples: int, coverage: bool):
    config = copy.deepcopy(SCHEMATHESIS_CONFIG)
    config["generation"]["max-examples"] = max_examples
    config["phases"]["coverage"] = {"enabled": coverage}
    return schemathesis.openapi.from_dict(
        openapi.spec(), config=schemathesis.Config.from_dict(config)
    )


# The document the servers serve at /openapi.json (the server fixtures check that they do).
# Loaded here rather than from a fixture: schemathesis' fixture loader does not run on pytest 9.
SCHEMA = _schema(MAX_EXAMPLES, coverage=True)
SCHEMA_AUTHENTICATED = _schema(MAX_EXAMPLES_AUTHENTICATED, coverage=False)
SCHEMA_UNAUTHENTICATED = _schema(MAX_EXAMPLES_UNAUTHENTICATED, coverage=False)


# Health checks judge how fast data is generated, which a shared CI machine cannot promise.
FUZZ = settings(deadline=DEADLINE, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip


@SCHEMA.parametrize()
@FUZZ
def test_fuzz_without_basic_auth(case, open_server, http):
    response = case.call(base_url=open_server.url, session=http, timeout=30)
    case.validate_response(response, checks=CHECKS)
    assert_clean_answer(response, case.operation.path, case.as_curl_command())


@SCHEMA_AUTHENTICATED.parametrize()
@FUZZ
def test_fuzz_with_basic_auth_and_the_credentials(case, auth_server, http):
    headers = {"Authorization": BASIC}
    response = case.call(base_url=auth_server.url, session=http, headers=headers, timeout=30)
    case.validate_response(response, checks=CHECKS, headers=headers)
    assert_clean_answer(response, case.operation.path, case.as_curl_command())
    assert response.status_code != 401


@SCHEMA_UNAUTHENTICATED.parametrize()
@FUZZ
def test_fuzz_with_basic_auth_without_the_credentials(case, auth_server, http):
    if case.headers:
        case.headers.pop("Authorization", None)  # whatever was generated, none is sent
    response = case.call(base_url=auth_server.url, session=http, timeout=30)
    case.validate_response(response, checks=CHECKS)
    assert_clean_answer(response, case.operation.path, case.as_curl_command())
    assert response.status_code == 401, response.text[:200]
    assert header(response, "WWW-Authenticate") == 'Basic realm="pupil-backend"'
    assert "basic auth" in response.json()["error"]


# ---------------------------------------------------------------------------------------------
# 4. Beyond the description: arbitrary JSON in every field

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and Infinity too: Python's JSON reader accepts them
    | st.text(max_size=12)
)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def mutated(template: object) -> st.SearchStrategy:
    """`template` with any part kept, dropped (object members) or replaced by any JSON value,
    at every depth."""
    if isinstance(template, dict):
        members = {key: mutated(value) for key, value in template.items()}
        return st.fixed_dictionaries({}, optional=members) | json_values
    if isinstance(template, list) and template:
        return st.lists(st.one_of([mutated(item) for item in template]), max_size=4) | json_values
    return st.just(template) | json_values


def _region(label: str, x: float, parent: str | None = None) -> dict:
    region = {
        "id": f"r-{label}",
        "from_name": "keypoints",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": 1280,
        "original_height": 960,
        "image_rotation": 0,
        "value": {"x": x, "y": 40.0, "width": 0.5, "keypointlabels": [label]},
        "origin": "manual",
    }
    if parent is not None:
        region["parentID"] = parent
    return region


VERDICT = {"type": "choices", "from_name": "verdict", "to_name": "image",
           "value": {"choices": ["wrong"]}}  # fmt: skip
ANNOTATION = {
    "id": 17,
    "task": 42,
    "project": 3,
    "result": [_region("left_pupil", 60.0, "f0"), _region("right_pupil", 40.0, "f0"), VERDICT],
    "was_cancelled": False,
    "ground_truth": False,
    "parent_prediction": 55,
    "created_at": "2025-05-01T10:00:00.000000Z",
    "updated_at": "2025-05-01T11:00:00.000000Z",
}
TASK = {
    "id": 42,
    "data": {"image": "/data/upload/3/2bd44c48-face_001.jpg"},
    "meta": {},
    "project": 3,
    "annotations": [ANNOTATION],
    "predictions": [{"id": 55, "result": ANNOTATION["result"], "score": 0.5}],
}
PROJECT = {"id": 3, "title": "Pupils", "label_config": CONFIG}
EVENTS = {
    "ANNOTATION_CREATED": {"annotation": ANNOTATION, "task": TASK, "project": PROJECT},
    "ANNOTATION_UPDATED": {"annotation": ANNOTATION, "task": TASK, "project": 3},
    "ANNOTATIONS_CREATED": {"annotation": [ANNOTATION], "task": [TASK], "project": PROJECT},
    "ANNOTATIONS_DELETED": {"annotations": [{"id": 17}], "project": PROJECT},
    "START_TRAINING": {"project": PROJECT},
    "TASKS_CREATED": {"tasks": [TASK], "project": PROJECT},
}
webhook_events = st.sampled_from(sorted(EVENTS)).flatmap(
    lambda action: st.tuples(st.just(action) | json_values, mutated(EVENTS[action]))
)
HTTP_FUZZ = settings(max_examples=HTTP_EXAMPLES, deadline=DEADLINE, derandomize=True,
                     database=None, suppress_health_check=list(HealthCheck))  # fmt: skip
PARSER_FUZZ = settings(max_examples=PARSER_EXAMPLES, deadline=None, derandomize=True,
                       database=None, suppress_health_check=list(HealthCheck))  # fmt: skip


def _send(http, server: Server, path: str, body: object):
    """POST `body` as Python's JSON writes it (NaN and Infinity included, as a hostile client
    may), with the credentials when the server asks for them."""
    headers = {"Content-Type": "application/json"}
    if server.auth:
        headers["Authorization"] = BASIC
    data = json.dumps(body).encode()
    return http.post(server.url + path, data=data, headers=headers, timeout=30)


@HTTP_FUZZ
@given(tasks=st.lists(mutated(TASK), max_size=4), params=mutated({"context": None}))
def test_predict_survives_any_json_in_every_task_field(open_server, http, tasks, params):
    response = _send(http, open_server, "/predict", {"tasks": tasks, "params": params})
    assert_clean_answer(response, "/predict")
    if not isinstance(params, dict) and params is not None:
        assert response.status_code == 400 and "'params'" in response.json()["error"]
        return
    assert response.status_code == 200, response.text[:300]
    results = response.json()["results"]
    assert len(results) == len(tasks)  # one per task, in order, whatever the task holds
    conforms(openapi.spec(), {"$ref": "#/components/schemas/PredictResponse"}, response.json())


@HTTP_FUZZ
@given(event=webhook_events)
def test_webhook_survives_any_json_in_every_field(open_server, http, event):
    action, body = event
    payload = {**body, "action": action} if isinstance(body, dict) else body
    response = _send(http, open_server, "/webhook", payload)
    assert_clean_answer(response, "/webhook")
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 200:
        schema = {"$ref": "#/components/schemas/WebhookResponse"}
        conforms(openapi.spec(), schema, response.json())
        assert response.json()["event"] == action


@PARSER_FUZZ
@given(annotation=mutated(ANNOTATION))
def test_parse_annotation_reads_anything_without_raising(annotation):
    if not isinstance(annotation, dict):
        return  # webhooks.py passes only objects (the next test checks that)
    label = parse_annotation(annotation)
    assert label.kind in (POINTS, ACCEPTED, REJECTED, SKIPPED, EMPTY)
    for pair in label.pairs:  # a label training would use: finite pixels
        for xy in (pair.left_pupil, pair.right_pupil):
            assert xy.shape == (2,) and all(math.isfinite(v) for v in xy)


numbers = (
    st.floats()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.booleans()
    | st.none()
    | st.text(max_size=8)
)


@PARSER_FUZZ
@given(
    x=st.floats(0, 100) | numbers,
    y=st.floats(0, 100),
    width=st.floats(min_value=0) | numbers,
    height=st.floats(min_value=0, max_value=1e4) | numbers,
)
def test_any_numbers_in_a_keypoint_give_finite_pixels_or_no_point(x, y, width, height):
    odd = _region("left_pupil", 60.0)
    odd["value"].update(x=x, y=y)
    odd.update(original_width=width, original_height=height)
    label = parse_annotation({"result": [odd, _region("right_pupil", 40.0)]})
    for pair in label.pairs:
        assert all(math.isfinite(v) for v in (*pair.left_pupil, *pair.right_pupil))
        assert 0 <= pair.left_pupil[0] <= float(width) and 0 <= pair.left_pupil[1] <= float(height)


@pytest.fixture(scope="module")
def parser_store(tmp_path_factory) -> LabelStore:
    """One label store for the whole run (a new SQLite file per example would be slow)."""
    return LabelStore(tmp_path_factory.mktemp("parser-store"))


@PARSER_FUZZ
@given(action=st.sampled_from([*HANDLED, "TASKS_CREATED"]), data=st.data())
def test_record_event_raises_only_webhook_errors(parser_store, action, data):
    body = data.draw(mutated(EVENTS.get(action, EVENTS["START_TRAINING"])))
    if not isinstance(body, dict):
        body = {"project": body}  # the server answers a body that is not an object itself
    try:
        outcome = record_event(parser_store, action, copy.deepcopy(body))
    except WebhookError as e:
        assert str(e).strip()
        return
    assert outcome.status in ("recorded", "ignored")
    assert outcome.stored >= 0 and outcome.deleted >= 0
    json.dumps(outcome.to_json(), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# 5. The logs


def test_the_real_servers_never_log_credentials(open_server, auth_server, http):
    """After the fuzzing above (when run with it) and a refused and an accepted call on every
    route here, neither server's log holds the user, the password or the header."""
    wrong = "Basic " + base64.b64encode(f"{USER}:not-{PASSWORD}".encode()).decode()
    spec_paths = [re.sub(r"\{[^}]+\}", "predict-p3-pid1-0a1b2c3d", p) for _, p in
                  sorted(openapi.operations())]  # fmt: skip
    for server in (open_server, auth_server):
        for (method, _), path in zip(sorted(openapi.operations()), spec_paths, strict=True):
            for sent in (None, wrong, BASIC):
                headers = {"Authorization": sent} if sent else {}
                response = http.request(
                    method, server.url + path, json={}, headers=headers, timeout=30
                )
                assert_clean_answer(response, path)
                if server.auth:
                    assert (response.status_code == 401) == (sent != BASIC), (path, sent)
    for server in (open_server, auth_server):
        log = server.log.read_text(encoding="utf-8", errors="replace")
        assert "method=GET path=/health" in log  # the log is the one the server writes
        for secret in (USER, PASSWORD, BASIC, BASIC[6:], wrong[6:], LS_KEY):
            assert secret not in log, f"{secret!r} in {server.log}"
    assert "auth refused" in auth_server.log.read_text(encoding="utf-8", errors="replace")
