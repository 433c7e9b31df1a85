"""Label Studio tokens: legacy keys as `Token`, personal access tokens refreshed into `Bearer`
access tokens, against a stand-in Label Studio on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from fake_label_studio import FakeServer, Reply, Seen, json_reply, unsigned_jwt

from backend.image_source import AUTH_FAILED, ImageSource, ImageSourceError
from backend.ls_auth import (
    LEGACY,
    PERSONAL,
    REFRESH_PATH,
    LabelStudioAuth,
    LabelStudioAuthError,
    jwt_claims,
    key_kind,
)
from backend.settings import Settings

LEGACY_KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
IMAGE = b"\x89PNG\r\n\x1a\n pretend image bytes"


class TokenIssuer:
    """Plays /api/token/refresh/ and an upload that needs the latest access token."""

    def __init__(self, server: FakeServer, pat: str, lifetime_s: float = 300.0) -> None:
        self.pat = pat
        self.lifetime_s = lifetime_s
        self.issued: list[str] = []
        self.refresh_delay_s = 0.0
        self._lock = threading.Lock()
        server.route(REFRESH_PATH, self.refresh)
        server.route("/data/upload/1/face.png", self.upload)

    def refresh(self, seen: Seen) -> Reply:
        if seen.method != "POST" or json.loads(seen.body or b"{}").get("refresh") != self.pat:
            return json_reply({"detail": "Token is invalid or expired"}, 401)
        time.sleep(self.refresh_delay_s)
        with self._lock:
            access = unsigned_jwt(
                {
                    "token_type": "access",
                    "exp": int(time.time() + self.lifetime_s),
                    "n": len(self.issued),
                }
            )
            self.issued.append(access)
        return json_reply({"access": access})

    def revoke_all(self) -> None:
        with self._lock:
            self.issued.append("revoked")  # the latest valid token is no longer the last one

    def upload(self, seen: Seen) -> Reply:
        with self._lock:
            current = self.issued[-1] if self.issued else None
        if current is None or seen.authorization != f"Bearer {current}":
            return json_reply({"detail": "Given token not valid for any token type"}, 401)
        return Reply(200, IMAGE, {"Content-Type": "image/png"})


@pytest.fixture
def label_studio():
    server = FakeServer().start()
    yield server
    server.stop()


def pat(exp_in_s: float = 3600 * 24 * 365) -> str:
    claims = {"token_type": "refresh", "exp": int(time.time() + exp_in_s), "jti": uuid.uuid4().hex}
    return unsigned_jwt(claims)


def test_keys_are_told_apart_by_decoding_only():
    token = pat()
    assert key_kind(token) == PERSONAL
    assert key_kind(LEGACY_KEY) == LEGACY
    assert jwt_claims(token)["token_type"] == "refresh"  # unsigned, yet decoded: never verified
    for not_jwt in ("a.b", "a.!!!.c", "x.e30", "..", LEGACY_KEY, "a.W10.c"):  # W10 = "[]"
        assert jwt_claims(not_jwt) is None


def test_a_legacy_token_is_sent_as_token(label_studio):
    label_studio.route("/data/upload/1/face.png", Reply(200, IMAGE))
    source = ImageSource(
        Settings(label_studio_url=label_studio.url, label_studio_api_key=LEGACY_KEY)
    )
    assert source.fetch("/data/upload/1/face.png", 1) == IMAGE
    (seen,) = label_studio.seen("/data/upload/1/face.png")
    assert seen.authorization == f"Token {LEGACY_KEY}"
    assert label_studio.seen(REFRESH_PATH) == []


def test_a_personal_access_token_is_exchanged_for_a_bearer_access_token(label_studio):
    token = pat()
    issuer = TokenIssuer(label_studio, token)
    source = ImageSource(Settings(label_studio_url=label_studio.url, label_studio_api_key=token))
    assert source.fetch("/data/upload/1/face.png", 1) == IMAGE
    source.cache = type(source.cache)(0)  # no cache: every fetch goes to Label Studio
    assert source.fetch("/data/upload/1/face.png", 1) == IMAGE
    (refresh,) = label_studio.seen(REFRESH_PATH)  # one refresh serves both downloads
    assert refresh.method == "POST" and refresh.headers["content-type"] == "application/json"
    uploads = label_studio.seen("/data/upload/1/face.png")
    assert [s.authorization for s in uploads] == [f"Bearer {issuer.issued[0]}"] * 2
    assert all(token not in (s.authorization or "") for s in uploads)  # the PAT never is Bearer


def test_an_access_token_near_its_exp_is_refreshed_before_use(label_studio):
    token = pat()
    issuer = TokenIssuer(label_studio, token, lifetime_s=20)  # always within the 30 s margin
    auth = LabelStudioAuth(label_studio.url, token)
    first = auth.header()
    second = auth.header()
    assert len(label_studio.seen(REFRESH_PATH)) == 2
    assert (first, second) == tuple(f"Bearer {t}" for t in issuer.issued)

    clock = [time.time()]
    issuer.lifetime_s = 300
    later = LabelStudioAuth(label_studio.url, token, clock=lambda: clock[0])
    header = later.header()
    assert later.header() == header  # 300 s left: reused
    clock[0] += 271  # 29 s left: inside the margin
    assert later.header() != header
    assert len(label_studio.seen(REFRESH_PATH)) == 4


def test_a_401_refreshes_the_access_token_and_retries_once(label_studio):
    token = pat()
    issuer = TokenIssuer(label_studio, token)
    settings = Settings(
        label_studio_url=label_studio.url, label_studio_api_key=token, image_cache_mb=0
    )
    source = ImageSource(settings)
    assert source.fetch("/data/upload/1/face.png", 1) == IMAGE
    issuer.revoke_all()  # Label Studio stops accepting the access token before its exp
    assert source.fetch("/data/upload/1/face.png", 1) == IMAGE
    assert len(label_studio.seen(REFRESH_PATH)) == 2
    statuses = [s.authorization for s in label_studio.seen("/data/upload/1/face.png")]
    assert statuses == [f"Bearer {issuer.issued[0]}"] * 2 + [f"Bearer {issuer.issued[2]}"]


def test_a_401_with_a_legacy_token_is_not_retried_and_names_the_setting(label_studio):
    label_studio.route("/data/upload/1/face.png", json_reply({"detail": "no"}, 401))
    source = ImageSource(
        Settings(label_studio_url=label_studio.url, label_studio_api_key=LEGACY_KEY)
    )
    with pytest.raises(ImageSourceError, match="legacy tokens are enabled") as caught:
        source.fetch("/data/upload/1/face.png", 1)
    assert caught.value.reason == AUTH_FAILED
    assert len(label_studio.seen("/data/upload/1/face.png")) == 1


def test_a_refused_refresh_is_a_clear_auth_failure(label_studio):
    TokenIssuer(label_studio, pat())
    other = pat()  # Label Studio does not know this one
    source = ImageSource(Settings(label_studio_url=label_studio.url, label_studio_api_key=other))
    with pytest.raises(ImageSourceError, match="refused the personal access token") as caught:
        source.fetch("/data/upload/1/face.png", 1)
    assert caught.value.reason == AUTH_FAILED
    assert other not in str(caught.value)
    assert label_studio.seen("/data/upload/1/face.png") == []


def test_refresh_failures_without_an_answer_raise_label_studio_auth_error():
    auth = LabelStudioAuth("http://127.0.0.1:9", pat())  # nothing listens on port 9
    with pytest.raises(LabelStudioAuthError, match="cannot refresh"):
        auth.header()


def test_concurrent_threads_cause_one_refresh(label_studio):
    token = pat()
    issuer = TokenIssuer(label_studio, token)
    issuer.refresh_delay_s = 0.2
    auth = LabelStudioAuth(label_studio.url, token)
    headers: list[str] = []
    threads = [threading.Thread(target=lambda: headers.append(auth.header())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(label_studio.seen(REFRESH_PATH)) == 1
    assert set(headers) == {f"Bearer {issuer.issued[0]}"}


def test_an_expired_personal_access_token_is_reported_at_start(caplog):
    expired = pat(exp_in_s=-60)
    with caplog.at_level("WARNING", logger="backend"):
        LabelStudioAuth("http://127.0.0.1:9", expired)
    assert "personal access token that expired" in caplog.text
    assert expired not in caplog.text
