"""End to end against a real Label Studio (1.23.2, from .venv-ls): what a user does, checked.

Create a project with label_config/pupils.xml, connect this backend as its model (basic auth),
upload face photos, press "Retrieve Predictions" (the Data Manager action), then read the tasks
back and check the predictions, the "Prediction score" column, a view ordered by it, and the
labelling page in a real browser (Debian's chromium through playwright; screenshot saved in the
session tmp dir, and to docs/images/label-studio-preannotated.png with UPDATE_SCREENSHOTS=1).

The servers come from tests/e2e/conftest.py.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from label_studio_sdk import LabelStudio as LabelStudioClient
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LABEL_CONFIG = REPO / "label_config" / "pupils.xml"
ASTRONAUT = REPO / "tests" / "data" / "astronaut.png"
SCREENSHOT_DOC = REPO / "docs" / "images" / "label-studio-preannotated.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

KEYPOINT_LABELS = {
    "left_pupil",
    "right_pupil",
    "left_eye_outer",
    "left_eye_inner",
    "right_eye_inner",
    "right_eye_outer",
}
# Pupil centres in tests/data/astronaut.png (512x512), image pixels; see tests/conftest.py.
ASTRONAUT_PUPILS = {"left_pupil": (246.7, 103.5), "right_pupil": (203.3, 101.1)}
TOLERANCE = 0.015  # of the image width
EXIF_CROP_HEIGHT = 384  # the EXIF test photo is the astronaut's top 512x384, stored on its side


@dataclass(frozen=True)
class Upload:
    """An image uploaded as a task: what the browser shows is `width` x `height`."""

    name: str
    data: bytes
    mime: str
    width: int
    height: int
    faces: int


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_uploads(tmp: Path) -> dict[str, Upload]:
    """The astronaut, the astronaut as an EXIF-rotated JPEG, two astronauts, and no face."""
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    w, h = astronaut.size

    # Shown as 512x384 (the top of the photo); stored as 384x512 pixels turned a quarter to the
    # left, with EXIF Orientation 6 ("rotate 90 CW to display"). Without the EXIF transpose
    # the size and every point would be wrong.
    shown = astronaut.crop((0, 0, w, EXIF_CROP_HEIGHT))
    stored = shown.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    exif_jpeg = buf.getvalue()
    assert Image.open(io.BytesIO(exif_jpeg)).size == (EXIF_CROP_HEIGHT, w)

    pair = Image.new("RGB", (2 * w, h))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut, (w, 0))

    # No face: smooth colour gradients and a few flat shapes.
    blank = Image.new("RGB", (400, 300))
    blank.putdata([(x * 255 // 399, y * 255 // 299, 128) for y in range(300) for x in range(400)])
    blank.paste((30, 30, 30), (40, 40, 140, 120))
    blank.paste((230, 230, 230), (250, 160, 360, 260))

    uploads = [
        Upload("astronaut.png", ASTRONAUT.read_bytes(), "image/png", w, h, 1),
        Upload("astronaut-exif-rotated.jpg", exif_jpeg, "image/jpeg", w, EXIF_CROP_HEIGHT, 1),
        Upload("two-astronauts.png", _png(pair), "image/png", 2 * w, h, 2),
        Upload("no-face.png", _png(blank), "image/png", 400, 300, 0),
    ]
    for upload in uploads:  # kept for looking at after a failure
        (tmp / upload.name).write_bytes(upload.data)
    return {u.name: u for u in uploads}


@dataclass
class PredictedProject:
    client: LabelStudioClient
    ls: Any  # conftest.LabelStudio
    project_id: int
    uploads: dict[str, Upload]
    task_ids: dict[str, int]  # upload name -> task id
    tasks: dict[str, dict]  # upload name -> task (fields=all) right after the predictions


def _list_tasks(client: LabelStudioClient, project_id: int, **params) -> list[dict]:
    tasks = client.tasks.list(project=project_id, fields="all", page_size=100, **params)
    return [t.dict() for t in tasks]


def _upload_name(task: dict, uploads: dict[str, Upload]) -> str:
    # task data: {"image": "/data/upload/<project>/<8 hex>-<original name>"}
    image = task["data"]["image"]
    matches = [name for name in uploads if image.endswith("-" + name)]
    assert len(matches) == 1, f"task {task['id']}: cannot tell which upload {image!r} is"
    return matches[0]


def predicted_project(
    label_studio: Any, backend: Any, title: str, config: Path, uploads: dict[str, Upload]
) -> PredictedProject:
    """What a user does: create a project, connect the backend, upload, Retrieve Predictions."""
    client = LabelStudioClient(base_url=label_studio.url, api_key=label_studio.token)
    pid = client.projects.create(title=title, label_config=config.read_text(encoding="utf-8")).id

    # Settings -> Model -> Connect Model, with basic auth. LS calls /health and /setup.
    ml = client.ml.create(
        project=pid,
        url=backend.url,
        title="pupil-backend",
        auth_method="BASIC_AUTH",
        basic_auth_user=backend.auth[0],
        basic_auth_pass=backend.auth[1],
    )
    ml = client.ml.get(ml.id)  # re-checks /health and /setup
    assert ml.state == "CO", f"LS reports the backend as {ml.readable_state}: {ml.error_message}"
    assert ml.model_version, "LS kept no model_version from /setup"

    # Upload: one multipart form field per file (the same name twice imports only one).
    files = {f"file{i}": (u.name, u.data, u.mime) for i, u in enumerate(uploads.values())}
    r = requests.post(
        f"{label_studio.url}/api/projects/{pid}/import",
        headers=label_studio.headers,
        files=files,
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert r.json()["task_count"] == len(uploads), r.text

    # Data Manager: select all -> Actions -> "Retrieve Predictions" (one /predict for all).
    client.actions.create(
        id="retrieve_tasks_predictions",
        project=pid,
        selected_items={"all": True, "excluded": []},
        request_options={"timeout_in_seconds": 120},
    )

    tasks = {_upload_name(t, uploads): t for t in _list_tasks(client, pid)}
    assert set(tasks) == set(uploads)
    return PredictedProject(
        client=client,
        ls=label_studio,
        project_id=pid,
        uploads=uploads,
        task_ids={name: t["id"] for name, t in tasks.items()},
        tasks=tasks,
    )


@pytest.fixture(scope="module")
def project(
    label_studio: Any, backend: Any, tmp_path_factory: pytest.TempPathFactory
) -> PredictedProject:
    """A project with the backend connected, four images uploaded and predictions retrieved."""
    uploads = build_uploads(tmp_path_factory.mktemp("uploads"))
    return predicted_project(label_studio, backend, "Pupils e2e", LABEL_CONFIG, uploads)


def _prediction(task: dict) -> dict:
    predictions = task["predictions"]
    assert len(predictions) == 1, f"task {task['id']}: {len(predictions)} predictions"
    return predictions[0]


def _points(prediction: dict, upload: Upload) -> list[tuple[str, float, float]]:
    """(label, x px, y px) per keypoint, after checking the region's shape."""
    points = []
    for region in prediction["result"]:
        assert region["type"] == "keypointlabels", region
        assert region["from_name"] == "keypoints" and region["to_name"] == "image", region
        assert (region["original_width"], region["original_height"]) == (
            upload.width,
            upload.height,
        ), f"{upload.name}: region size is not the (EXIF-transposed) image size: {region}"
        value = region["value"]
        (label,) = value["keypointlabels"]
        assert label in KEYPOINT_LABELS, region
        assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100, region
        points.append((label, value["x"] / 100 * upload.width, value["y"] / 100 * upload.height))
    return points


def _assert_pupils(points, upload: Upload, dx: float = 0.0) -> None:
    """Each astronaut pupil (shifted right by `dx` px) has a predicted point within tolerance."""
    limit = TOLERANCE * upload.width
    for label, (ex, ey) in ASTRONAUT_PUPILS.items():
        found = [math.dist((x, y), (ex + dx, ey)) for name, x, y in points if name == label]
        assert found and min(found) <= limit, (
            f"{upload.name}: {label} expected near ({ex + dx:.1f}, {ey:.1f}) px, got "
            f"{[(round(x, 1), round(y, 1)) for n, x, y in points if n == label]} "
            f"(limit {limit:.1f} px)"
        )


def test_face_tasks_get_keypoint_predictions(project: PredictedProject) -> None:
    for name, upload in project.uploads.items():
        if not upload.faces:
            continue
        prediction = _prediction(project.tasks[name])
        version = prediction["model_version"]
        assert isinstance(version, str) and version.strip(), prediction
        assert isinstance(prediction["score"], float) and 0 <= prediction["score"] <= 1
        points = _points(prediction, upload)
        counts = Counter(label for label, _, _ in points)
        # every label once per face (the two-astronaut image's exact count: test below)
        assert set(counts) == KEYPOINT_LABELS and len(set(counts.values())) == 1, counts
        assert len(points) >= 6 * upload.faces, f"{name}: {len(points)} keypoints"


def test_astronaut_pupils_where_they_are(project: PredictedProject) -> None:
    upload = project.uploads["astronaut.png"]
    _assert_pupils(_points(_prediction(project.tasks[upload.name]), upload), upload)


def test_exif_rotated_jpeg_is_predicted_upright(project: PredictedProject) -> None:
    upload = project.uploads["astronaut-exif-rotated.jpg"]
    _assert_pupils(_points(_prediction(project.tasks[upload.name]), upload), upload)


def test_two_faces_are_both_found(project: PredictedProject) -> None:
    upload = project.uploads["two-astronauts.png"]
    points = _points(_prediction(project.tasks[upload.name]), upload)
    single = project.uploads["astronaut.png"]  # same tolerance in px as for one astronaut
    for dx in (0.0, single.width):
        _assert_pupils(points, single, dx=dx)


def test_two_faces_give_twelve_keypoints(project: PredictedProject) -> None:
    upload = project.uploads["two-astronauts.png"]
    points = _points(_prediction(project.tasks[upload.name]), upload)
    assert len(points) == 12, (
        f"{len(points)} keypoints: {sorted(Counter(p[0] for p in points).items())}"
    )


def test_no_face_gets_an_empty_prediction_with_score_zero(project: PredictedProject) -> None:
    prediction = _prediction(project.tasks["no-face.png"])
    assert prediction["result"] == []
    assert prediction["score"] == 0
    assert isinstance(prediction["model_version"], str) and prediction["model_version"]


def test_prediction_score_column_and_lowest_score_first(project: PredictedProject) -> None:
    client, pid = project.client, project.project_id
    versions = {_prediction(t)["model_version"] for t in project.tasks.values()}
    assert len(versions) == 1, versions
    (version,) = versions

    # The column stays empty until the project's model version is the predictions' version.
    client.projects.update(pid, model_version=version)
    tasks = _list_tasks(client, pid)
    assert len(tasks) == len(project.uploads)
    for task in tasks:
        assert task["predictions_score"] is not None, f"task {task['id']}: no Prediction score"
        assert math.isclose(task["predictions_score"], _prediction(task)["score"])

    # A Data Manager tab ordered by Prediction score, lowest first: the no-face task leads.
    view = client.views.create(
        project=pid,
        data={"title": "Least confident first", "ordering": ["tasks:predictions_score"]},
    )
    ordered = _list_tasks(client, pid, view=view.id)
    assert [t["id"] for t in ordered][0] == project.task_ids["no-face.png"], [
        (t["id"], t["predictions_score"]) for t in ordered
    ]
    scores = [t["predictions_score"] for t in ordered]
    assert scores == sorted(scores)


def test_labelling_page_shows_the_predicted_points(
    project: PredictedProject, e2e_dir: Path
) -> None:
    """Screenshot of the astronaut's labelling page: the predicted points listed as regions."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system_test_deps.sh", pytrace=False)
    client, pid, ls = project.client, project.project_id, project.ls
    # The labelling page shows predictions of the project's model version only.
    version = _prediction(project.tasks["astronaut.png"])["model_version"]
    client.projects.update(pid, model_version=version)
    view = client.views.create(project=pid, data={"title": "Review"})
    task_id = project.task_ids["astronaut.png"]

    shot = e2e_dir / "label-studio-preannotated.png"
    profile = e2e_dir / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
            # keep chromium's caches (dconf, fontconfig) out of $HOME
            env={
                **os.environ,
                "XDG_CACHE_HOME": str(profile / "cache"),
                "XDG_CONFIG_HOME": str(profile / "config"),
            },
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{ls.url}/user/login/")
            page.fill("#email", ls.username)
            page.fill("#password", ls.password)
            page.click("#login-form [type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)

            page.goto(f"{ls.url}/projects/{pid}/data?tab={view.id}&task={task_id}")
            image = page.locator(
                f"img[src*='{Path(project.tasks['astronaut.png']['data']['image']).name}']"
            )
            image.first.wait_for(state="attached")
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=image.first.element_handle()
            )
            # the Regions panel (outliner): one item per predicted point, label and score
            items = page.locator(".lsf-outliner-item")
            try:
                items.nth(len(KEYPOINT_LABELS) - 1).wait_for(timeout=20_000)
            except PlaywrightTimeoutError:
                pass  # the assertion below says what is listed; the screenshot shows the rest
            page.wait_for_timeout(1500)  # let the canvas finish drawing the points
            page.screenshot(path=str(shot))
            shot.with_suffix(".html").write_text(page.content())
            regions = items.all_inner_texts()
        finally:
            context.close()

    listed = Counter(
        label for text in regions for label in KEYPOINT_LABELS if label in text.split()
    )
    assert listed == Counter(KEYPOINT_LABELS), f"Regions panel lists {regions}; see {shot}"

    # only a screenshot that passed the checks goes into the docs
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT_DOC.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_DOC)


# ---------------------------------------------------------------------------------------------
# label_config/pupils-faces.xml: each face's keypoints grouped under its face rectangle

FACES_CONFIG = REPO / "label_config" / "pupils-faces.xml"


def test_faces_config_groups_each_faces_keypoints_under_its_rectangle(
    label_studio: Any, backend: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pair = build_uploads(tmp_path_factory.mktemp("faces-config"))["two-astronauts.png"]
    grouped = predicted_project(
        label_studio, backend, "Pupils by face", FACES_CONFIG, {pair.name: pair}
    )
    task = grouped.tasks[pair.name]
    result = _prediction(task)["result"]
    faces = {r["id"]: r for r in result if r["type"] == "rectanglelabels"}
    points = [r for r in result if r["type"] == "keypointlabels"]
    assert len(faces) == 2 and all(
        f["value"]["rectanglelabels"] == ["face"] for f in faces.values()
    )
    assert len(points) == 12
    by_face = Counter(p.get("parentID") for p in points)
    assert by_face == {face_id: 6 for face_id in faces}, by_face
    for p in points:  # every point lies inside the rectangle it is grouped under
        box = faces[p["parentID"]]["value"]
        assert box["x"] <= p["value"]["x"] <= box["x"] + box["width"]
        assert box["y"] <= p["value"]["y"] <= box["y"] + box["height"]
