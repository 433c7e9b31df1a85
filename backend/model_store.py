"""Model versions on disk: written atomically, listed with their metrics, one promoted to serve.

Layout under the store's root (MODEL_DIR):

    versions/<name>/            one directory per trained version, complete or absent
        metadata.json           written last: metrics, data seen, preprocessing, code version
        ...                     whatever the trainer wrote (weights, ...)
    serving.json                which version serves (absent: the coarse detector serves)
    decisions.jsonl             every promotion and rejection, with its reason, append-only
    .tmp-<name>/                a version being written; never listed, swept when stale

A version is written into a private temporary directory and renamed into `versions/` only once
complete, so a crash mid-training (or a full disk) never leaves a half-written version where a
server would load it. `serving.json` is replaced with `os.replace`, so readers see the old or
the new pointer, never a torn one. Every process (gunicorn and RQ workers) reads the pointer
itself; nothing needs a restart to see a promotion.

metadata.json lists every file the writer wrote with its size and sha256 (`files`), so a version
damaged on disk afterwards (truncated, overwritten, a file deleted) is detected (`verify`)
rather than loaded. When the promoted version cannot be used, the version that serves is the
last good one promoted before it (`resolve_serving`, from decisions.jsonl), never a rejected
one; the reasons travel with the choice so servers can say why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

METADATA = "metadata.json"
SERVING = "serving.json"
DECISIONS = "decisions.jsonl"
FILES = "files"  # metadata.json's manifest: {relative path: {"bytes": n, "sha256": hex}}
_TMP_PREFIX = ".tmp-"

T = TypeVar("T")


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


@dataclass(frozen=True)
class ServingChoice(Generic[T]):
    """Which version serves, and why others were passed over.

    `pointer` is the version serving.json names (None: no pointer, or an unreadable one);
    `version` the one that serves: the pointer's, else the last good version promoted before
    it, else None (the next store, or the coarse detector). `loaded` is what the caller's
    `load` made of it; `passed_over` says, pointer first, which versions were passed over and
    why (name None: the pointer file itself); empty when the pointer's version serves."""

    pointer: str | None
    version: ModelVersion | None
    loaded: T | None
    passed_over: tuple[tuple[str | None, str], ...]

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(why for _, why in self.passed_over)


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

        `metadata` (JSON-serialisable) is written after `write` returns, with the version's name,
        creation time and the manifest of the files `write` made (`files`) added. If anything
        fails (`write` raises, the disk is full), nothing is left behind and the error
        propagates.
        """
        name = _new_name(prefix)
        tmp = self.root / f"{_TMP_PREFIX}{name}"
        tmp.mkdir()
        try:
            write(tmp)
            full = {**metadata, "name": name, "created": _now(), FILES: _manifest(tmp)}
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

    def unusable(self) -> list[tuple[str, str]]:
        """(name, why) of every version directory whose metadata cannot be read, newest first."""
        found = []
        for path in self.versions_dir.iterdir():
            if path.is_dir() and not path.name.startswith("."):
                try:
                    self.get(path.name)
                except ModelStoreError as e:
                    found.append((path.name, str(e)))
        return sorted(found, reverse=True)

    def verify(self, version: ModelVersion) -> list[str]:
        """What is wrong with the version's files compared with what was written (its manifest):
        a file missing, of another size, or with other bytes. Empty when intact, or when the
        version predates manifests (nothing to compare with). Hashes are cached per file
        state (size, mtime, inode), so checking an unchanged version again costs a few stats."""
        manifest = version.metadata.get(FILES)
        if manifest is None:
            return []
        if not isinstance(manifest, Mapping):
            return [f"{METADATA} '{FILES}' is not an object"]
        problems = []
        for rel, expected in sorted(manifest.items()):
            path = version.path / rel
            if not isinstance(expected, Mapping) or Path(rel).is_absolute() or ".." in rel:
                problems.append(f"{METADATA} lists {rel!r} oddly")
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                problems.append(f"{rel} is missing")
                continue
            except OSError as e:
                problems.append(f"{rel} cannot be read: {e}")
                continue
            if stat.st_size != expected.get("bytes"):
                problems.append(
                    f"{rel} has {stat.st_size} bytes, {expected.get('bytes')} when written"
                )
                continue
            try:
                digest = _sha256(path, stat)
            except OSError as e:
                problems.append(f"{rel} cannot be read: {e}")
                continue
            if digest != expected.get("sha256"):
                problems.append(f"{rel} differs from what was written (sha256)")
        return problems

    def check(self, name: str) -> ModelVersion:
        """`get(name)`, also refusing a version whose files were damaged since it was written."""
        version = self.get(name)
        problems = self.verify(version)
        if problems:
            raise ModelStoreError(f"model version {name!r} is damaged: {'; '.join(problems)}")
        return version

    # -- serving -------------------------------------------------------------------------------

    def promote(self, name: str, reason: str) -> ModelVersion:
        """Make `name` the serving version (atomically) and record why; a version whose files
        were damaged since it was written is refused (ModelStoreError)."""
        version = self.check(name)
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
        """The version that serves (see `resolve_serving`), or None (the coarse detector serves).

        A promoted version that has become unusable is passed over with a warning saying why,
        for the last good version promoted before it, so callers load a model that works
        rather than fail.
        """
        choice = self.resolve_serving()
        if choice.problems:
            log.warning(
                "serving version unusable (%s); serving %s", "; ".join(choice.problems),
                f"{choice.version.name}, the last good promoted version"
                if choice.version is not None else "the fallback",
            )  # fmt: skip
        return choice.version

    def resolve_serving(self, load: Callable[[ModelVersion], T] | None = None) -> ServingChoice[T]:
        """The version serving.json names if it can be used, else the newest good version that
        was promoted before it (decisions.jsonl; a rejected version never serves), else none.

        A version is good when its metadata reads, its files match their manifest, and `load`
        (when given: e.g. rebuilding the network) does not raise; what `load` returns is kept
        in the choice. No serving.json: nothing serves (the coarse detector). An unreadable
        serving.json: the newest good promoted version.
        """
        pointer, problem, candidates = self._serving_candidates()
        passed: list[tuple[str | None, str]] = [(None, problem)] if problem else []
        for name in candidates:
            try:
                version = self.check(name)
                loaded = load(version) if load is not None else None
            except ModelStoreError as e:
                passed.append((name, str(e)))
                continue
            except Exception as e:  # a loader's own failure: the next candidate may load
                passed.append((name, f"model version {name!r} failed to load: "
                                     f"{type(e).__name__}: {e}"))  # fmt: skip
                continue
            return ServingChoice(pointer, version, loaded, tuple(passed))
        return ServingChoice(pointer, None, None, tuple(passed))

    def _serving_candidates(self) -> tuple[str | None, str | None, list[str]]:
        """(the pointer's version, why the pointer is unreadable, names to try in order)."""
        try:
            pointer = json.loads((self.root / SERVING).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None, []
        except (OSError, ValueError) as e:
            pointer, problem = None, f"serving pointer unreadable: {e}"
        else:
            name = pointer.get("version") if isinstance(pointer, dict) else None
            if isinstance(name, str) and name:
                pointer, problem = name, None
            else:
                pointer, problem = None, f"serving pointer unreadable: {SERVING} names no version"
        promoted = [
            d.get("version") for d in self.decisions()
            if d.get("decision") == "promoted" and isinstance(d.get("version"), str)
        ]  # fmt: skip
        if pointer is not None and pointer in promoted:
            # Fall back to what served before the pointer's version was promoted (a pointer
            # written by hand may name an older version than the latest promotion).
            promoted = promoted[: len(promoted) - promoted[::-1].index(pointer) - 1]
        candidates = [pointer] if pointer is not None else []
        for name in reversed(promoted):
            if name not in candidates:
                candidates.append(name)
        return pointer, problem, candidates

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
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("decisions log: unreadable line skipped")
        return out

    def _decide(self, what: str, name: str, reason: str) -> None:
        line = json.dumps({"at": _now(), "decision": what, "version": name, "reason": reason})
        fd = os.open(self.root / DECISIONS, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A line torn by a full disk or a crash must not swallow this one.
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            data = (("\n" if torn else "") + line + "\n").encode("utf-8")
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, f"{DECISIONS}: short write")
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_name(prefix: str) -> str:
    """Sortable by creation time and unique across processes: v20261121T141500123456Z-3f2a9c."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{prefix}{stamp}-{secrets.token_hex(3)}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Mapping[str, Any], atomic: bool = False) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    target = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp") if atomic else path
    try:
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic:  # e.g. the disk is full: no half-written pointer left beside the real one
            target.unlink(missing_ok=True)
        raise
    if atomic:
        _fsync_dir(path.parent)


def _manifest(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under `root`: its path relative to `root`, size and sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = {
                "bytes": path.stat().st_size, "sha256": _sha256(path, None),
            }  # fmt: skip
    return out


_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def _sha256(path: Path, stat: os.stat_result | None) -> str:
    """The file's sha256; with `stat`, cached for as long as the file keeps that state."""
    key = None
    if stat is not None:
        key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        with _digests_lock:
            if key in _digests:
                return _digests[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    hexdigest = digest.hexdigest()
    if key is not None:
        with _digests_lock:
            if len(_digests) > 4096:
                _digests.clear()
            _digests[key] = hexdigest
    return hexdigest


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
