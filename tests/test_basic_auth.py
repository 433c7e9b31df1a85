"""BASIC_AUTH_USER / BASIC_AUTH_PASS: every route asks for them, nothing logs them."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from backend import basic_auth
from backend.server import create_app
from backend.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = (ROOT / "label_config" / "pupils.xml").read_text(encoding="utf-8")
USER = "studio-bot-3f9a"
PASSWORD = "pässwörd with spaces 7c21"  # not ASCII: sent as UTF-8, as Label Studio does

ROUTES = [
    ("GET", "/", None),
    ("GET", "/health", None),
    ("GET", "/versions", None),
    ("GET", "/metrics", None),
    ("POST", "/setup", {"project": "1.1", "schema": CONFIG}),
    ("POST", "/predict", {"tasks": [], "label_config": CONFIG}),
    ("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
    ("GET", "/no/such/route", None),
    ("DELETE", "/predict", None),
]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def client():
    return create_app(Settings(basic_auth_user=USER, basic_auth_pass=PASSWORD)).test_client()


def call(client, method: str, path: str, body, headers=None):
    return client.open(path, method=method, json=body, headers=headers or {})


@pytest.mark.parametrize(
    "headers",
    [
        None,
        basic(USER, "wrong"),
        basic("wrong", PASSWORD),
        basic(USER, PASSWORD + " "),
        basic(USER.upper(), PASSWORD),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},  # no colon
        {"Authorization": "Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    ],
    ids=[
        "none",
        "wrong-pass",
        "wrong-user",
        "pass-suffix",
        "user-case",
        "junk",
        "no-colon",
        "bearer",
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_answers_401_without_the_right_credentials(client, method, path, body, headers):
    response = call(client, method, path, body, headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="pupil-backend"'
    assert response.is_json
    assert response.get_json()["status"] == 401
    assert "basic auth" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [(*route, status) for route, status in zip(ROUTES, [200] * 7 + [404, 405], strict=True)],
)
def test_the_right_credentials_open_every_route(client, method, path, body, status):
    response = call(client, method, path, body, basic(USER, PASSWORD))
    assert response.status_code == status
    assert "WWW-Authenticate" not in response.headers


def test_credentials_never_reach_the_logs(client, caplog):
    with caplog.at_level(logging.DEBUG):
        for headers in (None, basic(USER, "guess"), basic(USER, PASSWORD)):
            for method, path, body in ROUTES:
                call(client, method, path, body, headers)
    text = caplog.text
    assert "auth refused" in text  # refusals are logged ...
    for secret in (USER, PASSWORD, "guess", basic(USER, PASSWORD)["Authorization"][6:]):
        assert secret not in text  # ... but never with what was sent or expected


def test_user_and_password_are_both_compared_in_constant_time(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = basic_auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(basic_auth.hmac, "compare_digest", spy)
    header = basic("intruder", "x")["Authorization"]
    assert basic_auth.credentials_match(header, USER, PASSWORD) is False
    assert len(compared) == 2  # the password is compared even though the user is wrong
    assert all(len(a) == len(b) == 32 for a, b in compared)  # digests: lengths never leak
    assert basic_auth.credentials_match(basic(USER, PASSWORD)["Authorization"], USER, PASSWORD)


def test_only_one_of_user_and_password_is_a_start_up_error():
    with pytest.raises(ValueError, match="BASIC_AUTH_USER is set but BASIC_AUTH_PASS is not"):
        Settings(basic_auth_user=USER)
    with pytest.raises(ValueError, match="BASIC_AUTH_PASS is set but BASIC_AUTH_USER is not"):
        Settings.from_env({"BASIC_AUTH_PASS": PASSWORD})


def test_without_settings_no_route_asks_for_credentials():
    client = create_app(Settings()).test_client()
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
