"""Model blobs addressed by sha256 in the object store, plus a node-local disk cache.

``add`` uploads a checkpoint once under ``models/sha256/<sha>.safetensors``; ``fetch``
returns ``cache_dir/<sha>.safetensors``, downloading and verifying it only when it is not
cached yet. Concurrent fetches of one model (threads or processes on one node) download it
once: they serialise on ``cache_dir/<sha>.lock`` and the file appears by atomic rename only
after its sha256 matched, so a file present in the cache is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.base import ObjectStore, Progress, StorageError, StrPath
from storage.keys import model_key

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: unique temp names + os.replace suffice
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1024 * 1024


def sha256_file(path: StrPath, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read in chunks (``progress`` is told each chunk's size)."""
    with open(path, "rb") as f:
        if progress is None:
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            progress(len(chunk))
        return digest.hexdigest()


@dataclass(frozen=True)
class ModelBlob:
    sha256: str
    size: int
    key: str


class ModelStore:
    def __init__(self, store: ObjectStore, cache_dir: StrPath) -> None:
        self.store = store
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.downloads = 0  # completed downloads, so callers and tests can see reuse
        self.uploads = 0
        self._count_lock = threading.Lock()

    def add(self, path: StrPath) -> ModelBlob:
        """Upload a checkpoint unless the store already holds it with the same size."""
        sha = sha256_file(path)
        size = os.path.getsize(path)
        key = model_key(sha)
        if not (self.store.exists(key) and self.store.size(key) == size):
            self.store.put_file(key, path)
            with self._count_lock:
                self.uploads += 1
        return ModelBlob(sha, size, key)

    def cache_path(self, sha256: str) -> Path:
        model_key(sha256)  # validates the hash
        return self.cache_dir / f"{sha256}.safetensors"

    def is_cached(self, sha256: str, size: int | None = None) -> bool:
        path = self.cache_path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def fetch(self, sha256: str, size: int | None = None, progress: Progress | None = None) -> Path:
        """Local path of the model, downloaded and sha256-checked if not cached.

        With ``size`` given, a cached file of another size is discarded and fetched again.
        ``progress`` is called as the download and the check go on, and every half second
        while another thread or process on this node downloads the same model.
        Raises ObjectNotFound if the store lacks it, StorageError if its hash is wrong.
        """
        path = self.cache_path(sha256)
        if self.is_cached(sha256, size):
            return path
        with self._locked(sha256, progress):
            if self.is_cached(sha256, size):  # another thread or process fetched it
                return path
            self._download(sha256, path, progress)
        return path

    @contextlib.contextmanager
    def _locked(self, sha256: str, progress: Progress | None = None) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        # flock locks belong to the open file description: this excludes other threads too
        with open(self.cache_dir / f"{sha256}.lock", "a+b") as lock:
            if progress is None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        progress(0)  # waiting on a download that is under way
                        time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _download(self, sha256: str, path: Path, progress: Progress | None = None) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{sha256}.", suffix=".part")
        os.close(fd)
        try:
            self.store.get_file(model_key(sha256), tmp, progress)
            actual = sha256_file(tmp, progress)
            if actual != sha256:
                raise StorageError(
                    f"model {model_key(sha256)} in {self.store.describe()} is corrupted: "
                    f"its content hashes to {actual}"
                )
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with self._count_lock:
            self.downloads += 1
