"""Where task images come from: local files, Label Studio, allowlisted hosts, cloud storage
through Label Studio's presign endpoint, data: URIs; and everything that is refused.

Label Studio and a second "image host" are stand-ins on 127.0.0.1 (tests/fake_label_studio.py).
"""

from __future__ import annotations

import base64
import os
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fake_label_studio import FakeServer, Reply, Seen

from backend.image_source import (
    AUTH_FAILED,
    BAD_REFERENCE,
    DOWNLOAD_FAILED,
    FORBIDDEN_SOURCE,
    IMAGE_TOO_LARGE,
    NOT_CONFIGURED,
    NOT_FOUND,
    ImageCache,
    ImageSource,
    ImageSourceError,
    Timeouts,
)
from backend.images import ImageLimits
from backend.metrics import FAILURE_REASONS
from backend.settings import Settings

KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # 2 KiB; only bytes matter here
UPLOAD = "/data/upload/3/2bd44c48-face.png"


@pytest.fixture
def label_studio():
    server = FakeServer().start()
    server.route(UPLOAD, _needs_key(Reply(200, IMAGE, {"Content-Type": "image/png"})))
    yield server
    server.stop()


@pytest.fixture
def image_host():
    server = FakeServer().start()
    yield server
    server.stop()


def _needs_key(reply: Reply):
    def handler(seen: Seen) -> Reply:
        if seen.authorization != f"Token {KEY}":
            return Reply(401, b'{"detail": "Authentication credentials were not provided."}')
        return reply

    return handler


def source_for(label_studio: FakeServer | None = None, **settings) -> ImageSource:
    if label_studio is not None:
        settings.setdefault("label_studio_url", label_studio.url)
        settings.setdefault("label_studio_api_key", KEY)
    return ImageSource(Settings(**settings), timeouts=Timeouts(1.0, 1.0, 5.0))


def fails(source: ImageSource, ref, reason: str, message: str = "", task_id=None):
    with pytest.raises(ImageSourceError, match=re.escape(message)) as caught:
        source.fetch(ref, task_id)
    assert caught.value.reason == reason, str(caught.value)
    return caught.value


def test_every_reason_is_a_metric_label():
    import backend.image_source as module

    reasons = {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str)}
    assert set(module.REASONS) <= set(FAILURE_REASONS)
    assert {r for r in reasons if r.islower() and "_" in r} <= set(FAILURE_REASONS)


# ---------------------------------------------------------------------------------------------
# Label Studio


def test_uploads_and_urls_on_label_studios_host_are_downloaded_with_the_key(label_studio):
    source = source_for(label_studio, image_cache_mb=0)
    assert source.fetch(UPLOAD, 1) == IMAGE
    assert source.fetch(f"{label_studio.url}{UPLOAD}", 1) == IMAGE
    assert [s.authorization for s in label_studio.seen(UPLOAD)] == [f"Token {KEY}"] * 2


def test_label_studio_answers_become_reasons(label_studio):
    label_studio.route("/data/upload/forbidden.png", Reply(403, b"{}"))
    label_studio.route("/data/upload/broken.png", Reply(502, b"bad gateway"))
    label_studio.route("/data/upload/teapot.png", Reply(418, b""))
    label_studio.route("/data/upload/slow.png", Reply(200, IMAGE, delay_s=0.6))
    source = source_for(label_studio)
    fails(source, "/data/upload/missing.png", NOT_FOUND, "not found on Label Studio (HTTP 404)")
    fails(source, "/data/upload/forbidden.png", AUTH_FAILED, "check LABEL_STUDIO_API_KEY")
    fails(source, "/data/upload/broken.png", DOWNLOAD_FAILED, "answered HTTP 502")
    fails(source, "/data/upload/teapot.png", DOWNLOAD_FAILED, "failed with HTTP 418")
    impatient = ImageSource(source.settings, timeouts=Timeouts(1.0, 0.2, 5.0))
    fails(impatient, "/data/upload/slow.png", DOWNLOAD_FAILED, "timed out")
    fails(source_for(label_studio, label_studio_api_key=None), UPLOAD, AUTH_FAILED, "is not set")
    fails(source_for(), UPLOAD, NOT_CONFIGURED, "LABEL_STUDIO_URL is not set")
    unreachable = source_for(label_studio_url="http://127.0.0.1:9")  # nothing listens there
    fails(unreachable, UPLOAD, DOWNLOAD_FAILED, "cannot download")


def test_downloads_are_size_limited_with_and_without_a_content_length(label_studio):
    label_studio.route("/no-length", Reply(200, IMAGE, send_length=False))
    small = ImageSource(
        Settings(label_studio_url=label_studio.url, label_studio_api_key=KEY),
        ImageLimits(max_bytes=1000),
    )
    fails(small, UPLOAD, IMAGE_TOO_LARGE, f"{len(IMAGE):,} bytes (limit 1,000 bytes)")
    fails(small, "/no-length", IMAGE_TOO_LARGE, "over the limit")
    assert source_for(label_studio).fetch("/no-length") == IMAGE


def test_redirects_stay_on_the_same_host(label_studio, image_host):
    label_studio.route("/home", Reply(302, headers={"Location": UPLOAD}))
    label_studio.route("/away", Reply(302, headers={"Location": f"{image_host.url}/x.png"}))
    label_studio.route("/loop", Reply(302, headers={"Location": "/loop"}))
    label_studio.route("/ftp", Reply(302, headers={"Location": "ftp://127.0.0.1/x.png"}))
    source = source_for(label_studio, allowed_image_hosts=(image_host.netloc,))
    assert source.fetch("/home") == IMAGE
    assert label_studio.seen(UPLOAD)[0].authorization == f"Token {KEY}"
    fails(source, "/away", FORBIDDEN_SOURCE, "redirected to another host")  # even allowlisted
    fails(source, "/loop", DOWNLOAD_FAILED, "too many redirects")
    fails(source, "/ftp", FORBIDDEN_SOURCE, "redirected to")
    assert image_host.requests == []


# ---------------------------------------------------------------------------------------------
# Other hosts


def test_allowlisted_hosts_are_read_without_the_key(label_studio, image_host):
    image_host.route("/pics/face.png", Reply(200, IMAGE))
    image_host.route("/pics/next.png", Reply(301, headers={"Location": "/pics/face.png"}))
    source = source_for(label_studio, allowed_image_hosts=(image_host.netloc,))
    assert source.fetch(f"{image_host.url}/pics/face.png") == IMAGE
    assert source.fetch(f"{image_host.url}/pics/next.png") == IMAGE  # same-host redirect
    assert [s.authorization for s in image_host.requests] == [None, None, None]
    assert source_for(allowed_image_hosts=("127.0.0.1",)).fetch(
        f"{image_host.url}/pics/face.png"
    )  # a bare host allows any port


def test_other_hosts_are_refused_naming_the_variable_to_set(label_studio, image_host):
    url = f"{image_host.url}/pics/face.png?X-Amz-Signature=secret"
    error = fails(source_for(label_studio), url, FORBIDDEN_SOURCE, "ALLOWED_IMAGE_HOSTS")
    assert image_host.netloc in str(error) and "secret" not in str(error)
    other_port = source_for(label_studio, allowed_image_hosts=("127.0.0.1:1",))
    fails(other_port, url, FORBIDDEN_SOURCE, "add '127.0.0.1")
    fails(source_for(), url, FORBIDDEN_SOURCE, "LABEL_STUDIO_URL is not set")
    assert image_host.requests == []


@pytest.mark.parametrize(
    ("ref", "reason", "message"),
    [
        ("file:///etc/passwd", FORBIDDEN_SOURCE, "file: URLs are not read"),
        ("ftp://example.com/x.png", FORBIDDEN_SOURCE, "ftp: URLs are not read"),
        ("gopher://example.com/x", FORBIDDEN_SOURCE, "gopher: URLs"),
        ("//example.com/x.png", BAD_REFERENCE, "scheme-relative"),
        ("images/x.png", BAD_REFERENCE, "expected a path starting with /"),
        ("http://[::1/x.png", BAD_REFERENCE, "malformed URL"),
        ("http://example.com:port/x.png", BAD_REFERENCE, "malformed URL"),
        ("http:///x.png", BAD_REFERENCE, "has no host"),
        ("", BAD_REFERENCE, "non-empty string"),
        (42, BAD_REFERENCE, "non-empty string"),
        (None, BAD_REFERENCE, "non-empty string"),
        ("data:text/html;base64,PGI+", BAD_REFERENCE, "only data:image/...;base64"),
        ("data:image/png,rawbytes", BAD_REFERENCE, "only data:image/...;base64"),
        ("data:image/png;base64,%%%%", BAD_REFERENCE, "not valid base64"),
    ],
)
def test_unusable_references_are_refused(ref, reason, message):
    fails(source_for(label_studio_url="http://127.0.0.1:9"), ref, reason, message)


def test_data_uris_are_decoded_within_the_byte_limit():
    uri = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert source_for().fetch(uri) == IMAGE
    small = ImageSource(Settings(), ImageLimits(max_bytes=1000))
    error = fails(small, uri, IMAGE_TOO_LARGE, "limit 1,000 bytes")
    assert len(str(error)) < 300  # the payload is never echoed


# ---------------------------------------------------------------------------------------------
# Cloud storage through Label Studio's presign endpoint


def _presign(label_studio: FakeServer, task_id: int, reply: Reply) -> None:
    label_studio.route(f"/tasks/{task_id}/presign/", _needs_key(reply))


def _fileuri(seen: Seen) -> str:
    encoded = parse_qs(urlsplit(seen.path).query)["fileuri"][0]
    return base64.urlsafe_b64decode(encoded).decode()


@pytest.mark.parametrize("scheme", ["s3", "gs", "azure-blob", "azure-spi"])
def test_cloud_uris_follow_label_studios_presign_redirect(label_studio, image_host, scheme):
    signed = f"{image_host.url}/bucket/face.png?X-Amz-Signature=abc&X-Amz-Expires=900"
    _presign(label_studio, 7, Reply(302, headers={"Location": signed}))
    image_host.route("/bucket/face.png", Reply(200, IMAGE))
    uri = f"{scheme}://bucket/photos/face 1.png"
    # The stand-in storage is on 127.0.0.1, which only an allowlist opens (see below).
    assert source_for(label_studio, allowed_image_hosts=(image_host.netloc,)).fetch(uri, 7) == IMAGE
    (presign,) = label_studio.seen("/tasks/7/presign/")
    assert _fileuri(presign) == uri
    assert presign.authorization == f"Token {KEY}"
    (download,) = image_host.requests
    assert download.path == "/bucket/face.png?X-Amz-Signature=abc&X-Amz-Expires=900"
    assert download.authorization is None  # the key never leaves Label Studio's host


def test_cloud_uris_proxied_by_label_studio_and_their_failures(label_studio, image_host):
    _presign(label_studio, 8, Reply(200, IMAGE))  # storage with presigning off: LS proxies
    source = source_for(label_studio, allowed_image_hosts=(image_host.netloc,))
    assert source.fetch("s3://bucket/a.png", 8) == IMAGE
    fails(source, "s3://bucket/a.png", BAD_REFERENCE, "needs the task's id", task_id=None)
    fails(source_for(), "gs://bucket/a.png", NOT_CONFIGURED, "LABEL_STUDIO_URL", task_id=8)
    fails(source, "s3://bucket/gone.png", NOT_FOUND, "s3://bucket/gone.png", task_id=99)

    expired = f"{image_host.url}/b/x.png?X-Amz-Signature=topsecret"
    image_host.route("/b/x.png", Reply(403, b"<Error>AccessDenied</Error>"))
    _presign(label_studio, 9, Reply(302, headers={"Location": expired}))
    error = fails(source, "s3://b/x.png", DOWNLOAD_FAILED, "HTTP 403", task_id=9)
    assert "topsecret" not in str(error)

    onward = f"{image_host.url}/b/y.png?sig=1"
    image_host.route("/b/y.png", Reply(307, headers={"Location": f"{label_studio.url}{UPLOAD}"}))
    _presign(label_studio, 10, Reply(302, headers={"Location": onward}))
    fails(source, "s3://b/y.png", FORBIDDEN_SOURCE, "another host", task_id=10)


@pytest.mark.parametrize(
    ("signed", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/iam", "link-local"),  # cloud metadata
        ("http://10.0.0.7/bucket/a.png", "private"),
        ("http://192.168.1.20:9000/bucket/a.png", "private"),
        ("http://[::1]:9000/bucket/a.png", "loopback"),
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://localhost:9000/a.png", "loopback"),
        ("http://no-such-host.invalid/a.png", "unresolvable"),
    ],
)
def test_signed_urls_to_non_public_addresses_are_refused_unless_allowlisted(
    label_studio, signed, kind
):
    _presign(label_studio, 11, Reply(302, headers={"Location": signed}))
    error = fails(source_for(label_studio), "s3://b/a.png", FORBIDDEN_SOURCE, f"a {kind} address",
                  task_id=11)  # fmt: skip
    assert "ALLOWED_IMAGE_HOSTS" in str(error)


def test_a_signed_url_on_loopback_is_read_once_allowlisted(label_studio, image_host):
    image_host.route("/bucket/a.png", Reply(200, IMAGE))
    _presign(label_studio, 12, Reply(302, headers={"Location": f"{image_host.url}/bucket/a.png"}))
    fails(source_for(label_studio), "s3://bucket/a.png", FORBIDDEN_SOURCE, "a loopback address",
          task_id=12)  # fmt: skip
    assert image_host.requests == []  # refused before any connection
    allowed = source_for(label_studio, allowed_image_hosts=("127.0.0.1",))
    assert allowed.fetch("s3://bucket/a.png", 12) == IMAGE


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x.png",
        "http://localhost/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/x.png",
        "http://172.16.0.1/x.png",
        "http://192.168.0.10/x.png",
        "http://[::1]/x.png",
        "http://[fe80::1]/x.png",
        "https://example.com/x.png",
    ],
)
def test_plain_urls_off_label_studios_host_are_refused_whatever_their_address(url):
    """Only LABEL_STUDIO_URL's host and ALLOWED_IMAGE_HOSTS are read: loopback, link-local
    and private addresses are refused like any other host, before any connection."""
    source = source_for(label_studio_url="http://127.0.0.1:9", label_studio_api_key=KEY)
    fails(source, url, FORBIDDEN_SOURCE, "ALLOWED_IMAGE_HOSTS")


# ---------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "face.png").write_bytes(IMAGE)
    (root / "escape.png").symlink_to("/etc/passwd")
    (root / "inside.png").symlink_to(root / "sub" / "face.png")
    (tmp_path / "outside.png").write_bytes(IMAGE)
    os.mkfifo(root / "pipe.png")
    return root


def test_local_files_are_read_under_the_document_root(root):
    source = source_for(local_files_document_root=root)
    assert source.fetch("/data/local-files/?d=sub/face.png") == IMAGE
    assert source.fetch("/data/local-files/?d=sub%2Fface.png") == IMAGE
    assert source.fetch("/data/local-files/?d=inside.png") == IMAGE  # a symlink that stays in
    assert len(source.cache) == 0  # never cached: the file is already local
    (root / "sub" / "face.png").write_bytes(b"new")
    assert source.fetch("/data/local-files/?d=sub/face.png") == b"new"


@pytest.mark.parametrize(
    ("d", "reason", "message"),
    [
        ("../outside.png", FORBIDDEN_SOURCE, "contains '..'"),
        ("sub/../../outside.png", FORBIDDEN_SOURCE, "contains '..'"),
        ("..\\outside.png", FORBIDDEN_SOURCE, "contains '..'"),
        ("/etc/passwd", FORBIDDEN_SOURCE, "is absolute"),
        ("escape.png", FORBIDDEN_SOURCE, "escapes LOCAL_FILES_DOCUMENT_ROOT"),
        ("pipe.png", FORBIDDEN_SOURCE, "not a regular file"),
        ("sub", BAD_REFERENCE, "is a directory"),
        ("missing.png", NOT_FOUND, "file not found: 'missing.png'"),
        ("a%00b", BAD_REFERENCE, "invalid local file path"),
        ("", BAD_REFERENCE, "no ?d="),
    ],
)
def test_local_paths_that_leave_the_root_or_are_not_files_are_refused(root, d, reason, message):
    error = fails(
        source_for(local_files_document_root=root), f"/data/local-files/?d={d}", reason, message
    )
    assert str(root) not in str(error)  # messages name the path the user knows


def test_local_files_over_the_limit_are_refused_before_reading(root):
    small = ImageSource(Settings(local_files_document_root=root), ImageLimits(max_bytes=100))
    fails(small, "/data/local-files/?d=sub/face.png", IMAGE_TOO_LARGE, "limit 100 bytes")


def test_local_files_without_a_root_are_downloaded_from_label_studio(label_studio):
    label_studio.route("/data/local-files/", _needs_key(Reply(200, IMAGE)))
    assert source_for(label_studio).fetch("/data/local-files/?d=sub/face.png") == IMAGE
    (seen,) = label_studio.seen("/data/local-files/")
    assert seen.path == "/data/local-files/?d=sub/face.png"
    fails(source_for(), "/data/local-files/?d=x.png", NOT_CONFIGURED, "LOCAL_FILES_DOCUMENT_ROOT")


# ---------------------------------------------------------------------------------------------
# The cache


def test_downloads_are_cached_by_url_and_the_cache_can_be_off(label_studio):
    source = source_for(label_studio)
    assert source.fetch(UPLOAD) == IMAGE and source.fetch(UPLOAD) == IMAGE
    assert len(label_studio.seen(UPLOAD)) == 1
    assert source.cache.size == len(IMAGE)
    off = source_for(label_studio, image_cache_mb=0)
    off.fetch(UPLOAD)
    off.fetch(UPLOAD)
    assert len(label_studio.seen(UPLOAD)) == 3 and len(off.cache) == 0


def test_the_cache_evicts_least_recently_used_items_to_stay_within_its_bytes():
    cache = ImageCache(max_bytes=250)
    for key in "abc":
        cache.put(key, bytes(100))
    assert cache.get("a") is None and cache.size == 200  # "a" made room for "c"
    assert cache.get("b") is not None  # "b" is now the most recently used
    cache.put("d", bytes(100))
    assert cache.get("c") is None and cache.get("b") is not None
    cache.put("huge", bytes(251))  # bigger than the whole budget: not kept
    assert cache.get("huge") is None and cache.size == 200
    cache.put("b", bytes(10))  # replacing an item frees its old size
    assert cache.size == 110


def test_the_cache_is_thread_safe():
    cache = ImageCache(max_bytes=10_000)
    errors: list[Exception] = []

    def hammer(seed: int) -> None:
        try:
            for i in range(2000):
                key = f"{(seed * 7 + i) % 50}"
                cache.put(key, bytes(100 + (i % 300)))
                cache.get(f"{(seed + i) % 50}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.size <= 10_000
    assert cache.size == sum(len(cache.get(k) or b"") for k in map(str, range(50)))
