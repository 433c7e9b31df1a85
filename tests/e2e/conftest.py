"""Session fixtures for the end-to-end tests: a real Label Studio and this backend, on loopback.

Label Studio runs from its own venv (`.venv-ls`, `make venv-ls`; `make test` builds it). Its
first start migrates a fresh SQLite database (~30-50 s), so that is done once and kept as a
template under `.cache/label-studio-template-<version>/` (git-ignored; rebuilt when missing or
not valid), and each session starts from a copy of it (a few seconds). Both servers listen on
127.0.0.1 only, on free ports; their logs stay in the session's tmp dir and their tails are
printed when a test or a start-up fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"
LS_BIN = LS_VENV / "bin" / "label-studio"
CACHE = REPO / ".cache"

# Fixed test-only credentials (the servers listen on 127.0.0.1 only). They are baked into the
# template database, so changing them rebuilds the template.
LS_USERNAME = "e2e@example.com"
LS_PASSWORD = "e2e-Password-123"
LS_TOKEN = "e2e0" + "5eed" * 9  # LABEL_STUDIO_USER_TOKEN: 40 hex digits (a legacy API token)
ML_USER = "ls-e2e"
ML_PASS = "e2e-basic-auth-pass"

MIGRATE_TIMEOUT_S = 300  # first start: migrations (~30-50 s on a CI machine)
START_TIMEOUT_S = 120  # later starts from the template (~4 s)
BACKEND_TIMEOUT_S = 180  # detector warm-up before the backend listens
LOG_TAIL_LINES = 60

# Run Label Studio's own settings module, but keep it off any Redis on localhost:6379 (its RQ
# settings hard-code that address). With a Redis there, LS queues jobs -- data migrations,
# webhooks, counters -- for RQ workers that never run, and writes into that Redis.
_LS_SETTINGS_SHIM = """\
import importlib.util
import os

from core.settings import base as _base

for _q in _base.RQ_QUEUES.values():
    _q.pop("HOST", None)
    _q.pop("PORT", None)
    _q["UNIX_SOCKET_PATH"] = os.environ["E2E_NO_REDIS_SOCKET"]  # a path that does not exist

# Run label_studio.core.settings.label_studio as this module: it reads django.conf.settings while
# loading, which has to find this partly run module as it would find its own.
_spec = importlib.util.find_spec("label_studio.core.settings.label_studio")
exec(compile(open(_spec.origin).read(), _spec.origin, "exec"), globals())
"""


@dataclass
class Server:
    """A server process started by a fixture, with its log."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    auth: tuple[str, str] | None = None  # HTTP basic auth it requires

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        _stop(self.proc)


@dataclass
class LabelStudio(Server):
    token: str = LS_TOKEN
    username: str = LS_USERNAME
    password: str = LS_PASSWORD
    data_dir: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}


_SERVERS: list[Server] = []  # what the report hook prints on failure


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "e2e" in item.keywords:
        for server in _SERVERS:
            report.sections.append(
                (f"{server.name} log tail ({server.log_path})", server.log_tail())
            )


# ---------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the process group started for `proc`, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
    try:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: _stop reaches its children too
        )
    finally:
        log.close()


def _wait_until(server: Server, ready, timeout_s: float, what: str, poll_s: float = 0.5) -> float:
    """Poll `ready()` until it is true; fail with the log tail on exit or timeout."""
    started = time.monotonic()
    last_error = ""
    while time.monotonic() - started < timeout_s:
        if server.proc.poll() is not None:
            pytest.fail(
                f"{server.name} exited with {server.proc.returncode} before {what}.\n"
                f"--- {server.log_path} (tail) ---\n{server.log_tail()}",
                pytrace=False,
            )
        try:
            if ready():
                return time.monotonic() - started
        except requests.RequestException as e:
            last_error = f"{type(e).__name__}: {e}"
        time.sleep(poll_s)
    server.stop()
    pytest.fail(
        f"{server.name} not {what} after {timeout_s:.0f} s ({last_error or 'no answer'}).\n"
        f"--- {server.log_path} (tail) ---\n{server.log_tail()}",
        pytrace=False,
    )


def installed_ls_version() -> str:
    """The label-studio version in .venv-ls, from its dist-info (no import: that takes seconds)."""
    found = sorted(LS_VENV.glob("lib/python3*/site-packages/label_studio-*.dist-info"))
    if not LS_BIN.exists() or not found:
        pytest.fail(
            f"Label Studio is not installed in {LS_VENV}; run `make venv-ls` (or `make test`)",
            pytrace=False,
        )
    return found[-1].name.removeprefix("label_studio-").removesuffix(".dist-info")


def _ls_env(data_dir: Path, shim_dir: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # nothing from the project venv or this process's LS/Django settings leaks in
        if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV", "PYTHON", "BASIC_AUTH"))
        and k not in ("HOST", "PORT")
    }
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=LS_USERNAME,
        LABEL_STUDIO_PASSWORD=LS_PASSWORD,
        LABEL_STUDIO_USER_TOKEN=LS_TOKEN,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        # offline and quiet: no version check, analytics or Sentry
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        PYTHONPATH=str(shim_dir),
        DJANGO_SETTINGS_MODULE="e2e_ls_settings",
        E2E_NO_REDIS_SOCKET=str(shim_dir / "no-redis.sock"),
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO",
    )
    return env


def _start_label_studio(
    data_dir: Path, work_dir: Path, timeout_s: float, name: str = "Label Studio"
) -> tuple[LabelStudio, float]:
    shim_dir = work_dir / "ls-settings"
    shim_dir.mkdir(parents=True, exist_ok=True)
    (shim_dir / "e2e_ls_settings.py").write_text(_LS_SETTINGS_SHIM)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work_dir / f"{data_dir.name}.log"
    cmd = [
        str(LS_BIN), "start", "--no-browser",
        "--internal-host", "127.0.0.1",  # the address it binds (`--host` only names it in links)
        "--host", url,
        "--port", str(port),
    ]  # fmt: skip
    proc = _start(cmd, _ls_env(data_dir, shim_dir, port), log_path, cwd=work_dir)
    ls = LabelStudio(name=name, url=url, proc=proc, log_path=log_path, data_dir=data_dir)

    def ready() -> bool:
        r = requests.get(f"{url}/api/projects", headers=ls.headers, timeout=5)
        return r.status_code == 200

    return ls, _wait_until(ls, ready, timeout_s, "answering GET /api/projects with 200")


def _template_marker(version: str) -> dict[str, str]:
    """What a template was built for; another value means it must be rebuilt."""
    return {
        "label_studio": version,
        "user": LS_USERNAME,
        "password": LS_PASSWORD,
        "token": LS_TOKEN,
    }


def _template_is_valid(template: Path, version: str) -> bool:
    try:
        marker = json.loads((template / "e2e-template.json").read_text())
        if marker != _template_marker(version):
            return False
        db = sqlite3.connect(f"file:{template / 'label_studio.sqlite3'}?mode=ro", uri=True)
        try:
            users = db.execute("select count(*) from htx_user where email = ?", (LS_USERNAME,))
            tokens = db.execute("select count(*) from authtoken_token where key = ?", (LS_TOKEN,))
            return users.fetchone()[0] == 1 and tokens.fetchone()[0] == 1
        finally:
            db.close()
    except (OSError, ValueError, sqlite3.Error):
        return False


def _build_template(template: Path, version: str, work_dir: Path) -> float:
    """Start LS once on an empty data dir (migrations, user, token), stop it, keep the dir."""
    building = template.with_name(f"{template.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        ls, seconds = _start_label_studio(
            building, work_dir, MIGRATE_TIMEOUT_S, "Label Studio (first start: migrations)"
        )
        ls.stop()
        (building / "e2e-template.json").write_text(json.dumps(_template_marker(version)))
        shutil.rmtree(template, ignore_errors=True)
        building.rename(template)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already unless something failed
    return seconds


# ---------------------------------------------------------------------------------------------
# Fixtures


def _say(config: pytest.Config, message: str) -> None:
    """A line on the terminal even under -q and output capture (start-up timings)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n[e2e] {message}")


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's working dir: data dirs, logs, screenshots."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def label_studio(e2e_dir: Path, pytestconfig: pytest.Config) -> Iterator[LabelStudio]:
    """A running Label Studio (fresh copy of the migrated template), ready for API calls."""
    version = installed_ls_version()
    template = CACHE / f"label-studio-template-{version}"
    if not _template_is_valid(template, version):
        seconds = _build_template(template, version, e2e_dir)
        _say(
            pytestconfig,
            f"migrated a Label Studio {version} template in {seconds:.1f} s: {template}",
        )
    data_dir = e2e_dir / "label-studio-data"
    shutil.copytree(template, data_dir)
    ls, seconds = _start_label_studio(data_dir, e2e_dir, START_TIMEOUT_S)
    _say(
        pytestconfig,
        f"Label Studio {version} ready in {seconds:.1f} s at {ls.url} (log {ls.log_path})",
    )
    _SERVERS.append(ls)
    try:
        yield ls
    finally:
        ls.stop()


@contextmanager
def running_backend(
    e2e_dir: Path, label_studio: LabelStudio, name: str, **extra_env: str
) -> Iterator[Server]:
    """This backend (`python -m backend.server`), with basic auth, pointed at `label_studio`,
    its models under e2e_dir/<name>-models and its log at e2e_dir/<name>.log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model_dir = e2e_dir / f"{name}-models"
    model_dir.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("LABEL_STUDIO_", "BASIC_AUTH", "ALLOWED_IMAGE", "PROMETHEUS_", "REDIS_", "TRAIN_")
        )
    }
    env.update(
        PORT=str(port),
        HOST="127.0.0.1",
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.token,
        BASIC_AUTH_USER=ML_USER,
        BASIC_AUTH_PASS=ML_PASS,
        MODEL_DIR=str(model_dir),
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    log_path = e2e_dir / f"{name}.log"
    proc = _start([sys.executable, "-m", "backend.server"], env, log_path, cwd=REPO)
    server = Server(name=name, url=url, proc=proc, log_path=log_path, auth=(ML_USER, ML_PASS))
    _SERVERS.append(server)

    def ready() -> bool:
        r = requests.get(f"{url}/health", auth=(ML_USER, ML_PASS), timeout=5)
        return r.status_code == 200

    try:
        _wait_until(server, ready, BACKEND_TIMEOUT_S, "answering /health")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def start_backend(e2e_dir: Path, label_studio: LabelStudio):
    """`start_backend(name, **env)`: a context manager running another backend (basic auth,
    pointed at `label_studio`) with extra environment, e.g. TRAIN_* settings."""

    def start(name: str, **extra_env: str):
        return running_backend(e2e_dir, label_studio, name, **extra_env)

    return start


@pytest.fixture(scope="session")
def backend(
    e2e_dir: Path, label_studio: LabelStudio, pytestconfig: pytest.Config
) -> Iterator[Server]:
    """This backend with basic auth and default settings, pointed at `label_studio`."""
    started = time.monotonic()
    with running_backend(e2e_dir, label_studio, "backend") as server:
        _say(pytestconfig, f"backend ready in {time.monotonic() - started:.1f} s at "
             f"{server.url} (log {server.log_path})")  # fmt: skip
        yield server


@pytest.fixture(scope="session")
def personal_access_token(label_studio: LabelStudio) -> Iterator[str]:
    """A personal access token (JWT refresh token) of the e2e user, revoked at the end.

    Label Studio allows one per user, so every test that needs one shares this."""
    made = requests.post(f"{label_studio.url}/api/token/", headers=label_studio.headers,
                         timeout=30)  # fmt: skip
    assert made.status_code == 201, (
        f"cannot create a personal access token for the e2e user ({made.status_code}: {made.text})"
    )
    token = made.json()["token"]
    yield token
    requests.post(f"{label_studio.url}/api/token/blacklist/", json={"refresh": token},
                  headers=label_studio.headers, timeout=30)  # fmt: skip
