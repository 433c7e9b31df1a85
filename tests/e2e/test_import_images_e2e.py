"""scripts/import_images.py, run as a user runs it, against a real Label Studio and this backend.

- Eight face photos (two folders deep, one with an upper-case extension) and one damaged JPEG,
  legacy token, backend credentials from the environment, --preannotate: the project is created
  with label_config/pupils.xml, the backend connected with basic auth, the model's webhook
  carries the backend's credentials (and Label Studio's events are accepted), the eight photos
  are tasks carrying their sha256, the damaged one is reported, and every task has the
  backend's prediction with a score under the project's model version.
- The same command again imports nothing, adds no second model, webhook or prediction; a
  webhook deleted in Label Studio is made again with the credentials.
- A wrong token: exit status 1 and one `error:` line.
- A personal access token and a list of URLs (Label Studio's own upload URLs, which the backend
  downloads with its key), pre-annotated too.
- A backend that cannot reach Label Studio: its predict job fails, and the script stops waiting
  at once with exit status 1 and the job's error (not after --timeout).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "import_images.py"
LABEL_CONFIG = (REPO / "label_config" / "pupils.xml").read_text(encoding="utf-8")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

N_FACES = 8
TITLE = "Import e2e"


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Eight faces under photos/ and photos/more/, one named .PNG, and a damaged broken.jpg."""
    sys.path.insert(0, str(REPO / "tests"))
    from face_dataset import write_dataset

    root = tmp_path_factory.mktemp("import") / "photos"
    write_dataset(root, N_FACES, seed=21)
    (root / "eyes.csv").unlink()
    (root / "more").mkdir()
    for i in range(N_FACES // 2, N_FACES):
        (root / f"face_{i:03d}.png").rename(root / "more" / f"face_{i:03d}.png")
    (root / "face_000.png").rename(root / "face_000.PNG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 cut short")
    return root


@pytest.fixture(scope="module")
def backend(start_backend):
    with start_backend("import-backend") as server:
        yield server


def run_script(*args: str, env: dict[str, str], timeout_s: float = 240) -> tuple[int, str, str]:
    """The script as a subprocess; (exit status, stdout, stderr)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH"))}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-progress", *args], cwd=REPO, env={**clean, **env},
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    print(done.stdout, done.stderr, sep="\n")
    return done.returncode, done.stdout, done.stderr


def seconds_in(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    assert found, (pattern, text)
    return float(found.group(1))


class Api:
    """Plain requests to Label Studio with the legacy token (what the tests check with)."""

    def __init__(self, label_studio) -> None:
        self.url, self.headers = label_studio.url, label_studio.headers

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        r = requests.request(method, self.url + path, headers=self.headers, timeout=60, **kwargs)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r

    def project(self, title: str) -> dict:
        found = [p for p in self("GET", "/api/projects", params={"page_size": 1000}).json()
                 ["results"] if p["title"] == title]  # fmt: skip
        assert len(found) == 1, found
        return self("GET", f"/api/projects/{found[0]['id']}").json()

    def tasks(self, pid: int) -> list[dict]:
        params = {"project": pid, "fields": "all", "page_size": 1000}
        return self("GET", "/api/tasks", params=params).json()["tasks"]


def check_predicted(api: Api, pid: int, tasks: list[dict]) -> str:
    """Every task has exactly one prediction of the project's model version, with a score and
    the six points; the version, which is the coarse detector's (nothing promoted)."""
    version = api("GET", f"/api/projects/{pid}").json()["model_version"]
    assert version.startswith("coarse-"), version
    for task in tasks:
        mine = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(mine) == 1, (task["id"], task["predictions"])
        assert 0.0 < mine[0]["score"] <= 1.0 and len(mine[0]["result"]) == 6, mine[0]
        assert task["predictions_score"] is not None
    return version


def test_import_connects_the_backend_preannotates_and_a_rerun_adds_nothing(
    label_studio, backend, faces
):
    api = Api(label_studio)
    user, password = backend.auth
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "BASIC_AUTH_USER": user, "BASIC_AUTH_PASS": password}  # fmt: skip
    args = ("--project", TITLE, "--images", str(faces), "--backend-url", backend.url,
            "--preannotate")  # fmt: skip
    started = time.monotonic()
    code, out, err = run_script(*args, env=env)
    wall = time.monotonic() - started
    assert code == 0, err
    assert "imported: 8" in out and "skipped (already in the project): 0" in out
    assert re.search(r"failed: 1\n  broken\.jpg: not a usable image", out), out
    imported_s = seconds_in(out, r"import took ([\d.]+) s")
    predicted_s = seconds_in(out, r"pre-annotated: .*\(([\d.]+) s\)")
    print(
        f"\n[e2e] import of {N_FACES} images: {imported_s:.1f} s; pre-annotation: "
        f"{predicted_s:.1f} s; whole run (with start-up and checks) {wall:.1f} s"
    )

    project = api.project(TITLE)
    pid = project["id"]
    assert project["label_config"].strip() == LABEL_CONFIG.strip()
    (model,) = api("GET", "/api/ml", params={"project": pid}).json()
    assert model["url"] == backend.url and model["state"] == "CO"
    assert model["auth_method"] == "BASIC_AUTH" and model["basic_auth_user"] == user
    hooks = [h for h in api("GET", "/api/webhooks/", params={"project": pid}).json()
             if h["url"] == f"{backend.url}/webhook"]  # fmt: skip
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert len(hooks) == 1 and hooks[0]["headers"] == {"Authorization": f"Basic {token}"}

    tasks = api.tasks(pid)
    files = sorted(p for p in faces.rglob("*") if p.suffix.lower() == ".png")
    assert len(tasks) == len(files) == N_FACES
    assert {t["data"]["sha256"] for t in tasks} == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }
    assert {t["data"]["source"] for t in tasks} == {p.relative_to(faces).as_posix() for p in files}
    assert all(t["data"]["image"].startswith(f"/data/upload/{pid}/") for t in tasks)
    version = check_predicted(api, pid, tasks)
    # Label Studio's events (TASKS_CREATED, ...) reached the backend with its credentials.
    log = backend.log_path.read_text()
    assert "path=/webhook status=200" in log and "auth refused path=/webhook" not in log

    code, out, err = run_script(*args, env=env)
    assert code == 0, err
    assert "imported: 0" in out and "skipped (already in the project): 8" in out
    assert "backend: " in out and "(connected); webhook: ok" in out
    assert len(api("GET", "/api/ml", params={"project": pid}).json()) == 1
    assert len([h for h in api("GET", "/api/webhooks/", params={"project": pid}).json()
                if h["url"] == f"{backend.url}/webhook"]) == 1  # fmt: skip
    tasks = api.tasks(pid)
    assert len(tasks) == N_FACES and check_predicted(api, pid, tasks) == version

    # A deleted webhook is made again, with the credentials.
    api("DELETE", f"/api/webhooks/{hooks[0]['id']}/")
    one = str(sorted(faces.glob("*.png"))[0])
    code, out, err = run_script("--project", TITLE, "--images", one, "--backend-url",
                                backend.url, env=env)  # fmt: skip
    assert code == 0 and "webhook: created with basic auth" in out and "imported: 0" in out, err
    (hook,) = [h for h in api("GET", "/api/webhooks/", params={"project": pid}).json()
               if h["url"] == f"{backend.url}/webhook"]  # fmt: skip
    assert hook["headers"] == {"Authorization": f"Basic {token}"} and hook["send_payload"]


def test_a_wrong_token_is_one_error_line_and_a_failure(label_studio, faces):
    code, out, err = run_script(
        "--url", label_studio.url, "--api-key", "0" * 40, "--project", "never made",
        "--images", str(faces), env={},
    )  # fmt: skip
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "refused the API key (HTTP 401" in errors[0]
    titles = [p["title"] for p in Api(label_studio)("GET", "/api/projects").json()["results"]]
    assert "never made" not in titles


def test_a_personal_access_token_and_a_list_of_urls(
    label_studio, backend, faces, tmp_path, personal_access_token
):
    api = Api(label_studio)
    pat = personal_access_token
    # Two photos uploaded to a scratch project: their Label Studio URLs are the list.
    scratch = api(
        "POST", "/api/projects", json={"title": "URL source", "label_config": LABEL_CONFIG}
    ).json()["id"]
    photos = sorted(faces.glob("*.png"))[:2]
    files = {f"file{i}": (p.name, p.read_bytes(), "image/png") for i, p in enumerate(photos)}
    api("POST", f"/api/projects/{scratch}/import", files=files)
    urls = [label_studio.url + t["data"]["image"] for t in api.tasks(scratch)]
    listing = tmp_path / "urls.txt"
    listing.write_text("# faces\n\n" + "\n".join(urls) + "\nftp://elsewhere/x.jpg\n")

    user, password = backend.auth
    code, out, err = run_script(
        "--url", label_studio.url, "--api-key", pat, "--project", "Import e2e URLs",
        "--images", str(listing), "--backend-url", backend.url, "--backend-user", user,
        "--backend-password", password, "--preannotate", env={},
    )  # fmt: skip
    assert code == 0, err
    assert "(personal access token)" in err
    assert "imported: 2" in out and "ftp://elsewhere/x.jpg: not an image URL" in out
    pid = api.project("Import e2e URLs")["id"]
    tasks = api.tasks(pid)
    assert sorted(t["data"]["image"] for t in tasks) == sorted(urls)
    assert {t["data"]["sha256"] for t in tasks} == {
        hashlib.sha256(u.encode()).hexdigest() for u in urls
    }
    check_predicted(api, pid, tasks)


def e2e_conftest(config: pytest.Config):
    """tests/e2e/conftest.py as pytest loaded it: its running_backend takes any Label Studio
    address, which the start_backend fixture does not."""
    path = str(Path(__file__).with_name("conftest.py"))
    return next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", "") == path)


def test_a_failed_predict_job_ends_the_wait_at_once_with_its_error(
    label_studio, faces, e2e_dir, pytestconfig
):
    e2e = e2e_conftest(pytestconfig)
    nowhere = dataclasses.replace(label_studio, url=f"http://127.0.0.1:{e2e.free_port()}")
    with e2e.running_backend(e2e_dir, nowhere, "import-lost-backend") as backend:
        user, password = backend.auth
        started = time.monotonic()
        code, out, err = run_script(
            "--url", label_studio.url, "--api-key", label_studio.token, "--project",
            "Import e2e lost backend", "--images", str(faces), "--backend-url", backend.url,
            "--backend-user", user, "--backend-password", password, "--preannotate",
            "--timeout", "500", env={},
        )  # fmt: skip
        seconds = time.monotonic() - started
    assert code == 1 and "imported: 8" in out, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    job = re.search(r"pre-annotation queued: job (\S+),", out)
    assert job, out
    assert errors[0].startswith(
        f"error: pre-annotation failed: the backend's job {job.group(1)} failed: GET "
        f"{nowhere.url}/api/projects/"
    ), errors[0]
    assert "no answer from Label Studio (ConnectionError" in errors[0]
    assert seconds < 200, f"the script waited {seconds:.0f} s: the failure did not end the wait"
