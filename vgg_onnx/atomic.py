"""Files appear whole or not at all: write a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import UsageError, VggOnnxError


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before slow work, when `path` cannot be created."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, not a file name")
    probe_dir = folder
    while not os.path.exists(probe_dir):  # folders we would create
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise UsageError(f"{path}: cannot write there ({probe_dir} is not a folder)")
    try:  # a real file, not os.access: root passes access checks on read-only mounts and /proc
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        raise UsageError(f"{path}: cannot write there (cannot create a file in {probe_dir}: {e.strerror or e})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
