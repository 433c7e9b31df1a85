"""The HTTP server Label Studio calls: /health, /setup, /predict, /versions, /webhook, /metrics;
and /jobs/predict, which tools (scripts/import_images.py) call to pre-annotate a whole project.

`create_app(settings)` builds the Flask app; `main()` (`python -m backend.server`) reads the
settings from the environment, builds the detector once and serves with gunicorn, preloaded so
every worker shares it. `gunicorn 'backend.server:create_app()'` works too (add `warm=True` to
build the detector before the first request; with PROMETHEUS_MULTIPROC_DIR, empty that
directory yourself before starting).

With BASIC_AUTH_USER and BASIC_AUTH_PASS set, every route, unknown ones included, answers 401
with `WWW-Authenticate: Basic realm="pupil-backend"` unless the request carries them.
Every answer is JSON, errors included ({"error": ..., "status": code}), except /metrics
(Prometheus text); a 500 never carries a traceback (it goes to the log). One log line per
request (method, path, status, ms) and one per task (task id and what happened); what a client
sent is escaped onto that one line (backend.model.loggable).

GET /openapi.json describes every route (backend/openapi.py); tests/test_api_fuzz.py keeps the
two in step and fuzzes a real server against it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from backend import basic_auth, openapi
from backend.image_source import ImageSource
from backend.jobs import PREDICT, QueueUnavailable, is_job_id, job_queue, job_status, new_job_id
from backend.label_store import LabelStoreError
from backend.ls_auth import key_kind
from backend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from backend.metrics import Metrics, no_queue, reset_multiproc_dir, worker_exited
from backend.model import (
    ConfigError,
    PupilModel,
    loggable,
    model_version,
    warm_up,
)
from backend.project_dirs import project_of, serving_roots
from backend.scheduler import Scheduler
from backend.settings import Settings
from backend.versions import versions_report
from backend.webhooks import WebhookError

# Named explicitly: under `python -m backend.server` __name__ is "__main__".
log = logging.getLogger("backend.server")
access_log = logging.getLogger("backend.access")

MODEL_CLASS = "PupilModel"
# The project's config arrives with every /predict; this one is used when a caller omits it.
DEFAULT_LABEL_CONFIG = Path(__file__).resolve().parent.parent / "label_config" / "pupils.xml"
# A "Retrieve Predictions" batch carries every selected task with its annotations.
MAX_BODY_BYTES = 64 * 1024 * 1024
GUNICORN_TIMEOUT_S = 120
# The largest id Label Studio (and our SQLite label store) can hold.
MAX_ID = 2**63 - 1
# How deep objects and lists may nest in a request body.
MAX_JSON_DEPTH = 100
# predict() keyword names that request params must not override.
_RESERVED_PARAMS = frozenset({"self", "tasks", "context", "project"})
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s"


def configure_logging(level: str) -> None:
    """Send the `backend` loggers to stderr at `level` (idempotent)."""
    logger = logging.getLogger("backend")
    if not any(getattr(h, "_pupil_backend", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler._pupil_backend = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)


@functools.cache
def default_label_config() -> str | None:
    """The bundled label_config/pupils.xml, or None when it is not shipped alongside."""
    try:
        return DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8")
    except OSError:
        return None


def create_app(
    settings: Settings | None = None,
    *,
    warm: bool = False,
    queue_depth: Callable[[], int] = no_queue,
) -> Flask:
    """The Flask app. `settings` defaults to Settings.from_env(); `warm` builds the detector
    now rather than on the first prediction; `queue_depth` feeds the queue_depth gauge (0 until
    a job queue exists)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    if queue_depth is no_queue:

        def queue_depth() -> int:
            return job_queue(settings).depth()

    metrics = Metrics(multiproc_dir=settings.prometheus_multiproc_dir, queue_depth=queue_depth)
    scheduler = Scheduler(settings)
    source = ImageSource(settings)  # one per app: its cache and token outlive each request
    PupilModel(None, settings, source=source)  # checks COARSE_VARIANT now, not at first use
    _warn_about(settings)
    if warm:
        warm_up(settings.coarse_variant)

    app = Flask(__name__, static_folder=None)  # no /static route: every route is described
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # OPTIONS is a JSON 405 like any method a route does not serve (Flask's own answer is an
    # empty text/html 200); nothing calls it: Label Studio talks to the backend server-side.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.config["PUPIL_SETTINGS"] = settings
    app.extensions["pupil_metrics"] = metrics
    app.extensions["pupil_image_source"] = source
    app.extensions["pupil_scheduler"] = scheduler

    def new_model(label_config: str | None, project: object = None) -> PupilModel:
        project = _project_or_none(project)
        return PupilModel(label_config, settings, source=source, metrics=metrics, project=project)

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()
        scheduler.ensure_started()  # pending training left by a restart or a Redis outage

    credentials = (settings.basic_auth_user, settings.basic_auth_pass)

    @app.before_request
    def require_basic_auth() -> Response | None:
        user, password = credentials
        if user is None or password is None:  # Settings makes sure it is both or neither
            return None
        header = request.headers.get("Authorization")
        if basic_auth.credentials_match(header, user, password):
            return None
        log.warning(
            "auth refused method=%s path=%s reason=%s",
            loggable(request.method),
            loggable(request.path, 200),
            "no credentials" if not header else "wrong credentials",
        )
        response = _error(
            401,
            "authentication required: this backend expects HTTP basic auth (in Label Studio, "
            "the model's Basic auth user and password)",
        )
        response.headers["WWW-Authenticate"] = basic_auth.CHALLENGE
        return response

    @app.after_request
    def log_request(response: Response) -> Response:
        started = g.get("started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        extra = f" tasks={g.tasks}" if "tasks" in g else ""
        access_log.info(
            "method=%s path=%s status=%d ms=%.1f%s",
            loggable(request.method),
            loggable(request.path, 200),
            response.status_code,
            seconds * 1000,
            extra,
        )
        rule = request.url_rule.rule if request.url_rule is not None else None
        metrics.observe_request(request.method, rule, response.status_code, seconds)
        return response

    @app.get("/")
    @app.get("/health")
    def health():
        return {"status": "UP", "model_class": MODEL_CLASS}

    @app.post("/setup")
    def setup():
        body = _json_object()
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            return _error(400, "'schema' (the project's label config) is required")
        try:
            model = new_model(schema, body.get("project"))
        except ConfigError as e:
            project = loggable(body.get("project"))
            log.warning("setup project=%s outcome=rejected reason=%s", project, loggable(e, 300))
            return _error(400, str(e))
        log.info(
            "setup project=%s hostname=%s model_version=%s",
            loggable(body.get("project")),
            loggable(body.get("hostname")),
            model.model_version,
        )
        return {"model_version": model.model_version}

    @app.post("/predict")
    def predict():
        body = _json_object()
        if "tasks" not in body:
            return _error(400, "'tasks' (a list of Label Studio tasks) is required")
        tasks = body["tasks"]
        if not isinstance(tasks, list):
            return _error(400, f"'tasks' must be a list, got {_json_type(tasks)}")
        label_config = body.get("label_config")
        if label_config is None:
            label_config = default_label_config()
            if label_config is None:
                return _error(400, "'label_config' is required")
        if not isinstance(label_config, str):
            return _error(400, f"'label_config' must be a string, got {_json_type(label_config)}")
        params = body.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _error(400, f"'params' must be an object, got {_json_type(params)}")
        g.tasks = len(tasks)
        try:
            model = new_model(label_config, body.get("project"))
        except ConfigError as e:
            return _error(400, str(e))
        kwargs = {k: v for k, v in params.items() if k.isidentifier() and k not in _RESERVED_PARAMS}
        predictions = model.predict(
            tasks, context=params.get("context"), project=body.get("project"), **kwargs
        )
        return {"results": predictions}

    @app.get("/versions")
    def versions():
        """Version names (serving first), then each with its metrics and status, per project."""
        raw = request.args.get("project", "")
        project = _project_or_none(raw)
        if project is None and raw.strip():
            return _error(
                400,
                "'project' must be a Label Studio project id (e.g. 3, or 3.1746612998 as Label "
                f"Studio sends it), got {raw[:40]!r}",
            )
        return versions_report(settings, new_model(None, project).model_version, project)

    @app.get("/openapi.json")
    def openapi_document():
        """The OpenAPI description of these routes (backend/openapi.py)."""
        return openapi.spec()

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(metrics.render(), status=200, content_type=METRICS_CONTENT_TYPE)

    @app.post("/webhook")
    def webhook():
        """Record the event (durably) and answer at once; training is decided in the background
        (Label Studio waits one second and never retries)."""
        body = _json_object()
        action = body.get("action")
        if not isinstance(action, str) or not action.strip():
            return _error(400, "'action' (the event name) is required")
        data = {k: v for k, v in body.items() if k != "action"}
        try:
            result = new_model(None).fit(action, data)
        except WebhookError as e:
            log.warning("webhook event=%s outcome=rejected reason=%s", loggable(action), e)
            return _error(400, f"{action[:80]}: {e}")
        except LabelStoreError as e:  # disk full, store locked: nothing was written
            log.error("webhook event=%s outcome=not_recorded reason=%s", loggable(action), e)
            return _error(
                503,
                f"the event was not recorded: {e}; the next training run brings the annotation "
                "in from Label Studio's API",
            )
        if result["status"] == "recorded":
            scheduler.ensure_started()
            scheduler.notify()
        return result

    @app.post("/jobs/predict")
    def request_predictions():
        """Queue the "predict" job for a project: every task without a prediction of the
        serving model version is predicted and the predictions are imported into Label Studio
        in batches (no 100 s limit as for Label Studio's synchronous "Retrieve Predictions").
        Answers 202 at once with the job id and the version to wait for."""
        project = _project_id(_json_object().get("project"))
        if not settings.label_studio_url or not settings.label_studio_api_key:
            return _error(
                503,
                "this backend has no LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: it cannot read "
                "the project's tasks or push predictions; restart it with both set",
            )
        queue = job_queue(settings)
        job_id = new_job_id(PREDICT, project, getattr(queue, "owner", "q"))
        try:
            queue.enqueue(PREDICT, project, job_id)
        except QueueUnavailable as e:
            log.warning("project=%s predict job not queued: %s", project, e)
            return _error(503, f"the job queue is unavailable, try again later: {e}")
        version = new_model(None, project).model_version
        log.info("project=%s job=%s outcome=enqueued reason=requested version=%s",
                 project, job_id, version)  # fmt: skip
        body = {"job": job_id, "kind": PREDICT, "project": project, "model_version": version}
        return body, 202

    @app.get("/jobs/<job_id>")
    def job_report(job_id: str):
        """What became of a job: queued, started, finished (with its result) or failed (with
        its error, one line). A predict job counts its chunk jobs ("chunks") and is finished
        when all are, failed when one failed for good. The thread queue (no REDIS_URL) knows
        only this process's jobs: its 404 says so."""
        if not is_job_id(job_id):
            return _error(400, f"{json.dumps(job_id[:60])} is not a job id (they look like "
                          "predict-p3-rq-1a2b3c4d, as POST /jobs/predict answers)")  # fmt: skip
        queue = job_queue(settings)
        try:
            body = job_status(queue, job_id)
        except QueueUnavailable as e:
            log.warning("job=%s outcome=unknown reason=queue_unavailable detail=%s", job_id, e)
            return _error(503, f"the job queue is unavailable, try again later: {e}")
        if body is None:
            return _error(404, queue.unknown_job(job_id))
        return body

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        response = _error(error.code or 500, error.description or error.name)
        for name, value in error.get_headers():
            if name.lower() != "content-type":  # keep Allow (405), drop the HTML type
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def internal_error(error: Exception):
        log.exception("unhandled error method=%s path=%s", request.method, request.path)
        return _error(500, "internal server error; the reason is in the server's log")

    return app


def _json_object() -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadRequest(f"unreadable JSON: {e}") from None
    except RecursionError:
        raise BadRequest(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _nested_deeper_than(body, MAX_JSON_DEPTH):
        # Label Studio's deepest (an annotation's region values) is under 10 levels; a deeper
        # body would only make writing it back out (label store, logs) recurse past the limit.
        raise BadRequest(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def _project_id(value: object) -> int:
    """A Label Studio project id from a request body: a positive integer (or its digits)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        digits = value.strip().lstrip("0") or "0"
        value = int(digits) if len(digits) <= 19 else value  # longer: past 64 bits, refused
    if value is None:
        raise BadRequest("'project' is required: the Label Studio project id (a positive integer)")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise BadRequest(f"'project' must be a Label Studio project id (a positive integer), "
                         f"got {_json_type(value)} {json.dumps(value)[:40]}")  # fmt: skip
    return value


def _nested_deeper_than(value: object, limit: int) -> bool:
    """Whether objects and lists in `value` nest more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _project_or_none(value: object) -> int | None:
    """The project id in what Label Studio sends (3, "3", "3.1746612998"), or None when it
    names no project this backend could store (not an id, or past 64 bits)."""
    try:
        project = project_of(value)
    except ValueError:  # digits past Python's int conversion limit
        return None
    return project if project is not None and project <= MAX_ID else None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message, "status": status})
    response.status_code = status
    return response


def _warn_about(settings: Settings) -> None:
    """Log what the settings mean for operators (never a secret: no key, user or password)."""
    root = settings.local_files_document_root
    if root is not None and not Path(root).is_dir():
        log.warning("LOCAL_FILES_DOCUMENT_ROOT=%s is not a directory", root)
    if settings.label_studio_url and not settings.label_studio_api_key:
        log.warning("LABEL_STUDIO_URL is set but LABEL_STUDIO_API_KEY is not: downloads will 401")
    if settings.label_studio_api_key:
        log.info("LABEL_STUDIO_API_KEY is a %s", key_kind(settings.label_studio_api_key))
    log.info("basic auth %s", "required" if settings.basic_auth else "off")
    if settings.workers > 1 and settings.prometheus_multiproc_dir is None:
        log.warning(
            "WORKERS=%d without PROMETHEUS_MULTIPROC_DIR: /metrics shows only the answering "
            "worker's counts",
            settings.workers,
        )


# ---------------------------------------------------------------------------------------------
# Serving


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(host: str, port: int) -> str:
    return f"http://{_bind(host, port)}"


def announced_version(settings: Settings) -> str:
    """The version the workers will serve, read from the model store without loading it: the
    gunicorn master must never import TensorFlow or load a regressor, or the workers it forks
    inherit TensorFlow's thread pools broken and hang on their first prediction."""
    from backend.model_store import ModelStore

    for root in serving_roots(settings.model_dir, None):
        try:
            version = ModelStore(root).serving()
        except Exception:  # noqa: BLE001 - only a log line depends on it
            continue
        if version is not None:
            return version.name
    return model_version(settings.coarse_variant)


def gunicorn_options(settings: Settings) -> dict:
    """Gunicorn settings for `settings`: threaded workers, model preloaded in the master."""
    url = _url(settings.host, settings.port)
    everywhere = " (all interfaces)" if settings.host in ("0.0.0.0", "::") else ""

    def when_ready(server) -> None:
        log.info(
            "ready: serving %s on %s%s workers=%d threads=%d model_version=%s",
            MODEL_CLASS,
            url,
            everywhere,
            settings.workers,
            settings.threads,
            announced_version(settings),
        )

    def post_worker_init(worker) -> None:
        # Training left pending before a restart resumes without waiting for a request.
        scheduler = getattr(worker.wsgi, "extensions", {}).get("pupil_scheduler")
        if scheduler is not None:
            scheduler.ensure_started()

    options = {
        "post_worker_init": post_worker_init,
        "bind": _bind(settings.host, settings.port),
        "workers": settings.workers,
        "threads": settings.threads,
        "worker_class": "gthread",
        "timeout": GUNICORN_TIMEOUT_S,
        "preload_app": True,
        "accesslog": None,  # our own access line has the timing
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "pupil-backend",
        "when_ready": when_ready,
        # gunicorn >= 27 opens a control socket at a fixed per-user path; two servers on one
        # machine would fight over it, and nothing here uses it.
        "control_socket_disable": True,
    }
    multiproc_dir = settings.prometheus_multiproc_dir
    if multiproc_dir is not None:

        def child_exit(server, worker) -> None:
            worker_exited(multiproc_dir, worker.pid)

        options["child_exit"] = child_exit
    return options


def serve(app: Flask, options: dict) -> None:
    """Run `app` under gunicorn's arbiter with `options` (blocks until shut down)."""
    from gunicorn.app.base import BaseApplication

    class _Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                if key in self.cfg.settings and value is not None:
                    self.cfg.set(key.lower(), value)

        def load(self) -> Flask:
            return app

    _Server().run()


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process and the workers it forks, unless
    MALLOC_ARENA_MAX is set. glibc gives each thread its own arena and keeps every arena's
    high-water mark: with 4 threads decoding 12-megapixel photos at once, the server's memory
    climbed 606 -> 722 MB over a 10-minute soak (12 MB/min); with 2 arenas it stayed flat, at
    the same throughput (docs/reliability.md). False where there is no glibc (musl, macOS)."""
    if "MALLOC_ARENA_MAX" in os.environ:  # glibc read it at start-up
        return False
    try:
        return ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):
        return False


def main() -> None:
    """`python -m backend.server`: settings from the environment, detector built, then serve."""
    try:
        settings = Settings.from_env()
    except ValueError as e:
        sys.exit(f"error: {e}")
    configure_logging(settings.log_level)
    limit_malloc_arenas()
    started = time.perf_counter()
    try:
        if settings.prometheus_multiproc_dir is not None:
            reset_multiproc_dir(settings.prometheus_multiproc_dir)
        app = create_app(settings, warm=True)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    log.info(
        "starting %s on %s (model ready in %.1f s)",
        MODEL_CLASS,
        _url(settings.host, settings.port),
        time.perf_counter() - started,
    )
    serve(app, gunicorn_options(settings))


if __name__ == "__main__":
    main()
