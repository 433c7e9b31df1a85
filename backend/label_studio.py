"""A small client for the Label Studio 1.23 REST API, for the backend's background jobs.

Training reconciliation reads every task of a project with its annotations, and the
prediction pusher writes predictions and sets the project's model version. Both run outside
any request Label Studio is waiting on, so they can afford retries but must fail with a
message that says what went wrong (which call, which status, Label Studio's reason).

Why not label-studio-sdk: its generated client changes shape between releases, its paging
and error types are its own, and it authenticates through httpx with its own token refresh.
Five calls over `requests` with the backend's `LabelStudioAuth` (the same header, the same
refresh-on-401 as image downloads) are easier to test and to trust.

Behaviour:

- One `requests.Session` (connection reuse). The Authorization header comes from
  `LabelStudioAuth` for every request; after a 401 the client asks `auth.unauthorized()` and
  retries once with a fresh header when that may help (personal access tokens).
- GETs are retried by urllib3 (`Retry` on the session's adapter) after connection errors,
  read errors and 502/503/504, with exponential backoff. Other methods are retried only when
  the connection could not be made (the request never reached Label Studio), never after a
  status: importing predictions twice would duplicate them.
- Every failure -- connection error, timeout, non-2xx, a body that is not JSON -- is a
  `LabelStudioError` naming the method, the URL, the status and the first 200 characters of
  Label Studio's answer. The API key and the Authorization header are never logged.

Label Studio facts this relies on (1.23.2, checked by tests/e2e/test_label_studio_client_e2e.py):

- `GET /api/tasks?project=P&fields=all&page=N&page_size=S` answers
  `{"tasks": [...], "total": T, "total_annotations": ..., "total_predictions": ...}`; with
  `fields=all` each task carries its `annotations` and `predictions` lists. With
  `query={"selectedItems": {"all": false, "included": [ids]}}` only those tasks are listed
  (and counted in `total`). A page past the
  end answers 404 (Django REST framework's "Invalid page"), a missing project too, so 404 ends
  the paging only after page 1. An answer that is a bare list (no total) is accepted too.
- `POST /api/projects/P/import/predictions` answers 201 `{"created": n}` and silently drops
  items whose result does not fit the label config, so `created` may be less than what was
  sent; a task id not in the project fails the whole request (400, nothing created).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.util.retry import Retry

from backend.ls_auth import LabelStudioAuth, LabelStudioAuthError, first_line

if TYPE_CHECKING:
    from backend.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "pupil-backend"
SHOWN_BODY_CHARS = 200  # of Label Studio's answer, in error messages
RETRY_STATUSES = (502, 503, 504)  # a proxy or a restarting Label Studio


def default_retry() -> Retry:
    """urllib3's retry policy for the session: GETs after connection/read errors and 502-504
    (backoff 0, 1, 2 s); any method only when the connection could not be made."""
    return Retry(
        total=3,
        connect=3,
        read=3,
        status=3,
        other=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=0.5,
        backoff_max=10.0,
        # A Retry-After from a proxy could ask for an hour; the backoff above is enough.
        respect_retry_after_header=False,
        raise_on_status=False,  # give back the last 5xx: it becomes a LabelStudioError
    )


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed; the message names the call, the status and LS's reason.

    `status` is the HTTP status, or None when no answer came (connection error, timeout).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Header(AuthBase):
    """Sets one Authorization value. Passed as `auth=`, so requests does not replace it with
    credentials from ~/.netrc, and drops it on a redirect to another host."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self.value
        return request


class LabelStudioClient:
    """The Label Studio API calls the background jobs make (see the module docstring).

    `timeout` is (connect, read) seconds per attempt. `retry` replaces `default_retry()`
    (tests use one without backoff). requests does not promise that a Session is thread-safe:
    give each thread that calls Label Studio its own client (they may share one auth).
    """

    def __init__(
        self,
        base_url: str,
        auth: LabelStudioAuth,
        *,
        timeout: tuple[float, float] = (5.0, 60.0),
        retry: Retry | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(max_retries=retry if retry is not None else default_retry())
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelStudioClient | None:
        """A client for LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY; None when either is unset."""
        if not settings.label_studio_url or not settings.label_studio_api_key:
            return None
        auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)
        return cls(settings.label_studio_url, auth)

    def close(self) -> None:
        """Close the session's pooled connections."""
        self.session.close()

    # -- the API

    def project(self, project_id: int) -> dict:
        """The project (GET /api/projects/{id}): title, label_config, model_version, counters."""
        return self._json("GET", f"/api/projects/{int(project_id)}")

    def tasks(
        self, project_id: int, *, page_size: int = 100, ids: Sequence[int] | None = None
    ) -> Iterator[dict]:
        """Every task of the project, page by page, each with its `annotations` and
        `predictions` lists (GET /api/tasks?fields=all). Lazy: a page is fetched when the
        previous one is used up. Pages are in task id order by offset, so a task deleted
        while paging may make one later task be skipped. `ids`: only those tasks (the Data
        Manager's `query={"selectedItems": {"all": false, "included": [...]}}`); ids not in
        the project are left out.

        Beware: when the project has "retrieve predictions automatically"
        (`evaluate_predictions_automatically`) and a model connected, Label Studio asks the
        model's /predict for each task of a page that has no prediction before answering."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if ids is not None and not ids:
            return
        page = 1
        seen = 0
        while True:
            params = {
                "project": int(project_id),
                "fields": "all",
                "page": page,
                "page_size": page_size,
            }
            if ids is not None:
                selected = {"all": False, "included": [int(i) for i in ids]}
                params["query"] = json.dumps({"selectedItems": selected})
            try:
                body = self._json("GET", "/api/tasks", params=params)
            except LabelStudioError as e:
                if e.status == 404 and page > 1:  # "Invalid page": the previous one was the last
                    return
                raise
            if isinstance(body, dict):
                batch, total = body.get("tasks"), body.get("total")
            else:
                batch, total = body, None
            if not isinstance(batch, list):
                raise LabelStudioError(
                    f"GET {self.base_url}/api/tasks (project {project_id}, page {page}): "
                    f"the answer has no task list: {_shown(body)}"
                )
            yield from batch
            seen += len(batch)
            log.debug("label studio tasks project=%s page=%d got=%d", project_id, page, len(batch))
            if not batch or (isinstance(total, int) and seen >= total):
                return
            if total is None and len(batch) < page_size:
                return
            page += 1

    def prediction(self, prediction_id: int) -> dict:
        """One prediction (GET /api/predictions/{id}): task, result, score, model_version."""
        return self._json("GET", f"/api/predictions/{int(prediction_id)}")

    def import_predictions(
        self, project_id: int, predictions: Sequence[dict], *, batch_size: int = 100
    ) -> int:
        """Create predictions (POST /api/projects/{id}/import/predictions), `batch_size` per
        request; each item is {"task", "result", "score", "model_version"}. Returns how many
        Label Studio says it created: it drops invalid items silently, so compare with
        len(predictions). A failing batch raises LabelStudioError naming its task ids; the
        batches before it stay created."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        path = f"/api/projects/{int(project_id)}/import/predictions"
        batches = [predictions[i : i + batch_size] for i in range(0, len(predictions), batch_size)]
        created = 0
        for number, batch in enumerate(batches, 1):
            try:
                body = self._json("POST", path, json=list(batch))
            except LabelStudioError as e:
                raise LabelStudioError(
                    f"importing predictions into project {project_id}: batch {number}/"
                    f"{len(batches)} ({len(batch)} predictions, tasks {_task_range(batch)}) "
                    f"failed, {created} created before it: {e}",
                    e.status,
                ) from e
            count = body.get("created") if isinstance(body, dict) else None
            if not isinstance(count, int):
                raise LabelStudioError(
                    f"POST {self.base_url}{path}: batch {number}/{len(batches)} (tasks "
                    f"{_task_range(batch)}): no 'created' count in the answer: {_shown(body)}"
                )
            if count < len(batch):
                log.warning(
                    "label studio dropped predictions project=%s batch=%d/%d tasks=%s "
                    "sent=%d created=%d",
                    project_id,
                    number,
                    len(batches),
                    _task_range(batch),
                    len(batch),
                    count,
                )
            created += count
        log.info(
            "label studio predictions imported project=%s sent=%d created=%d batches=%d",
            project_id,
            len(predictions),
            created,
            len(batches),
        )
        return created

    def model_versions(self, project_id: int) -> dict[str, int]:
        """Predictions per model version in the project (GET /api/projects/{id}/model-versions)."""
        body = self._json("GET", f"/api/projects/{int(project_id)}/model-versions")
        return {str(k): int(v) for k, v in body.items()} if isinstance(body, dict) else {}

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Make `model_version` the project's (PATCH /api/projects/{id}): the version whose
        predictions fill the Prediction score column and prelabel tasks. Label Studio answers
        400 for a version that has no predictions in the project."""
        self._json(
            "PATCH", f"/api/projects/{int(project_id)}", json={"model_version": model_version}
        )
        log.info("label studio model version set project=%s version=%s", project_id, model_version)

    # -- internals

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its JSON body; LabelStudioError for any failure."""
        response = self._send(method, path, **kwargs)
        call = f"{method} {response.url}"
        if not 200 <= response.status_code < 300:
            raise LabelStudioError(
                f"{call} -> HTTP {response.status_code}: {_shown(response.text)}",
                response.status_code,
            )
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(
                f"{call} -> HTTP {response.status_code} but the answer is not JSON: "
                f"{_shown(response.text)}",
                response.status_code,
            ) from None

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The response to `method path` (any status), retried once after a 401 when the
        auth says a fresh header may help. Connection errors become LabelStudioError."""
        url = self.base_url + path
        for attempt in (1, 2):
            try:
                header = self.auth.header()
            except LabelStudioAuthError as e:
                raise LabelStudioError(f"{method} {url}: no usable API key: {e}") from None
            started = time.monotonic()
            try:
                response = self.session.request(
                    method, url, auth=_Header(header), timeout=self.timeout, **kwargs
                )
            except requests.RequestException as e:
                raise LabelStudioError(
                    f"{method} {url}: no answer from Label Studio ({type(e).__name__}: "
                    f"{first_line(e)})"
                ) from None
            log.debug(
                "label studio %s %s -> %d in %.2f s",
                method,
                path,
                response.status_code,
                time.monotonic() - started,
            )
            if response.status_code == 401 and attempt == 1 and self.auth.unauthorized(header):
                log.info(
                    "label studio answered 401 to %s %s; retrying with a fresh token", method, path
                )
                response.close()
                continue
            return response
        raise AssertionError("unreachable")  # the loop returns or raises


def _task_range(batch: Sequence[dict]) -> str:
    """'12..57' (or '12'): the smallest and largest task id in a batch of predictions."""
    ids = [p.get("task") for p in batch if isinstance(p, dict)]
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    if not ids:
        return "(no task ids)"
    low, high = min(ids), max(ids)
    return str(low) if low == high else f"{low}..{high}"


def _shown(body: object) -> str:
    """The first SHOWN_BODY_CHARS characters of an answer, on one line."""
    text = body if isinstance(body, str) else repr(body)
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    return text if len(text) <= SHOWN_BODY_CHARS else text[:SHOWN_BODY_CHARS] + "..."
