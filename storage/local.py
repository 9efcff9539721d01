"""Object store on a local directory (also any shared file system mounted on all nodes).

Every write goes to a temporary file in the destination directory that is then renamed
over the target with ``os.replace``, so a reader or a crashed writer never sees half a file.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from storage.base import ObjectNotFound, Progress, StorageError, StrPath, check_key, check_prefix

TMP_PREFIX = ".tmp-"
_CHUNK = 1024 * 1024


def atomic_write(path: Path, fill: Callable[[BinaryIO], object], *, fsync: bool = True) -> None:
    """Create ``path`` atomically: ``fill(fileobj)`` writes a temp file renamed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# a full disk, a quota, an I/O error or a stale network mount can clear up; the rest cannot
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ETIMEDOUT}


def _os_error(message: str, e: OSError) -> StorageError:
    return StorageError(f"{message}: {e}", transient=e.errno in _TRANSIENT_ERRNOS)


def _copy_from(src: BinaryIO, progress: Progress | None = None) -> Callable[[BinaryIO], object]:
    if progress is None:
        return lambda dst: shutil.copyfileobj(src, dst, _CHUNK)

    def copy(dst: BinaryIO) -> None:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            progress(len(chunk))

    return copy


class LocalStore:
    """Objects as files under ``root``; key ``a/b.png`` is ``root/a/b.png``."""

    def __init__(self, root: StrPath, *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {self.root}: {e}") from e

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        path = self._path(key)
        try:
            atomic_write(path, lambda f: f.write(data), fsync=self.fsync)
        except OSError as e:
            raise _os_error(f"cannot write {path}", e) from e

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, str(self.root)) from None
        except OSError as e:
            raise _os_error(f"cannot read {path}", e) from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key, str(self.root))
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as e:
            raise _os_error(f"cannot delete {path}", e) from e
        # prune now-empty parent directories, never the root itself
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def put_file(
        self, key: str, path: StrPath, content_type: str = "application/octet-stream"
    ) -> None:
        dest = self._path(key)
        try:
            with open(path, "rb") as src:
                atomic_write(dest, _copy_from(src), fsync=self.fsync)
        except OSError as e:
            raise _os_error(f"cannot copy {path} to {dest}", e) from e

    def get_file(self, key: str, path: StrPath, progress: Progress | None = None) -> None:
        src_path = self._path(key)
        try:
            with open(src_path, "rb") as src:
                atomic_write(Path(path).absolute(), _copy_from(src, progress), fsync=self.fsync)
        except (FileNotFoundError, IsADirectoryError) as e:
            if not src_path.is_file():
                raise ObjectNotFound(key, str(self.root)) from None
            raise _os_error(f"cannot copy {src_path} to {path}", e) from e
        except OSError as e:
            raise _os_error(f"cannot copy {src_path} to {path}", e) from e

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        # walk only the deepest directory the prefix names, then filter by string prefix
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if (base + d).startswith(prefix[: len(base + d)])]
            for name in filenames:
                key = base + name
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self._path(key).as_uri()

    def describe(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"
