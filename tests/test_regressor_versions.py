"""Regressor versions end to end: TF-Hub backbones, train.py, evaluate.py, the fine detector.

The TF-Hub modules are tiny SavedModels built here and loaded through the real
`tensorflow_hub.KerasLayer` path (nothing is downloaded). The face data are warped copies of
the committed astronaut photo (tests/face_dataset.py).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from face_dataset import write_dataset
from synthetic_eyes import dot_samples

from backend.model_store import ModelStore, ModelStoreError
from backend.regressor.network import NetworkConfig, build_network, tf
from backend.regressor.training import TrainConfig, fit, predict_samples
from backend.regressor.version import BACKBONE, WEIGHTS, load_version, write_version

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TinyImageModule(tf.Module):
    """A TF-Hub style image module: RGB in [0, 1] -> a feature map or a feature vector."""

    def __init__(self, pooled: bool) -> None:
        super().__init__()
        init = tf.random.stateless_normal([3, 3, 3, 8], seed=[1, 2], stddev=0.3)
        self.kernel = tf.Variable(init, name="kernel")
        self.pooled = pooled

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, images):
        features = tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides=2, padding="SAME"))
        return tf.reduce_mean(features, axis=[1, 2]) if self.pooled else features


@pytest.fixture(scope="module")
def hub_modules(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    paths = {}
    for kind, pooled in (("feature_map", False), ("feature_vector", True)):
        paths[kind] = root / kind
        tf.saved_model.save(TinyImageModule(pooled), str(paths[kind]))
    return paths


@pytest.mark.parametrize("kind", ["feature_map", "feature_vector"])
def test_hub_backbone_trains_saves_and_reloads_offline(hub_modules, tmp_path, kind):
    module = tmp_path / "module"
    shutil.copytree(hub_modules[kind], module)
    network = NetworkConfig(backbone=str(module), hub_input_size=(40, 64))
    model = build_network(network)
    assert any(layer.name == "hub" for layer in model.layers)
    train, val = dot_samples(24, seed=1), dot_samples(6, seed=2)
    model, history = fit(train, None, TrainConfig(epochs=1, batch_size=16, network=network),
                         progress=False)  # fmt: skip
    assert np.isfinite(history[0]["loss_px"])
    before = predict_samples(model, val).xy
    store = ModelStore(tmp_path / "store")
    written = write_version(store, model, network, np.zeros(6), np.zeros(2), {"metrics": {}})
    assert (written.path / BACKBONE / "saved_model.pb").is_file()
    shutil.rmtree(module)  # the version must not need the original handle any more
    loaded = load_version(store.get(written.name))
    np.testing.assert_allclose(predict_samples(loaded.model, val).xy, before, atol=1e-4)
    assert loaded.metadata["network"]["backbone"] == str(module)


def test_a_hub_module_of_the_wrong_shape_is_refused(tmp_path):
    class Scalar(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.reduce_mean(images, axis=[1, 2, 3])

    tf.saved_model.save(Scalar(), str(tmp_path / "scalar"))
    with pytest.raises(ValueError, match="feature vector .* or a feature map"):
        build_network(NetworkConfig(backbone=str(tmp_path / "scalar")))


def test_unusable_versions_are_refused_with_a_reason(tmp_path):
    store = ModelStore(tmp_path)
    model = build_network(NetworkConfig())
    version = write_version(
        store, model, NetworkConfig(), np.zeros(6), np.zeros(2), {"metrics": {}}
    )
    (version.path / WEIGHTS).write_bytes(b"not hdf5")
    with pytest.raises(ModelStoreError, match="weights unusable"):
        load_version(store.get(version.name))
    other = store.create(lambda d: None, {"kind": "something-else"})
    with pytest.raises(ModelStoreError, match="not a pupil-regressor"):
        load_version(other)


# --- scripts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """36 warped astronauts and their eyes.csv."""
    return write_dataset(tmp_path_factory.mktemp("faces"), 36)


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def train_args(csv: Path, store: Path, *extra: str) -> list[str]:
    return ["--csv", str(csv), "--root", str(csv.parent), "--model-dir", str(store),
            "--workers", "1", "--quiet", "--val-fraction", "0.3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(faces, tmp_path_factory) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("store")
    plot = store / "learning.png"
    proc = run_script(
        "train.py", *train_args(faces, store, "--epochs", "5", "--promote", "--plot", str(plot))
    )
    assert proc.returncode == 0, proc.stderr
    assert plot.read_bytes()[:8] == PNG_MAGIC
    return store, json.loads(proc.stdout)


def test_train_script_writes_a_complete_promoted_version(trained, faces):
    store_dir, summary = trained
    for key in ("model_version", "train_size", "val_e10", "seconds"):
        assert key in summary
    assert summary["train_size"] + summary["val_size"] == 36
    assert 0.0 <= summary["val_e10"] <= 1.0 and summary["seconds"] > 0
    assert summary["labels"] == "truth" and summary["promoted"] is True
    assert set(summary["uncertainty"]) == {
        "spread", "tta", "coarse_disagreement", "coarse_confidence", "calibrated"
    }  # fmt: skip
    store = ModelStore(store_dir)
    assert store.serving().name == summary["model_version"]
    meta = store.get(summary["model_version"]).metadata
    assert meta["kind"] == "pupil-regressor"
    assert meta["data"]["train_faces"] == summary["train_size"]
    assert meta["data"]["csv_sha256"] and meta["data"]["labels"] == "truth"
    assert meta["metrics"]["val_e10"] == summary["val_e10"]
    assert meta["preprocessing"]["model_crop"]["eye_width_px"] == 32.0
    assert set(meta["code_version"]) == {"package", "commit"}
    assert len(meta["training"]["history"]) == 5
    assert "val_e10" in meta["training"]["history"][-1]
    assert set(meta["calibration"]) >= {"intercept", "spread", "tta"}


def test_train_script_learns_from_coarse_labels_and_skips_bad_rows(faces, tmp_path):
    bad = faces.parent / "with_bad_rows.csv"
    (faces.parent / "blank.png").write_bytes(b"\x89PNG broken")
    bad.write_text(faces.read_text() + "blank.png,10,10,20,10\nmissing.png,10,10,20,10\n")
    proc = run_script("train.py", *train_args(bad, tmp_path, "--epochs", "1", "--labels", "coarse"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["labels"] == "coarse" and summary["skipped"] == 2
    assert summary["promoted"] is False and ModelStore(tmp_path).serving() is None
    meta = ModelStore(tmp_path).get(summary["model_version"]).metadata
    assert meta["data"]["labels"] == "coarse" and meta["data"]["skipped"] == 2


def test_train_script_with_a_local_hub_backbone(faces, hub_modules, tmp_path):
    proc = run_script(
        "train.py", *train_args(faces, tmp_path, "--epochs", "1",
                                "--backbone", str(hub_modules["feature_map"]))
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["config"]["backbone"] == str(hub_modules["feature_map"])
    assert (Path(summary["path"]) / BACKBONE).is_dir()


def test_train_script_rejects_bad_input_clearly(faces, tmp_path):
    missing = run_script("train.py", *train_args(tmp_path / "nope.csv", tmp_path))
    assert missing.returncode == 2 and "nope.csv" in missing.stderr
    zero = run_script("train.py", *train_args(faces, tmp_path, "--epochs", "0"))
    assert zero.returncode == 2 and "--epochs" in zero.stderr
    assert ModelStore(tmp_path).versions() == []


def test_killing_training_midway_leaves_no_version(faces, tmp_path):
    args = [a for a in train_args(faces, tmp_path, "--epochs", "400") if a != "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen = bytearray()
    reader = threading.Thread(target=lambda: _drain(proc.stderr, seen), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    try:  # wait until its training progress bar has moved past the first epoch
        while time.monotonic() < deadline and proc.poll() is None:
            if _midway(seen):
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert _midway(seen), seen.decode(errors="replace")[-2000:]
    store = ModelStore(tmp_path)
    assert store.versions() == [] and store.serving() is None
    assert not any((tmp_path / "versions").iterdir())


def _midway(progress: bytes) -> bool:
    """The bar shows an epoch from 2 to 399 of 400 (tqdm redraws at most every 0.1 s, so at
    a dozen epochs a second it may never print exactly 2/400)."""
    return any(2 <= int(n) < 400 for n in re.findall(rb" (\d+)/400", bytes(progress)))


def _drain(stream, into: bytearray) -> None:
    while chunk := stream.read1(4096):
        into.extend(chunk)


def test_evaluate_puts_coarse_and_regressor_on_one_plot(trained, faces, tmp_path):
    store_dir, summary = trained
    out_json, out_png = tmp_path / "eval.json", tmp_path / "ced.png"
    proc = run_script(
        "evaluate.py", "--csv", str(faces), "--root", str(faces.parent),
        "--method", "coarse", "--method", "regressor", "--model-dir", str(store_dir),
        "--json", str(out_json), "--plot", str(out_png), "--limit", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    coarse, fine = json.loads(out_json.read_text())["results"]
    assert (coarse["method"], coarse["variant"]) == ("coarse", "fused")
    assert (fine["method"], fine["variant"]) == ("regressor", summary["model_version"])
    assert coarse.keys() == fine.keys()
    assert fine["faces"] == 8 and fine["found_rate"] == 1.0
    assert 0.0 <= fine["e10"] <= 1.0
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_evaluate_regressor_needs_a_version(faces, tmp_path):
    base = ["--csv", str(faces), "--root", str(faces.parent), "--json", str(tmp_path / "o.json"),
            "--method", "regressor"]  # fmt: skip
    no_dir = run_script("evaluate.py", *base)
    assert no_dir.returncode == 2 and "--model-dir" in no_dir.stderr
    empty = run_script("evaluate.py", *base, "--model-dir", str(tmp_path / "store"))
    assert empty.returncode == 2 and "no promoted version" in empty.stderr
    wrong = run_script("evaluate.py", *base, "--model-dir", str(tmp_path / "store"),
                       "--version", "v-none")  # fmt: skip
    assert wrong.returncode == 2 and "does not exist" in wrong.stderr


def test_fine_detector_on_a_face(trained, astronaut_grey, astronaut_pupils):
    from backend.regressor.detector import RegressorDetector

    store_dir, summary = trained
    store = ModelStore(store_dir)
    detector = RegressorDetector(load_version(store.serving()))
    (face,) = detector.detect(astronaut_grey)
    assert face.method == f"regressor/{summary['model_version']}"
    assert face.points.shape == (6, 2) and np.all(np.isfinite(face.points))
    assert np.all((face.confidences >= 0) & (face.confidences <= 1))
    assert face.confidence == pytest.approx(face.confidences[0] * face.confidences[1])
    # five epochs on 25 faces already land inside the eye (e < 0.25)
    distance = np.linalg.norm(astronaut_pupils["left_pupil"] - astronaut_pupils["right_pupil"])
    for name in ("left_pupil", "right_pupil"):
        assert np.linalg.norm(face.point(name) - astronaut_pupils[name]) < 0.25 * distance
    assert detector.detect(np.zeros((64, 64), np.uint8)) == []


def test_server_serves_the_promoted_regressor_and_falls_back_to_coarse(trained, tmp_path):
    from backend.server import create_app
    from backend.settings import Settings

    store_dir, summary = trained
    model_dir = tmp_path / "models"
    shutil.copytree(store_dir, model_dir)
    data = REPO / "tests" / "data"
    app = create_app(Settings(local_files_document_root=data, model_dir=model_dir))
    client = app.test_client()
    config = (REPO / "label_config" / "pupils.xml").read_text()
    body = {"tasks": [{"id": 7, "data": {"image": "/data/local-files/?d=astronaut.png"}}],
            "label_config": config}  # fmt: skip

    (served,) = client.post("/predict", json=body).get_json()["results"]
    assert served["model_version"] == summary["model_version"]
    labels = {r["value"]["keypointlabels"][0] for r in served["result"]}
    assert {"left_pupil", "right_pupil"} <= labels
    versions = client.get("/versions").get_json()["versions"]
    assert versions[0] == summary["model_version"]

    # a promotion to a version that cannot be used: the last good promoted version answers
    (model_dir / "serving.json").write_text(json.dumps({"version": "v-gone"}))
    (fallback,) = client.post("/predict", json=body).get_json()["results"]
    assert fallback["model_version"] == summary["model_version"]
    # with no good version promoted before it, the coarse detector answers
    (model_dir / "decisions.jsonl").unlink()
    (model_dir / "serving.json").write_text(json.dumps({"version": "v-gone-too"}))
    (fallback,) = client.post("/predict", json=body).get_json()["results"]
    assert fallback["model_version"].startswith("coarse-")
    assert fallback["result"]
    # and a good promotion is picked up without a restart
    ModelStore(model_dir).promote(summary["model_version"], reason="test")
    (again,) = client.post("/predict", json=body).get_json()["results"]
    assert again["model_version"] == summary["model_version"]


def test_speed_benchmark_times_the_regressor_beside_the_coarse_pipeline(trained, faces, tmp_path):
    store_dir, summary = trained
    out = tmp_path / "speed.json"
    proc = run_script(
        "benchmark_speed.py", "--csv", str(faces), "--root", str(faces.parent), "--n", "3",
        "--repeats", "1", "--json", str(out), "--model-dir", str(store_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["regressor_version"] == summary["model_version"]
    assert report["median_ms"]["regressor_pipeline"] > 0
    assert np.isfinite(report["regressor_added_ms_per_face"])


def test_offset_ablation_scores_four_models_on_the_same_faces(trained, faces):
    store_dir, summary = trained
    proc = run_script("offset_ablation.py", "--csv", str(faces), "--root", str(faces.parent),
                      "--model-dir", str(store_dir), "--workers", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["version"] == summary["model_version"] and report["found_faces"] == 36
    assert report["label_offset_px"] == pytest.approx(summary["label_offset_px"], abs=1e-3)
    for name in ("coarse", "coarse + label offset", "network alone",
                 "network + label offset (the version)"):  # fmt: skip
        assert set(report[name]) == {"e05", "e10", "e25"}


def test_compare_heads_trains_both_heads_on_the_same_split(faces):
    proc = run_script("compare_heads.py", "--csv", str(faces), "--root", str(faces.parent),
                      "--epochs", "1", "--test-fraction", "0.3", "--workers", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["train_faces"] + report["test_faces"] == 36
    for head in ("heatmap", "dense"):
        assert set(report[head]) >= {"e05", "e10", "e25", "weights"}
    assert report["heatmap"]["weights"] != report["dense"]["weights"]


def test_a_server_started_with_a_promoted_regressor_answers_predictions(trained, tmp_path):
    """The real server under gunicorn, started with a regressor already promoted: the master
    must not load it (TensorFlow before fork left every worker hanging on /predict)."""
    import requests
    from server_process import free_port, running_server

    store_dir, summary = trained
    model_dir = tmp_path / "models"
    shutil.copytree(store_dir, model_dir)
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_DIR": str(model_dir),
        "LOCAL_FILES_DOCUMENT_ROOT": str(REPO / "tests" / "data"),
    }
    log_path = tmp_path / "server.log"
    body = {"tasks": [{"id": 7, "data": {"image": "/data/local-files/?d=astronaut.png"}}]}
    with running_server(env, log_path):
        response = requests.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=90)
        (served,) = response.json()["results"]
    assert served["model_version"] == summary["model_version"]
    assert len(served["result"]) >= 2
    ready = [line for line in log_path.read_text().splitlines() if "ready: serving" in line]
    assert ready and f"model_version={summary['model_version']}" in ready[0]
