"""Files appear whole or not at all: write a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import UsageError


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before slow work, when `path` cannot be created."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, not a file name")
    probe_dir = folder
    while not os.path.exists(probe_dir):  # folders we would create
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir) or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write there ({probe_dir} is not a writable folder)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
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
