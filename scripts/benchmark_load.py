"""Load benchmark: /predict at rising concurrency while a training job runs, then a memory soak.

    python scripts/benchmark_load.py [--csv eyes.csv --root DIR] [--photos 24]
        [--levels 1,2,4,8,16] [--requests-per-level 200 | --seconds-per-level S]
        [--soak-s 600] [--soak-clients 4] [--workers N] [--threads N] [--env KEY=VALUE ...]
        [--model-dir DIR] [--no-train | --train-rows 1000 --train-epochs 40 --train-nice 0]
        [--work-dir DIR] [--keep] [--json out/benchmark-load.json] [--plot out/load.png]

1. Photos, built once into WORK/photos: sizes from 640x480 to 4000x3000 (a quarter portrait),
   1-3 faces each, saved as JPEG quality 90 like phone photos. Faces come from the labelled CSV
   (MTFL: ~250x250 face photos, cropped around the labelled eyes, scaled up and blended with a
   feathered ellipse onto a blurred photo background with sensor noise) or, without --csv, from
   tests/data/astronaut.png (public domain). A manifest records each photo's size and faces; a
   later run with the same inputs reuses them.
2. The real backend (`python -m backend.server`) on 127.0.0.1 and a free port, gunicorn WORKERS
   and THREADS as documented (backend/settings.py) unless --workers/--threads, with
   LOCAL_FILES_DOCUMENT_ROOT = the photo folder, so tasks say `/data/local-files/?d=<name>` as
   Label Studio's local storage does; MODEL_DIR a fresh directory (the coarse detector serves)
   or --model-dir (its promoted regressor serves). --env adds variables to the server's
   environment (OMP_NUM_THREADS=1, MALLOC_ARENA_MAX=2, ...).
3. A training job for the whole measurement: `scripts/train.py` on --train-rows faces of the CSV
   (or astronaut variants), --train-epochs, into its own model store (never promoted, so the
   served model does not change under the benchmark), restarted whenever it finishes. The
   report says what ran: command, runs, epochs seen (from its progress bar) and the CPU cores it
   used during each level. Measurement starts once its first epoch is under way.
4. Levels: N client threads (--levels) each POST /predict with one task (a random photo) in a
   closed loop, --requests-per-level (or --seconds-per-level) requests in all. Per level:
   throughput (requests/s, faces/s), latency p50/p95/p99 (client side, ms), errors (HTTP status
   not 200, transport errors and timeouts, answers that are not a list of one prediction, and
   tasks the server counted as failed in /metrics), faces found against faces pasted, the
   server's own time per request (/metrics; the rest of the latency is waiting for a gunicorn
   thread), and the CPU cores used by the server, the trainer and everything else on the
   machine ("other": when that is above 0.25 cores the report says the machine was not quiet
   and its latencies are not representative).
5. Soak: --soak-clients clients for --soak-s seconds. The server's memory (RSS of the gunicorn
   master and all its workers, children included; also PSS, which counts shared pages once) is
   sampled every --sample-s seconds from start to end; the report gives start/end/max and the
   least-squares slope (MB/min) over the second half of the soak (the first half is warm-up:
   allocator arenas and caches fill), and how latency drifted from the first to the last
   quarter.

Targets (the issue's): zero errors; p95 at 8 clients <= 4 x the single-client p50; memory flat
over the soak: RSS slope <= --leak-mb-per-min (default 2 MB/min: growing faster, a server would
use up 3 GB of headroom within a day; at the ~3 requests/s a 2-core machine serves, that is ~10
KB kept per request). In-flight images make RSS jump by tens of MB between samples, so the
report also gives the slope's standard error and calls the fit conclusive only when that is at
most half the limit. Next to the latency ratio the report puts the floor the machine sets under
it: in a closed loop mean latency = clients / throughput, and throughput <= CPUs / server CPU
time per request, whatever WORKERS and THREADS are.

Bounded everywhere: loopback only; --request-timeout per request, --level-timeout per level,
--max-s for the whole run (checked before every stretch of load; a SIGALRM two minutes later
ends a hang); the server and the trainer run in their own process groups and are stopped
(SIGTERM, then SIGKILL) on the way out, also on Ctrl-C or SIGTERM, and get SIGTERM from the
kernel if this script dies without cleaning up (parent-death signal, Linux); WORK is a
temporary directory removed at the end unless --work-dir or --keep. Writes
--json, --plot (latency percentiles and throughput vs concurrency; memory over time) and prints
a table. Exit status: 0 run complete (targets are in the report), 1 the server or trainer could
not start, 2 bad arguments, 130 interrupted (a partial report is still written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import psutil
import requests
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/benchmark_load.py` from a checkout
    sys.path.insert(0, str(REPO))
ASTRONAUT = REPO / "tests" / "data" / "astronaut.png"
# The astronaut's pupils, image-left eye then image-right eye (tests/conftest.py).
ASTRONAUT_EYES = ((203.3, 101.1), (246.7, 103.5))
LABEL_CONFIG = REPO / "label_config" / "pupils.xml"
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
# Phone and camera sizes, 4:3 (a quarter of the photos are portrait).
SIZES = (
    (640, 480),
    (1024, 768),
    (1280, 960),
    (1600, 1200),
    (2048, 1536),
    (2592, 1944),
    (3264, 2448),
    (4000, 3000),
)
JPEG_QUALITY = 90
NOISE_SIGMA = 6.0
TILE_IODS = 5.5  # a face tile is this many eye distances wide (the face and some hair)
DEFAULT_LEVELS = (1, 2, 4, 8, 16)
P95_RATIO_LIMIT = 4.0
QUIET_OTHER_CORES = 0.25  # other processes may take this much of the machine
LEAK_MB_PER_MIN = 2.0
MB = 1024 * 1024
_EPOCH_BAR = re.compile(r"training \(\w+ labels\):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or the --max-s alarm: stop everything and report what was measured."""


def say(message: str) -> None:
    tqdm.write(f"[load] {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Photos


@dataclass(frozen=True)
class FaceSource:
    """A labelled face photo: its file and its pupils (image-left eye, image-right eye)."""

    path: Path
    left: tuple[float, float]
    right: tuple[float, float]


@dataclass
class Photo:
    """One benchmark photo: file name (under the photo folder), size, and the pasted faces'
    pupils in its pixels."""

    name: str
    width: int
    height: int
    faces: list[list[list[float]]]  # per face: [[x, y] image-left pupil, [x, y] image-right]
    bytes: int = 0


def face_sources(
    csv_path: Path | None, root: Path | None, limit: int, seed: int
) -> list[FaceSource]:
    """Up to `limit` labelled faces from the CSV (random rows), or the astronaut."""
    if csv_path is None:
        return [FaceSource(ASTRONAUT, *ASTRONAUT_EYES)]
    from backend.evaluation import read_truth_csv

    rows = read_truth_csv(csv_path)
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.permutation(len(rows))[:limit]]
    return [
        FaceSource(Path(root) / r.file, tuple(map(float, r.left)), tuple(map(float, r.right)))
        for r in picked
    ]


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def background(rgb: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A photo's worth of background: another photo, upside down (so HOG finds no face in it),
    blurred (out of focus) and stretched to width x height, with a lighting gradient."""
    small = cv2.resize(
        rgb, (max(8, width // 16), max(6, height // 16)), interpolation=cv2.INTER_AREA
    )
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=1.5)[::-1]  # upside down: no face in it
    if rng.random() < 0.5:
        small = small[:, ::-1]
    big = cv2.resize(np.ascontiguousarray(small), (width, height), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.2), width, dtype=np.float32)
    return np.clip(big.astype(np.float32) * ramp[None, :, None], 0, 255)


def paste_face(
    canvas: np.ndarray, face: FaceSource, rgb: np.ndarray, cx: float, cy: float, side: int
) -> list[list[float]]:
    """Blend `face` onto `canvas` (float32, in place) as a side x side tile centred on (cx, cy):
    the tile is cropped around the labelled eyes and its edge feathered into the background.
    Returns the pupils' positions on the canvas."""
    (lx, ly), (rx, ry) = face.left, face.right
    iod = math.hypot(rx - lx, ry - ly)
    src_side = TILE_IODS * iod
    src_cx, src_cy = (lx + rx) / 2, (ly + ry) / 2 + 0.45 * iod
    scale = side / src_side
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    # source -> canvas tile: p' = scale * (p - src_centre) + side/2
    matrix = np.array(
        [[scale, 0, side / 2 - scale * src_cx], [0, scale, side / 2 - scale * src_cy]]
    )
    tile = cv2.warpAffine(
        rgb, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    mask = np.zeros((side, side), np.float32)
    # an ellipse around head and shoulders, feathered to nothing before the tile's edge
    cv2.ellipse(
        mask, (side // 2, side // 2), (int(side * 0.38), int(side * 0.42)), 0, 0, 360, 1.0, -1
    )
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(1.0, side * 0.03))[..., None]
    region = canvas[y0 : y0 + side, x0 : x0 + side]
    region *= 1 - mask
    region += mask * tile.astype(np.float32)
    return [
        [x0 + scale * (lx - src_cx) + side / 2, y0 + scale * (ly - src_cy) + side / 2],
        [x0 + scale * (rx - src_cx) + side / 2, y0 + scale * (ry - src_cy) + side / 2],
    ]


def make_photo(
    index: int, sources: Sequence[FaceSource], rng: np.random.Generator, cache: dict
) -> tuple[np.ndarray, list[list[list[float]]]]:
    """Photo `index`: size SIZES[index % 8] (portrait with probability 1/4), 1 + index % 3 faces
    side by side (8 sizes x 3 counts: 24 photos cover every combination)."""
    width, height = SIZES[index % len(SIZES)]
    if rng.random() < 0.25:
        width, height = height, width
    count = 1 + index % 3

    def rgb_of(source: FaceSource) -> np.ndarray:
        if source.path not in cache:
            cache[source.path] = _read_rgb(source.path)
        return cache[source.path]

    canvas = background(rgb_of(sources[rng.integers(len(sources))]), width, height, rng)
    slot = width / count
    side = int(min(rng.uniform(0.3, 0.55) * min(width, height), 0.92 * slot, 0.95 * height))
    faces = []
    for k in range(count):
        cx = slot * (k + 0.5) + rng.uniform(-1, 1) * max(0.0, (slot - side) / 2 - 1)
        cy = rng.uniform(side / 2 + 1, height - side / 2 - 1)
        source = sources[rng.integers(len(sources))]
        rgb = rgb_of(source)
        if rng.random() < 0.5:  # mirrored: a different-looking face from the same source
            rgb = np.ascontiguousarray(rgb[:, ::-1])
            w = rgb.shape[1] - 1
            source = FaceSource(
                source.path,
                (w - source.right[0], source.right[1]),
                (w - source.left[0], source.left[1]),
            )
        faces.append(paste_face(canvas, source, rgb, cx, cy, side))
    # sensor noise: also makes the JPEGs as large as a phone's (12 MP: ~2.5 MB at quality 90)
    canvas += rng.normal(0.0, NOISE_SIGMA, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), faces


def build_photos(
    folder: Path, count: int, sources: Sequence[FaceSource], source_key: str, seed: int
) -> list[Photo]:
    """`count` photos in `folder`, reused when the folder's manifest matches the inputs."""
    manifest = folder / "manifest.json"
    key = {
        "count": count,
        "seed": seed,
        "source": source_key,
        "sizes": SIZES,
        "quality": JPEG_QUALITY,
        "noise": NOISE_SIGMA,
        "version": 3,
    }
    if manifest.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(manifest.read_text())
            photos = [Photo(**p) for p in saved["photos"]]
            if saved["key"] == json.loads(json.dumps(key)) and all(
                (folder / p.name).is_file() for p in photos
            ):
                say(f"reusing {len(photos)} photos in {folder}")
                return photos
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cache: dict = {}
    photos = []
    for index in tqdm(range(count), desc="photos", unit="photo", file=sys.stderr):
        rgb, faces = make_photo(index, sources, rng, cache)
        name = f"photo{index:03d}_{rgb.shape[1]}x{rgb.shape[0]}_{len(faces)}f.jpg"
        Image.fromarray(rgb).save(folder / name, "JPEG", quality=JPEG_QUALITY)
        photos.append(
            Photo(name, rgb.shape[1], rgb.shape[0], faces, (folder / name).stat().st_size)
        )
    manifest.write_text(json.dumps({"key": key, "photos": [asdict(p) for p in photos]}, indent=1))
    return photos


def astronaut_training_set(folder: Path, people: int = 8) -> Path:
    """A tiny labelled set without data: the astronaut at several scales, mirrored every other
    time, each named as a different person (train.py splits by person). Returns its CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _read_rgb(ASTRONAUT)
    rows = ["file,left_x,left_y,right_x,right_y"]
    (lx, ly), (rx, ry) = ASTRONAUT_EYES
    for i in range(people):
        k = 1.0 - 0.3 * i / max(1, people - 1)
        size = round(512 * k)
        image = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        p = [
            ((lx + 0.5) * k - 0.5, (ly + 0.5) * k - 0.5),
            ((rx + 0.5) * k - 0.5, (ry + 0.5) * k - 0.5),
        ]
        if i % 2:
            image = np.ascontiguousarray(image[:, ::-1])
            p = [(size - 1 - p[1][0], p[1][1]), (size - 1 - p[0][0], p[0][1])]
        name = f"Person{chr(65 + i)}_Astro_0001.png"
        Image.fromarray(image).save(folder / name)
        rows.append(f"{name},{p[0][0]:.2f},{p[0][1]:.2f},{p[1][0]:.2f},{p[1][1]:.2f}")
    (folder / "eyes.csv").write_text("\n".join(rows) + "\n")
    return folder / "eyes.csv"


def training_csv(csv_path: Path, rows: int, seed: int, out: Path) -> Path:
    """`rows` random rows of the CSV (header kept), for the background training job."""
    with csv_path.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    header, body = lines[0], lines[1:]
    rng = np.random.default_rng(seed + 1)
    picked = [body[i] for i in sorted(rng.permutation(len(body))[:rows])]
    with out.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *picked])
    return out


# ---------------------------------------------------------------------------------------------
# Processes


def _prctl() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when this script dies, even by SIGKILL (Linux), so
    no server or training job outlives the benchmark; the finally blocks do the rest."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of `pid` and its live descendants."""
    total = 0.0
    for p in tree(pid) if pid else []:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_memory(pid: int | None) -> dict[str, float]:
    """RSS and PSS (MB) summed over `pid` and its live descendants, and how many processes."""
    rss = pss = 0.0
    procs = tree(pid) if pid else []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return {"rss_mb": rss / MB, "pss_mb": pss / MB, "processes": len(procs)}


def stop_group(process: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """SIGTERM the process (its own group leader), then SIGKILL its whole group."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # workers or crop processes left behind
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


class Server:
    """`python -m backend.server` in its own process group on 127.0.0.1."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> None:
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend.server"],
                cwd=REPO,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server did not start within {timeout_s:.0f} s:\n{tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        stop_group(self.process, grace_s=30.0)


@dataclass
class TrainRun:
    started_s: float
    seconds: float | None = None
    returncode: int | None = None
    epochs_done: int = 0
    epochs_total: int | None = None
    cpu_s: float | None = None


class Trainer:
    """scripts/train.py restarted in a loop until stopped; counts epochs from its progress bar
    and its CPU time (finished runs: their rusage, crop processes included; the live run: its
    process tree)."""

    def __init__(self, command: list[str], env: Mapping[str, str], work: Path, nice: int) -> None:
        self.command = command
        self.env = dict(env)
        self.work = work
        self.nice = nice
        self.runs: list[TrainRun] = []
        self.pids: list[int] = []
        self.process: subprocess.Popen | None = None
        self.failures_in_a_row = 0
        self.gave_up: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._finished_cpu_s = 0.0
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="trainer", daemon=True)
        self.log_path = work / "trainer.log"

    def start(self) -> None:
        self._thread.start()

    def _preexec(self) -> None:
        """In the child, after setsid: die with this script, and lower the priority of the
        whole session. With the kernel's autogroup scheduling (sched_autogroup_enabled, on by
        default) every session competes as one group and a process's own nice only counts
        inside it, like a container's processes against another container: the group's nice
        (/proc/self/autogroup) is what gives the server precedence, as a lower CPU weight for
        the worker's container would."""
        die_with_parent()
        if self.nice:
            with contextlib.suppress(OSError):
                Path("/proc/self/autogroup").write_text(str(self.nice))

    def epochs(self) -> int:
        with self._lock:
            return sum(r.epochs_done for r in self.runs)

    def cpu_s(self) -> float:
        with self._lock:
            # never poll() here: only the loop may reap the run (wait4 gives its rusage)
            live = self.process.pid if self.process is not None else None
            return self._finished_cpu_s + tree_cpu_s(live)

    def _loop(self) -> None:
        while not self._stop.is_set():
            models = self.work / "train-models"
            shutil.rmtree(models, ignore_errors=True)  # keep the disk bounded: nothing serves it
            run = TrainRun(started_s=time.monotonic() - self._t0)
            with self._lock:
                self.runs.append(run)
            with open(self.log_path, "ab") as log_file:
                log_file.write(f"\n=== run {len(self.runs)}: {' '.join(self.command)}\n".encode())
                log_file.flush()
                process = subprocess.Popen(
                    ["nice", "-n", str(self.nice), *self.command] if self.nice else self.command,
                    cwd=REPO,
                    env=self.env,
                    stdout=log_file,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    preexec_fn=self._preexec,
                )
                with self._lock:
                    self.process = process
                    self.pids.append(process.pid)
                self._read_progress(process, run, log_file)
                last_cpu = tree_cpu_s(process.pid)
                # wait4, not Popen.wait: its rusage is the run's CPU, crop processes included.
                try:
                    _, status, usage = os.wait4(process.pid, 0)
                    process.returncode = os.waitstatus_to_exitcode(status)
                    cpu = usage.ru_utime + usage.ru_stime
                except ChildProcessError:  # reaped elsewhere: keep what was last seen
                    process.returncode = process.returncode if process.returncode else -1
                    cpu = last_cpu
            run.seconds = time.monotonic() - self._t0 - run.started_s
            run.returncode = process.returncode
            run.cpu_s = cpu
            with self._lock:
                self._finished_cpu_s += run.cpu_s
                self.process = None
            if self._stop.is_set():
                break
            if process.returncode != 0:
                self.failures_in_a_row += 1
                if self.failures_in_a_row >= 3:
                    self.gave_up = f"3 runs in a row failed (last exit {process.returncode})"
                    say(f"trainer: {self.gave_up}; see {self.log_path}")
                    return
                time.sleep(2)
            else:
                self.failures_in_a_row = 0

    def _read_progress(self, process: subprocess.Popen, run: TrainRun, log_file) -> None:
        """Copy the run's stderr to the log and note the last epoch its bar showed."""
        assert process.stderr is not None
        pending = b""
        while chunk := process.stderr.read1(4096):
            log_file.write(chunk)
            pending = (pending + chunk)[-4096:]
            for match in _EPOCH_BAR.finditer(pending.decode("utf-8", "replace")):
                done, total = int(match.group(1)), int(match.group(2))
                with self._lock:
                    run.epochs_done = max(run.epochs_done, done)
                    run.epochs_total = total
            pending = pending[-300:]

    def wait_for_first_epoch(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.epochs() < 1:
            if self.gave_up:
                raise RuntimeError(f"the training job failed: {self.gave_up} ({self.log_path})")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the training job showed no epoch in {timeout_s:.0f} s ({self.log_path})"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop restarting, SIGTERM the run's process group, SIGKILL it after 10 s; the loop's
        thread reaps it."""
        self._stop.set()
        with self._lock:
            process = self.process
        if process is not None:
            for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)
                self._thread.join(timeout=wait_s)
                if not self._thread.is_alive():
                    break
        self._thread.join(timeout=10)
        if process is not None:  # crop processes the run left behind, if any
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    def report(self) -> dict[str, Any]:
        with self._lock:
            runs = [asdict(r) for r in self.runs]
        return {
            "command": " ".join(self.command),
            "nice": self.nice,
            "nice_applies_to": "process and its session's autogroup" if self.nice else None,
            "runs_started": len(runs),
            "runs_completed": sum(r["returncode"] == 0 for r in runs),
            "runs_failed": sum(r["returncode"] not in (0, None) for r in runs),
            "epochs_seen": sum(r["epochs_done"] for r in runs),
            "cpu_s": round(self.cpu_s(), 1),
            "gave_up": self.gave_up,
            "runs": runs,
            "pids": list(self.pids),
            "log": str(self.log_path),
        }


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Sample:
    """One request: when it started (s since the run's t0), latency, what came back."""

    start_s: float
    latency_ms: float
    status: int | None  # None: no answer (timeout, connection error)
    ok: bool
    faces: int = 0
    expected_faces: int = 0
    error: str | None = None


def check_answer(response: requests.Response) -> tuple[bool, int, str | None]:
    """(ok, faces, error): ok when 200 and the body is {"results": [one prediction]}."""
    if response.status_code != 200:
        return False, 0, f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        body = response.json()
    except ValueError:
        return False, 0, "answer is not JSON"
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != 1:
        return False, 0, f"'results' is not a list of one prediction: {str(body)[:200]}"
    prediction = results[0]
    if not (
        isinstance(prediction, dict)
        and isinstance(prediction.get("result"), list)
        and isinstance(prediction.get("score"), (int, float))
        and isinstance(prediction.get("model_version"), str)
    ):
        return False, 0, f"not a prediction: {str(prediction)[:200]}"
    faces = sum(
        1
        for region in prediction["result"]
        if isinstance(region, dict)
        and (region.get("value") or {}).get("keypointlabels") == ["left_pupil"]
    )
    return True, faces, None


class Client:
    """Sends one-task /predict requests like Label Studio's ML API does."""

    def __init__(self, url: str, photos: Sequence[Photo], timeout_s: float, t0: float) -> None:
        self.url = url
        self.photos = photos
        self.timeout = (5.0, timeout_s)
        self.t0 = t0
        self.label_config = LABEL_CONFIG.read_text(encoding="utf-8")
        self._ids = itertools.count(1)
        self._local = threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def predict(self, photo: Photo) -> Sample:
        task_id = next(self._ids)
        body = {
            "tasks": [
                {"id": task_id, "data": {"image": f"/data/local-files/?d={quote(photo.name)}"}}
            ],
            "label_config": self.label_config,
            "project": "1.1700000000",
            "params": {"login": None, "password": None, "context": None},
        }
        started = time.monotonic()
        try:
            response = self.session().post(f"{self.url}/predict", json=body, timeout=self.timeout)
            ok, faces, error = check_answer(response)
            status: int | None = response.status_code
        except requests.RequestException as e:
            ok, faces, error, status = False, 0, f"{type(e).__name__}: {str(e)[:200]}", None
            self._local.__dict__.pop("session", None)  # a fresh connection next time
        latency = (time.monotonic() - started) * 1000
        return Sample(started - self.t0, latency, status, ok, faces, len(photo.faces), error)


def run_clients(
    client: Client,
    clients: int,
    requests_total: int | None,
    seconds: float | None,
    stop_at: float,
    seed: Sequence[int],
    label: str,
) -> tuple[list[Sample], float, bool]:
    """`clients` threads in a closed loop until `requests_total` requests were sent or `seconds`
    passed (or `stop_at`, the level's hard deadline). Returns the samples, the wall time and
    whether the deadline cut the level short."""
    samples: list[Sample] = []
    lock = threading.Lock()
    issued = itertools.count()
    started = time.monotonic()
    end = min(stop_at, started + seconds) if seconds else stop_at
    bar = tqdm(
        total=requests_total or int(seconds or 0),
        desc=label,
        file=sys.stderr,
        unit="req" if requests_total else "s",
        leave=False,
    )
    last_tick = [started]

    def work(index: int) -> None:
        rng = np.random.default_rng([*seed, index])
        while True:
            with lock:
                n = next(issued)
            if (requests_total is not None and n >= requests_total) or time.monotonic() >= end:
                return
            sample = client.predict(client.photos[rng.integers(len(client.photos))])
            with lock:
                samples.append(sample)
                if requests_total:
                    bar.update(1)
                else:
                    now = time.monotonic()
                    bar.update(int(now - started) - int(last_tick[0] - started))
                    last_tick[0] = now

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    join_by = end + client.timeout[0] + client.timeout[1] + 5
    for t in threads:
        t.join(timeout=max(0.0, join_by - time.monotonic()))
    bar.close()
    wall = time.monotonic() - started
    cut = any(t.is_alive() for t in threads) or (
        requests_total is not None and len(samples) < requests_total
    )
    with lock:
        return list(samples), wall, cut


# ---------------------------------------------------------------------------------------------
# Measurements


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(a, 50)), 1),
        "p95": round(float(np.percentile(a, 95)), 1),
        "p99": round(float(np.percentile(a, 99)), 1),
        "mean": round(float(a.mean()), 1),
        "max": round(float(a.max()), 1),
    }


def slope_per_min(times_s: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of values over time, per minute (None with fewer than 3 points)."""
    fit = slope_fit(times_s, values)
    return None if fit is None else fit[0]


def slope_fit(times_s: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """(slope, its standard error), per minute, of a least-squares line through the points."""
    t = np.asarray(times_s, float) / 60.0
    y = np.asarray(values, float)
    if len(t) < 3 or np.ptp(t) <= 0:
        return None
    k, b = np.polyfit(t, y, 1)
    residual = y - (k * t + b)
    stderr = math.sqrt(
        float(residual @ residual) / (len(t) - 2) / float(((t - t.mean()) ** 2).sum())
    )
    return float(k), stderr


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def metric_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    keys = {
        "predictions_ok": 'predictions_total{outcome="ok"}',
        "tasks_failed": 'predictions_total{outcome="failed"}',
        "faces_detected": "faces_detected_total",
        "server_seconds_sum": 'http_request_duration_seconds_sum{route="/predict"}',
        "server_seconds_count": 'http_request_duration_seconds_count{route="/predict"}',
    }
    delta = {k: after.get(v, 0.0) - before.get(v, 0.0) for k, v in keys.items()}
    reasons = {
        key.split('reason="', 1)[1].rstrip('"}'): after[key] - before.get(key, 0.0)
        for key in after
        if key.startswith("prediction_failures_total{") and after[key] - before.get(key, 0.0)
    }
    delta["failure_reasons"] = reasons
    return delta


@dataclass
class Probe:
    """Counters read before and after a stretch of load (CPU of each party, /metrics)."""

    t: float
    server_cpu: float
    trainer_cpu: float
    client_cpu: float
    machine_busy: float
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)


def autogroup_enabled() -> bool | None:
    """Whether the kernel schedules each session as one group (server, trainer, this script
    and every other session then get equal CPU shares whatever their processes' nice)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Bench:
    """State of one run, so an interrupted run can still report what it measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.server: Server | None = None
        self.trainer: Trainer | None = None
        self.levels: list[dict[str, Any]] = []
        self.soak: dict[str, Any] | None = None
        self.memory: list[dict[str, Any]] = []
        self.phase = "start"
        self.photos: list[Photo] = []
        self.photo_info: dict[str, Any] = {}
        self.server_info: dict[str, Any] = {}
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    # -- sampling memory

    def _sample_memory(self) -> None:
        while not self._sampling.wait(self.args.sample_s):
            self.memory.append(self.memory_sample())

    def memory_sample(self) -> dict[str, Any]:
        server = tree_memory(self.server.pid if self.server else None)
        trainer_pid = None
        if self.trainer is not None and self.trainer.process is not None:
            trainer_pid = self.trainer.process.pid
        trainer = tree_memory(trainer_pid)
        return {
            "t_s": round(time.monotonic() - self.t0, 1),
            "phase": self.phase,
            "rss_mb": round(server["rss_mb"], 1),
            "pss_mb": round(server["pss_mb"], 1),
            "server_processes": server["processes"],
            "trainer_rss_mb": round(trainer["rss_mb"], 1),
            "machine_available_mb": round(psutil.virtual_memory().available / MB),
        }

    def probe(self) -> Probe:
        metrics: dict[str, float] = {}
        with contextlib.suppress(requests.RequestException):
            r = requests.get(f"{self.server.url}/metrics", timeout=10)
            metrics = parse_metrics(r.text)
        me = psutil.Process().cpu_times()
        return Probe(
            t=time.monotonic(),
            server_cpu=tree_cpu_s(self.server.pid),
            trainer_cpu=self.trainer.cpu_s() if self.trainer else 0.0,
            client_cpu=me.user + me.system,
            machine_busy=machine_busy_s(),
            epochs=self.trainer.epochs() if self.trainer else 0,
            metrics=metrics,
        )

    # -- one stretch of load

    def measure(
        self,
        client: Client,
        clients: int,
        requests_total: int | None,
        seconds: float | None,
        label: str,
        seed: Sequence[int],
    ) -> dict[str, Any]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise Interrupted(f"--max-s reached before {label}")
        stop_at = time.monotonic() + min(self.args.level_timeout, remaining)
        say(f"{label}: start")
        self.memory.append(self.memory_sample())  # every stretch has a first and a last sample
        before = self.probe()
        samples, wall, cut = run_clients(
            client, clients, requests_total, seconds, stop_at, seed, label
        )
        after = self.probe()
        self.memory.append(self.memory_sample())
        result = summarise(samples, wall, cut, clients, before, after)
        result["rss_mb_end"] = self.memory[-1]["rss_mb"]
        return result

    @property
    def deadline(self) -> float:
        return self.t0 + self.args.max_s

    # -- the run

    def run(self) -> None:
        args = self.args
        work = args.work
        photo_dir = work / "photos"
        if args.csv is not None:
            sources = face_sources(args.csv, args.root, 2000, args.seed)
            source_key = (
                f"csv:{args.csv.resolve()}:{hashlib.sha256(args.csv.read_bytes()).hexdigest()[:16]}"
            )
        else:
            sources = face_sources(None, None, 0, args.seed)
            source_key = "astronaut"
        self.photos = build_photos(photo_dir, args.photos, sources, source_key, args.seed)
        sizes = sorted({(p.width, p.height) for p in self.photos}, key=lambda s: s[0] * s[1])
        self.photo_info = {
            "source": "MTFL (--csv)" if args.csv else "tests/data/astronaut.png",
            "count": len(self.photos),
            "dir": str(photo_dir),
            "sizes": [f"{w}x{h}" for w, h in sizes],
            "faces_per_photo": {
                str(k): sum(len(p.faces) == k for p in self.photos) for k in (1, 2, 3)
            },
            "megapixels_mean": round(
                float(np.mean([p.width * p.height / 1e6 for p in self.photos])), 2
            ),
            "jpeg_mb_mean": round(float(np.mean([p.bytes / MB for p in self.photos])), 2),
            "jpeg_quality": JPEG_QUALITY,
        }

        if not args.no_train:
            self.phase = "training-start"
            self.trainer = self.make_trainer(work)
            self.trainer.start()
            say(f"training job started: {' '.join(self.trainer.command)}")

        model_dir = args.model_dir or (work / "models")
        model_dir.mkdir(parents=True, exist_ok=True)
        multiproc = work / "prometheus"
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "MODEL_DIR": str(model_dir),
            "LOCAL_FILES_DOCUMENT_ROOT": str(photo_dir),
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "TRAIN_EVERY_N_LABELS": "0",
        }
        for name in (
            "LABEL_STUDIO_URL",
            "LABEL_STUDIO_API_KEY",
            "REDIS_URL",
            "BASIC_AUTH_USER",
            "BASIC_AUTH_PASS",
            "ALLOWED_IMAGE_HOSTS",
        ):
            env.pop(name, None)  # loopback only: nothing to download, nobody to call
        if args.workers is not None:
            env["WORKERS"] = str(args.workers)
        if args.threads is not None:
            env["THREADS"] = str(args.threads)
        env.update(args.env)
        from backend.settings import Settings

        try:
            settings = Settings.from_env(env)
        except ValueError as e:
            raise RuntimeError(f"bad server settings: {e}") from None
        self.phase = "server-start"
        self.server = Server(env, work / "server.log")
        self.server.start(timeout_s=args.start_timeout)
        self.server_info = {
            "url": self.server.url,
            "pid": self.server.pid,
            "workers": settings.workers,
            "threads": settings.threads,
            "workers_threads_from": "flags" if (args.workers or args.threads) else "defaults",
            "extra_env": dict(args.env),
            "model_dir": str(model_dir),
            "log": str(self.server.log_path),
        }
        say(
            f"server ready at {self.server.url} pid={self.server.pid} "
            f"workers={settings.workers} threads={settings.threads}"
        )
        self._sampler = threading.Thread(target=self._sample_memory, name="memory", daemon=True)
        self._sampler.start()

        if self.trainer is not None:
            self.phase = "training-start"
            say("waiting for the training job's first epoch")
            self.trainer.wait_for_first_epoch(args.train_start_timeout)

        client = Client(self.server.url, self.photos, args.request_timeout, self.t0)
        self.phase = "warm-up"
        warm = self.measure(
            client,
            min(2, settings.workers * settings.threads),
            args.warmup,
            None,
            "warm-up",
            (args.seed, 0),
        )
        self.warmup = warm
        versions = requests.get(f"{self.server.url}/versions", timeout=30).json()
        self.server_info["model_version"] = (versions.get("versions") or [None])[0]
        say(
            f"warm-up: {warm['requests']} requests, {warm['errors']['total']} errors; "
            f"serving {self.server_info['model_version']}"
        )

        for i, clients in enumerate(args.levels, start=1):
            self.phase = f"level-{clients}"
            level = self.measure(
                client,
                clients,
                args.requests_per_level,
                args.seconds_per_level,
                f"{clients} clients",
                (args.seed, i),
            )
            self.levels.append(level)
            say(level_line(level))

        if args.soak_s > 0:
            self.phase = "soak"
            soak_from = time.monotonic() - self.t0
            soak = self.measure(
                client,
                args.soak_clients,
                None,
                args.soak_s,
                f"soak {args.soak_clients} clients",
                (args.seed, 99),
            )
            points = sorted(
                (m for m in self.memory if m["phase"] == "soak"), key=lambda m: m["t_s"]
            )
            soak.update(soak_memory(points, points[0]["t_s"], points[-1]["t_s"]))
            soak["latency_drift"] = latency_drift(soak.pop("_samples"), soak_from)
            self.soak = soak
            say(
                f"soak: {level_line(soak)}; RSS {soak['rss']['start_mb']} -> "
                f"{soak['rss']['end_mb']} MB, slope {soak['rss']['slope_mb_per_min']} MB/min"
            )
        self.phase = "done"

    def make_trainer(self, work: Path) -> Trainer:
        args = self.args
        if args.csv is not None:
            csv_path, root = (
                training_csv(args.csv, args.train_rows, args.seed, work / "train.csv"),
                args.root,
            )
        else:
            root = work / "train-set"
            csv_path = astronaut_training_set(root)
        command = [
            sys.executable,
            str(TRAIN_SCRIPT),
            "--csv",
            str(csv_path),
            "--root",
            str(root),
            "--model-dir",
            str(work / "train-models"),
            "--epochs",
            str(args.train_epochs),
            "--workers",
            "1",
            "--seed",
            str(args.seed),
        ]
        env = {**os.environ, **args.train_env, "PYTHONUNBUFFERED": "1"}
        return Trainer(command, env, work, args.train_nice)

    def stop(self) -> None:
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=30)
        for part in (self.trainer, self.server):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()

    def report(self) -> dict[str, Any]:
        for level in self.levels:
            level.pop("_samples", None)
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "wall_s": round(time.monotonic() - self.t0, 1),
            "phase_reached": self.phase,
            "machine": {
                "cpus": os.cpu_count(),
                "cpus_usable": usable_cpus(),
                "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
                "python": platform.python_version(),
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                "sched_autogroup": autogroup_enabled(),
            },
            "server": self.server_info,
            "photos": self.photo_info,
            "training": (
                self.trainer.report()
                if self.trainer
                else {"command": None, "note": "--no-train: no training job ran"}
            ),
            "warmup": {k: v for k, v in getattr(self, "warmup", {}).items() if k != "_samples"},
            "levels": self.levels,
            "soak": self.soak,
            "memory_samples": sorted(self.memory, key=lambda m: m["t_s"]),
            "targets": targets(self.levels, self.soak, self.args.leak_mb_per_min, usable_cpus()),
            "other_load": other_load(self.levels, self.soak),
        }


def other_load(levels: Sequence[Mapping[str, Any]], soak: Mapping[str, Any] | None) -> dict:
    """How many cores processes outside the benchmark took: latencies from a busy machine are
    not comparable with a quiet one's (the ratio target least of all)."""
    others = [s["cpu_cores"]["other"] for s in [*levels, *([soak] if soak else [])]]
    worst = max(others, default=0.0)
    return {"max_cores": worst, "quiet": worst <= QUIET_OTHER_CORES, "limit": QUIET_OTHER_CORES}


def summarise(
    samples: Sequence[Sample], wall: float, cut: bool, clients: int, before: Probe, after: Probe
) -> dict[str, Any]:
    """One level's numbers (see the module docstring)."""
    ok = [s for s in samples if s.ok]
    http = sum(1 for s in samples if s.status is not None and s.status != 200)
    transport = sum(1 for s in samples if s.status is None)
    bad = sum(1 for s in samples if s.status == 200 and not s.ok)
    metrics = metric_delta(before.metrics, after.metrics)
    failed_tasks = int(metrics["tasks_failed"])
    errors = {
        "http": http,
        "transport": transport,
        "bad_answer": bad,
        "failed_tasks": failed_tasks,
        "total": http + transport + bad + failed_tasks,
    }
    faces = sum(s.faces for s in ok)
    expected = sum(s.expected_faces for s in ok)
    dt = max(after.t - before.t, 1e-9)
    cores = {
        "server": (after.server_cpu - before.server_cpu) / dt,
        "trainer": (after.trainer_cpu - before.trainer_cpu) / dt,
        "client": (after.client_cpu - before.client_cpu) / dt,
        "machine_busy": (after.machine_busy - before.machine_busy) / dt,
    }
    # everything else on the machine: on a shared one it takes cores from the server
    cores["other"] = max(0.0, cores["machine_busy"] - cores["server"] - cores["trainer"]
                         - cores["client"])  # fmt: skip
    server_s = metrics["server_seconds_sum"]
    count = metrics["server_seconds_count"]
    return {
        "clients": clients,
        "requests": len(samples),
        "ok": len(ok),
        "errors": errors,
        "error_examples": sorted({s.error for s in samples if s.error})[:5],
        "failure_reasons": metrics["failure_reasons"],
        "cut_by_timeout": cut,
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 3) if wall > 0 else None,
        "faces_per_s": round(faces / wall, 3) if wall > 0 else None,
        "latency_ms": percentiles([s.latency_ms for s in ok]),
        "server_ms_mean": round(1000 * server_s / count, 1) if count else None,
        "faces_found": faces,
        "faces_pasted": expected,
        "cpu_cores": {k: round(v, 2) for k, v in cores.items()},
        "server_cpu_ms_per_request": (
            round(1000 * (after.server_cpu - before.server_cpu) / len(samples), 1)
            if samples
            else None
        ),
        "trainer_epochs": after.epochs - before.epochs,
        "latencies_ms_all": [round(s.latency_ms, 1) for s in samples],
        "_samples": list(samples),
    }


def soak_memory(memory: Sequence[Mapping[str, Any]], start: float, end: float) -> dict[str, Any]:
    """RSS/PSS start, end, max and the slope over the second half of [start, end]."""
    points = [m for m in memory if start <= m["t_s"] <= end and m["rss_mb"] > 0]
    half = start + (end - start) / 2
    late = [m for m in points if m["t_s"] >= half]
    out: dict[str, Any] = {"samples": len(points), "fit_from_s": round(half, 1)}
    for key in ("rss", "pss"):
        values = [m[f"{key}_mb"] for m in points]
        fit = slope_fit([m["t_s"] for m in late], [m[f"{key}_mb"] for m in late])
        out[key] = {
            "start_mb": values[0] if values else None,
            "end_mb": values[-1] if values else None,
            "max_mb": max(values) if values else None,
            "slope_mb_per_min": None if fit is None else round(fit[0], 3),
            "slope_stderr_mb_per_min": None if fit is None else round(fit[1], 3),
        }
    return out


def latency_drift(samples: Sequence[Sample], start: float) -> dict[str, Any]:
    """p50/p95 of the first and the last quarter of the soak's requests, and their ratio."""
    ok = sorted((s for s in samples if s.ok), key=lambda s: s.start_s)
    quarter = len(ok) // 4
    if quarter < 2:
        return {"note": "too few requests"}
    first = percentiles([s.latency_ms for s in ok[:quarter]])
    last = percentiles([s.latency_ms for s in ok[-quarter:]])
    slope = slope_per_min([s.start_s - start for s in ok], [s.latency_ms for s in ok])
    return {
        "first_quarter_ms": {"p50": first["p50"], "p95": first["p95"]},
        "last_quarter_ms": {"p50": last["p50"], "p95": last["p95"]},
        "p50_ratio_last_to_first": round(last["p50"] / first["p50"], 3),
        "slope_ms_per_min": None if slope is None else round(slope, 1),
    }


def targets(
    levels: Sequence[Mapping[str, Any]],
    soak: Mapping[str, Any] | None,
    leak_limit: float,
    cpus: int | None = None,
) -> dict[str, Any]:
    """The issue's three targets. With `cpus`, also the floor the machine puts under the
    latency ratio: in a closed loop mean latency = clients / throughput (Little's law), and
    throughput <= cpus / (server CPU per request), so mean(8) / p50(1) >= 8 * cpu_ms / (cpus *
    p50(1)), whatever the settings (p95 is almost always above the mean)."""
    errors = sum(level["errors"]["total"] for level in levels)
    errors += soak["errors"]["total"] if soak else 0
    by_clients = {level["clients"]: level for level in levels}
    out: dict[str, Any] = {
        "zero_errors": {"errors": errors, "met": errors == 0 if levels else None},
    }
    p50_1 = (by_clients.get(1) or {}).get("latency_ms", {}).get("p50")
    p95_8 = (by_clients.get(8) or {}).get("latency_ms", {}).get("p95")
    ratio = p95_8 / p50_1 if p50_1 and p95_8 else None
    out["p95_at_8_over_p50_at_1"] = {
        "p50_1_ms": p50_1,
        "p95_8_ms": p95_8,
        "ratio": None if ratio is None else round(ratio, 2),
        "limit": P95_RATIO_LIMIT,
        "met": None if ratio is None else ratio <= P95_RATIO_LIMIT,
    }
    cpu_ms = (by_clients.get(8) or {}).get("server_cpu_ms_per_request")
    if cpus and cpu_ms and p50_1:
        out["p95_at_8_over_p50_at_1"]["mean_ratio_floor"] = round(8 * cpu_ms / (cpus * p50_1), 2)
        out["p95_at_8_over_p50_at_1"]["floor_cpus"] = cpus
    slope = soak["rss"]["slope_mb_per_min"] if soak else None
    stderr = soak["rss"]["slope_stderr_mb_per_min"] if soak else None
    out["memory_flat"] = {
        "rss_slope_mb_per_min": slope,
        "rss_slope_stderr_mb_per_min": stderr,
        # in-flight images make RSS jump by tens of MB from sample to sample: a slope whose
        # standard error is not well below the limit says nothing either way
        "conclusive": None if stderr is None else stderr <= leak_limit / 2,
        "pss_slope_mb_per_min": soak["pss"]["slope_mb_per_min"] if soak else None,
        "soak_s": soak["wall_s"] if soak else None,
        "limit_mb_per_min": leak_limit,
        "met": None if slope is None else slope <= leak_limit,
    }
    return out


# ---------------------------------------------------------------------------------------------
# Output


def level_line(level: Mapping[str, Any]) -> str:
    lat = level["latency_ms"]
    cpu = level["cpu_cores"]
    return (
        f"{level['clients']:>3} clients: {level['requests']:>4} req {level['throughput_rps']:>6} "
        f"req/s {level['faces_per_s']:>6} faces/s p50 {lat['p50']} p95 {lat['p95']} p99 "
        f"{lat['p99']} ms, errors {level['errors']['total']}, cores server {cpu['server']} "
        f"trainer {cpu['trainer']} other {cpu['other']}, epochs {level['trainer_epochs']}"
    )


def table(report: Mapping[str, Any]) -> str:
    head = (
        "clients",
        "requests",
        "req/s",
        "faces/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "server ms",
        "server cores",
        "trainer cores",
        "other cores",
        "epochs",
    )
    rows = [head]
    stretches = list(report["levels"]) + ([report["soak"]] if report.get("soak") else [])
    for i, level in enumerate(stretches):
        lat = level["latency_ms"]
        cpu = level["cpu_cores"]
        name = str(level["clients"]) + (" (soak)" if i == len(report["levels"]) else "")
        rows.append(
            (
                name,
                level["requests"],
                level["throughput_rps"],
                level["faces_per_s"],
                lat["p50"],
                lat["p95"],
                lat["p99"],
                level["errors"]["total"],
                level["server_ms_mean"],
                cpu["server"],
                cpu["trainer"],
                cpu["other"],
                level["trainer_epochs"],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    t = report["targets"]
    other = report.get("other_load") or {}
    if other and not other["quiet"]:
        lines.append(
            f"WARNING: other processes took up to {other['max_cores']} cores during the run: "
            "the machine was not quiet, so latencies and their ratio are not representative"
        )
    lines.append(f"zero errors: {t['zero_errors']['met']} ({t['zero_errors']['errors']} errors)")
    r = t["p95_at_8_over_p50_at_1"]
    floor = r.get("mean_ratio_floor")
    lines.append(
        f"p95(8) / p50(1): {r['ratio']} (limit {r['limit']}): {r['met']}"
        + (f"; floor on {r['floor_cpus']} CPUs (mean(8) / p50(1)): {floor}" if floor else "")
    )
    m = t["memory_flat"]
    lines.append(
        f"RSS slope over the soak's second half: {m['rss_slope_mb_per_min']} "
        f"+- {m['rss_slope_stderr_mb_per_min']} MB/min (conclusive: {m['conclusive']}) "
        f"(PSS {m['pss_slope_mb_per_min']}; limit {m['limit_mb_per_min']}): {m['met']}"
    )
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    x = [lv["clients"] for lv in levels]
    ax = axes[0]
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^--")):
        ax.plot(x, [lv["latency_ms"][key] for lv in levels], style, label=key)
    p50_1 = report["targets"]["p95_at_8_over_p50_at_1"]["p50_1_ms"]
    if p50_1:
        ax.axhline(
            P95_RATIO_LIMIT * p50_1,
            color="grey",
            ls=":",
            label=f"target: p95(8) <= {P95_RATIO_LIMIT:g} x p50(1)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency per request (ms)")
    ax.set_title("/predict latency")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, [lv["throughput_rps"] for lv in levels], "o-", label="requests/s")
    ax.plot(x, [lv["faces_per_s"] for lv in levels], "s-", label="faces/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("concurrent clients")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax = axes[2]
    memory = report["memory_samples"]
    if memory:
        t0 = memory[0]["t_s"]
        ax.plot(
            [(m["t_s"] - t0) / 60 for m in memory],
            [m["rss_mb"] for m in memory],
            label="server RSS (master + workers)",
        )
        ax.plot(
            [(m["t_s"] - t0) / 60 for m in memory],
            [m["pss_mb"] for m in memory],
            label="server PSS",
        )
        soak = report.get("soak")
        if soak:
            soak_points = [m for m in memory if m["phase"] == "soak"]
            if soak_points:
                ax.axvspan(
                    (soak_points[0]["t_s"] - t0) / 60,
                    (soak_points[-1]["t_s"] - t0) / 60,
                    color="0.92",
                    label="soak",
                )
            slope = soak["rss"]["slope_mb_per_min"]
            ax.set_title(f"memory (soak RSS slope {slope} MB/min)")
        else:
            ax.set_title("memory")
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)
    server = report["server"]
    fig.suptitle(
        f"Load: WORKERS={server.get('workers')} THREADS={server.get('threads')} "
        f"{' '.join(f'{k}={v}' for k, v in (server.get('extra_env') or {}).items())}, "
        f"{report['photos'].get('count')} photos 640x480-4000x3000, "
        f"{'training running' if report['training'].get('command') else 'no training'}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def key_values(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {raw!r}")
    return name, value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, help="labelled faces (MTFL eyes.csv); default: astronaut")
    p.add_argument("--root", type=Path, help="the CSV's image paths are relative to it")
    p.add_argument(
        "--photos", type=int, default=24, help="photos to build (24: every size x 1-3 faces)"
    )
    p.add_argument(
        "--levels",
        default=",".join(map(str, DEFAULT_LEVELS)),
        help="concurrent clients per level, comma-separated",
    )
    per = p.add_mutually_exclusive_group()
    per.add_argument("--requests-per-level", type=int, default=None, help="default 200")
    per.add_argument("--seconds-per-level", type=float, default=None)
    p.add_argument("--warmup", type=int, default=6, help="requests before the first level")
    p.add_argument("--soak-s", type=float, default=600.0, help="0: no soak")
    p.add_argument("--soak-clients", type=int, default=4)
    p.add_argument("--sample-s", type=float, default=1.0, help="memory sampling interval")
    p.add_argument("--workers", type=int, help="WORKERS (default: backend/settings.py's)")
    p.add_argument("--threads", type=int, help="THREADS (default: backend/settings.py's)")
    p.add_argument(
        "--env",
        type=key_values,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server environment, e.g. OMP_NUM_THREADS=1 (repeatable)",
    )
    p.add_argument("--model-dir", type=Path, help="serve this store's promoted regressor")
    p.add_argument("--no-train", action="store_true", help="no training job (for comparison)")
    p.add_argument("--train-rows", type=int, default=1000, help="faces the training job uses")
    p.add_argument("--train-epochs", type=int, default=40)
    p.add_argument(
        "--train-nice",
        type=int,
        default=0,
        help="niceness of the training job (0..19; also its session's autogroup)",
    )
    p.add_argument(
        "--train-env",
        type=key_values,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the training job",
    )
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--level-timeout", type=float, default=900.0, help="seconds per level")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds for /health")
    p.add_argument(
        "--train-start-timeout",
        type=float,
        default=600.0,
        help="seconds until the training job's first epoch",
    )
    p.add_argument("--max-s", type=float, default=3600.0, help="the whole run, at most")
    p.add_argument("--leak-mb-per-min", type=float, default=LEAK_MB_PER_MIN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, help="default: a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=REPO / "out" / "benchmark-load.json")
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    try:
        args.levels = [int(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        p.error(f"--levels must be comma-separated integers, got {args.levels!r}")
    if not args.levels or min(args.levels) < 1 or max(args.levels) > 256:
        p.error("--levels must be between 1 and 256 clients")
    if args.requests_per_level is None and args.seconds_per_level is None:
        args.requests_per_level = 200
    if args.requests_per_level is not None and args.requests_per_level < 1:
        p.error("--requests-per-level must be >= 1")
    if args.seconds_per_level is not None and args.seconds_per_level <= 0:
        p.error("--seconds-per-level must be > 0")
    if (args.csv is None) != (args.root is None):
        p.error("--csv and --root go together")
    if args.csv is not None and not args.csv.is_file():
        p.error(f"--csv {args.csv} is not a file")
    if args.photos < 1 or args.soak_s < 0 or args.soak_clients < 1 or args.sample_s <= 0:
        p.error("--photos, --soak-clients and --sample-s must be positive, --soak-s >= 0")
    if (
        args.workers is not None
        and args.workers < 1
        or args.threads is not None
        and args.threads < 1
    ):
        p.error("--workers and --threads must be >= 1")
    if args.train_rows < 4 or args.train_epochs < 1 or not 0 <= args.train_nice <= 19:
        p.error("--train-rows >= 4, --train-epochs >= 1, --train-nice in 0..19")
    if min(args.request_timeout, args.level_timeout, args.max_s, args.start_timeout) <= 0:
        p.error("timeouts must be positive")
    if args.model_dir is not None and not args.model_dir.is_dir():
        p.error(f"--model-dir {args.model_dir} is not a directory")
    args.env = dict(args.env)
    args.train_env = dict(args.train_env)
    for name in ("csv", "root", "model_dir", "work_dir", "json", "plot"):  # the children's
        if getattr(args, name) is not None:  # working directory is the repository
            setattr(args, name, getattr(args, name).resolve())
    return args


@contextlib.contextmanager
def work_dir(args: argparse.Namespace) -> Iterator[Path]:
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        yield args.work_dir.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="benchmark-load-"))
    try:
        yield path
    finally:
        if args.keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(int(math.ceil(args.max_s)) + 120)  # the last word if something hangs
    status = 0
    with work_dir(args) as work:
        args.work = work
        bench = Bench(args)
        try:
            bench.run()
        except Interrupted as e:
            say(f"interrupted ({e}); stopping the server and the training job")
            status = 130
        except RuntimeError as e:
            say(f"error: {e}")
            status = 1
        except Exception:  # a bug or an unexpected answer: still stop everything and report
            import traceback

            traceback.print_exc()
            status = 1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            bench.stop()
        report = bench.report()
        report["interrupted"] = status == 130
        report["work_dir_kept"] = bool(args.keep or args.work_dir)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        say(f"wrote {args.json}")
        if args.plot is not None and report["levels"]:
            plot(report, args.plot)
            say(f"wrote {args.plot}")
        if report["levels"]:
            print(table(report))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
