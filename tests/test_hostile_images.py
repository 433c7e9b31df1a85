"""Hostile images through the real server: one /predict batch holding every kind of bad file
a team's photo folder can hold, next to real faces, read the way Label Studio's local storage
names them. Each bad file fails alone with a reason in the log; the faces (in any of the odd
but valid encodings) are predicted; the request finishes in bounded time and the server's
memory stays bounded (no 900-megapixel decode).

tests/test_images.py proves each case on the loader; this proves the whole path holds them.
"""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from server_process import free_port, running_server
from test_images import SVG, bomb_png, encode

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.png"
MAX_SECONDS = 60  # the whole batch on 2 shared cores (about 6 s when quiet)
MAX_GROWTH_MB = 400  # a decoded 30,000 x 30,000 bomb alone would be 2,700 MB


def _face() -> Image.Image:
    return Image.open(ASTRONAUT).convert("RGB")


def _huge_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: APP1 holds at most 64 kB
    return encode(_face(), "JPEG", exif=exif.tobytes(), quality=92)


def _huge_exif_png() -> bytes:
    exif = Image.Exif()
    exif[0x927C] = b"\x00" * 8_000_000  # MakerNote: 8 MB of metadata in one chunk
    return encode(_face(), "PNG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    face = _face()
    frames = [face, Image.new("RGB", face.size, "black"), Image.new("RGB", face.size, "white")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    data = encode(_face(), "JPEG", quality=92)
    return data[: len(data) // 2]


def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)), "JPEG")


# name -> (bytes, expected: "face" = six points, else the failure reason in the log)
GALLERY: dict[str, tuple[bytes, str]] = {
    "face.png": (ASTRONAUT.read_bytes(), "face"),
    "cmyk.jpg": (encode(_face().convert("CMYK"), "JPEG", quality=92), "face"),
    "exif-huge.jpg": (_huge_exif_jpeg(), "face"),
    "exif-huge.png": (_huge_exif_png(), "face"),
    "animated.gif": (_animated_gif(), "face"),  # first frame
    "png-named.jpg": (ASTRONAUT.read_bytes(), "face"),  # format from content, not the name
    "no-face.jpg": (_noise_jpeg(), "no_face"),
    "empty.jpg": (b"", "image_unreadable"),
    "truncated.jpg": (_truncated_jpeg(), "image_unreadable"),
    "bomb.png": (bomb_png(30_000, 30_000), "image_too_large"),
    "vector.svg": (SVG, "image_unreadable"),
    "svg-named.png": (SVG, "image_unreadable"),
    "text.jpg": (b"just some text, not a photo\n" * 10, "image_unreadable"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name, (data, _) in GALLERY.items():
        (root / name).write_bytes(data)
    work = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_DIR": str(work / "models"),
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LOG_LEVEL": "INFO",
    }
    log_path = work / "server.log"
    with running_server(env, log_path) as process:
        yield f"http://127.0.0.1:{port}", process, log_path


def _tree_rss(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_every_bad_image_fails_alone_with_its_reason_in_bounded_time_and_memory(server):
    url, process, log_path = server
    names = list(GALLERY)
    tasks = [
        {"id": i + 1, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)
    ]
    warm = [{"id": 999, "data": {"image": "/data/local-files/?d=face.png"}}]
    assert requests.post(f"{url}/predict", json={"tasks": warm}, timeout=120).status_code == 200
    tree = psutil.Process(process.pid)
    before = _tree_rss(tree)
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the server's memory while it works on the batch
        while not done.wait(0.02):
            peak.append(_tree_rss(tree))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        response = requests.post(f"{url}/predict", json={"tasks": tasks}, timeout=MAX_SECONDS)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started

    assert seconds < MAX_SECONDS
    assert (max(peak) - before) / 2**20 < MAX_GROWTH_MB, (before, max(peak))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    log = log_path.read_text()
    for task, result in zip(tasks, results, strict=True):
        name = names[task["id"] - 1]
        expected = GALLERY[name][1]
        points = [r for r in result["result"] if r["type"] == "keypointlabels"]
        if expected == "face":
            assert len(points) == 6 and result["score"] > 0, name
            continue
        assert points == [] and result["score"] == 0, name
        if expected == "no_face":
            continue
        lines = [
            ln for ln in log.splitlines() if re.search(rf"task={task['id']} outcome=failed", ln)
        ]
        assert len(lines) == 1, (name, lines)
        assert f"reason={expected}" in lines[0], (name, lines[0])
        assert "Traceback" not in log
