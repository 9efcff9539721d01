"""ModelStore: upload once by sha256, fetch into a node-local cache, verify, share safely."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from storage import ObjectNotFound, ObjectStore, StorageError
from storage.keys import model_key
from storage.models import ModelStore, sha256_file

MiB = 1024 * 1024


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-sd15.safetensors"
    path.write_bytes(os.urandom(3 * MiB + 17))
    return path


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_sha256_file(checkpoint: Path) -> None:
    assert sha256_file(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_add_then_fetch_downloads_once(
    store: ObjectStore, checkpoint: Path, tmp_path: Path
) -> None:
    blob = ModelStore(store, tmp_path / "node-a").add(checkpoint)
    assert blob.sha256 == sha256_file(checkpoint)
    assert blob.size == checkpoint.stat().st_size
    assert blob.key == model_key(blob.sha256) and store.exists(blob.key)

    models = ModelStore(store, tmp_path / "node-b")  # a fresh node
    assert not models.is_cached(blob.sha256)
    path = models.fetch(blob.sha256)
    assert path == tmp_path / "node-b" / f"{blob.sha256}.safetensors"
    assert path.read_bytes() == checkpoint.read_bytes()
    assert models.downloads == 1
    assert models.fetch(blob.sha256, size=blob.size) == path  # reused
    assert models.downloads == 1
    assert ModelStore(store, tmp_path / "node-b").fetch(blob.sha256) == path  # restart
    assert cache_files(tmp_path / "node-b") == [path.name]


def test_add_skips_existing_upload(store: ObjectStore, checkpoint: Path, tmp_path: Path) -> None:
    models = ModelStore(store, tmp_path / "cache")
    first = models.add(checkpoint)
    assert models.add(checkpoint) == first
    assert models.uploads == 1


def test_cached_file_of_wrong_size_is_fetched_again(
    store: ObjectStore, checkpoint: Path, tmp_path: Path
) -> None:
    models = ModelStore(store, tmp_path / "cache")
    blob = models.add(checkpoint)
    models.cache_path(blob.sha256).write_bytes(b"truncated")
    assert models.fetch(blob.sha256, size=blob.size).read_bytes() == checkpoint.read_bytes()
    assert models.downloads == 1


def test_corrupted_blob_is_rejected(store: ObjectStore, checkpoint: Path, tmp_path: Path) -> None:
    sha = sha256_file(checkpoint)
    store.put_bytes(model_key(sha), b"not the model you are looking for")
    models = ModelStore(store, tmp_path / "cache")
    with pytest.raises(StorageError, match="corrupted") as info:
        models.fetch(sha)
    assert not isinstance(info.value, ObjectNotFound)
    assert cache_files(tmp_path / "cache") == []
    assert models.downloads == 0


def test_missing_model(store: ObjectStore, tmp_path: Path) -> None:
    models = ModelStore(store, tmp_path / "cache")
    with pytest.raises(ObjectNotFound):
        models.fetch("0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        models.fetch("not-a-hash")
    assert cache_files(tmp_path / "cache") == []


def test_concurrent_fetches_download_once(
    store: ObjectStore, checkpoint: Path, tmp_path: Path
) -> None:
    blob = ModelStore(store, tmp_path / "up").add(checkpoint)
    cache = tmp_path / "shared-cache"
    # separate instances behave like separate worker processes on one node
    fetchers = [ModelStore(store, cache) for _ in range(4)]
    barrier = threading.Barrier(len(fetchers))
    results: list[Path | BaseException] = [Path()] * len(fetchers)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fetchers[i].fetch(blob.sha256)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fetchers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r == cache / f"{blob.sha256}.safetensors" for r in results), results
    assert sha256_file(cache / f"{blob.sha256}.safetensors") == blob.sha256
    assert sum(f.downloads for f in fetchers) == 1
    assert cache_files(cache) == [f"{blob.sha256}.safetensors"]


def test_a_fetch_reports_progress_and_keeps_reporting_while_another_downloads(
    store: ObjectStore, checkpoint: Path, tmp_path: Path
) -> None:
    """A worker's hang detection counts these calls as progress, so a load that waits on
    another process's download of the same model is not taken for a hung one."""
    blob = ModelStore(store, tmp_path / "up").add(checkpoint)
    cache = tmp_path / "cache"
    seen: list[int] = []
    path = ModelStore(store, cache).fetch(blob.sha256, progress=seen.append)
    size = checkpoint.stat().st_size
    assert sha256_file(path) == blob.sha256
    assert sum(seen) == 2 * size  # the download, then the hash check, piece by piece

    other = tmp_path / "cache2"
    holder, waiter = ModelStore(store, other), ModelStore(store, other)
    waits: list[int] = []
    got: list[Path] = []
    with holder._locked(blob.sha256):  # another process is downloading it
        t = threading.Thread(
            target=lambda: got.append(waiter.fetch(blob.sha256, progress=waits.append))
        )
        t.start()
        t.join(1.6)
        assert t.is_alive() and got == []
        assert waits.count(0) >= 3  # every half second while it waits
    t.join(30)
    assert got == [other / f"{blob.sha256}.safetensors"] and waiter.downloads == 1
