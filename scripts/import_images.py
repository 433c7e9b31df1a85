#!/usr/bin/env python
"""Import face photos into a Label Studio project connected to this backend, pre-annotated.

    python scripts/import_images.py --url http://localhost:8080 --api-key "$TOKEN" \\
        --project "Pupils" --images photos/ \\
        --backend-url http://localhost:9090 --preannotate

Every step is safe to repeat, so an interrupted import is simply run again:

1. Project: the one titled exactly --project, else a new one with label_config/pupils.xml
   (--label-config for another).
2. Backend (--backend-url): connected as the project's model unless it already is, with HTTP
   basic auth when --backend-user/--backend-password (or BASIC_AUTH_USER/BASIC_AUTH_PASS) are
   given; the webhook Label Studio creates for the model gets the same credentials
   (`Authorization: Basic ...`), so annotation events reach the training loop.
3. Images: a folder (recursive; .jpg .jpeg .png .webp .bmp .gif in any case), a glob, or a text
   file of image URLs (one per line; blank lines and # comments ignored). Each file is checked
   (backend.images.load_image) and hashed (sha256 of its bytes; of the URL string for a URL);
   one whose hash a task of the project already carries (`data.sha256`) is skipped. New ones
   become tasks {"image": "/data/upload/...", "sha256": ..., "source": <path or URL>}.
4. Pre-annotation (--preannotate): the backend's predict job (POST /jobs/predict) predicts every
   task without a prediction of the serving model version and imports the predictions into
   Label Studio in chunks that every job worker takes part in -- no 100 s limit, unlike the
   Data Manager's "Retrieve Predictions". The script waits until every task has one and the
   project's model version is set (--timeout), watching the job too (GET /jobs/<id>): a failed
   job ends the wait at once with its error; parts the backend retries (Label Studio away for
   a while) are said once and waited for.

How files are uploaded (Label Studio 1.23.2): a task made by uploading a file holds only the
file's URL, so files are uploaded without making tasks (`POST /api/projects/<id>/import?
commit_to_project=false`, multipart), their stored names read back (`GET /api/projects/<id>/
file-uploads?ids=[...]`) and the tasks created from JSON with the hash (`POST
/api/projects/<id>/import`). A run interrupted between the two leaves files without a task: the
next run uploads them again (and the orphans are deleted when task creation fails).

The Label Studio SDK makes the project, model, webhook and task-listing calls (it also refreshes
a personal access token); backend.label_studio's client makes the upload calls the SDK lacks.

Exit status: 0 when done (files that failed are listed in the summary); 1 when no image could be
imported, Label Studio or the backend cannot be reached or refuses the credentials, or
pre-annotation failed or timed out; 2 for bad arguments, a missing images path included.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

REPO = Path(__file__).resolve().parent.parent
try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/import_images.py` from a checkout
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402 - the SDK's HTTP library; its errors are translated below
from label_studio_sdk import LabelStudio  # noqa: E402
from label_studio_sdk.core.api_error import ApiError  # noqa: E402

from backend.images import ImageError, load_image  # noqa: E402
from backend.label_studio import LabelStudioClient, LabelStudioError  # noqa: E402
from backend.ls_auth import (  # noqa: E402
    LabelStudioAuth,
    LabelStudioAuthError,
    first_line,
    key_kind,
)
from backend.model import ConfigError, parse_label_config  # noqa: E402

log = logging.getLogger("import_images")

DEFAULT_LABEL_CONFIG = REPO / "label_config" / "pupils.xml"
# What Label Studio 1.23 accepts as uploaded images (settings.SUPPORTED_EXTENSIONS) and
# browsers display; a batch holding any other extension is refused whole.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
URL_SCHEMES = frozenset({"http", "https", "s3", "gs", "azure-blob"})
GLOB_CHARS = frozenset("*?[")
BATCH_FILES = 20  # files per upload request (Label Studio takes at most 100)
BATCH_BYTES = 64 * 1024 * 1024  # bytes per upload request (Label Studio takes at most 250 MB)
MODEL_TITLE = "pupil-backend"
POLL_S = (0.5, 5.0)  # first and longest wait between looks at the predictions
SHOWN_CHARS = 200  # of an error body, in messages

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Fatal(Exception):
    """Stops the run with a one-line message (no traceback) and an exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class SourceError(ValueError):
    """One image that cannot be imported; the message says why (the run goes on)."""


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Options:
    url: str
    api_key: str = field(repr=False)
    project: str
    images: str
    backend_url: str | None = None
    ls_backend_url: str | None = None  # the backend as Label Studio reaches it
    backend_user: str | None = field(default=None, repr=False)
    backend_password: str | None = field(default=None, repr=False)
    preannotate: bool = False
    label_config: Path = DEFAULT_LABEL_CONFIG
    batch_size: int = BATCH_FILES
    timeout_s: float = 600.0
    progress: bool | None = None  # None: a bar when stderr is a terminal

    @property
    def backend_auth(self) -> tuple[str, str] | None:
        if self.backend_user is None or self.backend_password is None:
            return None
        return self.backend_user, self.backend_password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Import images into a Label Studio project connected to the pupil backend "
        "and optionally pre-annotate them.",
        epilog="URL, key and basic auth also come from LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
        "BASIC_AUTH_USER and BASIC_AUTH_PASS.",
    )
    add = parser.add_argument
    add("--url", help="Label Studio's base URL (env LABEL_STUDIO_URL)")
    add("--api-key", help="legacy token or personal access token (env LABEL_STUDIO_API_KEY)")
    add("--project", required=True, help="project title: found by exact title, else created")
    add("--images", required=True, help="a folder (recursive), a glob, or a .txt file of URLs")
    add("--backend-url", help="this backend's URL, to connect it as the project's model")
    add("--ls-backend-url", help="the backend's URL as Label Studio reaches it, if different "
        "(docker compose: http://backend:9090); default --backend-url")  # fmt: skip
    add("--backend-user", help="backend basic-auth user (env BASIC_AUTH_USER)")
    add("--backend-password", help="backend basic-auth password (env BASIC_AUTH_PASS)")
    add("--preannotate", action="store_true", help="have the backend predict every task")
    add("--label-config", type=Path, default=DEFAULT_LABEL_CONFIG,
        help="label config for a new project (default label_config/pupils.xml)")  # fmt: skip
    add("--batch-size", type=int, default=BATCH_FILES, help="files per upload request (1-100)")
    add("--timeout", type=float, default=600.0, help="seconds to wait for pre-annotation")
    add("--no-progress", action="store_true", help="no progress bars")
    add("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_options(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Options:
    """Options from the command line, falling back to the environment; Fatal(EXIT_USAGE) when
    something needed is missing or unusable (checked before any network call)."""
    args = build_parser().parse_args(argv)

    def pick(value: str | None, name: str) -> str | None:
        chosen = value if value is not None else environ.get(name)
        return chosen if chosen and chosen.strip() else None

    url = pick(args.url, "LABEL_STUDIO_URL")
    api_key = pick(args.api_key, "LABEL_STUDIO_API_KEY")
    user = pick(args.backend_user, "BASIC_AUTH_USER")
    password = pick(args.backend_password, "BASIC_AUTH_PASS")
    if url is None:
        raise Fatal("Label Studio's URL is needed: --url or LABEL_STUDIO_URL", EXIT_USAGE)
    if api_key is None:
        raise Fatal("an API key is needed: --api-key or LABEL_STUDIO_API_KEY", EXIT_USAGE)
    for name, value in (("--url", url), ("--backend-url", args.backend_url),
                        ("--ls-backend-url", args.ls_backend_url)):  # fmt: skip
        if value is not None:
            check_http_url(name, value)
    if (user is None) != (password is None):
        raise Fatal("backend basic auth needs both a user and a password "
                    "(--backend-user/--backend-password or BASIC_AUTH_USER/BASIC_AUTH_PASS)",
                    EXIT_USAGE)  # fmt: skip
    if args.preannotate and not args.backend_url:
        raise Fatal("--preannotate needs --backend-url (the backend computes the predictions)",
                    EXIT_USAGE)  # fmt: skip
    if args.ls_backend_url and not args.backend_url:
        raise Fatal("--ls-backend-url needs --backend-url", EXIT_USAGE)
    if not 1 <= args.batch_size <= 100:
        raise Fatal(f"--batch-size must be 1 to 100, got {args.batch_size}", EXIT_USAGE)
    if args.timeout <= 0:
        raise Fatal(f"--timeout must be positive, got {args.timeout:g}", EXIT_USAGE)
    if not args.project.strip():
        raise Fatal("--project must not be empty", EXIT_USAGE)
    return Options(
        url=url.strip().rstrip("/"), api_key=api_key.strip(), project=args.project.strip(),
        images=args.images, backend_url=_trimmed(args.backend_url),
        ls_backend_url=_trimmed(args.ls_backend_url), backend_user=user,
        backend_password=password, preannotate=args.preannotate, label_config=args.label_config,
        batch_size=args.batch_size, timeout_s=args.timeout,
        progress=False if args.no_progress else None,
    )  # fmt: skip


def check_http_url(name: str, value: str) -> None:
    """Fatal(EXIT_USAGE) unless `value` is an absolute http(s) URL."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Fatal(f"{name} must be an http(s) URL such as http://localhost:8080, got {value!r}",
                    EXIT_USAGE)  # fmt: skip


def _trimmed(url: str | None) -> str | None:
    return url.strip().rstrip("/") if url else None


# ---------------------------------------------------------------------------------------------
# Finding the images


@dataclass(frozen=True)
class Source:
    """One image to import: a local file or a URL."""

    ref: str  # the file's path, or the URL
    name: str  # shown in the summary and kept in the task's data["source"]
    is_url: bool = False


def discover(spec: str) -> list[Source]:
    """The images `spec` names: a folder (recursive, by extension), a text file of URLs, one
    image file, or a glob. Fatal(EXIT_USAGE) when it names nothing that exists."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_images(path)
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return url_list(path)
        return [Source(str(path), path.name)]
    if GLOB_CHARS & set(spec):
        return glob_images(spec)
    raise Fatal(f"images path not found: {spec!r} (give a folder, a glob or a .txt file of URLs)",
                EXIT_USAGE)  # fmt: skip


def folder_images(root: Path) -> list[Source]:
    """Every image file under `root` (any depth; extension case ignored), in path order."""
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return [Source(str(p), p.relative_to(root).as_posix()) for p in sorted(found)]


def glob_images(pattern: str) -> list[Source]:
    """The files a glob matches (`**` included), in path order; any extension, so that a file
    Label Studio would refuse is reported rather than silently left out."""
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    return [Source(str(p), str(p)) for p in matches if p.is_file()]


def url_list(path: Path) -> list[Source]:
    """One URL per line; blank lines and lines starting with # are ignored."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Fatal(f"cannot read the URL list {str(path)!r}: {e}", EXIT_USAGE) from None
    urls = [line.strip() for line in lines]
    return [Source(u, u, is_url=True) for u in urls if u and not u.startswith("#")]


# ---------------------------------------------------------------------------------------------
# Checking and hashing


@dataclass(frozen=True)
class Prepared:
    """An image ready to import: its hash and, for a file, its bytes."""

    source: Source
    sha256: str
    data: bytes | None = field(default=None, repr=False)  # None for a URL


def prepare(source: Source) -> Prepared:
    """Hash `source` and check it can be imported; SourceError says why not."""
    if source.is_url:
        scheme = urlsplit(source.ref).scheme.lower()
        if scheme not in URL_SCHEMES:
            raise SourceError(f"not an image URL (expected {', '.join(sorted(URL_SCHEMES))})")
        return Prepared(source, url_sha256(source.ref))
    suffix = Path(source.ref).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise SourceError(f"Label Studio does not take {suffix or 'extension-less'} uploads "
                          f"(use {', '.join(sorted(IMAGE_EXTENSIONS))})")  # fmt: skip
    try:
        data = Path(source.ref).read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror or e}") from None
    try:
        load_image(data)  # the backend's own decoder: what it cannot read, it cannot predict
    except ImageError as e:
        raise SourceError(f"not a usable image: {e}") from None
    return Prepared(source, bytes_sha256(data), data)


def bytes_sha256(data: bytes) -> str:
    """The file's identity: the same photo under two names is imported once."""
    return hashlib.sha256(data).hexdigest()


def url_sha256(url: str) -> str:
    """A URL's identity is its text: downloading every URL to hash it would cost more than the
    import, and Label Studio stores the URL, not the bytes."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The summary


@dataclass
class Summary:
    """What happened to each image, for the report and the exit status."""

    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the project (or the run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    task_ids: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.imported) + len(self.skipped) + len(self.failed)

    def exit_code(self) -> int:
        """Failure only when there were images and none is in the project now."""
        nothing = self.total > 0 and not self.imported and not self.skipped
        return EXIT_FAILED if nothing else EXIT_OK

    def render(self) -> str:
        lines = [
            f"imported: {len(self.imported)}",
            f"skipped (already in the project): {len(self.skipped)}",
            f"failed: {len(self.failed)}",
        ]
        lines += [f"  {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Label Studio


class UploadClient(LabelStudioClient):
    """backend.label_studio's client (requests, the backend's token handling, one-line errors)
    plus the upload calls label-studio-sdk has no method for."""

    def upload_files(self, project: int, files: Sequence[tuple[str, bytes]]) -> list[int]:
        """Store files in the project without making tasks; their FileUpload ids, in order."""
        form = {f"file{i}": (name, data) for i, (name, data) in enumerate(files)}
        body = self._json("POST", f"/api/projects/{int(project)}/import",
                          params={"commit_to_project": "false"}, files=form)  # fmt: skip
        ids = body.get("file_upload_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) != len(files):
            raise LabelStudioError(f"upload of {len(files)} files: unexpected answer {body!r:.200}")
        return ids

    def uploaded_urls(self, project: int, ids: Sequence[int]) -> dict[int, str]:
        """The /data/... URL under which each uploaded file is served."""
        body = self._json("GET", f"/api/projects/{int(project)}/file-uploads",
                          params={"ids": json.dumps(list(ids))})  # fmt: skip
        found = {u["id"]: u["file"] for u in body if isinstance(u, dict) and "file" in u}
        missing = [i for i in ids if i not in found]
        if missing:
            raise LabelStudioError(f"uploaded files {missing} are not listed by Label Studio")
        return {i: "/data/" + found[i].lstrip("/") for i in ids}

    def delete_uploads(self, project: int, ids: Sequence[int]) -> None:
        """Remove uploaded files that got no task (best effort)."""
        self._json("DELETE", f"/api/projects/{int(project)}/file-uploads",
                   json={"file_upload_ids": list(ids)})  # fmt: skip

    def create_tasks(self, project: int, tasks: Sequence[dict]) -> list[int]:
        """Create tasks from JSON; their ids."""
        body = self._json("POST", f"/api/projects/{int(project)}/import",
                          params={"return_task_ids": "true"}, json=list(tasks))  # fmt: skip
        ids = body.get("task_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) != len(tasks):
            raise LabelStudioError(f"creating {len(tasks)} tasks: unexpected answer {body!r:.200}")
        return ids


@dataclass
class Studio:
    """A connected Label Studio: the SDK client and the upload client, same URL and key."""

    url: str
    sdk: LabelStudio
    uploads: UploadClient


def connect(url: str, api_key: str) -> Studio:
    """Both clients, after one authenticated call that proves URL and key work."""
    with ls_errors(url, "connecting"):
        sdk = LabelStudio(base_url=url, api_key=api_key, timeout=60)  # an expired PAT fails here
        me = sdk.users.whoami()
    if not getattr(me, "id", None):
        raise Fatal(f"{url} does not look like Label Studio: /api/current-user/whoami "
                    "answered without a user")  # fmt: skip
    uploads = UploadClient(url, LabelStudioAuth(url, api_key), timeout=(10.0, 300.0))
    log.info(
        "connected to Label Studio at %s as %s (%s)", url, me.email or me.id, key_kind(api_key)
    )
    return Studio(url, sdk, uploads)


@contextmanager
def ls_errors(url: str, doing: str) -> Iterator[None]:
    """Turns SDK, httpx and backend-client errors into a one-line Fatal naming `doing`."""
    try:
        yield
    except Fatal:
        raise
    except Exception as e:
        message = explain(e, url)
        if message is None:
            raise
        raise Fatal(f"{doing}: {message}") from None


def explain(error: BaseException, url: str) -> str | None:
    """A one-line reason for a Label Studio error; None for errors that are bugs."""
    if isinstance(error, httpx.ConnectError):
        return f"cannot connect to Label Studio at {url} ({first_line(error)})"
    if isinstance(error, httpx.TimeoutException):
        return f"Label Studio at {url} did not answer in time ({type(error).__name__})"
    if isinstance(error, httpx.HTTPError):
        return f"talking to Label Studio at {url} failed ({type(error).__name__}: {error})"
    if isinstance(error, (LabelStudioError, LabelStudioAuthError)):
        return _label_studio_error(error, url)
    if isinstance(error, ApiError):
        return _api_error(error, url)
    return None


def _api_error(error: ApiError, url: str) -> str:
    status, body = error.status_code, error.body
    headers = {k.lower(): v for k, v in (error.headers or {}).items()}
    if status in (401, 403):
        if "basic" in headers.get("www-authenticate", "").lower():
            return f"{url} asks for HTTP basic auth: it is not Label Studio (the backend?)"
        return (f"Label Studio at {url} refused the API key (HTTP {status}: {_shown(body)}); "
                "check --api-key/LABEL_STUDIO_API_KEY (a legacy token also needs legacy tokens "
                "enabled under Organization -> Settings -> Access Token Settings)")  # fmt: skip
    json_api = isinstance(body, (dict, list))
    if status is not None and (200 <= status < 300 or status == 404) and not json_api:
        return f"{url} does not look like Label Studio (HTTP {status}: {_shown(body)})"
    return f"Label Studio answered HTTP {status}: {_shown(body)}"


def _label_studio_error(error: Exception, url: str) -> str:
    status = getattr(error, "status", None)
    if status in (401, 403):
        return f"Label Studio at {url} refused the API key: {first_line(error)}"
    return first_line(error)


def _shown(body: object) -> str:
    """An answer on one short line: Label Studio's `detail` when it has one."""
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        body = body["detail"]
    if isinstance(body, str) and body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        return "an HTML page"
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


# -- the project


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    data_key: str  # the task data field the <Image> reads ("image")
    created: bool


def ensure_project(studio: Studio, title: str, label_config_path: Path) -> Project:
    """The project titled exactly `title`, else a new one with the label config."""
    with ls_errors(studio.url, f"finding project {title!r}"):
        matches = [p for p in studio.sdk.projects.list(title=title, page_size=100)
                   if p.title == title]  # fmt: skip
    if len(matches) > 1:
        ids = ", ".join(str(p.id) for p in matches)
        raise Fatal(f"{len(matches)} projects are titled {title!r} (ids {ids}): rename all "
                    "but one, or give another title")  # fmt: skip
    if matches:
        with ls_errors(studio.url, f"reading project {title!r}"):
            config = studio.sdk.projects.get(id=matches[0].id).label_config
        return Project(matches[0].id, title, _data_key(config, f"project {title!r}"), False)
    config = read_label_config(label_config_path)
    data_key = _data_key(config, str(label_config_path))
    with ls_errors(studio.url, f"creating project {title!r}"):
        created = studio.sdk.projects.create(title=title, label_config=config)
    log.info("project %r created (id %s) with %s", title, created.id, label_config_path.name)
    return Project(created.id, title, data_key, True)


def read_label_config(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise Fatal(f"cannot read the label config {str(path)!r}: {e.strerror or e}",
                    EXIT_USAGE) from None  # fmt: skip


def _data_key(label_config: str | None, what: str) -> str:
    """The task data field for images, once the config is known to suit the backend."""
    try:
        return parse_label_config(label_config or "").data_key
    except ConfigError as e:
        raise Fatal(f"{what}: the label config does not suit the pupil backend: {e}") from None


# -- the backend as the project's model


@dataclass(frozen=True)
class Backend:
    url: str  # as this script reaches it
    ls_url: str  # as Label Studio reaches it
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def authorization(self) -> str | None:
        """The Authorization header Label Studio's webhook must send."""
        if self.auth is None:
            return None
        return "Basic " + base64.b64encode(":".join(self.auth).encode("utf-8")).decode("ascii")


def check_backend(backend: Backend) -> None:
    """/health with the credentials: a clear error before Label Studio gives a vaguer one."""
    try:
        r = requests.get(f"{backend.url}/health", auth=backend.auth, timeout=(5, 30))
    except requests.RequestException as e:
        raise Fatal(f"cannot connect to the backend at {backend.url} ({first_line(e)})") from None
    if r.status_code == 401:
        given = "refused the basic-auth credentials" if backend.auth else "asks for basic auth"
        raise Fatal(f"the backend at {backend.url} {given} (HTTP 401): pass "
                    "--backend-user/--backend-password (or BASIC_AUTH_USER/BASIC_AUTH_PASS) as "
                    "the backend has them")  # fmt: skip
    if r.status_code != 200 or _json_or_none(r).get("status") != "UP":
        raise Fatal(f"{backend.url}/health answered HTTP {r.status_code}: {_shown(r.text)} "
                    "(is it the pupil backend?)")  # fmt: skip


def ensure_model(studio: Studio, project: Project, backend: Backend) -> str:
    """Connect the backend as the project's model unless it is; 'connected', 'updated' or
    'created'. An existing connection is updated when its auth differs or Label Studio cannot
    reach the backend with it (listing makes Label Studio check each model's /health)."""
    with ls_errors(studio.url, "listing the project's models"):
        models = studio.sdk.ml.list(project=project.id)
    same = [m for m in models if (m.url or "").rstrip("/") == backend.ls_url]
    auth: dict[str, Any] = {"auth_method": "NONE"}
    if backend.auth is not None:
        user, password = backend.auth
        auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password}
    doing = f"connecting the backend {backend.ls_url} as the project's model"
    with ls_errors(studio.url, doing):
        if not same:
            studio.sdk.ml.create(project=project.id, url=backend.ls_url, title=MODEL_TITLE, **auth)
            return "created"
        if _model_matches(same[0], backend):
            return "connected"
        studio.sdk.ml.update(id=same[0].id, url=backend.ls_url, **auth)
        return "updated"


def _model_matches(model: Any, backend: Backend) -> bool:
    """Whether a connected model already has the backend's auth and Label Studio reaches it."""
    if getattr(model, "state", None) not in ("CO", "TR", "PR"):  # connected, training, predicting
        return False
    if backend.auth is None:
        return model.auth_method in (None, "NONE")
    return (model.auth_method == "BASIC_AUTH" and model.basic_auth_user == backend.auth[0]
            and bool(model.basic_auth_pass_is_set))  # fmt: skip


def ensure_webhook(studio: Studio, project: Project, backend: Backend) -> str:
    """The model's webhook (Label Studio makes one per connected model) with the backend's
    Authorization header; 'ok', 'updated', 'created' or 'refused'."""
    url = f"{backend.ls_url}/webhook"
    with ls_errors(studio.url, "listing the project's webhooks"):
        hooks = [h for h in studio.sdk.webhooks.list(project=str(project.id))
                 if (h.url or "").rstrip("/") == url]  # fmt: skip
    wanted = backend.authorization
    if not hooks:  # deleted, or not made (Label Studio's SSRF protection refuses local URLs)
        return _create_webhook(studio, project, url, wanted)
    hook = hooks[0]
    headers = dict(hook.headers or {}) if isinstance(hook.headers, dict) else {}
    if wanted is None or headers.get("Authorization") == wanted:
        return "ok"
    with ls_errors(studio.url, "giving the webhook the backend's credentials"):
        studio.sdk.webhooks.update(id=hook.id, url=hook.url,
                                   headers={**headers, "Authorization": wanted})  # fmt: skip
    return "updated"


def _create_webhook(studio: Studio, project: Project, url: str, authorization: str | None) -> str:
    """A webhook like the one Label Studio makes for a model; 'refused' (with a warning) when
    Label Studio will not send to that URL."""
    headers = {"Authorization": authorization} if authorization else {}
    with ls_errors(studio.url, f"creating a webhook to {url}"):
        try:
            studio.sdk.webhooks.create(project=project.id, url=url, send_payload=True,
                                       send_for_all_actions=True, headers=headers)  # fmt: skip
        except ApiError as e:
            if e.status_code != 400:
                raise
            log.warning("Label Studio refused a webhook to %s (%s): annotations will not reach "
                        "the training loop; is SSRF_PROTECTION_ENABLED=false set for Label "
                        "Studio?", url, _shown(e.body))  # fmt: skip
            return "refused"
    return "created"


# -- importing


def known_hashes(studio: Studio, project: Project) -> set[str]:
    """The sha256 every task of the project carries (tasks imported otherwise have none)."""
    with ls_errors(studio.url, "reading the project's tasks"):
        tasks = studio.sdk.tasks.list(project=project.id, page_size=500, fields="task_only")
        hashes = {t.data.get("sha256") for t in tasks if isinstance(t.data, dict)}
    hashes.discard(None)
    return {h for h in hashes if isinstance(h, str)}


def task_data(item: Prepared, image_url: str, data_key: str) -> dict:
    """A task's data: the image, its hash (how re-runs know it) and where it came from."""
    return {data_key: image_url, "sha256": item.sha256, "source": item.source.name}


def import_batch(studio: Studio, project: Project, batch: list[Prepared]) -> list[int]:
    """Upload the batch's files and create its tasks; their ids. LabelStudioError on failure
    (uploads left without a task are deleted)."""
    files = [item for item in batch if item.data is not None]
    urls: dict[int, str] = {}
    upload_ids: list[int] = []
    if files:
        names = [(Path(i.source.ref).name, i.data or b"") for i in files]
        upload_ids = studio.uploads.upload_files(project.id, names)
        by_id = studio.uploads.uploaded_urls(project.id, upload_ids)
        urls = {id(item): by_id[up] for item, up in zip(files, upload_ids, strict=True)}
    tasks = [
        {"data": task_data(item, urls.get(id(item), item.source.ref), project.data_key)}
        for item in batch
    ]
    try:
        return studio.uploads.create_tasks(project.id, tasks)
    except LabelStudioError:
        if upload_ids:
            _forget_uploads(studio, project, upload_ids)
        raise


def _forget_uploads(studio: Studio, project: Project, ids: list[int]) -> None:
    try:
        studio.uploads.delete_uploads(project.id, ids)
    except LabelStudioError as e:
        log.warning("uploaded files %s got no task and could not be deleted: %s", ids, e)


def import_all(
    studio: Studio, project: Project, sources: Sequence[Source], batch_size: int,
    progress: bool | None,
) -> Summary:  # fmt: skip
    """Check, hash, de-duplicate and import `sources` in batches, with a progress bar."""
    summary = Summary()
    known = known_hashes(studio, project)
    log.info("project has %d tasks with a known hash; %d images to look at", len(known),
             len(sources))  # fmt: skip
    bar = tqdm(total=len(sources), unit="image", desc="importing", disable=_no_bar(progress))
    with bar:
        new = new_images(sources, known, summary, on_done=lambda: bar.update(1))
        for batch in batched(new, batch_size):
            send_batch(studio, project, batch, summary, bar)
    return summary


def new_images(
    sources: Iterable[Source], known: set[str], summary: Summary,
    on_done: Callable[[], None] = lambda: None,
) -> Iterator[Prepared]:  # fmt: skip
    """The images to import, one at a time (a file's bytes are held only until its batch is
    sent): unreadable ones go to summary.failed, ones whose hash is in `known` (the project's
    tasks) or came earlier in this run to summary.skipped; `on_done` is called for those."""
    seen = set(known)
    for source in sources:
        try:
            item = prepare(source)
        except SourceError as e:
            summary.failed.append((source.name, str(e)))
            on_done()
            continue
        if item.sha256 in seen:
            summary.skipped.append(source.name)
            on_done()
            continue
        seen.add(item.sha256)
        yield item


def batched(
    items: Iterable[Prepared], size: int, max_bytes: int = BATCH_BYTES
) -> Iterator[list[Prepared]]:
    """Consecutive batches of at most `size` images and about `max_bytes` of file data (Label
    Studio refuses requests over 100 files or 250 MB)."""
    batch: list[Prepared] = []
    weight = 0
    for item in items:
        batch.append(item)
        weight += len(item.data or b"")
        if len(batch) >= size or weight >= max_bytes:
            yield batch
            batch, weight = [], 0
    if batch:
        yield batch


def send_batch(studio: Studio, project: Project, batch: list[Prepared], summary: Summary,
          bar: tqdm) -> None:  # fmt: skip
    """Import one batch; when Label Studio refuses it, each image alone, so that one bad file
    is reported and the others still go in. Fatal when Label Studio stops answering."""
    try:
        ids = import_batch(studio, project, batch)
    except LabelStudioError as e:
        if e.status is None or e.status in (401, 403) or len(batch) == 1:
            _record_failure(studio, batch, e, summary)
            bar.update(len(batch))
            return
        log.warning("a batch of %d images was refused (%s); importing them one by one",
                    len(batch), first_line(e))  # fmt: skip
        for item in batch:
            send_batch(studio, project, [item], summary, bar)
        return
    summary.imported += [item.source.name for item in batch]
    summary.task_ids += ids
    bar.update(len(batch))


def _record_failure(studio: Studio, batch: list[Prepared], error: LabelStudioError,
                    summary: Summary) -> None:  # fmt: skip
    if error.status is None or error.status in (401, 403):  # nothing else will work either
        raise Fatal(f"importing images: {_label_studio_error(error, studio.url)}")
    for item in batch:
        summary.failed.append((item.source.name, f"Label Studio refused it: {first_line(error)}"))


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


# ---------------------------------------------------------------------------------------------
# Pre-annotation


def request_predictions(backend: Backend, project: Project) -> dict:
    """Ask the backend to queue its predict job for the project; its answer (job, version)."""
    url = f"{backend.url}/jobs/predict"
    try:
        r = requests.post(url, json={"project": project.id}, auth=backend.auth, timeout=(5, 60))
    except requests.RequestException as e:
        raise Fatal(f"cannot reach the backend at {backend.url} ({first_line(e)})") from None
    body = _json_or_none(r)
    if r.status_code == 404:
        raise Fatal(f"{url} answered 404: this backend predates --preannotate; update it")
    if r.status_code != 202 or not isinstance(body.get("model_version"), str):
        reason = body.get("error") or _shown(r.text)
        raise Fatal(f"the backend did not queue the predictions (HTTP {r.status_code}): {reason}")
    return body


class JobWatch:
    """The backend's view of its predict job (GET /jobs/<id>): a failed job ends the wait at
    once, with its error. `status()` is None when the backend cannot tell now, said once per
    reason: an older backend, or a server process other than the one running the job (404;
    without REDIS_URL each process knows only its own jobs), the queue or the backend not
    answering. Label Studio's predictions are watched all the same, and the job asked again."""

    def __init__(self, backend: Backend, job_id: str) -> None:
        self.backend = backend
        self.job_id = job_id
        self._said: set[str] = set()

    def status(self) -> dict | None:
        url = f"{self.backend.url}/jobs/{self.job_id}"
        try:
            r = requests.get(url, auth=self.backend.auth, timeout=(5, 30))
        except requests.RequestException as e:
            self._say_once(f"the backend did not answer about job {self.job_id} "
                           f"({first_line(e)}); asking again")  # fmt: skip
            return None
        body = _json_or_none(r)
        if r.status_code == 404:
            self._say_once(f"the backend does not know job {self.job_id} "
                           f"({body.get('error') or 'HTTP 404'}); watching Label Studio's "
                           "predictions")  # fmt: skip
            return None
        if r.status_code != 200 or not isinstance(body.get("status"), str):
            self._say_once(f"the backend answered HTTP {r.status_code} about job "
                           f"{self.job_id}: {body.get('error') or _shown(r.text)}")  # fmt: skip
            return None
        if body.get("last_error"):
            self._say_once(f"the backend retries part of the job: {body['last_error']}")
        return body

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)


def wait_for_predictions(
    studio: Studio, project: Project, version: str, timeout_s: float, progress: bool | None,
    job: JobWatch | None = None, clock: Callable[[], float] = time.monotonic,
) -> int:  # fmt: skip
    """Poll the backend's job and Label Studio until every task has a prediction of `version`
    and the project's model version is `version`; the number of tasks. Fatal when the job
    failed (at once, with its error), when it finished and tasks still lack a prediction, or
    after `timeout_s`."""
    deadline = clock() + timeout_s
    pause, longest = POLL_S
    bar = tqdm(desc=f"predictions ({version})", unit="task", disable=_no_bar(progress))
    with bar:
        while True:
            state = job.status() if job is not None else None  # asked before Label Studio
            if state is not None and state["status"] == "failed":
                raise Fatal(f"pre-annotation failed: the backend's job {job.job_id} failed: "
                            f"{state.get('error') or 'no reason given'}; see the backend's "
                            "(or worker's) log, then run again with --preannotate (tasks "
                            "already predicted are kept)")  # fmt: skip
            done, total, current = _prediction_progress(studio, project, version)
            bar.total = total
            bar.n = min(done, total)
            if state is not None:
                bar.set_postfix_str(_job_postfix(state), refresh=False)
            bar.refresh()
            if (
                done >= total
                and current == version
                and _every_task_predicted(studio, project, version)
            ):
                return total
            if state is not None and state["status"] == "finished":
                raise Fatal(
                    f"the backend's job {job.job_id} finished, but {min(done, total)} of "
                    f"{total} tasks have a prediction of {version} (project model version "
                    f"{current!r}): tasks imported while it ran, or predictions Label Studio "
                    "refused (see the backend's log); run again with --preannotate"
                )
            if clock() > deadline:
                raise Fatal(
                    f"timed out after {timeout_s:.0f} s: {min(done, total)} of {total} tasks "
                    f"have a prediction of {version} (project model version {current!r}). The "
                    "backend may still be working: see its log (predict job), check that its "
                    "LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY reach this Label Studio, and run "
                    "again with --preannotate (tasks already predicted are kept)"
                )
            time.sleep(min(pause, max(deadline - clock(), 0.0)))
            pause = min(pause * 1.5, longest)


def _job_postfix(state: dict) -> str:
    """'job started, chunks 3/20 done, 1 retrying' for the progress bar."""
    text = f"job {state['status']}"
    chunks = state.get("chunks")
    if isinstance(chunks, dict) and chunks.get("total"):
        text += f", chunks {chunks.get('finished', 0)}/{chunks['total']} done"
        if chunks.get("retrying"):
            text += f", {chunks['retrying']} retrying"
    return text


def _prediction_progress(studio: Studio, project: Project, version: str) -> tuple[int, int, str]:
    """(predictions of `version`, tasks, the project's model version): two cheap calls."""
    with ls_errors(studio.url, "checking the predictions"):
        info = studio.sdk.projects.get(id=project.id)
        counts = studio.uploads.model_versions(project.id)
    return counts.get(version, 0), int(info.task_number or 0), info.model_version or ""


def _every_task_predicted(studio: Studio, project: Project, version: str) -> bool:
    """The exact check (a task may hold two predictions of a version): every task, read."""
    with ls_errors(studio.url, "checking the predictions"):
        for task in studio.uploads.tasks(project.id):
            versions = {p.get("model_version") for p in task.get("predictions") or []}
            if version not in versions:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# The run


def run(options: Options) -> int:
    """The whole import (see the module docstring); the exit status."""
    sources = discover(options.images)
    if not sources:
        raise Fatal(f"no images found in {options.images!r} (looked for "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})", EXIT_USAGE)  # fmt: skip
    backend = None
    if options.backend_url:
        backend = Backend(options.backend_url, options.ls_backend_url or options.backend_url,
                          options.backend_auth)  # fmt: skip
        check_backend(backend)
    studio = connect(options.url, options.api_key)
    project = ensure_project(studio, options.project, options.label_config)
    print(f"project: {project.title!r} (id {project.id}, "
          f"{'created' if project.created else 'found'})")  # fmt: skip
    if backend is not None:
        model = ensure_model(studio, project, backend)
        hook = ensure_webhook(studio, project, backend)
        print(f"backend: {backend.ls_url} ({model}); webhook: {hook}"
              f"{' with basic auth' if backend.auth else ''}")  # fmt: skip
    started = time.monotonic()
    with logging_redirect_tqdm():
        summary = import_all(studio, project, sources, options.batch_size, options.progress)
    seconds = time.monotonic() - started
    print(summary.render())
    print(f"import took {seconds:.1f} s")
    code = summary.exit_code()
    if options.preannotate and backend is not None:
        if code != EXIT_OK:
            print("pre-annotation skipped: no image is in the project")
        else:
            preannotate(studio, project, backend, options)
    return code


def preannotate(studio: Studio, project: Project, backend: Backend, options: Options) -> None:
    """Queue the backend's predict job and wait for its predictions to be in Label Studio."""
    started = time.monotonic()
    answer = request_predictions(backend, project)
    version = answer["model_version"]
    job_id = answer.get("job")
    print(f"pre-annotation queued: job {job_id}, model version {version}")
    job = JobWatch(backend, job_id) if isinstance(job_id, str) else None
    with logging_redirect_tqdm():
        total = wait_for_predictions(studio, project, version, options.timeout_s, options.progress,
                                     job)  # fmt: skip
    print(f"pre-annotated: {total} tasks have a prediction of {version} "
          f"({time.monotonic() - started:.1f} s)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")  # fmt: skip
    if not verbose:  # the SDK's httpx logs every request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        options = parse_options(argv)
        return run(options)
    except Fatal as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted: run the same command again to import the rest", file=sys.stderr)
        return 130


def _json_or_none(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
