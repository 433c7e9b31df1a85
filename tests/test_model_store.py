"""The model store: versions appear whole or not at all; promotions are atomic and recorded."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from backend.model_store import DECISIONS, METADATA, SERVING, ModelStore, ModelStoreError

ROOT = Path(__file__).resolve().parents[1]


def write_weights(payload: bytes = b"weights"):
    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "params.json").write_text('{"crop": 32}')

    return write


def test_a_version_holds_what_the_writer_wrote_and_its_metadata(tmp_path):
    store = ModelStore(tmp_path / "models")
    version = store.create(write_weights(), {"metrics": {"e05": 0.8}, "train_size": 10})
    assert (version.path / "weights.bin").read_bytes() == b"weights"
    assert (version.path / "sub" / "params.json").exists()
    on_disk = json.loads((version.path / METADATA).read_text())
    assert on_disk["name"] == version.name and on_disk["train_size"] == 10 and on_disk["created"]
    assert version.metrics == {"e05": 0.8}
    assert [v.name for v in store.versions()] == [version.name]
    assert store.get(version.name).metadata == on_disk


def test_versions_are_listed_newest_first_with_unique_sortable_names(tmp_path):
    store = ModelStore(tmp_path)
    names = [store.create(write_weights(), {"i": i}).name for i in range(5)]
    assert len(set(names)) == 5
    assert names == sorted(names)
    assert [v.name for v in store.versions()] == names[::-1]


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    store = ModelStore(tmp_path)

    def explode(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.create(explode, {})
    assert store.versions() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["versions"]


def test_metadata_that_cannot_be_json_fails_the_version_not_the_store(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ValueError):
        store.create(write_weights(), {"e05": float("nan")})
    assert store.versions() == []


def test_a_writer_killed_mid_version_leaves_no_version_and_is_swept(tmp_path):
    """A real crash: the writing process gets SIGKILL while the weights are half written."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from backend.model_store import ModelStore

        def slow(directory):
            (directory / "weights.bin").write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)

        ModelStore(Path({str(tmp_path)!r})).create(slow, {{"metrics": {{}}}})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    store = ModelStore(tmp_path)
    assert store.versions() == []
    leftovers = [p.name for p in tmp_path.glob(".tmp-*")]
    assert len(leftovers) == 1
    assert store.sweep(older_than_s=3600) == []  # too fresh: may still be being written
    assert store.sweep(older_than_s=0) == leftovers
    assert list(tmp_path.glob(".tmp-*")) == []


def test_promotion_points_serving_at_the_version_and_is_recorded(tmp_path):
    store = ModelStore(tmp_path)
    assert store.serving() is None  # nothing promoted: the coarse detector serves
    first = store.create(write_weights(), {"metrics": {"e05": 0.7}})
    second = store.create(write_weights(), {"metrics": {"e05": 0.6}})
    store.promote(first.name, "beats the coarse detector: e05 0.70 > 0.68")
    store.reject(second.name, "e05 0.60 < serving 0.70")
    assert store.serving().name == first.name
    decisions = store.decisions()
    assert [(d["decision"], d["version"]) for d in decisions] == [
        ("promoted", first.name),
        ("rejected", second.name),
    ]
    assert decisions[1]["reason"] == "e05 0.60 < serving 0.70"
    assert json.loads((tmp_path / SERVING).read_text())["version"] == first.name


def test_unknown_or_malicious_names_are_refused(tmp_path):
    store = ModelStore(tmp_path)
    for name in ("", "nope", "../versions", ".tmp-x", "a/b"):
        with pytest.raises(ModelStoreError):
            store.get(name)
        with pytest.raises(ModelStoreError):
            store.promote(name, "because")
    assert store.serving() is None and not (tmp_path / DECISIONS).exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: (path / METADATA).unlink(),
        lambda path: (path / METADATA).write_text("{torn"),
        lambda path: (path / METADATA).write_text("[1, 2]"),
    ],
    ids=["missing", "torn", "not-an-object"],
)
def test_a_corrupted_version_is_skipped_and_serving_falls_back_saying_why(tmp_path, caplog, damage):
    store = ModelStore(tmp_path)
    good = store.create(write_weights(), {})
    bad = store.create(write_weights(), {})
    store.promote(bad.name, "test")
    damage(bad.path)
    with caplog.at_level(logging.WARNING, logger="backend.model_store"):
        assert [v.name for v in store.versions()] == [good.name]
        assert store.serving() is None
    assert bad.name in caplog.text
    with pytest.raises(ModelStoreError, match=bad.name):
        store.get(bad.name)


def test_an_unreadable_serving_pointer_means_the_fallback_serves(tmp_path, caplog):
    store = ModelStore(tmp_path)
    (tmp_path / SERVING).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="backend.model_store"):
        assert store.serving() is None
    assert "serving pointer unreadable" in caplog.text


def test_racing_promotions_never_show_a_torn_pointer(tmp_path):
    """Two promoters flip the pointer while a reader checks it is always whole and valid."""
    store = ModelStore(tmp_path)
    names = [store.create(write_weights(), {}).name for _ in range(2)]
    stop = threading.Event()
    seen: set[str] = set()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            existed = (tmp_path / SERVING).exists()  # checked first: it only ever appears
            serving = store.serving()
            if serving is None:
                if existed:
                    problems.append("pointer present but not readable")
            else:
                seen.add(serving.name)

    def promoter(name: str) -> None:
        for i in range(100):
            store.promote(name, f"round {i}")

    threads = [threading.Thread(target=reader)] + [
        threading.Thread(target=promoter, args=(n,)) for n in names
    ]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(timeout=60)
    stop.set()
    threads[0].join(timeout=10)
    assert problems == []
    assert seen <= set(names) and seen
    assert len(store.decisions()) == 200
    assert store.serving().name in names
    assert not list(tmp_path.glob("*.tmp"))


def test_the_store_root_is_created(tmp_path):
    root = tmp_path / "a" / "b"
    store = ModelStore(root)
    assert (root / "versions").is_dir()
    assert store.versions() == [] and store.decisions() == []


def test_chosen_is_the_named_version_or_the_promoted_one(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="no promoted version .* none, train one"):
        store.chosen(None)
    first = store.create(lambda d: None, {})
    second = store.create(lambda d: None, {})
    with pytest.raises(ModelStoreError, match=f"pass --version .*{second.name}"):
        store.chosen(None)
    assert store.chosen(first.name).name == first.name
    store.promote(first.name, reason="test")
    assert store.chosen(None).name == first.name
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.chosen("v-missing")
