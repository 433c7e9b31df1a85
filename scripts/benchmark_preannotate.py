#!/usr/bin/env python
"""Benchmark batch pre-annotation through the job queue with 1 and with 2 workers: images per
second, and the scaling between the two.

    python scripts/benchmark_preannotate.py [--images 2000] [--workers 1,2]
        [--csv ../shared/data/mtfl-train/eyes.csv --root ../shared/data/mtfl-train]
        [--work-dir out/preannotate-benchmark] [--json out/benchmark-preannotate.json]

Starts Label Studio (from .venv-ls, a copy of the migrated template the e2e tests use, as
scripts/benchmark_loop.py does), a redis-server on a free port, this backend with REDIS_URL and
`python -m backend.worker` processes, all on 127.0.0.1 with their data and logs under
--work-dir (emptied first), and stops them all at the end (also on Ctrl-C, SIGTERM or an
error). The images are --images faces from the CSV (shuffled with --seed), or, without --csv,
synthetic faces made by tests/face_dataset.py (320x320 PNG, the astronaut warped).

For each worker count, in order: a fresh project with the same images (uploaded, not timed),
the workers started (the running ones kept: 1, then a 2nd), then POST /jobs/predict and
GET /jobs/<id> until the job is finished; seconds from the request to "finished" (planning,
chunk jobs, imports into Label Studio), with a progress bar of the predictions Label Studio
holds. Every task must then have exactly one prediction of the version, or the run fails.
The report: images/s per worker count and the ratio of the last to the first, in --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # benchmark_loop, next to this file
import benchmark_loop as loop  # noqa: E402 - Label Studio, its API and uploads
from benchmark_loop import Api, say  # noqa: E402
from polling import wait_for  # noqa: E402 - tests/, on the path through benchmark_loop

from backend.evaluation import TruthRow  # noqa: E402

LABEL_CONFIG = REPO / "label_config" / "pupils.xml"
POLL_S = 0.5
WORK_DIR_MARKERS = ("label-studio-data", "backend-models", "ls-settings")


# ---------------------------------------------------------------------------------------------
# Pure parts


def parse_workers(text: str) -> list[int]:
    """'1,2' -> [1, 2]: increasing worker counts (workers are added, never removed)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--workers must be counts like 1,2, got {text!r}"
        ) from None
    if not counts or counts[0] < 1 or any(b <= a for a, b in zip(counts, counts[1:], strict=False)):
        raise argparse.ArgumentTypeError(f"--workers must increase from 1 or more, got {text!r}")
    return counts


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Images/s of each run and the scaling: last run's images/s over the first's."""
    first, last = runs[0], runs[-1]
    return {
        "images_per_s": {str(r["workers"]): r["images_per_s"] for r in runs},
        "scaling": round(last["images_per_s"] / first["images_per_s"], 2),
        "scaling_between": [first["workers"], last["workers"]],
    }


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot work, or None."""
    if args.images < 1:
        return "--images must be at least 1"
    if (args.csv is None) != (args.root is None):
        return "--csv and --root go together (or neither: synthetic faces)"
    if args.csv is not None and not args.csv.is_file():
        return f"--csv {args.csv}: no such file"
    if args.root is not None and not args.root.is_dir():
        return f"--root {args.root}: no such directory"
    work = args.work_dir
    if work.exists() and (
        not work.is_dir()
        or (any(work.iterdir()) and not any((work / n).exists() for n in WORK_DIR_MARKERS))
    ):
        return f"--work-dir {work} is not empty and not a benchmark work dir (it is emptied)"
    return None


def pick_faces(rows: Sequence[TruthRow], n: int, seed: int) -> list[TruthRow]:
    """`n` rows in a shuffled order (any faces: nothing is scored here)."""
    if len(rows) < n:
        raise ValueError(f"the CSV has {len(rows)} faces; --images {n} asked for more")
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Servers


def synthetic_faces(directory: Path, n: int, seed: int) -> tuple[Path, list[TruthRow]]:
    """`n` warped astronauts (tests/face_dataset.py); (their folder, their rows)."""
    sys.path.insert(0, str(REPO / "tests"))
    from face_dataset import write_dataset

    csv_path = write_dataset(directory, n, seed=seed)
    return directory, loop.read_rows(csv_path)


@contextlib.contextmanager
def redis_server(work_dir: Path) -> Iterator[str]:
    """A redis-server of its own on a free port (tests/redis_server.py); its URL."""
    from redis_server import RedisServer  # tests/, on the path through benchmark_loop

    server = RedisServer(work_dir / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


class Workers:
    """`python -m backend.worker` processes with the backend's environment, added one by one;
    all stopped on close."""

    def __init__(self, e2e: Any, work_dir: Path, ls: Any, redis_url: str) -> None:
        self.e2e, self.work_dir, self.redis_url = e2e, work_dir, redis_url
        left_out = ("LABEL_STUDIO_", "BASIC_AUTH", "REDIS_", "TRAIN_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(left_out)}
        env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token, REDIS_URL=redis_url,
                   MODEL_DIR=str(work_dir / "backend-models"), LOG_LEVEL="INFO",
                   PYTHONUNBUFFERED="1")  # fmt: skip
        self.env = env
        self.servers: list[Any] = []

    def grow_to(self, count: int) -> None:
        """Start workers until `count` run, and wait until all are registered in Redis (each
        builds the detector first)."""
        from redis import Redis
        from rq import Worker

        while len(self.servers) < count:
            n = len(self.servers) + 1
            log_path = self.work_dir / f"worker-{n}.log"
            proc = self.e2e._start([sys.executable, "-m", "backend.worker"], self.env, log_path,
                                   cwd=REPO)  # fmt: skip
            self.servers.append(self.e2e.Server(name=f"worker {n}", url="", proc=proc,
                                                log_path=log_path))  # fmt: skip
        connection = Redis.from_url(self.redis_url)

        def registered() -> bool:
            for server in self.servers:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
            return len(Worker.all(connection=connection)) == count

        wait_for(f"{count} workers to register", registered, 180, 0.5)

    def close(self) -> None:
        for server in self.servers:
            server.stop()


# ---------------------------------------------------------------------------------------------
# One run


def new_project(api: Api, title: str, root: Path, faces: Sequence[TruthRow]) -> int:
    """A project with the faces as tasks (Label Studio uploads); its id."""
    config = LABEL_CONFIG.read_text(encoding="utf-8")
    pid = api("POST", "/api/projects", json={"title": title, "label_config": config})["id"]
    loop.upload(api, pid, root, faces)
    return pid


def preannotate(api: Api, backend: Any, pid: int, n: int, timeout_s: float) -> dict[str, Any]:
    """POST /jobs/predict and wait for the job to finish; what it took."""
    started = time.monotonic()
    r = requests.post(f"{backend.url}/jobs/predict", json={"project": pid}, auth=backend.auth,
                      timeout=60)  # fmt: skip
    if r.status_code != 202:
        raise RuntimeError(f"POST /jobs/predict: {r.status_code} {r.text[:300]}")
    job, version = r.json()["job"], r.json()["model_version"]
    bar = tqdm(total=n, unit="image", desc=f"project {pid}", leave=False)
    with bar:
        while True:
            status = requests.get(f"{backend.url}/jobs/{job}", auth=backend.auth, timeout=60)
            body = status.json()
            if body.get("status") == "failed":
                raise RuntimeError(f"job {job} failed: {body.get('error')}")
            if body.get("status") == "finished":
                seconds = time.monotonic() - started
                break
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"job {job} not finished after {timeout_s:.0f} s: {body}")
            counts = api("GET", f"/api/projects/{pid}/model-versions")
            bar.n = min(int(counts.get(version, 0)), n)
            bar.set_postfix_str(_chunks(body), refresh=False)
            bar.refresh()
            time.sleep(POLL_S)
    check_predicted(api, pid, n, version)
    result = body.get("result") or {}
    return {"project": pid, "job": job, "version": version, "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 2), "chunks": len(result.get("chunks") or []),
            "created": result.get("created")}  # fmt: skip


def check_predicted(api: Api, pid: int, n: int, version: str) -> None:
    """Every one of the `n` tasks has exactly one prediction of `version`, or RuntimeError."""
    tasks = api.tasks(pid)
    counts = {t: sum(p["model_version"] == version for p in task["predictions"])
              for t, task in tasks.items()}  # fmt: skip
    wrong = {t: c for t, c in counts.items() if c != 1}
    if len(tasks) != n or wrong:
        shown = list(wrong.items())[:5]
        raise RuntimeError(f"project {pid}: {len(tasks)} tasks of {n}; {len(wrong)} without "
                           f"exactly one prediction of {version}: {shown}")  # fmt: skip


def _chunks(body: dict) -> str:
    chunks = body.get("chunks")
    if not isinstance(chunks, dict):
        return str(body.get("status"))
    return f"chunks {chunks.get('finished', 0)}/{chunks.get('total', 0)}"


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    work_dir = args.work_dir.resolve()
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    if args.csv is None:
        say(f"making {args.images} synthetic faces")
        root, faces = synthetic_faces(work_dir / "faces", args.images, args.seed)
        source = "synthetic 320x320 PNG (tests/face_dataset.py)"
    else:
        root, faces = args.root, pick_faces(loop.read_rows(args.csv), args.images, args.seed)
        source = f"{args.csv} ({args.root})"
    e2e = loop._e2e()
    runs: list[dict[str, Any]] = []
    with loop.label_studio(e2e, work_dir) as ls, redis_server(work_dir) as redis_url:
        api = Api(ls.url, ls.headers)
        with e2e.running_backend(work_dir, ls, "backend", REDIS_URL=redis_url) as backend:
            say(f"backend ready at {backend.url} (log {backend.log_path})")
            workers = Workers(e2e, work_dir, ls, redis_url)
            try:
                for count in args.workers:
                    pid = new_project(api, f"Pre-annotation, {count} workers", root, faces)
                    say(f"project {pid}: {len(faces)} images uploaded; starting {count} "
                        "worker(s)")  # fmt: skip
                    workers.grow_to(count)
                    one = preannotate(api, backend, pid, len(faces), args.timeout)
                    runs.append({"workers": count, **one})
                    say(f"{count} worker(s): {one['images_per_s']:.1f} images/s ({len(faces)} "
                        f"in {one['seconds']:.1f} s, {one['chunks']} chunks)")  # fmt: skip
            finally:
                workers.close()
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "images": args.images, "source": source, "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": runs, **summarise(runs),
        "wall_seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=parse_workers, default=[1, 2],
                        help="worker counts in order, e.g. 1,2 (default)")  # fmt: skip
    parser.add_argument("--csv", type=Path, default=None, help="truth CSV (file column)")
    parser.add_argument("--root", type=Path, default=None, help="folder the CSV's files are in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--work-dir", type=Path, default=REPO / "out" / "preannotate-benchmark")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "benchmark-preannotate.json")
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    report = loop.run_interruptibly(run, args)
    if report is None:
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    for r in report["runs"]:
        print(f"workers={r['workers']} images={args.images} seconds={r['seconds']:.1f} "
              f"images_per_s={r['images_per_s']:.2f} chunks={r['chunks']}")  # fmt: skip
    print(f"scaling {report['scaling_between'][0]} -> {report['scaling_between'][1]} workers: "
          f"x{report['scaling']:.2f}; wrote {args.json}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
