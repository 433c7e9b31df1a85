"""Task image references -> the image's bytes, from wherever Label Studio says the image is.

`ImageSource(settings).fetch(value, task_id)` accepts what Label Studio puts in a task's image
field and refuses everything else with an `ImageSourceError(reason, message)`: the reason is a
short class for metrics and logs, the message says what to change.

- `/data/local-files/?d=REL`: LOCAL_FILES_DOCUMENT_ROOT/REL when that is set (no `..`, no
  absolute path, no symlink out of the root); otherwise downloaded from Label Studio.
- `/data/upload/...` and any other root-relative path: LABEL_STUDIO_URL + path, with the key.
- `http(s)://` on LABEL_STUDIO_URL's host: downloaded with the API key.
- `http(s)://` on a host in ALLOWED_IMAGE_HOSTS: downloaded without any key (the allowlist is
  explicit trust: such hosts are not checked for private addresses).
- `s3://`, `gs://`, `azure-blob://`, `azure-spi://`: Label Studio's
  `/tasks/<id>/presign/?fileuri=<urlsafe base64>`, following its redirect to the signed URL (or
  taking the bytes when Label Studio proxies them).
- `data:image/...;base64,...`: decoded in place, within the byte limit.

Any other host or scheme (`file:`, `ftp:`, ...) is refused, whatever its address. Redirects
are followed (at most MAX_REDIRECTS) only to the same host and port, except the one from Label
Studio's presign endpoint to the signed URL, which must resolve to public addresses only (no
loopback, private, link-local such as 169.254.169.254, ...) unless its host is allowlisted;
the API key is only ever sent to LABEL_STUDIO_URL's host.
Downloads stream with a byte limit, connect/read timeouts and a total deadline. Downloaded
bytes are kept in a size-bounded LRU cache (IMAGE_CACHE_MB); local files are read afresh.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import re
import socket
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, parse_qs, quote, urljoin, urlsplit

import requests

from backend.images import ImageLimits
from backend.ls_auth import LEGACY, LabelStudioAuth, LabelStudioAuthError
from backend.settings import Settings

log = logging.getLogger(__name__)

# Failure reasons (metric label values); backend/metrics.py lists every reason a task can have.
BAD_REFERENCE = "bad_reference"  # not something that could name an image
FORBIDDEN_SOURCE = "forbidden_source"  # a host, scheme or path this backend will not read
NOT_CONFIGURED = "not_configured"  # LABEL_STUDIO_URL / LOCAL_FILES_DOCUMENT_ROOT missing
AUTH_FAILED = "auth_failed"  # Label Studio refused the API key
NOT_FOUND = "not_found"  # 404, or no such local file
DOWNLOAD_FAILED = "download_failed"  # timeouts, connection errors, 5xx, unreadable files
IMAGE_TOO_LARGE = "image_too_large"  # over ImageLimits.max_bytes
REASONS = (
    BAD_REFERENCE,
    FORBIDDEN_SOURCE,
    NOT_CONFIGURED,
    AUTH_FAILED,
    NOT_FOUND,
    DOWNLOAD_FAILED,
    IMAGE_TOO_LARGE,
)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 3
_LOCAL_FILES_PATH = "/data/local-files"
_CHUNK = 64 * 1024
_SHOWN_CHARS = 200
_QUERY = re.compile(r"\?[^\s)'\"]*")


class ImageSourceError(ValueError):
    """A task's image cannot be had; `reason` is one of REASONS, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Timeouts:
    """How long a download may take: per connection attempt, per read, and in total."""

    connect_s: float = 5.0
    read_s: float = 30.0
    total_s: float = 60.0


# ---------------------------------------------------------------------------------------------
# The cache


class ImageCache:
    """An LRU of downloaded bytes bounded by their total size; thread-safe.

    Keyed by the URL first requested (Label Studio URLs of uploads carry a unique prefix, so
    the same key means the same file). An item bigger than the whole budget is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------------------------
# The source


class ImageSource:
    """Fetches task images (see the module docstring). One per process: it holds the cache,
    a connection pool per thread and the Label Studio access token."""

    def __init__(
        self,
        settings: Settings,
        limits: ImageLimits = ImageLimits(),
        *,
        auth: LabelStudioAuth | None = None,
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.timeouts = timeouts
        base = settings.label_studio_url
        self._ls = urlsplit(base) if base else None
        if auth is None and base and settings.label_studio_api_key:
            auth = LabelStudioAuth(base, settings.label_studio_api_key)
        self.auth = auth
        self.cache = ImageCache(settings.image_cache_mb * 1024 * 1024)
        self._local = threading.local()  # one requests.Session per thread

    # -- public

    def fetch(self, value: object, task_id: int | None = None) -> bytes:
        """The encoded image `value` refers to; raises ImageSourceError with a reason.

        `task_id` is needed only for cloud-storage URIs (Label Studio signs them per task).
        """
        if not isinstance(value, str) or not value.strip():
            raise ImageSourceError(
                BAD_REFERENCE, f"image reference must be a non-empty string, got {value!r:.80}"
            )
        ref = value.strip()
        if ref[:5].lower() == "data:":
            return self._data_uri(ref)
        try:
            parts = urlsplit(ref)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as e:
            raise ImageSourceError(BAD_REFERENCE, f"malformed URL {_shown(ref)!r}: {e}") from None
        scheme = parts.scheme.lower()

        if not scheme and not parts.netloc and ref.startswith("/"):
            if _is_local_files(parts.path):
                if self.settings.local_files_document_root is not None:
                    return self._read_local(parts.query)
                if self._ls is None:
                    raise ImageSourceError(
                        NOT_CONFIGURED,
                        f"cannot read local file {_shown(ref)!r}: LOCAL_FILES_DOCUMENT_ROOT is "
                        "not set, and LABEL_STUDIO_URL is not set either to download it",
                    )
            return self._download(self._label_studio_url(ref), ref)

        if scheme in ("http", "https"):
            if not parts.hostname:
                raise ImageSourceError(BAD_REFERENCE, f"URL {_shown(ref)!r} has no host")
            if self._is_label_studio(parts):
                if (
                    _is_local_files(parts.path)
                    and self.settings.local_files_document_root is not None
                ):
                    return self._read_local(parts.query)
                return self._download(ref, ref)
            if self._is_allowed(parts):
                return self._download(ref, ref)
            raise ImageSourceError(FORBIDDEN_SOURCE, self._refused_host_message(ref, parts))

        if scheme in CLOUD_SCHEMES:
            return self._presigned(ref, task_id)
        if not scheme and parts.netloc:
            raise ImageSourceError(
                BAD_REFERENCE, f"scheme-relative image URL {_shown(ref)!r} is not supported"
            )
        if scheme:
            raise ImageSourceError(
                FORBIDDEN_SOURCE,
                f"unsupported image reference {_shown(ref)!r}: {scheme}: URLs are not read "
                "(use Label Studio uploads, /data/local-files/?d=..., cloud storage "
                f"({', '.join(s + '://' for s in CLOUD_SCHEMES)}), or http(s) URLs on "
                "LABEL_STUDIO_URL's host or ALLOWED_IMAGE_HOSTS)",
            )
        raise ImageSourceError(
            BAD_REFERENCE,
            f"unsupported image reference {_shown(ref)!r}: expected a path starting with / "
            "(such as /data/upload/...) or a URL",
        )

    # -- hosts

    def _is_label_studio(self, parts: SplitResult) -> bool:
        return self._ls is not None and _same_host(parts, self._ls)

    def _is_allowed(self, parts: SplitResult) -> bool:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        allowed = self.settings.allowed_image_hosts
        return host in allowed or f"{host}:{_port(parts)}" in allowed

    def _refused_host_message(self, ref: str, parts: SplitResult) -> str:
        where = (
            f"it is not LABEL_STUDIO_URL's host ({self._ls.netloc})"
            if self._ls is not None
            else "LABEL_STUDIO_URL is not set"
        )
        return (
            f"image URL {_shown(ref)!r} refused: its host {parts.netloc!r} is not allowed "
            f"({where}); to read images from it, add {parts.netloc!r} to ALLOWED_IMAGE_HOSTS"
        )

    def _label_studio_url(self, path: str) -> str:
        base = self.settings.label_studio_url
        if not base:
            raise ImageSourceError(
                NOT_CONFIGURED,
                f"cannot download {_shown(path)!r}: LABEL_STUDIO_URL is not set (set it to the "
                "address this backend can reach Label Studio at, and LABEL_STUDIO_API_KEY)",
            )
        return base.rstrip("/") + path

    # -- local files

    def _read_local(self, query: str) -> bytes:
        relative = parse_qs(query, keep_blank_values=True).get("d", [""])[0]
        if not relative:
            raise ImageSourceError(BAD_REFERENCE, "local-files URL has no ?d=<path> parameter")
        if "\x00" in relative:
            raise ImageSourceError(BAD_REFERENCE, f"invalid local file path {relative!r}")
        pure = PurePosixPath(relative.replace("\\", "/"))
        if pure.is_absolute() or Path(relative).is_absolute():
            raise ImageSourceError(
                FORBIDDEN_SOURCE,
                f"local file path {relative!r} is absolute; it must be relative to "
                "LOCAL_FILES_DOCUMENT_ROOT",
            )
        if ".." in pure.parts:
            raise ImageSourceError(
                FORBIDDEN_SOURCE, f"local file path {relative!r} contains '..'; refused"
            )
        configured = self.settings.local_files_document_root
        assert configured is not None  # checked by the caller
        try:
            root = Path(configured).resolve()
            target = (root / relative).resolve()
        except (OSError, RuntimeError) as e:  # symlink loops
            raise ImageSourceError(
                BAD_REFERENCE, f"invalid local file path {relative!r}: {e}"
            ) from None
        if not target.is_relative_to(root):
            raise ImageSourceError(
                FORBIDDEN_SOURCE,
                f"local file path {relative!r} escapes LOCAL_FILES_DOCUMENT_ROOT "
                "(after resolving symlinks); refused",
            )
        return self._read_file(target, relative)

    def _read_file(self, path: Path, shown: str) -> bytes:
        """A regular file's bytes, at most the byte limit (the file may grow meanwhile)."""
        limit = self.limits.max_bytes
        try:
            info = os.stat(path)
            if stat.S_ISDIR(info.st_mode):
                raise ImageSourceError(BAD_REFERENCE, f"{shown!r} is a directory, not a file")
            if not stat.S_ISREG(info.st_mode):  # FIFOs and devices could block or never end
                raise ImageSourceError(FORBIDDEN_SOURCE, f"{shown!r} is not a regular file")
            if info.st_size > limit:
                raise _too_large(f"{info.st_size:,} bytes", limit)
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ImageSourceError(
                NOT_FOUND, f"file not found: {shown!r} (under LOCAL_FILES_DOCUMENT_ROOT)"
            ) from None
        except PermissionError:
            raise ImageSourceError(
                DOWNLOAD_FAILED, f"permission denied reading {shown!r}"
            ) from None
        except OSError as e:
            raise ImageSourceError(
                DOWNLOAD_FAILED, f"cannot read {shown!r}: {e.strerror or e}"
            ) from None
        if len(data) > limit:
            raise _too_large("over the limit", limit)
        return data

    # -- data: URIs

    def _data_uri(self, ref: str) -> bytes:
        header, comma, payload = ref.partition(",")
        params = [p.strip().lower() for p in header[5:].split(";")]
        if not comma or "base64" not in params[1:] or not params[0].startswith("image/"):
            raise ImageSourceError(
                BAD_REFERENCE,
                f"data: URI {_shown(ref)!r} is not supported: only data:image/...;base64,... is",
            )
        limit = self.limits.max_bytes
        if len(payload) // 4 * 3 > limit + 3:  # checked before decoding anything
            raise _too_large(f"about {len(payload) // 4 * 3:,} bytes", limit)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageSourceError(BAD_REFERENCE, "data: URI is not valid base64") from None
        if len(data) > limit:
            raise _too_large(f"{len(data):,} bytes", limit)
        return data

    # -- downloads

    def _presigned(self, uri: str, task_id: int | None) -> bytes:
        if task_id is None:
            raise ImageSourceError(
                BAD_REFERENCE,
                f"cloud storage URI {_shown(uri)!r} needs the task's id (Label Studio signs "
                "it per task), and the task has no integer 'id'",
            )
        base = self.settings.label_studio_url
        if not base:
            raise ImageSourceError(
                NOT_CONFIGURED,
                f"cannot read cloud storage URI {_shown(uri)!r}: LABEL_STUDIO_URL is not set "
                "(Label Studio signs cloud URLs; set it and LABEL_STUDIO_API_KEY)",
            )
        fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        url = f"{base.rstrip('/')}/tasks/{task_id}/presign/?fileuri={quote(fileuri)}"
        return self._download(url, uri, presign=True)

    def _download(self, url: str, ref: str, *, presign: bool = False) -> bytes:
        cached = self.cache.get(url)
        if cached is not None:
            return cached
        data = self._get(url, ref, presign=presign)
        self.cache.put(url, data)
        return data

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "pupil-backend"
            self._local.session = session
        return session

    def _get(self, url: str, ref: str, *, presign: bool) -> bytes:
        """GET `url` following allowed redirects by hand, so that each hop is checked and the
        key is only sent to Label Studio; retries once after a 401 with a refreshed token."""
        deadline = time.monotonic() + self.timeouts.total_s
        retried = False
        hops = 0
        while True:
            parts = urlsplit(url)
            to_label_studio = self._is_label_studio(parts)
            headers = {}
            if to_label_studio and self.auth is not None:
                try:
                    headers["Authorization"] = self.auth.header()
                except LabelStudioAuthError as e:
                    raise ImageSourceError(AUTH_FAILED, str(e)) from None
            response = self._request(url, headers, ref)
            with response:
                status = response.status_code
                if status == 401 and to_label_studio and self.auth is not None and not retried:
                    if self.auth.unauthorized(headers.get("Authorization", "")):
                        retried = True
                        continue
                if response.is_redirect:
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise ImageSourceError(
                            DOWNLOAD_FAILED, f"too many redirects downloading {_shown(ref)!r}"
                        )
                    target = urljoin(url, response.headers.get("Location", ""))
                    # Label Studio's presign answer is the one hop allowed to leave its host.
                    signed_url_hop = presign and hops == 1 and to_label_studio
                    self._check_redirect(url, target, ref, signed_url_hop=signed_url_hop)
                    url = target
                    continue
                self._check_status(response, ref, to_label_studio)
                return self._read_body(response, ref, deadline)

    def _request(self, url: str, headers: dict, ref: str) -> requests.Response:
        try:
            return self._session().get(
                url,
                headers=headers,
                timeout=(self.timeouts.connect_s, self.timeouts.read_s),
                stream=True,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise ImageSourceError(
                DOWNLOAD_FAILED,
                f"timed out downloading {_shown(ref)!r} (connect {self.timeouts.connect_s:g} s, "
                f"read {self.timeouts.read_s:g} s)",
            ) from None
        except requests.RequestException as e:
            raise ImageSourceError(
                DOWNLOAD_FAILED, f"cannot download {_shown(ref)!r}: {_reason(e)}"
            ) from None

    def _check_redirect(self, url: str, target: str, ref: str, *, signed_url_hop: bool) -> None:
        """Redirects stay on the host, except Label Studio's presign answer, which may send us
        to the storage's signed URL: a public host, Label Studio's, or an allowlisted one (a
        compromised or misconfigured storage must not point the backend at 169.254.169.254 or
        the private network)."""
        parts = urlsplit(target)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ImageSourceError(
                FORBIDDEN_SOURCE,
                f"downloading {_shown(ref)!r} redirected to {_shown(target)!r}; refused",
            )
        if _same_host(parts, urlsplit(url)):
            return
        if not signed_url_hop:
            raise ImageSourceError(
                FORBIDDEN_SOURCE,
                f"downloading {_shown(ref)!r} redirected to another host ({parts.netloc}); "
                "redirects are only followed on the same host",
            )
        if self._is_label_studio(parts) or self._is_allowed(parts):
            return
        private = _non_public_address(parts.hostname)
        if private:
            raise ImageSourceError(
                FORBIDDEN_SOURCE,
                f"the signed URL for {_shown(ref)!r} points at {parts.netloc!r}, a {private} "
                f"address; refused (add {parts.netloc!r} to ALLOWED_IMAGE_HOSTS if your "
                "storage really lives there, e.g. MinIO on the local network)",
            )

    def _check_status(self, response: requests.Response, ref: str, to_label_studio: bool) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (401, 403) and to_label_studio:
            raise ImageSourceError(AUTH_FAILED, self._auth_failed_message(ref, status))
        if status == 404:
            where = "on Label Studio" if to_label_studio else "on its host"
            raise ImageSourceError(NOT_FOUND, f"image {_shown(ref)!r} not found {where} (HTTP 404)")
        if status >= 500:
            who = "Label Studio" if to_label_studio else "the image host"
            raise ImageSourceError(
                DOWNLOAD_FAILED,
                f"{who} answered HTTP {status} for {_shown(ref)!r} (a server error; the task "
                "can be retried later)",
            )
        raise ImageSourceError(
            DOWNLOAD_FAILED, f"downloading {_shown(ref)!r} failed with HTTP {status}"
        )

    def _auth_failed_message(self, ref: str, status: int) -> str:
        start = f"Label Studio refused the download of {_shown(ref)!r} (HTTP {status}): "
        if self.auth is None:
            return start + "LABEL_STUDIO_API_KEY is not set"
        if self.auth.kind == LEGACY:
            return start + (
                "check LABEL_STUDIO_API_KEY; it is a legacy token, which works only when legacy "
                "tokens are enabled in the organization's settings (or use a personal access "
                "token)"
            )
        return start + (
            "check LABEL_STUDIO_API_KEY; it is a personal access token: is it revoked, or does "
            "its user lack access to this project?"
        )

    def _read_body(self, response: requests.Response, ref: str, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(f"{int(declared):,} bytes", limit)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _too_large("over the limit", limit)
                if time.monotonic() > deadline:
                    raise ImageSourceError(
                        DOWNLOAD_FAILED,
                        f"downloading {_shown(ref)!r} took over {self.timeouts.total_s:g} s",
                    )
                chunks.append(chunk)
        except requests.Timeout:
            raise ImageSourceError(
                DOWNLOAD_FAILED,
                f"timed out reading {_shown(ref)!r} (read {self.timeouts.read_s:g} s)",
            ) from None
        except requests.RequestException as e:
            raise ImageSourceError(
                DOWNLOAD_FAILED, f"download of {_shown(ref)!r} broke off: {_reason(e)}"
            ) from None
        return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# Helpers


def _is_local_files(path: str) -> bool:
    return path.rstrip("/") == _LOCAL_FILES_PATH


def _port(parts: SplitResult) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def _same_host(a: SplitResult, b: SplitResult) -> bool:
    try:
        return (
            a.scheme.lower() in ("http", "https")
            and a.hostname is not None
            and a.hostname == b.hostname
            and _port(a) == _port(b)
        )
    except ValueError:  # a port that is not a number
        return False


def _non_public_address(host: str) -> str:
    """'' when every address `host` resolves to is a public one, else what the first other one
    is ("loopback", "private", "link-local", ...). A name that does not resolve is refused too
    (the download could not succeed anyway)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return "unresolvable"
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
            if getattr(address, f"is_{kind}"):
                return kind.replace("_", "-")
        if not address.is_global:
            return "non-global"
    return ""


def _too_large(size: str, limit: int) -> ImageSourceError:
    return ImageSourceError(IMAGE_TOO_LARGE, f"file is too large: {size} (limit {limit:,} bytes)")


def _shown(ref: str) -> str:
    """A reference for messages: no query string or credentials on URLs (signed URLs carry
    their signature there), no data: payloads, bounded length."""
    if ref[:5].lower() == "data:":
        return f"{ref.partition(',')[0]},... ({len(ref):,} chars)"[:_SHOWN_CHARS]
    try:
        parts = urlsplit(ref)
        if parts.scheme and parts.netloc and not _is_local_files(parts.path):
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            ref = f"{parts.scheme}://{host}{parts.path}"
    except ValueError:
        pass
    return ref if len(ref) <= _SHOWN_CHARS else ref[: _SHOWN_CHARS - 3] + "..."


def _reason(error: Exception) -> str:
    """A one-line reason for a requests error (its repr nests the whole urllib3 chain), with
    query strings cut: urllib3 names the URL, and a signed URL's signature is in its query."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _QUERY.sub("?...", text)[:300]
