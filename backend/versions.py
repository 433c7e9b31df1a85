"""What GET /versions reports: every trained version with its metrics and status, and each
project's training state.

`versions` is the list of names Label Studio shows (serving first, as before); `details` says
for each version which project trained it, whether it serves, was rejected (and why) or served
before, or is unusable (and why: unreadable metadata, files damaged since it was written), and
its validation metrics; `training` says per project how many label changes are recorded, how
many the last run took, whether a run waits, and what the last run did; `problems` lists every
model directory whose promoted version does not serve as promoted (the reasons, what serves
instead, what a restart would serve), empty when all is well.

"Serving" is what this process serves where it has loaded a model (backend/serving.py), else
what a process started now would serve (the files alone, no model loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend.label_store import FILENAME, label_store
from backend.model_store import SERVING, ModelStore
from backend.project_dirs import project_dir, training_running
from backend.serving import loaded_status
from backend.settings import Settings

SERVING_STATUS = "serving"
REJECTED = "rejected"
RETIRED = "retired"  # promoted once, replaced since
TRAINED = "trained"  # no decision recorded (scripts/train.py without --promote)
UNUSABLE = "unusable"  # metadata unreadable, or files damaged since written: never served


def versions_report(settings: Settings, serving: str, project: int | None) -> dict[str, Any]:
    """The /versions body; `project` limits it to one project (and the global versions)."""
    roots: list[tuple[int | None, Path]] = [(None, settings.model_dir)]
    projects_dir = settings.model_dir / "projects"
    if project is not None:
        roots.append((project, project_dir(settings.model_dir, project)))
    elif projects_dir.is_dir():
        ids = sorted(int(p.name) for p in projects_dir.iterdir() if p.name.isdigit())
        roots += [(i, project_dir(settings.model_dir, i)) for i in ids]
    details: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for owner, root in roots:
        found, problem = _versions(owner, root)
        details += found
        if problem is not None:
            problems.append(problem)
    details.sort(key=lambda d: d["created"] or "", reverse=True)
    names = [serving, *(d["name"] for d in details if d["name"] != serving)]
    return {
        "versions": names,
        "serving": serving,
        "details": details,
        "training": _training(settings, project),
        "problems": problems,
    }


def _versions(owner: int | None, root: Path) -> tuple[list[dict[str, Any]], dict | None]:
    """The directory's versions, and what is wrong with what it serves (None: nothing)."""
    if not (root / "versions").is_dir():
        return [], None
    store = ModelStore(root)
    decisions = {d.get("version"): d for d in store.decisions()}  # the latest per version
    problem = None
    current: str | None = None
    broken: dict[str, str] = {}  # version -> why it cannot serve
    if (root / SERVING).exists():
        live = loaded_status(root)  # what this process has loaded, if it serves from here
        choice = store.resolve_serving()  # what a process started now would serve
        current = choice.version.name if choice.version is not None else None
        broken = {name: why for name, why in choice.passed_over if name is not None}
        if live is not None and live["serving"] is not None:
            current = live["serving"]
        reasons = live["problems"] if live is not None else list(choice.problems)
        if reasons:
            problem = {
                "project": owner,
                "promoted": choice.pointer,
                "serving": current,
                "after_restart": choice.version.name if choice.version is not None else None,
                "reasons": reasons,
            }
    out = []
    for version in store.versions():
        decision = decisions.get(version.name) or {}
        why = broken.get(version.name)
        if version.name == current:
            status = SERVING_STATUS
        elif why is not None:
            status = UNUSABLE
        elif decision.get("decision") == "rejected":
            status = REJECTED
        elif decision.get("decision") == "promoted":
            status = RETIRED
        else:
            status = TRAINED
        data = version.metadata.get("data", {})
        out.append({
            "name": version.name,
            "project": owner,
            "status": status,
            "created": version.metadata.get("created"),
            "metrics": dict(version.metrics),
            "reason": decision.get("reason"),
            "train_faces": data.get("train_faces"),
            "val_faces": data.get("val_faces"),
            **({"problem": why} if why is not None else {}),
        })  # fmt: skip
    for name, why in store.unusable():
        out.append({
            "name": name, "project": owner, "created": None,
            "status": SERVING_STATUS if name == current else UNUSABLE,
            "metrics": {}, "reason": (decisions.get(name) or {}).get("reason"),
            "train_faces": None, "val_faces": None, "problem": why,
        })  # fmt: skip
    return out, problem


def _training(settings: Settings, project: int | None) -> list[dict[str, Any]]:
    if not (settings.model_dir / FILENAME).exists():
        return []
    store = label_store(settings.model_dir)
    states = store.projects() if project is None else [store.project(project)]
    return [
        {
            "project": s.id,
            "label_changes": s.label_seq,
            "trained_on": s.trained_seq,
            "new_labels": s.new_labels,
            "requested": s.requested is not None,
            "queued_job": s.queued_job,
            "running": training_running(settings.model_dir, s.id),
            "last_started": s.running_since,  # Unix time the latest run took its labels
            "failures": s.failures,
            "last_run": s.last_run,
        }
        for s in states
        if s is not None
    ]
