"""Benchmark the labelling loop against a real Label Studio: time from the Nth annotation to new
predictions in Label Studio, and the accuracy of the served model after each round.

    python scripts/benchmark_loop.py --csv eyes.csv --root DIR [--tasks 300] [--rounds 4]
        [--per-round 50] [--epochs 15] [--work-dir out/loop-benchmark]
        [--out out/benchmark-loop.json] [--plot docs/images/loop-benchmark.png]

Starts Label Studio (from .venv-ls, a copy of the migrated template the e2e tests use) and this
backend, both on 127.0.0.1, with their data and logs under --work-dir (emptied first), and stops
both at the end (also on Ctrl-C, SIGTERM or an error). Takes --tasks faces from a
person-disjoint test split of the CSV (one face per person, shuffled with --seed), uploads them,
connects the backend (basic auth; the auto-created webhook gets the same credentials), then:

- round 0: "Retrieve Predictions" (the coarse detector) on every task;
- rounds 1..R: annotates the next --per-round tasks through the API with the CSV's truth, then
  waits until the project's model version in Label Studio is a new "p<pid>-" version with
  predictions for every task (seconds from the last annotation), or until the backend's
  /versions says the round's run was rejected (or failed): the predictions then stay.

After each round the predictions of the project's model version are scored on the tasks not
annotated yet (Jesorsky e; a task without a predicted face is a failure).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import importlib.util
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/benchmark_loop.py` from a checkout
    sys.path.insert(0, str(REPO))

from backend.evaluation import TruthRow, group_split, normalised_error, person_of  # noqa: E402

sys.path.append(str(REPO / "tests"))  # the test suite's server machinery and polling
from polling import wait_for  # noqa: E402

LABEL_CONFIG = REPO / "label_config" / "pupils.xml"
UPLOAD_CHUNK = 50
ACTION_CHUNK = 25  # tasks per "Retrieve Predictions" call (one /predict each)
POLL_S = 2.0
WORK_DIR_MARKERS = ("label-studio-data", "backend-models", "ls-settings")
_FACE_ID = re.compile(r"^(?P<face>.*)-(?:left_pupil|right_pupil)$")


# ---------------------------------------------------------------------------------------------
# Pure parts: accuracy of Label Studio predictions against the truth


def pupil_faces(result: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """The faces in one prediction's result: {"left_pupil": xy, "right_pupil": xy} in pixels.

    left/right are the names Label Studio shows: the SUBJECT's pupils. Regions are grouped by
    their face (parentID, else the id's "...-<label>" prefix, else the order they come in);
    a face without both pupils is left out.
    """
    faces: dict[Any, dict[str, np.ndarray]] = {}
    seen: dict[str, int] = {}
    for region in result:
        if region.get("type") != "keypointlabels":
            continue
        value = region.get("value") or {}
        labels = value.get("keypointlabels") or []
        if len(labels) != 1 or labels[0] not in ("left_pupil", "right_pupil"):
            continue
        label = labels[0]
        try:
            x = float(value["x"]) * float(region["original_width"]) / 100.0
            y = float(value["y"]) * float(region["original_height"]) / 100.0
        except (KeyError, TypeError, ValueError):
            continue
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        match = _FACE_ID.match(str(region.get("id") or ""))
        if region.get("parentID"):
            key: Any = ("parent", region["parentID"])
        elif match:
            key = ("id", match.group("face"))
        else:
            key = ("order", seen.get(label, 0))
        seen[label] = seen.get(label, 0) + 1
        faces.setdefault(key, {})[label] = np.array([x, y])
    return [f for f in faces.values() if len(f) == 2]


def prediction_error(result: Sequence[Mapping[str, Any]], truth: TruthRow) -> float:
    """Jesorsky e of the best-matching predicted face; inf when no face was predicted.

    The truth's `left` is the eye on the IMAGE's left, the subject's right pupil.
    """
    errors = [
        normalised_error(face["right_pupil"], face["left_pupil"], truth)
        for face in pupil_faces(result)
    ]
    return min(errors) if errors else math.inf


def served_result(task: Mapping[str, Any], version: str | None) -> list[dict] | None:
    """The result of the task's latest prediction by `version` (any version if None)."""
    predictions = [
        p
        for p in task.get("predictions") or []
        if isinstance(p, Mapping) and (version is None or p.get("model_version") == version)
    ]
    if not predictions:
        return None
    latest = max(predictions, key=lambda p: (p.get("id") or 0, p.get("created_at") or ""))
    return list(latest.get("result") or [])


def accuracy(errors: Sequence[float]) -> dict[str, Any]:
    """e05/e10 rates (a miss is inf: a failure) and counts."""
    e = np.asarray(errors, dtype=np.float64)
    n = len(e)
    finite = e[np.isfinite(e)]
    return {
        "n": n,
        "e05": float(np.mean(e <= 0.05)) if n else None,
        "e10": float(np.mean(e <= 0.10)) if n else None,
        "no_face": int(n - len(finite)),
        "median_e": float(np.median(finite)) if len(finite) else None,
    }


def score_tasks(
    tasks: Mapping[int, Mapping[str, Any]],
    truth: Mapping[int, TruthRow],
    task_ids: Sequence[int],
    version: str | None,
) -> dict[str, Any]:
    """Accuracy of `version`'s predictions on `task_ids` (a task without one is a failure)."""
    errors = []
    for task_id in task_ids:
        result = served_result(tasks.get(task_id) or {}, version)
        errors.append(math.inf if result is None else prediction_error(result, truth[task_id]))
    return accuracy(errors)


def keypoint_results(truth: TruthRow, width: int, height: int) -> list[dict]:
    """An annotation's result: the true pupils as percentages of the (EXIF-transposed) image."""

    def point(label: str, xy: np.ndarray) -> dict:
        return {
            "from_name": "keypoints", "to_name": "image", "type": "keypointlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "origin": "manual",
            "value": {"x": float(xy[0]) / width * 100, "y": float(xy[1]) / height * 100,
                      "width": 0.5, "keypointlabels": [label]},
        }  # fmt: skip

    # the subject's left pupil is the eye on the image's right
    return [point("left_pupil", truth.right), point("right_pupil", truth.left)]


def select_faces(rows: Sequence[TruthRow], n: int, seed: int) -> list[TruthRow]:
    """`n` faces from the person-disjoint test split (as scripts/split_csv.py makes it), one
    per person, in a shuffled order: labelled and scored faces never show the same person."""
    groups = np.array([person_of(r.file) for r in rows])
    test = group_split(groups, 0.2, 0)
    first: dict[str, TruthRow] = {}
    for row, group, keep in zip(rows, groups.tolist(), test.tolist(), strict=True):
        if keep and group not in first:
            first[group] = row
    picked = list(first.values())
    np.random.default_rng(seed).shuffle(picked)
    if len(picked) < n:
        raise ValueError(f"the test split has {len(picked)} people; --tasks {n} asked for more")
    return picked[:n]


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot work, or None."""
    if args.rounds < 1:
        return "--rounds must be at least 1"
    if args.per_round < 2:
        return "--per-round must be at least 2 (a run validates on some of its labels)"
    if args.epochs < 1:
        return "--epochs must be at least 1"
    if args.tasks <= args.rounds * args.per_round:
        return (
            f"--tasks {args.tasks} leaves no held-out task after {args.rounds} rounds of "
            f"{args.per_round}"
        )
    work = args.work_dir
    if work.exists() and (
        not work.is_dir()
        or (any(work.iterdir()) and not any((work / n).exists() for n in WORK_DIR_MARKERS))
    ):
        return f"--work-dir {work} is not empty and not a benchmark work dir (it is emptied)"
    if not args.csv.is_file():
        return f"--csv {args.csv}: no such file"
    if not args.root.is_dir():
        return f"--root {args.root}: no such directory"
    return None


def read_rows(path: Path) -> list[TruthRow]:
    from backend.evaluation import read_truth_csv

    return read_truth_csv(path)


# ---------------------------------------------------------------------------------------------
# Plot


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> None:
    """e05/e10 on the held-out tasks vs labels (top) and seconds per round as bars (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 2))
    labels = [r["labels"] for r in rounds]
    for key, colour in (("e05", "tab:blue"), ("e10", "tab:green")):
        top.plot(labels, [r[key] for r in rounds], marker="o", color=colour,
                 label=f"{key}, tasks not labelled yet (n)")  # fmt: skip
        if all(r.get(f"fixed_{key}") is not None for r in rounds):
            top.plot(labels, [r[f"fixed_{key}"] for r in rounds], marker=".", color=colour,
                     linestyle="--", alpha=0.7,
                     label=f"{key}, the {rounds[0]['fixed_n']} tasks never labelled")  # fmt: skip
        for r in rounds:
            if r["outcome"] == "rejected":
                top.plot([r["labels"]], [r[key]], marker="x", markersize=11, color="tab:red",
                         linestyle="none")  # fmt: skip
    if any(r["outcome"] == "rejected" for r in rounds):
        top.plot([], [], marker="x", color="tab:red", linestyle="none",
                 label="run rejected: previous model still served")  # fmt: skip
    for r in rounds:
        top.annotate(f"n={r['n']}", (r["labels"], r["e10"]), textcoords="offset points",
                     xytext=(0, 6), ha="center", fontsize="x-small", color="grey")  # fmt: skip
    keys = ("e05", "e10", "fixed_e05", "fixed_e10")
    lowest = min([r[key] for r in rounds for key in keys if r.get(key) is not None] + [1.0])
    top.set_ylim(max(0.0, lowest - 0.25), 1.02)
    top.set_xlabel("labels in Label Studio")
    top.set_ylabel("fraction of held-out tasks")
    top.set_xticks(labels)
    top.grid(True, alpha=0.3)
    top.legend(loc="lower right", fontsize="x-small")
    top.set_title(title)

    later = [r for r in rounds if r["round"] > 0]
    xs = np.arange(len(later))
    promoted = [r["outcome"] == "promoted" for r in later]
    waited = [r.get("seconds_waited") or r["seconds_to_predictions"] or 0.0 for r in later]
    train = [r["train_seconds"] or 0.0 for r in later]
    for flag, colour, hatch, label in (
        (True, "tab:purple", None, "last annotation -> new predictions in LS"),
        (False, "thistle", "//", "last annotation -> run rejected (predictions kept)"),
    ):
        picked = [i for i, p in enumerate(promoted) if p == flag]
        if picked:
            bottom.bar(xs[picked] - 0.2, [waited[i] for i in picked], width=0.4, color=colour,
                       hatch=hatch, edgecolor="tab:purple", label=label)  # fmt: skip
    bottom.bar(xs + 0.2, train, width=0.4, color="tab:grey", label="training run (backend)")
    for x, r, s in zip(xs, later, waited, strict=True):
        text = f"{s:.0f} s" if r["outcome"] == "promoted" else f"{r['outcome']}\n{s:.0f} s"
        bottom.annotate(text, (x - 0.2, s), textcoords="offset points", xytext=(0, 2),
                        ha="center", fontsize="x-small")  # fmt: skip
    bottom.set_xticks(xs, [f"round {r['round']}\n{r['labels']} labels" for r in later])
    bottom.set_ylabel("seconds")
    bottom.set_ylim(0.0, max([*waited, *train, 1.0]) * 1.6)
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.legend(loc="upper center", fontsize="x-small", ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------
# Servers and Label Studio's API


def _e2e() -> Any:
    """tests/e2e/conftest.py, imported as a module (its server machinery)."""
    spec = importlib.util.spec_from_file_location(
        "e2e_conftest", REPO / "tests" / "e2e" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e_conftest"] = module
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def label_studio(e2e: Any, work_dir: Path) -> Iterator[Any]:
    version = e2e.installed_ls_version()
    template = e2e.CACHE / f"label-studio-template-{version}"
    if not e2e._template_is_valid(template, version):
        say(f"migrating a Label Studio {version} template (first start, ~1 min)")
        e2e._build_template(template, version, work_dir)
    data_dir = work_dir / "label-studio-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(template, data_dir)
    ls, seconds = e2e._start_label_studio(data_dir, work_dir, e2e.START_TIMEOUT_S)
    try:
        say(f"Label Studio {version} ready in {seconds:.1f} s at {ls.url} (log {ls.log_path})")
        yield ls
    finally:
        ls.stop()


@dataclass
class Api:
    url: str
    headers: dict[str, str]

    def __call__(self, method: str, path: str, timeout: float = 120, **kwargs: Any) -> Any:
        import requests

        r = requests.request(method, f"{self.url}{path}", headers=self.headers,
                             timeout=timeout, **kwargs)  # fmt: skip
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def tasks(self, project: int) -> dict[int, dict]:
        out: dict[int, dict] = {}
        page = 1
        while True:
            body = self("GET", f"/api/tasks?project={project}&fields=all&page_size=100&page={page}")
            for task in body["tasks"]:
                out[task["id"]] = task
            if len(out) >= body.get("total", 0) or not body["tasks"]:
                return out
            page += 1


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).size


def upload(api: Api, pid: int, root: Path, faces: Sequence[TruthRow]) -> list[int]:
    """Uploads the faces as tasks (multipart, in chunks); returns their task ids in order."""
    names = [f"{i:04d}_{Path(f.file).name}" for i, f in enumerate(faces)]
    for start in range(0, len(faces), UPLOAD_CHUNK):
        files = {
            f"file{i}": (names[i], (root / faces[i].file).read_bytes(), "image/jpeg")
            for i in range(start, min(start + UPLOAD_CHUNK, len(faces)))
        }
        api("POST", f"/api/projects/{pid}/import", files=files)
    by_name: dict[str, int] = {}
    for task in api.tasks(pid).values():
        stored = task["data"]["image"].rsplit("/", 1)[-1]
        match = [n for n in names if stored.endswith("-" + n) or stored == n]
        if len(match) != 1:
            raise RuntimeError(f"task {task['id']}: cannot tell which upload {stored!r} is")
        by_name[match[0]] = task["id"]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RuntimeError(f"{len(missing)} uploads have no task, e.g. {missing[:3]}")
    return [by_name[n] for n in names]


def connect_backend(api: Api, pid: int, backend_url: str, user: str, password: str) -> None:
    api("POST", "/api/ml", json={
        "project": pid, "url": backend_url, "title": "pupil-backend",
        "auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password,
    })  # fmt: skip
    # Label Studio's auto-created webhook sends no credentials: give it the model's.
    hooks = [h for h in api("GET", f"/api/webhooks/?project={pid}")
             if h["url"].rstrip("/") == f"{backend_url}/webhook"]  # fmt: skip
    if len(hooks) != 1:
        raise RuntimeError(f"expected one webhook to {backend_url}/webhook, got {hooks}")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    api("PATCH", f"/api/webhooks/{hooks[0]['id']}/",
        json={"headers": {"Authorization": f"Basic {token}"}})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    import requests

    started = time.monotonic()
    faces = select_faces(read_rows(args.csv), args.tasks, args.seed)
    sizes = [image_size(args.root / f.file) for f in faces]
    work_dir = args.work_dir.resolve()
    if work_dir.exists():  # a fresh start: an old label store would not match the new LS ids
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    e2e = _e2e()
    rounds: list[dict[str, Any]] = []
    k = args.per_round
    with label_studio(e2e, work_dir) as ls:
        api = Api(ls.url, ls.headers)
        config = LABEL_CONFIG.read_text(encoding="utf-8")
        pid = api("POST", "/api/projects", json={"title": "Loop benchmark",
                                                 "label_config": config})["id"]  # fmt: skip
        say(f"project {pid}: uploading {len(faces)} faces")
        task_ids = upload(api, pid, args.root, faces)
        truth = dict(zip(task_ids, faces, strict=True))
        say(f"starting the backend (TRAIN_EVERY_N_LABELS={k}, TRAIN_EPOCHS={args.epochs})")
        with e2e.running_backend(
            work_dir, ls, "backend", TRAIN_EVERY_N_LABELS=str(k), TRAIN_MIN_LABELS=str(k),
            TRAIN_DEBOUNCE_S="2", TRAIN_EPOCHS=str(args.epochs),
        ) as server:  # fmt: skip
            say(f"backend ready at {server.url} (log {server.log_path})")
            user, password = server.auth
            connect_backend(api, pid, server.url, user, password)

            def last_run() -> dict | None:
                r = requests.get(f"{server.url}/versions?project={pid}", auth=server.auth,
                                 timeout=30)  # fmt: skip
                r.raise_for_status()
                training = r.json().get("training") or []
                return training[0].get("last_run") if training else None

            # Round 0: the coarse detector, through Data Manager's "Retrieve Predictions".
            t0 = time.monotonic()
            for start in range(0, len(task_ids), ACTION_CHUNK):
                chunk = task_ids[start : start + ACTION_CHUNK]
                api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
                    json={"selectedItems": {"all": False, "included": chunk}},
                    timeout=600)  # fmt: skip
                say(f"round 0: retrieved predictions for {start + len(chunk)}/{len(task_ids)}")
            retrieve_s = time.monotonic() - t0
            version = api("GET", f"/api/projects/{pid}")["model_version"] or None
            tasks = api.tasks(pid)
            versions = {p.get("model_version") for t in tasks.values() for p in t["predictions"]}
            if version not in versions:  # LS names it after the ML backend's title: not used
                latest = [p for t in tasks.values() for p in t.get("predictions") or []]
                if latest:
                    version = max(latest, key=lambda p: p.get("id") or 0).get("model_version")
            never = task_ids[args.rounds * k :]  # never labelled: the same set every round

            def fixed(tasks: dict, version: str | None) -> dict[str, Any]:
                score = score_tasks(tasks, truth, never, version)
                return {"fixed_e05": score["e05"], "fixed_e10": score["e10"],
                        "fixed_n": score["n"]}  # fmt: skip

            score = score_tasks(tasks, truth, task_ids, version)
            score.update(fixed(tasks, version))
            rounds.append({"round": 0, "labels": 0, "outcome": "coarse", "version": version,
                           "seconds_to_predictions": round(retrieve_s, 1),
                           "train_seconds": None, "reason": None, **score})  # fmt: skip
            say(
                f"round 0 ({version}): e05 {score['e05']:.3f} e10 {score['e10']:.3f} "
                f"n {score['n']} no-face {score['no_face']} ({retrieve_s:.1f} s to retrieve)"
            )

            for rnd in range(1, args.rounds + 1):
                previous = last_run()
                before = (previous or {}).get("at")
                for i in range((rnd - 1) * k, rnd * k):
                    width, height = sizes[i]
                    body = {"result": keypoint_results(faces[i], width, height),
                            "was_cancelled": False}  # fmt: skip
                    api("POST", f"/api/tasks/{task_ids[i]}/annotations", json=body)
                t0 = time.monotonic()
                say(f"round {rnd}: {rnd * k} labels; waiting for a new version in Label Studio")

                def done(version=version, before=before) -> tuple[str, dict | None] | None:
                    current = api("GET", f"/api/projects/{pid}")["model_version"]
                    if current and current != version and current.startswith(f"p{pid}-"):
                        tasks = api.tasks(pid)
                        ok = all(served_result(t, current) is not None for t in tasks.values())
                        return ("promoted", None) if ok else None
                    run_ = last_run()
                    if (
                        run_
                        and run_.get("at") != before
                        and run_.get("outcome") in ("rejected", "failed", "waiting")
                    ):
                        return run_["outcome"], run_
                    return None

                try:
                    outcome, run_ = wait_for(f"round {rnd}'s predictions", done,
                                             args.round_timeout, POLL_S)  # fmt: skip
                except TimeoutError as e:
                    outcome, run_ = "timeout", {"reason": str(e)}
                seconds = time.monotonic() - t0
                run_ = last_run() if outcome == "promoted" else run_
                if outcome == "promoted":
                    version = api("GET", f"/api/projects/{pid}")["model_version"]
                tasks = api.tasks(pid)
                held_out = task_ids[rnd * k :]
                score = score_tasks(tasks, truth, held_out, version)
                score.update(fixed(tasks, version))
                rounds.append({
                    "round": rnd, "labels": rnd * k, "outcome": outcome,
                    "version": (run_ or {}).get("version"), "served_version": version,
                    "seconds_to_predictions": round(seconds, 1) if outcome == "promoted" else None,
                    "seconds_waited": round(seconds, 1),
                    "train_seconds": (run_ or {}).get("seconds"),
                    "human_faces": (run_ or {}).get("human_faces"),
                    "coarse_faces": (run_ or {}).get("coarse_faces"),
                    "reason": (run_ or {}).get("reason"), **score,
                })  # fmt: skip
                say(f"round {rnd}: {outcome} {rounds[-1]['version']} after {seconds:.1f} s "
                    f"(train {rounds[-1]['train_seconds']} s); served {version}: e05 "
                    f"{score['e05']:.3f} e10 {score['e10']:.3f} n {score['n']} "
                    f"no-face {score['no_face']}")  # fmt: skip
                if outcome != "promoted":
                    say(f"round {rnd}: reason: {rounds[-1]['reason']}")
    return {
        "command": " ".join(sys.argv),
        "tasks": args.tasks, "rounds_asked": args.rounds, "per_round": k,
        "epochs": args.epochs, "seed": args.seed, "work_dir": str(work_dir),
        "wall_seconds": round(time.monotonic() - started, 1),
        "rounds": rounds,
    }  # fmt: skip


def run_interruptibly(
    run: Callable[[argparse.Namespace], dict], args: argparse.Namespace
) -> dict | None:
    """`run(args)`, stopped by SIGTERM as by Ctrl-C (also when started in the background, where
    SIGINT is ignored): KeyboardInterrupt unwinds the context managers that stop the servers.
    None when interrupted."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-timeout", type=float, default=1200.0)
    parser.add_argument("--work-dir", type=Path, default=REPO / "out" / "loop-benchmark")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "benchmark-loop.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    report = run_interruptibly(run, args)
    if report is None:
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.out} (wall {report['wall_seconds']:.0f} s)")
    if args.plot is not None:
        plot_rounds(
            report["rounds"], args.plot,
            f"Labelling loop: {args.tasks} MTFL tasks, {args.per_round} labels a round, "
            f"{args.epochs} epochs",
        )  # fmt: skip
        say(f"wrote {args.plot}")
    with contextlib.suppress(Exception):
        csv.writer(sys.stdout).writerows(
            [["round", "labels", "outcome", "s_to_predictions", "s_waited", "train_s", "e05",
              "e10", "n", "fixed_e05", "fixed_e10", "fixed_n"]]
            + [[r["round"], r["labels"], r["outcome"], r["seconds_to_predictions"],
                r.get("seconds_waited"), r["train_seconds"], f"{r['e05']:.3f}",
                f"{r['e10']:.3f}", r["n"], f"{r['fixed_e05']:.3f}", f"{r['fixed_e10']:.3f}",
                r["fixed_n"]]
               for r in report["rounds"]]
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
