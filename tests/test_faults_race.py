"""Two training runs of one project racing to promote, each in its own Python process
(`train_project`, as an RQ work horse or the server's job thread runs it), started at the same
instant while a reader watches the serving pointer the way every server process does.

The project's training lock makes them one after the other, so the second compares itself with
what the first left serving: one pointer, never torn, both decisions recorded, the served
version the one the documented rule picks (a candidate serves only if it beats the serving
model on the same people-labelled validation faces); no exception escapes either run. A
half-written version a killed run left behind is swept by the next run. (The store-level race,
two promoters flipping one pointer, is in tests/test_model_store.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from server_process import ROOT
from test_faults import faces  # noqa: F401 (fixture)
from test_training_loop import PROJECT, annotation_event

from backend.label_store import LabelStore
from backend.model_store import DECISIONS, SERVING, ModelStore
from backend.project_dirs import project_dir
from backend.webhooks import record_event

pytestmark = pytest.mark.slow

RACER = """
import json, logging, sys, time
from pathlib import Path
import backend.regressor.training  # TensorFlow imported before the start line
from backend.retrain import train_project
from backend.settings import Settings

model_dir, images, go, job = sys.argv[1:5]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
settings = Settings(model_dir=Path(model_dir), local_files_document_root=Path(images),
                    train_min_labels=10, train_debounce_s=0.0, train_epochs=2)
while not Path(go).exists():
    time.sleep(0.01)
print(json.dumps(train_project(settings, 7, job)), flush=True)
"""


def test_two_runs_racing_to_promote_leave_one_pointer_and_both_decisions(
    tmp_path,
    faces,  # noqa: F811
):
    root, rows = faces
    model_dir = tmp_path / "models"
    store = LabelStore(model_dir)
    for i in range(12):
        event = annotation_event(rows, i)
        record_event(store, event["action"], event)
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(model_dir), str(root), str(go), f"train-p7-race{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"racer{i}.log", "wb"),
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    pstore = ModelStore(project_dir(model_dir, PROJECT))
    pointer = pstore.root / SERVING
    stale = pstore.root / ".tmp-p7-20261121T100000000000Z-dead00"  # left by a killed run
    stale.mkdir()
    (stale / "weights.h5").write_bytes(b"half")
    seen: set[str] = set()
    torn: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # what every server process does before each prediction
        while not stop.is_set():
            time.sleep(0.002)
            try:
                text = pointer.read_text()
            except FileNotFoundError:
                continue
            try:
                seen.add(json.loads(text)["version"])
            except (ValueError, KeyError):
                torn.append(text)

    watching = threading.Thread(target=reader)
    watching.start()
    try:
        go.touch()  # both start at once
        outputs = [racer.communicate(timeout=300)[0] for racer in racers]
    finally:
        stop.set()
        watching.join(timeout=10)
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    for i, racer in enumerate(racers):
        assert racer.returncode == 0, (tmp_path / f"racer{i}.log").read_text()[-3000:]
    records = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert all(r["outcome"] in ("promoted", "rejected") for r in records), records

    # One after the other: the second run compared itself with what the first left serving.
    first, second = sorted(records, key=lambda r: r["at"])
    decisions = pstore.decisions()
    assert [(d["decision"], d["version"]) for d in decisions] == [
        (first["outcome"], first["version"]), (second["outcome"], second["version"]),
    ]  # fmt: skip
    assert (pstore.root / DECISIONS).read_text().count("\n") == 2
    assert first["metrics"]["serving"].startswith("coarse-")
    assert first["outcome"] == "promoted", first  # the labels are 2 px off the detector's
    assert second["metrics"]["serving"] == first["version"]
    assert second["label_seq"] == first["label_seq"] == 12
    better = second["metrics"]["val_mean_e"] < second["metrics"]["serving_val_mean_e"]
    assert second["outcome"] == ("promoted" if better else "rejected")
    winner = second["version"] if better else first["version"]

    assert json.loads(pointer.read_text())["version"] == winner
    assert pstore.serving().name == winner
    assert torn == [] and seen and seen <= {first["version"], second["version"]}
    assert sorted(v.name for v in pstore.versions()) == sorted(
        [first["version"], second["version"]]
    )
    assert not stale.exists()  # swept by the first run, under the project's lock
    assert not list(pstore.root.glob(".tmp-*")) and not list(pstore.root.glob("*.tmp"))
    state = LabelStore(model_dir).project(PROJECT)
    assert state.trained_seq == 12 and state.failures == 0
    assert state.last_run["job"] == second["job"]
