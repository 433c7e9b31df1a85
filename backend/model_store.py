"""Model versions on disk: written atomically, listed with their metrics, one promoted to serve.

Layout under the store's root (MODEL_DIR):

    versions/<name>/            one directory per trained version, complete or absent
        metadata.json           written last: metrics, data seen, preprocessing, code version
        ...                     whatever the trainer wrote (weights, ...)
    serving.json                which version serves (absent: the coarse detector serves)
    decisions.jsonl             every promotion and rejection, with its reason, append-only
    .tmp-<name>/                a version being written; never listed, swept when stale

A version is written into a private temporary directory and renamed into `versions/` only once
complete, so a crash mid-training never leaves a half-written version where a server would load
it. `serving.json` is replaced with `os.replace`, so readers see the old or the new pointer,
never a torn one. Every process (gunicorn and RQ workers) reads the pointer itself; nothing
needs a restart to see a promotion.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METADATA = "metadata.json"
SERVING = "serving.json"
DECISIONS = "decisions.jsonl"
_TMP_PREFIX = ".tmp-"


class ModelStoreError(RuntimeError):
    """A version that does not exist or cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelVersion:
    """A complete version on disk and what its metadata.json says."""

    name: str
    path: Path
    metadata: Mapping[str, Any]

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.metadata.get("metrics", {})


class ModelStore:
    """The versions under one root directory (created when missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    # -- writing -------------------------------------------------------------------------------

    def create(
        self, write: Callable[[Path], None], metadata: Mapping[str, Any], prefix: str = "v"
    ) -> ModelVersion:
        """A new version: `write(dir)` fills a private directory, then it appears atomically.

        `metadata` (JSON-serialisable) is written after `write` returns, with the version's name
        and creation time added. If `write` raises, nothing is left behind and the error
        propagates.
        """
        name = _new_name(prefix)
        tmp = self.root / f"{_TMP_PREFIX}{name}"
        tmp.mkdir()
        try:
            write(tmp)
            full = {**metadata, "name": name, "created": _now()}
            _write_json(tmp / METADATA, full)
            _fsync_tree(tmp)
            os.rename(tmp, self.versions_dir / name)
            _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("model version written name=%s", name)
        return ModelVersion(name=name, path=self.versions_dir / name, metadata=full)

    def sweep(self, older_than_s: float = 24 * 3600) -> list[str]:
        """Remove temporary directories left by crashed writers; returns their names."""
        removed = []
        cutoff = time.time() - older_than_s
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
        return removed

    # -- reading -------------------------------------------------------------------------------

    def get(self, name: str) -> ModelVersion:
        """One complete version; ModelStoreError saying why when it cannot be used."""
        if not name or "/" in name or name.startswith("."):
            raise ModelStoreError(f"not a version name: {name!r}")
        path = self.versions_dir / name
        if not path.is_dir():
            raise ModelStoreError(f"model version {name!r} does not exist in {self.versions_dir}")
        try:
            metadata = json.loads((path / METADATA).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelStoreError(f"model version {name!r} has no {METADATA}") from None
        except (OSError, ValueError) as e:
            raise ModelStoreError(f"model version {name!r}: unreadable {METADATA}: {e}") from None
        if not isinstance(metadata, dict):
            raise ModelStoreError(f"model version {name!r}: {METADATA} is not an object")
        return ModelVersion(name=name, path=path, metadata=metadata)

    def versions(self) -> list[ModelVersion]:
        """Every usable version, newest first; unusable ones are logged and left out."""
        found = []
        for path in self.versions_dir.iterdir():
            if not path.is_dir():
                continue
            try:
                found.append(self.get(path.name))
            except ModelStoreError as e:
                log.warning("model version skipped: %s", e)
        return sorted(found, key=lambda v: v.name, reverse=True)

    # -- serving -------------------------------------------------------------------------------

    def promote(self, name: str, reason: str) -> ModelVersion:
        """Make `name` the serving version (atomically) and record why."""
        version = self.get(name)
        pointer = {"version": name, "promoted": _now(), "reason": reason}
        _write_json(self.root / SERVING, pointer, atomic=True)
        self._decide("promoted", name, reason)
        log.info("model version promoted name=%s reason=%s", name, reason)
        return version

    def reject(self, name: str, reason: str) -> None:
        """Record that `name` was trained but not promoted, and why."""
        self.get(name)
        self._decide("rejected", name, reason)
        log.info("model version rejected name=%s reason=%s", name, reason)

    def serving(self) -> ModelVersion | None:
        """The promoted version, or None (the coarse detector serves).

        A pointer to a version that has become unusable is reported as None with a warning, so
        callers fall back to a model they can load rather than fail.
        """
        try:
            pointer = json.loads((self.root / SERVING).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("serving pointer unreadable, serving the fallback: %s", e)
            return None
        try:
            return self.get(str(pointer.get("version", "")))
        except (ModelStoreError, AttributeError) as e:
            log.warning("serving version unusable, serving the fallback: %s", e)
            return None

    def chosen(self, name: str | None) -> ModelVersion:
        """Version `name`, or the promoted one when `name` is None (what scripts act on).

        Raises ModelStoreError saying what to pass when there is no such version.
        """
        if name is not None:
            return self.get(name)
        serving = self.serving()
        if serving is None:
            names = [v.name for v in self.versions()]
            raise ModelStoreError(
                f"no promoted version in {self.root}; pass --version (one of: "
                f"{', '.join(names) or 'none, train one with scripts/train.py'})"
            )
        return serving

    def decisions(self) -> list[dict[str, Any]]:
        """Promotions and rejections, oldest first (torn trailing lines are skipped)."""
        path = self.root / DECISIONS
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("decisions log: unreadable line skipped")
        return out

    def _decide(self, what: str, name: str, reason: str) -> None:
        line = json.dumps({"at": _now(), "decision": what, "version": name, "reason": reason})
        with open(self.root / DECISIONS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _new_name(prefix: str) -> str:
    """Sortable by creation time and unique across processes: v20261121T141500123456Z-3f2a9c."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{prefix}{stamp}-{secrets.token_hex(3)}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Mapping[str, Any], atomic: bool = False) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    target = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp") if atomic else path
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
        _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
