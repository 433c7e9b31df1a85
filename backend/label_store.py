"""The durable record of every annotation Label Studio told us about, and each project's
training state. One SQLite file (MODEL_DIR/labels.sqlite3), shared by every process.

Label Studio waits one second for a webhook and never retries, so an event is written here
before it is answered; everything else (training, queues) happens later and may fail without
losing a label. SQLite, not Redis, because the embedded default runs without Redis and because
labels must survive a Redis that keeps nothing on disk. WAL mode lets gunicorn workers, job
workers and the scheduler read while one writes; every write is one short transaction.

Annotations are keyed by Label Studio's annotation id. A newer copy replaces an older one (by
the annotation's own `updated_at`, so a late-delivered ANNOTATION_CREATED cannot undo an
ANNOTATION_UPDATED); a deletion leaves a tombstone, so an out-of-order update cannot bring a
deleted annotation back. Each project counts label changes (`label_seq`); a training run
records the count it saw (`trained_seq`), so "new labels since the last run" is a subtraction.

A write that cannot be made (the disk is full: SQLITE_FULL; the database locked past the
timeout) raises LabelStoreError, having changed nothing: SQLite rolls the transaction back, so
the store stays intact and callers must not report the event as recorded (the next training
run's reconciliation with Label Studio's API brings such annotations in once it can write).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILENAME = "labels.sqlite3"


class LabelStoreError(RuntimeError):
    """The label store cannot be read or written now (disk full, locked); nothing was changed.
    The message names the file and SQLite's reason."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,          -- Label Studio's annotation id
    project INTEGER NOT NULL,
    task INTEGER NOT NULL,
    task_data TEXT,                  -- JSON: the task's data (where its image is)
    annotation TEXT NOT NULL,        -- JSON: the annotation as Label Studio sent it
    updated_at TEXT,                 -- the annotation's own updated_at
    received REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS annotations_project ON annotations (project, deleted);
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    label_config TEXT,
    label_seq INTEGER NOT NULL DEFAULT 0,   -- label changes seen
    trained_seq INTEGER NOT NULL DEFAULT 0, -- label_seq the last finished run saw
    last_event REAL,
    requested REAL,                         -- START_TRAINING asked at this time, not yet run
    queued_job TEXT,                        -- the training job waiting in a queue, if any
    queued_at REAL,
    running_seq INTEGER,                    -- label_seq the running (or last started) run saw
    running_since REAL,
    retry_at REAL,                          -- after a failed run: not before this time
    failures INTEGER NOT NULL DEFAULT 0,
    last_run TEXT                           -- JSON: what the last run did and why
);
"""


@dataclass(frozen=True)
class StoredAnnotation:
    """One live annotation as stored."""

    id: int
    project: int
    task: int
    task_data: Mapping[str, Any]
    annotation: Mapping[str, Any]


@dataclass(frozen=True)
class ProjectState:
    """A project's training state."""

    id: int
    label_config: str | None
    label_seq: int
    trained_seq: int
    last_event: float | None
    requested: float | None
    queued_job: str | None
    queued_at: float | None
    running_seq: int | None
    running_since: float | None
    retry_at: float | None
    failures: int
    last_run: Mapping[str, Any] | None

    @property
    def new_labels(self) -> int:
        """Label changes since the last finished training run."""
        return self.label_seq - self.trained_seq


class LabelStore:
    """The label store under one model directory. Thread-safe; one connection per thread."""

    def __init__(self, model_dir: Path) -> None:
        self.path = Path(model_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # idempotent; executescript runs its own transaction

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid != os.getpid():
            db = None  # inherited through fork: a connection must not cross processes
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a recorded label survives a power cut
            except sqlite3.OperationalError as e:
                raise LabelStoreError(f"the label store {self.path} cannot be opened: "
                                      f"{_sqlite_reason(e)}") from e  # fmt: skip
            db.row_factory = sqlite3.Row
            self._local.db = db
            self._local.pid = os.getpid()
        return db

    @contextmanager
    def _write(self):
        """One short write transaction: committed whole, or rolled back and LabelStoreError
        (for SQLite's own errors: a full disk, a lock held past the timeout)."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")  # may fail too (SQLITE_FULL writing the WAL)
            except BaseException:
                self._roll_back(db)
                raise
        except sqlite3.OperationalError as e:
            raise LabelStoreError(f"the label store {self.path} cannot be written, nothing was "
                                  f"recorded: {_sqlite_reason(e)}") from e  # fmt: skip

    def _roll_back(self, db: sqlite3.Connection) -> None:
        """End the failed transaction (SQLite may have rolled it back itself); a connection
        that cannot is dropped, so this thread's next write starts clean."""
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            log.warning("label store: rollback failed; reopening the connection")
            self._local.db = None
            db.close()

    # -- annotations ---------------------------------------------------------------------------

    def upsert(
        self,
        project: int,
        task: int,
        annotation: Mapping[str, Any],
        task_data: Mapping[str, Any] | None,
        label_config: str | None = None,
        revive: bool = False,
    ) -> bool:
        """Keep `annotation` (it must have an integer "id"); True when it changed what we hold.

        An older copy than the one held (by updated_at) and any copy of a deleted annotation
        are ignored, unless `revive`: Label Studio's API listing it (reconciliation) is proof
        that it exists, e.g. after Label Studio's database was reset and ids were reused.
        """
        annotation_id = int(annotation["id"])
        updated = annotation.get("updated_at")
        updated = updated if isinstance(updated, str) else None
        text = json.dumps(annotation, sort_keys=True)
        content = _content(annotation)
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT annotation, updated_at, deleted, task_data FROM annotations WHERE id=?",
                (annotation_id,),
            ).fetchone()
            if row is not None:
                if row["deleted"] and not revive:
                    log.warning(
                        "annotation=%s project=%s ignored: it was deleted before (if Label "
                        "Studio's database was reset, Start Training reconciles)",
                        annotation_id, project,
                    )  # fmt: skip
                    return False
                if not row["deleted"] and _content(json.loads(row["annotation"])) == content:
                    if row["task_data"] is None and task_data is not None:
                        db.execute(
                            "UPDATE annotations SET task_data=? WHERE id=?",
                            (json.dumps(task_data), annotation_id),
                        )
                    return False
                if (
                    not row["deleted"]
                    and updated
                    and row["updated_at"]
                    and updated < row["updated_at"]
                ):
                    return False
            data = json.dumps(task_data) if task_data is not None else None
            if data is None and row is not None:
                data = row["task_data"]
            db.execute(
                "INSERT INTO annotations (id, project, task, task_data, annotation, updated_at, "
                "received) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "project=excluded.project, task=excluded.task, task_data=excluded.task_data, "
                "annotation=excluded.annotation, updated_at=excluded.updated_at, "
                "received=excluded.received, deleted=0",
                (annotation_id, project, task, data, text, updated, now),
            )
            self._touch(db, project, now, label_config)
        return True

    def delete(self, project: int, annotation_ids: Iterable[int]) -> int:
        """Tombstone these annotations; returns how many were live (or unknown) before."""
        now = time.time()
        changed = 0
        with self._write() as db:
            for annotation_id in annotation_ids:
                row = db.execute(
                    "SELECT deleted FROM annotations WHERE id=?", (annotation_id,)
                ).fetchone()
                if row is not None and row["deleted"]:
                    continue
                db.execute(
                    "INSERT INTO annotations (id, project, task, annotation, received, deleted) "
                    "VALUES (?, ?, -1, '{}', ?, 1) ON CONFLICT(id) DO UPDATE SET deleted=1, "
                    "received=excluded.received",
                    (annotation_id, project, now),
                )
                changed += 1
            if changed:
                self._touch(db, project, now, None)
        return changed

    def annotations(self, project: int) -> list[StoredAnnotation]:
        """The project's live annotations, oldest first."""
        rows = (
            self._db()
            .execute(
                "SELECT id, project, task, task_data, annotation FROM annotations "
                "WHERE project=? AND deleted=0 ORDER BY id",
                (project,),
            )
            .fetchall()
        )
        return [
            StoredAnnotation(
                id=r["id"], project=r["project"], task=r["task"],
                task_data=json.loads(r["task_data"]) if r["task_data"] else {},
                annotation=json.loads(r["annotation"]),
            )
            for r in rows
        ]  # fmt: skip

    def annotation_ids(self, project: int) -> set[int]:
        """Ids of the project's live annotations."""
        rows = (
            self._db()
            .execute("SELECT id FROM annotations WHERE project=? AND deleted=0", (project,))
            .fetchall()
        )
        return {r["id"] for r in rows}

    # -- projects ------------------------------------------------------------------------------

    def _touch(self, db: sqlite3.Connection, project: int, now: float, config: str | None) -> None:
        db.execute(
            "INSERT INTO projects (id, label_config, label_seq, last_event) VALUES (?, ?, 1, ?) "
            "ON CONFLICT(id) DO UPDATE SET label_seq=label_seq+1, last_event=excluded.last_event, "
            "label_config=COALESCE(excluded.label_config, label_config)",
            (project, config, now),
        )

    def note_project(self, project: int, label_config: str | None) -> None:
        """Make sure the project exists; remember its label config when given."""
        with self._write() as db:
            db.execute(
                "INSERT INTO projects (id, label_config) VALUES (?, ?) ON CONFLICT(id) DO UPDATE "
                "SET label_config=COALESCE(excluded.label_config, label_config)",
                (project, label_config),
            )

    def request_training(self, project: int, label_config: str | None) -> None:
        """START_TRAINING: train this project at the next chance, whatever the policy says."""
        self.note_project(project, label_config)
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE projects SET requested=COALESCE(requested, ?), retry_at=NULL WHERE id=?",
                (now, project),
            )

    def project(self, project: int) -> ProjectState | None:
        row = self._db().execute("SELECT * FROM projects WHERE id=?", (project,)).fetchone()
        return _state(row) if row is not None else None

    def projects(self) -> list[ProjectState]:
        rows = self._db().execute("SELECT * FROM projects ORDER BY id").fetchall()
        return [_state(r) for r in rows]

    def claim_queue(self, project: int, job_id: str, replacing: str | None) -> bool:
        """Give the project's one queue slot to `job_id` if it is still held by `replacing`
        (None: free); False when someone else changed it first."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE projects SET queued_job=?, queued_at=? WHERE id=? AND queued_job IS ?",
                (job_id, time.time(), project, replacing),
            )
            return cursor.rowcount == 1

    def unmark_queued(self, project: int, job_id: str) -> None:
        """Release the queue slot if `job_id` still holds it (enqueue failed, or job started)."""
        with self._write() as db:
            db.execute(
                "UPDATE projects SET queued_job=NULL, queued_at=NULL WHERE id=? AND queued_job=?",
                (project, job_id),
            )

    def start_run(self, project: int, job_id: str) -> tuple[int, float]:
        """A run starts: it frees the queue slot and takes the labels seen so far. Returns
        (label_seq it trains on, start time)."""
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO projects (id) VALUES (?) ON CONFLICT(id) DO NOTHING", (project,)
            )
            db.execute(
                "UPDATE projects SET queued_job=CASE WHEN queued_job=? THEN NULL ELSE queued_job "
                "END, running_seq=label_seq, running_since=? WHERE id=?",
                (job_id, now, project),
            )
            row = db.execute("SELECT label_seq FROM projects WHERE id=?", (project,)).fetchone()
        return int(row["label_seq"]), now

    def finish_run(
        self, project: int, seen_seq: int, started: float, record: Mapping[str, Any]
    ) -> None:
        """A run that saw `seen_seq` finished (trained, rejected or had too few labels)."""
        with self._write() as db:
            db.execute(
                "UPDATE projects SET trained_seq=MAX(trained_seq, ?), failures=0, retry_at=NULL, "
                "requested=CASE WHEN requested <= ? THEN NULL ELSE requested END, last_run=? "
                "WHERE id=?",
                (seen_seq, started, json.dumps(record), project),
            )

    def fail_run(self, project: int, retry_at: float, record: Mapping[str, Any]) -> None:
        """A run failed; the labels stay pending and the next try waits until `retry_at`."""
        with self._write() as db:
            db.execute(
                "UPDATE projects SET failures=failures+1, retry_at=?, last_run=? WHERE id=?",
                (retry_at, json.dumps(record), project),
            )


# The fields that decide what an annotation teaches. Label Studio's webhook and its API
# serialise annotations with different extra fields; only a change in these is a new label.
_CONTENT_FIELDS = ("result", "was_cancelled", "parent_prediction", "task")


def _content(annotation: Mapping[str, Any]) -> str:
    return json.dumps({k: annotation.get(k) for k in _CONTENT_FIELDS}, sort_keys=True)


_stores: dict[Path, LabelStore] = {}
_stores_lock = threading.Lock()


def label_store(model_dir: Path) -> LabelStore:
    """The process's LabelStore for `model_dir` (one per directory)."""
    key = Path(model_dir).resolve()
    with _stores_lock:
        if key not in _stores:
            _stores[key] = LabelStore(key)
        return _stores[key]


def _sqlite_reason(e: sqlite3.Error) -> str:
    """SQLite's error name and message: "SQLITE_FULL: database or disk is full"."""
    name = getattr(e, "sqlite_errorname", None)
    return f"{name}: {e}" if name else str(e)


def _state(row: sqlite3.Row) -> ProjectState:
    """A projects row as ProjectState (same names; last_run decoded from JSON)."""
    values = {key: row[key] for key in row.keys()}
    values["last_run"] = json.loads(values["last_run"]) if values["last_run"] else None
    return ProjectState(**values)
