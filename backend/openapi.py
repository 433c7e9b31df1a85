"""The OpenAPI 3.0 description of the backend's HTTP interface, served at GET /openapi.json.

It is a Python module rather than a YAML/JSON file so that it ships with the package whatever
installs it (setuptools packages only the .py files of `backend`) and needs no YAML parser at
run time. `python -m backend.openapi` prints it as JSON (e.g. for Swagger UI or a client
generator).

Kept honest by the tests: tests/test_api_fuzz.py checks that its paths and methods are exactly
the Flask app's routes (a route without a description fails CI), that it validates against the
OpenAPI 3.0 meta-schema, and fuzzes a real server with schemathesis against it (every answer
must conform to what is written here).

Request bodies are described as Label Studio 1.23 sends them (docs: label-studio-protocol.md
sections 1.6, 1.7 and 3.2); the server reads only what it needs and ignores any other field, so
every object allows additional properties.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from backend.basic_auth import REALM

OPENAPI_VERSION = "3.0.3"

_JSON = "application/json"
_PROMETHEUS = "text/plain"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json_response(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}, **extra}


def _json_body(schema: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": schema, "example": example}}}


def _errors(*codes: int) -> dict[str, Any]:
    """The error answers every operation shares (401, 500), plus `codes`."""
    names = {
        400: "BadRequest",
        401: "Unauthorized",
        404: "NotFound",
        413: "PayloadTooLarge",
        500: "InternalError",
        503: "Unavailable",
    }
    return {str(code): _response(names[code]) for code in sorted({*codes, 401, 500})}


_PUPILS_CONFIG = (
    '<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
    '  <KeyPointLabels name="keypoints" toName="image" smart="false">\n'
    '    <Label value="left_pupil"/><Label value="right_pupil"/>\n'
    '    <Label value="left_eye_outer"/><Label value="left_eye_inner"/>\n'
    '    <Label value="right_eye_inner"/><Label value="right_eye_outer"/>\n'
    "  </KeyPointLabels>\n"
    '  <Choices name="verdict" toName="image" choice="single">\n'
    '    <Choice value="correct"/><Choice value="wrong"/>\n'
    "  </Choices>\n</View>"
)
_TASK_EXAMPLE = {
    "id": 42,
    "data": {"image": "/data/upload/3/2bd44c48-face_001.jpg"},
    "meta": {},
    "project": 3,
    "annotations": [],
    "predictions": [],
}
_REGION_EXAMPLE = {
    "id": "a1",
    "from_name": "keypoints",
    "to_name": "image",
    "type": "keypointlabels",
    "original_width": 1280,
    "original_height": 960,
    "image_rotation": 0,
    "value": {"x": 41.2, "y": 37.9, "width": 0.5, "keypointlabels": ["left_pupil"]},
    "origin": "manual",
}
_ANNOTATION_EXAMPLE = {
    "id": 17,
    "task": 42,
    "project": 3,
    "result": [_REGION_EXAMPLE],
    "was_cancelled": False,
    "ground_truth": False,
    "parent_prediction": 55,
    "created_at": "2025-05-01T10:00:00.000000Z",
    "updated_at": "2025-05-01T10:00:00.000000Z",
}
_PROJECT_EXAMPLE = {"id": 3, "title": "Pupils", "label_config": _PUPILS_CONFIG}

_NULLABLE_STRING = {"type": "string", "nullable": True}
_NULLABLE_INT = {"type": "integer", "nullable": True}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error answer, whatever the route (never a traceback).",
        "required": ["error", "status"],
        "properties": {
            "error": {
                "type": "string",
                "minLength": 1,
                "description": "What is wrong, in words, naming the field at fault",
            },
            "status": {"type": "integer", "description": "The HTTP status, repeated"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "model_class"],
        "properties": {
            "status": {"type": "string", "enum": ["UP"]},
            "model_class": {"type": "string", "example": "PupilModel"},
        },
    },
    "SetupRequest": {
        "type": "object",
        "description": "What Label Studio sends when a model is connected and before every "
        "live prediction (3 s timeout). Only `schema` is read.",
        "required": ["schema"],
        "properties": {
            "schema": {
                "type": "string",
                "description": "The project's label config (XML): it needs an <Image> and a "
                "<KeyPointLabels> attached to it",
            },
            "project": {
                "type": "string",
                "description": 'Label Studio\'s "<project id>.<created timestamp>"',
                "example": "3.1746612998",
            },
            "hostname": {"type": "string", "example": "http://localhost:8080"},
            "access_token": {
                "type": "string",
                "description": "The project creator's legacy token; never used or logged",
            },
            "model_version": _NULLABLE_STRING,
            "extra_params": {
                **_NULLABLE_STRING,
                "description": 'The model\'s "extra params" text field; ignored',
            },
        },
    },
    "SetupResponse": {
        "type": "object",
        "required": ["model_version"],
        "properties": {
            "model_version": {
                "type": "string",
                "minLength": 1,
                "description": "The version predictions are stamped with now",
                "example": "coarse-fused-0.1.0",
            }
        },
    },
    "Task": {
        "type": "object",
        "description": "A Label Studio task (TaskSimpleSerializer: every Task field plus "
        "`annotations` and `predictions`). The image is read from the data field that the "
        "<Image> tag's value names ($image: `data.image`).",
        "required": ["id", "data"],
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "data": {
                "type": "object",
                "description": "/data/upload/..., /data/local-files/?d=..., http(s):// on "
                "LABEL_STUDIO_URL or ALLOWED_IMAGE_HOSTS, s3:// gs:// azure-blob:// (signed by "
                "Label Studio), or a data: URI",
                "properties": {"image": {"type": "string"}},
            },
            "meta": {"type": "object"},
            "project": {"type": "integer"},
            "annotations": {"type": "array", "items": {"type": "object"}},
            "predictions": {"type": "array", "items": {"type": "object"}},
        },
    },
    "PredictRequest": {
        "type": "object",
        "description": "A batch of tasks (Retrieve Predictions sends every selected task in "
        "one request; 100 s timeout).",
        "required": ["tasks"],
        "properties": {
            "tasks": {"type": "array", "items": _ref("Task")},
            "project": {"type": "string", "example": "3.1746612998"},
            "label_config": {
                "type": "string",
                "description": "The project's label config; label_config/pupils.xml when omitted",
            },
            "params": {
                "type": "object",
                "nullable": True,
                "description": "Label Studio sends login, password and context (the regions "
                "just drawn, in interactive mode); context is accepted and ignored",
                "properties": {
                    "login": _NULLABLE_STRING,
                    "password": _NULLABLE_STRING,
                    "context": {"type": "object", "nullable": True},
                },
            },
        },
    },
    "Region": {
        "type": "object",
        "description": "One keypoint (or face rectangle) in percent of the EXIF-transposed image",
        "required": [
            "id",
            "from_name",
            "to_name",
            "type",
            "original_width",
            "original_height",
            "image_rotation",
            "value",
            "score",
        ],
        "properties": {
            "id": {"type": "string"},
            "from_name": {"type": "string"},
            "to_name": {"type": "string"},
            "type": {"type": "string", "enum": ["keypointlabels", "rectanglelabels", "rectangle"]},
            "original_width": {"type": "integer", "minimum": 1},
            "original_height": {"type": "integer", "minimum": 1},
            "image_rotation": {"type": "number"},
            "value": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": 0, "maximum": 100},
                    "y": {"type": "number", "minimum": 0, "maximum": 100},
                    "width": {"type": "number", "minimum": 0, "maximum": 100},
                    "height": {"type": "number", "minimum": 0, "maximum": 100},
                    "rotation": {"type": "number"},
                    "keypointlabels": {"type": "array", "items": {"type": "string"}},
                    "rectanglelabels": {"type": "array", "items": {"type": "string"}},
                },
            },
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "parentID": {"type": "string"},
        },
    },
    "Prediction": {
        "type": "object",
        "description": "One task's prediction. A task that cannot be predicted gets an empty "
        "result and score 0 (and a log line naming the reason).",
        "required": ["result", "score", "model_version"],
        "properties": {
            "result": {"type": "array", "items": _ref("Region")},
            "score": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "P(every pupil of the task is right); 0 without a face",
            },
            "model_version": {"type": "string", "minLength": 1},
        },
    },
    "PredictResponse": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "description": "One prediction per task, in the order of `tasks`",
                "items": _ref("Prediction"),
            }
        },
    },
    "Annotation": {
        "type": "object",
        "description": "A Label Studio annotation (all its fields; foreign keys are ids)",
        "required": ["id"],
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "task": {"type": "integer", "minimum": 0},
            "project": {"type": "integer", "minimum": 0},
            "result": {"type": "array", "items": {"type": "object"}},
            "was_cancelled": {"type": "boolean"},
            "ground_truth": {"type": "boolean"},
            "parent_prediction": _NULLABLE_INT,
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
        },
    },
    "Project": {
        "type": "object",
        "description": "ProjectWebhookSerializer: every Project field plus counters",
        "required": ["id"],
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "title": {"type": "string"},
            "label_config": {"type": "string"},
            "model_version": _NULLABLE_STRING,
        },
    },
    "WebhookEvent": {
        "type": "object",
        "description": "A project event from Label Studio's webhook (1 s timeout, no retry) or "
        "START_TRAINING from the model card. Recorded: ANNOTATION_CREATED and "
        "ANNOTATION_UPDATED (`annotation` and `task` objects), ANNOTATIONS_CREATED (lists), "
        "ANNOTATIONS_DELETED (`annotations`: [{id}]), START_TRAINING (only `project`); any "
        "other action is answered as ignored.",
        "required": ["action"],
        "properties": {
            "action": {
                "type": "string",
                "example": "ANNOTATION_CREATED",
                "description": "ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED, "
                "ANNOTATIONS_DELETED, START_TRAINING; others (TASKS_CREATED, PROJECT_UPDATED, "
                "...) are ignored",
            },
            "project": {
                "description": "The project object, or its id; when absent, the "
                "annotation's `project`",
                "oneOf": [_ref("Project"), {"type": "integer", "minimum": 0}],
            },
            "annotation": {
                "oneOf": [
                    _ref("Annotation"),
                    {"type": "array", "items": _ref("Annotation")},
                ]
            },
            "task": {"oneOf": [_ref("Task"), {"type": "array", "items": _ref("Task")}]},
            "annotations": {
                "type": "array",
                "description": "ANNOTATIONS_DELETED: the deleted annotations' ids",
                "items": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {"id": {"type": "integer", "minimum": 0}},
                },
            },
        },
    },
    "WebhookResponse": {
        "type": "object",
        "required": ["status", "event"],
        "properties": {
            "status": {"type": "string", "enum": ["recorded", "ignored"]},
            "event": {"type": "string"},
            "project": {"type": "integer"},
            "stored": {"type": "integer", "minimum": 0},
            "deleted": {"type": "integer", "minimum": 0},
            "skipped": {
                "type": "array",
                "description": "Why annotations of the event were left out",
                "items": {"type": "string"},
            },
            "training": {"type": "string", "enum": ["requested"]},
        },
    },
    "VersionDetail": {
        "type": "object",
        "required": ["name", "project", "status"],
        "properties": {
            "name": {"type": "string"},
            "project": {**_NULLABLE_INT, "description": "null: trained by scripts/train.py"},
            "status": {
                "type": "string",
                "enum": ["serving", "rejected", "retired", "trained", "unusable"],
            },
            "created": _NULLABLE_STRING,
            "metrics": {"type": "object", "description": "Validation metrics (e05, e10, ...)"},
            "reason": {**_NULLABLE_STRING, "description": "Why it was promoted or rejected"},
            "train_faces": _NULLABLE_INT,
            "val_faces": _NULLABLE_INT,
            "problem": {"type": "string", "description": "Unusable: why"},
        },
    },
    "ServingProblem": {
        "type": "object",
        "description": "A model directory whose promoted version does not serve as promoted",
        "required": ["project", "promoted", "serving", "reasons"],
        "properties": {
            "project": _NULLABLE_INT,
            "promoted": {**_NULLABLE_STRING, "description": "What serving.json names"},
            "serving": {**_NULLABLE_STRING, "description": "What serves instead"},
            "after_restart": {**_NULLABLE_STRING, "description": "What a restart would serve"},
            "reasons": {"type": "array", "items": {"type": "string"}},
        },
    },
    "TrainingState": {
        "type": "object",
        "required": ["project", "label_changes", "trained_on", "requested", "running"],
        "properties": {
            "project": {"type": "integer"},
            "label_changes": {"type": "integer"},
            "trained_on": {"type": "integer"},
            "new_labels": {"type": "integer"},
            "requested": {"type": "boolean"},
            "queued_job": _NULLABLE_STRING,
            "running": {"type": "boolean"},
            "last_started": {**_NULLABLE_NUMBER, "description": "Unix time"},
            "failures": {"type": "integer", "minimum": 0},
            "last_run": {
                "type": "object",
                "nullable": True,
                "description": "What the last run did and why (outcome, reason, job, ...)",
            },
        },
    },
    "VersionsReport": {
        "type": "object",
        "required": ["versions", "serving", "details", "training"],
        "properties": {
            "versions": {
                "type": "array",
                "minItems": 1,
                "description": "Version names, the serving one first",
                "items": {"type": "string"},
            },
            "serving": {"type": "string"},
            "details": {"type": "array", "items": _ref("VersionDetail")},
            "training": {"type": "array", "items": _ref("TrainingState")},
            "problems": {
                "type": "array",
                "description": "Empty when every promoted version serves",
                "items": _ref("ServingProblem"),
            },
        },
    },
    "PredictJobRequest": {
        "type": "object",
        "required": ["project"],
        "properties": {
            "project": {
                "description": "The Label Studio project id (a positive integer, or its digits)",
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                    {"type": "string", "pattern": "^\\s*0*[1-9][0-9]{0,18}\\s*$"},
                ],
            }
        },
    },
    "PredictJobAccepted": {
        "type": "object",
        "required": ["job", "kind", "project", "model_version"],
        "properties": {
            "job": {"type": "string", "example": "predict-p3-pid12-1a2b3c4d"},
            "kind": {"type": "string", "enum": ["predict"]},
            "project": {"type": "integer", "minimum": 1},
            "model_version": {
                "type": "string",
                "description": "The version whose predictions the job imports",
            },
        },
    },
    "JobStatus": {
        "type": "object",
        "required": ["job", "kind", "project", "status"],
        "properties": {
            "job": {"type": "string"},
            "kind": {
                "type": "string",
                "example": "predict",
                "description": "predict, predict_chunk or train",
            },
            "project": {"type": "integer"},
            "status": {"type": "string", "enum": ["queued", "started", "finished", "failed"]},
            "result": {"type": "object", "description": "When finished: what the job did"},
            "error": {"type": "string", "description": "When failed: why (one line)"},
            "last_error": {
                "type": "string",
                "description": "Queued or started again after a failed attempt that is "
                "retried: that attempt's error",
            },
            "retries_left": {"type": "integer", "nullable": True, "minimum": 0},
            "chunks": {
                "type": "object",
                "description": "A predict job: how many of its chunk jobs are in each state "
                "(it is finished when all are, failed as soon as one failed for good)",
                "properties": {
                    name: {"type": "integer", "minimum": 0}
                    for name in ("total", "queued", "started", "finished", "failed", "retrying")
                },
            },
        },
    },
}

_RESPONSES: dict[str, Any] = {
    "BadRequest": _json_response(
        "The request cannot be used: the message names what is wrong (body not a JSON "
        "object, a required field missing or of the wrong type, an unusable label config)",
        _ref("Error"),
    ),
    "Unauthorized": _json_response(
        "Basic auth is on (BASIC_AUTH_USER/BASIC_AUTH_PASS) and the request lacks those "
        "credentials",
        _ref("Error"),
        headers={
            "WWW-Authenticate": {
                "required": True,
                "schema": {"type": "string", "example": f'Basic realm="{REALM}"'},
            }
        },
    ),
    "NotFound": _json_response("Nothing with that name", _ref("Error")),
    "PayloadTooLarge": _json_response("The body is over 64 MiB", _ref("Error")),
    "InternalError": _json_response(
        "An unexpected error; the body says only that (the traceback goes to the server's log)",
        _ref("Error"),
    ),
    "Unavailable": _json_response(
        "Cannot be done now, nothing was changed: a job needs LABEL_STUDIO_URL/"
        "LABEL_STUDIO_API_KEY or the queue (Redis) is unreachable; an event could not be "
        "written to the label store (disk full); the message says which",
        _ref("Error"),
    ),
}

_HEALTH = {
    "summary": "Liveness (Label Studio's 1 s health check); no model work",
    "responses": {
        "200": _json_response("Up", _ref("Health")),
        **_errors(),
    },
}

_SPEC: dict[str, Any] = {
    "openapi": OPENAPI_VERSION,
    "info": {
        "title": "Pupil pre-annotation backend for Label Studio",
        "version": "1",
        "description": (
            "A Label Studio ML backend that pre-annotates pupil centres and eye corners. "
            'Every answer is JSON, errors included ({"error": ..., "status": code}), except '
            "GET /metrics (Prometheus text). An unknown path is a JSON 404; a known path with "
            "another method is a JSON 405 with an Allow header. With BASIC_AUTH_USER and "
            "BASIC_AUTH_PASS set, every route (these included) answers 401 without those "
            "credentials."
        ),
    },
    "servers": [{"url": "/", "description": "this backend (port 9090 by default)"}],
    # Optional: basic auth only when BASIC_AUTH_USER/BASIC_AUTH_PASS are set.
    "security": [{}, {"basicAuth": []}],
    "paths": {
        "/": {"get": {**_HEALTH, "operationId": "root"}},
        "/health": {"get": {**_HEALTH, "operationId": "health"}},
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This description",
                "responses": {
                    "200": _json_response("The OpenAPI document", {"type": "object"}),
                    **_errors(),
                },
            }
        },
        "/setup": {
            "post": {
                "operationId": "setup",
                "summary": "Check the project's label config; answer the model version",
                "requestBody": _json_body(
                    _ref("SetupRequest"),
                    {
                        "project": "3.1746612998",
                        "schema": _PUPILS_CONFIG,
                        "hostname": "http://localhost:8080",
                        "access_token": "0123456789abcdef",
                        "extra_params": None,
                    },
                ),
                "responses": {
                    "200": _json_response("The config is usable", _ref("SetupResponse")),
                    **_errors(400, 413),
                },
            }
        },
        "/predict": {
            "post": {
                "operationId": "predict",
                "summary": "One prediction per task, in order",
                "requestBody": _json_body(
                    _ref("PredictRequest"),
                    {
                        "tasks": [_TASK_EXAMPLE],
                        "project": "3.1746612998",
                        "label_config": _PUPILS_CONFIG,
                        "params": {"login": None, "password": None, "context": None},
                    },
                ),
                "responses": {
                    "200": _json_response(
                        "Predictions; a task that fails gets an empty one",
                        _ref("PredictResponse"),
                    ),
                    **_errors(400, 413),
                },
            }
        },
        "/webhook": {
            "post": {
                "operationId": "webhook",
                "summary": "Record a Label Studio event; answers at once",
                "requestBody": _json_body(
                    _ref("WebhookEvent"),
                    {
                        "action": "ANNOTATION_CREATED",
                        "annotation": _ANNOTATION_EXAMPLE,
                        "task": _TASK_EXAMPLE,
                        "project": _PROJECT_EXAMPLE,
                    },
                ),
                "responses": {
                    "200": _json_response(
                        "Recorded (annotations stored or deleted, training requested) or "
                        "ignored (an action this backend does not use)",
                        _ref("WebhookResponse"),
                    ),
                    **_errors(400, 413, 503),
                },
            }
        },
        "/versions": {
            "get": {
                "operationId": "versions",
                "summary": "Model versions, their metrics and status; training state",
                "parameters": [
                    {
                        "name": "project",
                        "in": "query",
                        "required": False,
                        "description": 'A project id ("3", or Label Studio\'s "3.1746612998"): '
                        "that project's serving version and state only",
                        "schema": {"type": "string"},
                        "example": "3",
                    }
                ],
                "responses": {
                    "200": _json_response("The report", _ref("VersionsReport")),
                    **_errors(400),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4",
                        "content": {_PROMETHEUS: {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/jobs/predict": {
            "post": {
                "operationId": "requestPredictions",
                "summary": "Queue the predict job for a project (pre-annotate every task)",
                "requestBody": _json_body(_ref("PredictJobRequest"), {"project": 3}),
                "responses": {
                    "202": _json_response("Queued", _ref("PredictJobAccepted")),
                    **_errors(400, 413, 503),
                },
            }
        },
        "/jobs/{job_id}": {
            "get": {
                "operationId": "jobStatus",
                "summary": "A job's status",
                "parameters": [
                    {
                        "name": "job_id",
                        "in": "path",
                        "required": True,
                        "description": "The `job` POST /jobs/predict answered",
                        "schema": {"type": "string"},
                        "example": "predict-p3-pid12-1a2b3c4d",
                    }
                ],
                "responses": {
                    "200": _json_response("The job", _ref("JobStatus")),
                    **_errors(400, 404, 503),
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "basicAuth": {
                "type": "http",
                "scheme": "basic",
                "description": "Only when BASIC_AUTH_USER and BASIC_AUTH_PASS are set (then on "
                "every route); in Label Studio, the model's Basic auth user and password",
            }
        },
        "schemas": _SCHEMAS,
        "responses": _RESPONSES,
    },
}


def spec() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_SPEC)


def operations(document: dict[str, Any] | None = None) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation described, e.g. ("GET", "/jobs/{job_id}")."""
    paths = (document or _SPEC)["paths"]
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {(m.upper(), path) for path, item in paths.items() for m in item if m in methods}


if __name__ == "__main__":
    print(json.dumps(_SPEC, indent=2))
