"""Server settings, read once from the environment when the process starts.

Everything the server needs from the outside world arrives here, so the rest of the code takes a
`Settings` and never looks at `os.environ`. Values are checked on the way in: a typo in a number
or a log level stops the server at start-up with a message naming the variable. One exception
outside our code: prometheus_client reads PROMETHEUS_MULTIPROC_DIR itself when first imported;
`prometheus_multiproc_dir` mirrors it so the server can check and prepare that directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """What the server is told by its environment (variable names in the comments)."""

    port: int = 9090  # PORT
    host: str = "0.0.0.0"  # HOST
    model_dir: Path = Path("./models")  # MODEL_DIR: trained models and their state
    label_studio_url: str | None = None  # LABEL_STUDIO_URL, e.g. http://label-studio:8080
    # LABEL_STUDIO_API_KEY: a legacy token or a personal access token (backend/ls_auth.py)
    label_studio_api_key: str | None = field(default=None, repr=False)
    local_files_document_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT
    log_level: str = "INFO"  # LOG_LEVEL
    coarse_variant: str = "fused"  # COARSE_VARIANT: pupil method of the coarse detector
    workers: int = 1  # WORKERS: gunicorn worker processes
    threads: int = 4  # THREADS: threads per worker
    # BASIC_AUTH_USER / BASIC_AUTH_PASS: when both are set every route asks for them.
    basic_auth_user: str | None = field(default=None, repr=False)
    basic_auth_pass: str | None = field(default=None, repr=False)
    # ALLOWED_IMAGE_HOSTS: other hosts ("host" or "host:port", lowercase) images may come from.
    allowed_image_hosts: tuple[str, ...] = ()
    image_cache_mb: int = 256  # IMAGE_CACHE_MB: downloaded-image cache; 0 turns it off
    # PROMETHEUS_MULTIPROC_DIR: where prometheus_client's per-worker files go (WORKERS > 1).
    prometheus_multiproc_dir: Path | None = None
    # The training loop (backend/scheduler.py, backend/retrain.py).
    # REDIS_URL: jobs go to an RQ queue there (`python -m backend.worker` runs them); unset:
    # an in-process worker thread runs them.
    redis_url: str | None = field(default=None, repr=False)
    train_every: int = 10  # TRAIN_EVERY_N_LABELS: train after N new labels; 0: on request only
    train_min_labels: int = 10  # TRAIN_MIN_LABELS: human-labelled faces a run needs
    train_debounce_s: float = 10.0  # TRAIN_DEBOUNCE_S: wait for this much quiet before a run
    train_epochs: int = 40  # TRAIN_EPOCHS
    train_coarse_weight: float = 0.3  # TRAIN_COARSE_WEIGHT: unlabelled tasks' weight; 0: none
    train_max_coarse_tasks: int = 1000  # TRAIN_MAX_COARSE_TASKS: unlabelled tasks used per run
    train_timeout_s: int = 3600  # TRAIN_TIMEOUT_S: a run taking longer is stopped

    def __post_init__(self) -> None:
        if (self.basic_auth_user is None) != (self.basic_auth_pass is None):
            given, missing = (
                ("BASIC_AUTH_USER", "BASIC_AUTH_PASS")
                if self.basic_auth_user is not None
                else ("BASIC_AUTH_PASS", "BASIC_AUTH_USER")
            )
            raise ValueError(
                f"{given} is set but {missing} is not: set both to require basic auth, or "
                "neither to serve without it"
            )

    @property
    def basic_auth(self) -> bool:
        """Whether every request must carry the basic-auth credentials."""
        return self.basic_auth_user is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings from `environ`; unset or blank variables take the defaults above.

        Raises ValueError naming the variable for a value that cannot be used.
        """

        def text(name: str) -> str | None:
            value = environ.get(name)
            if value is None or not value.strip():
                return None
            return value.strip()

        defaults = cls()
        port = _int(environ, "PORT", defaults.port, minimum=1, maximum=65535)
        root = text("LOCAL_FILES_DOCUMENT_ROOT")
        multiproc = text("PROMETHEUS_MULTIPROC_DIR")
        return cls(
            port=port,
            host=text("HOST") or defaults.host,
            model_dir=Path(text("MODEL_DIR") or defaults.model_dir),
            label_studio_url=_url(text("LABEL_STUDIO_URL")),
            label_studio_api_key=text("LABEL_STUDIO_API_KEY"),
            local_files_document_root=Path(root) if root else None,
            log_level=_log_level(text("LOG_LEVEL") or defaults.log_level),
            coarse_variant=text("COARSE_VARIANT") or defaults.coarse_variant,
            workers=_int(environ, "WORKERS", defaults.workers, minimum=1),
            threads=_int(environ, "THREADS", defaults.threads, minimum=1),
            # Taken verbatim (no strip): a password may well end in a space.
            basic_auth_user=environ.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=environ.get("BASIC_AUTH_PASS") or None,
            allowed_image_hosts=_hosts(text("ALLOWED_IMAGE_HOSTS")),
            image_cache_mb=_int(environ, "IMAGE_CACHE_MB", defaults.image_cache_mb, minimum=0),
            prometheus_multiproc_dir=Path(multiproc) if multiproc else None,
            redis_url=_redis_url(text("REDIS_URL")),
            train_every=_int(environ, "TRAIN_EVERY_N_LABELS", defaults.train_every, minimum=0),
            train_min_labels=_int(
                environ, "TRAIN_MIN_LABELS", defaults.train_min_labels, minimum=2
            ),
            train_debounce_s=_float(
                environ, "TRAIN_DEBOUNCE_S", defaults.train_debounce_s, 0.0, 3600.0
            ),
            train_epochs=_int(environ, "TRAIN_EPOCHS", defaults.train_epochs, minimum=1),
            train_coarse_weight=_float(
                environ, "TRAIN_COARSE_WEIGHT", defaults.train_coarse_weight, 0.0, 1.0
            ),
            train_max_coarse_tasks=_int(
                environ, "TRAIN_MAX_COARSE_TASKS", defaults.train_max_coarse_tasks, minimum=0
            ),
            train_timeout_s=_int(environ, "TRAIN_TIMEOUT_S", defaults.train_timeout_s, minimum=60),
        )


def _int(
    environ: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    """An integer variable in [minimum, maximum], or `default` when unset or blank."""
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be at least {minimum}{upper}, got {value}")
    return value


def _float(
    environ: Mapping[str, str], name: str, default: float, minimum: float, maximum: float
) -> float:
    """A number variable in [minimum, maximum], or `default` when unset or blank."""
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value <= maximum:  # also refuses nan
        raise ValueError(f"{name} must be between {minimum:g} and {maximum:g}, got {raw!r}")
    return value


def _redis_url(raw: str | None) -> str | None:
    """REDIS_URL as redis-py accepts it (redis://, rediss:// or unix://)."""
    if raw is None:
        return None
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"REDIS_URL must look like redis://host:6379/0 (or rediss://, unix://), got a "
            f"{urlsplit(raw).scheme or 'scheme-less'} URL"
        )
    return raw


def _url(raw: str | None) -> str | None:
    """LABEL_STUDIO_URL without a trailing slash; it must be an absolute http(s) URL."""
    if raw is None:
        return None
    parts = urlsplit(raw)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"LABEL_STUDIO_URL must be an absolute http(s) URL such as "
            f"http://label-studio:8080, got {raw!r}"
        )
    return raw.rstrip("/")


def _hosts(raw: str | None) -> tuple[str, ...]:
    """ALLOWED_IMAGE_HOSTS as lowercase "host" / "host:port" entries (IPv6 as "[::1]:8080").

    Entries are hosts, not URLs: a scheme, path or credentials in one is a start-up error, so a
    typo cannot silently widen (or fail to grant) access.
    """
    if raw is None:
        return ()
    hosts: list[str] = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        parts = urlsplit(f"//{entry}")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            "://" in entry
            or not parts.hostname
            or parts.path
            or parts.query
            or parts.fragment
            or "@" in entry
            or port == -1
        ):
            raise ValueError(
                f"ALLOWED_IMAGE_HOSTS entries must be host or host:port (comma-separated), "
                f"such as images.example.com or minio:9000, got {entry!r}"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        hosts.append(f"{host}:{port}" if port is not None else host)
    return tuple(dict.fromkeys(hosts))


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {raw!r}")
    return level
