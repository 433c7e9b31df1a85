"""Point a Label Studio project's queue at the tasks the model is least sure of.

    python scripts/active_learning.py --url LS_URL --api-key KEY --project ID|TITLE \
        [--backend-url URL] [--model-version V] [--next 10]

(URL and key also from LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY.) Idempotent; each run:

1. picks the model version whose predictions rank the tasks: --model-version, else the version
   the backend serves for this project (--backend-url, GET /versions?project=ID) when Label
   Studio holds its predictions, else the version with the most predictions in the project;
2. makes it the project's model version (Label Studio shows only that version's predictions
   and fills the "Prediction score" column from them) and sets the project's task sampling
   to "Uncertainty sampling" (the open-source server accepts it through the API: /next then
   serves the lowest score first);
3. creates, or updates, the Data Manager view "Active learning" sorted by prediction score,
   lowest first: "Label Tasks As Displayed" in that view is the annotators' queue;
4. prints the next --next unlabelled tasks of that queue with their scores.

The score is the model's confidence that every pupil of the task is right (README, "Active
learning"), so the lowest score is the task a label teaches most.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/active_learning.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # the SDK's HTTP library: its connection errors
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.label_studio import LabelStudioClient, LabelStudioError
from backend.ls_auth import LabelStudioAuth, LabelStudioAuthError

log = logging.getLogger("active_learning")

VIEW_TITLE = "Active learning"
ORDERING = ["tasks:predictions_score"]  # ascending: least sure first
SAMPLING = "Uncertainty sampling"


class Failure(RuntimeError):
    """A problem the user must fix; printed as one line, no traceback."""


@dataclass(frozen=True)
class QueuedTask:
    """One task of the active-learning queue."""

    id: int
    score: float | None
    image: str


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"),
                        help="Label Studio URL (env LABEL_STUDIO_URL)")  # fmt: skip
    parser.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="legacy or personal token (env LABEL_STUDIO_API_KEY)")  # fmt: skip
    parser.add_argument("--project", required=True, help="project id or exact title")
    parser.add_argument("--backend-url", help="this backend, to ask which version it serves")
    parser.add_argument("--backend-user", default=os.environ.get("BASIC_AUTH_USER"),
                        help="backend basic-auth user (env BASIC_AUTH_USER)")  # fmt: skip
    parser.add_argument("--backend-password", default=os.environ.get("BASIC_AUTH_PASS"),
                        help="backend basic-auth password (env BASIC_AUTH_PASS)")  # fmt: skip
    parser.add_argument("--model-version", help="rank by this version's predictions")
    parser.add_argument("--next", type=int, default=10, help="how many queued tasks to print")
    args = parser.parse_args(argv)
    if not args.url or not args.api_key:
        parser.error("--url and --api-key (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY) are needed")
    if args.next < 0:
        parser.error("--next must be >= 0")
    return args


def find_project(client: LabelStudio, project: str) -> int:
    """The id of the project named by id or exact title."""
    if project.isdigit():
        return int(client.projects.get(id=int(project)).id)
    matches = [p.id for p in client.projects.list(title=project) if p.title == project]
    if not matches:
        raise Failure(f"no project titled {project!r}")
    if len(matches) > 1:
        raise Failure(f"{len(matches)} projects are titled {project!r}; pass its id instead")
    return int(matches[0])


def backend_version(url: str, project: int, auth: tuple[str, str] | None) -> str | None:
    """The version the backend serves for the project (None when it cannot say)."""
    try:
        response = requests.get(
            f"{url.rstrip('/')}/versions", params={"project": project}, auth=auth, timeout=10
        )
        response.raise_for_status()
        return response.json().get("serving")
    except (requests.RequestException, ValueError) as e:
        log.warning("backend %s did not say which version it serves: %s", url, e)
        return None


def choose_version(available: dict[str, int], wanted: str | None, served: str | None) -> str:
    """The version to rank by: the one asked for, else the served one, else the most used."""
    if wanted is not None:
        if wanted not in available:
            raise Failure(
                f"model version {wanted!r} has no predictions in this project; it has "
                f"{', '.join(sorted(available)) or 'none'}"
            )
        return wanted
    if served in available:
        return served
    if not available:
        raise Failure(
            "the project has no predictions to rank by: run scripts/import_images.py "
            "--preannotate, or Retrieve Predictions in Label Studio, first"
        )
    return max(available, key=lambda v: (available[v], v))


def ensure_view(client: LabelStudio, project: int) -> int:
    """The id of the project's "Active learning" view, created or re-sorted."""
    data = {"title": VIEW_TITLE, "ordering": ORDERING}
    for view in client.views.list(project=project):
        if (view.data or {}).get("title") == VIEW_TITLE:
            if (view.data or {}).get("ordering") != ORDERING:
                client.views.update(id=str(view.id), project=project,
                                    data={**view.data, **data})  # fmt: skip
            return int(view.id)
    return int(client.views.create(project=project, data=data).id)


def queue(client: LabelStudio, project: int, view: int, n: int) -> list[QueuedTask]:
    """The first n unlabelled tasks of the view, in its order."""
    out: list[QueuedTask] = []
    if n == 0:
        return out
    for task in client.tasks.list(project=project, view=view, fields="all", page_size=max(n, 50)):
        if task.total_annotations or task.is_labeled:
            continue
        data = task.data or {}
        image = next((str(v) for v in data.values() if isinstance(v, str)), "")
        out.append(QueuedTask(int(task.id), task.predictions_score, image))
        if len(out) == n:
            break
    return out


def run(args: argparse.Namespace) -> int:
    client = LabelStudio(base_url=args.url.rstrip("/"), api_key=args.api_key)
    project = find_project(client, args.project)
    # The SDK has no call for the project's model versions; the backend's client has.
    api = LabelStudioClient(args.url, LabelStudioAuth(args.url, args.api_key))
    available = api.model_versions(project)
    served = None
    if args.backend_url:
        auth = (args.backend_user, args.backend_password) if args.backend_user else None
        served = backend_version(args.backend_url, project, auth)
    version = choose_version(available, args.model_version, served)
    client.projects.update(id=project, model_version=version, sampling=SAMPLING)
    view = ensure_view(client, project)
    print(f"project {project}: ranking by model version {version!r} "
          f"({available[version]} predictions); sampling {SAMPLING!r}; "
          f"view {VIEW_TITLE!r} (id {view}) sorted by prediction score, lowest first")  # fmt: skip
    if served is not None and served != version:
        print(f"note: the backend serves {served!r}, which has no predictions here yet")
    tasks = queue(client, project, view, args.next)
    if tasks:
        print(f"next {len(tasks)} tasks to label (least sure first):")
        for t in tasks:
            score = "none" if t.score is None else f"{t.score:.3f}"
            print(f"  task {t.id:>8}  score {score:>6}  {t.image}")
    elif args.next:
        print("every task is labelled")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        return run(args)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
    except ApiError as e:
        hint = " (wrong --api-key?)" if e.status_code == 401 else ""
        print(f"error: Label Studio answered HTTP {e.status_code}{hint}: {e.body}", file=sys.stderr)
    except (LabelStudioError, LabelStudioAuthError) as e:
        print(f"error: Label Studio at {args.url}: {e}", file=sys.stderr)
    except (OSError, requests.RequestException, httpx.HTTPError) as e:
        print(f"error: cannot reach Label Studio at {args.url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
