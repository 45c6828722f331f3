"""Files appear whole or not at all: write a temporary file in the same folder, fsync, rename.

Rules every command's outputs follow:
  * an output is never one of the command's inputs (same file, also through symlinks and hard
    links): `check_writable(output, inputs=[...])` refuses it before any slow work;
  * an output that exists and is not a regular file is never renamed over: a FIFO or a
    character device (`/dev/stdout`, `>(cmd)`) is written in place once the content is complete,
    anything else (a block device, a socket) is refused;
  * an output that is a symlink to a regular file keeps its link: the file it points to is replaced;
  * several outputs that belong together (a model and its JSON sidecar) are written completely,
    all of them, before the first rename (`atomic_paths`);
  * temporary files are named `.<name>.<pid>.<random>.tmp`, so those of a killed run are
    recognisable: the next write of the same output removes the ones whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator

from .errors import OutputWriteError, UsageError, VggOnnxError

__all__ = ["atomic_path", "atomic_paths", "atomic_write_bytes", "atomic_write_text", "check_writable", "file_kind",
           "remove_stale_temps", "same_file"]

TEMP_SUFFIX = ".tmp"
# a full or failing disk: reported as one line naming the output, whatever the writer was doing
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both names exist and are the same file (symlinks followed, hard links included)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a FIFO", "a character device"..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _existing_mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _written_in_place(mode: int | None) -> bool:
    """FIFOs and character devices (a terminal, a pipe, /dev/null) take the content in place."""
    return mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode))


def check_writable(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Fail early, before slow work, when `path` cannot be written or is one of `inputs`.

    `inputs` are every file the command reads (a model, its weights, the images; None entries are
    skipped): an output that is the same file as one of them, by any name, is refused, so that no
    command silently replaces what it reads. Call it with the output and all inputs, e.g.
    `check_writable(output, inputs=[model, *image_paths])` for `infer --output`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, not a file name")
    for source in inputs:
        if source is not None and same_file(path, source):
            raise UsageError(f"{path}: is one of this command's inputs ({os.fspath(source)}); "
                             "choose another output name")
    mode = _existing_mode(path)
    if _written_in_place(mode):
        return
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(f"{path}: is {file_kind(mode)}; refusing to write there")
    folder = os.path.dirname(os.path.realpath(path)) or "."
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files of `path` left by runs that were killed (their pid is gone).

    Only names of the form `.<name>.<pid>.<random>.tmp` beside `path` are considered; a pid that
    is alive (even if reused by another program) keeps its file. Returns the removed paths.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape("." + name + ".") + r"(\d+)\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
    return removed


class _PendingFile:
    """One output being written: its temporary file until commit, then the output."""

    def __init__(self, path: str):
        self.path = path
        mode = _existing_mode(path)
        if mode is not None and not stat.S_ISREG(mode) and not _written_in_place(mode):
            raise VggOnnxError(f"{path}: is {file_kind(mode)}; refusing to write there")
        self.in_place = _written_in_place(mode)
        # a symlink keeps pointing at the new content; a device is opened by the name given, since
        # /dev/stdout resolves to names such as /proc/<pid>/fd/pipe:[123] that cannot be opened
        self.target = path if self.in_place else os.path.realpath(path)
        # a device's folder (/dev) is no place for a temporary file; the system's temp folder is
        folder = tempfile.gettempdir() if self.in_place else os.path.dirname(self.target)
        try:
            os.makedirs(folder, exist_ok=True)
            if not self.in_place:
                remove_stale_temps(self.target)
            fd, self.tmp = tempfile.mkstemp(dir=folder, suffix=TEMP_SUFFIX,
                                            prefix=f".{os.path.basename(self.target)}.{os.getpid()}.")
        except OSError as e:
            raise VggOnnxError(f"{path}: cannot write there ({e.strerror or e})") from None
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode

    def sync(self) -> None:
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())

    def commit(self) -> None:
        if not self.in_place:
            os.replace(self.tmp, self.target)
            return
        try:  # a FIFO nobody reads would block open() forever; non-blocking, it fails at once
            fd = os.open(self.target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise VggOnnxError(f"{self.path}: is a FIFO that no process reads; nothing written") from None
            raise
        os.set_blocking(fd, True)
        with open(fd, "wb") as out, open(self.tmp, "rb") as f:
            shutil.copyfileobj(f, out)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _settle(pending: _PendingFile, step) -> None:
    """Run a sync or commit step; a write error becomes one line naming the output."""
    try:
        step()
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise OutputWriteError(pending.path, e) from None


@contextlib.contextmanager
def atomic_paths(paths: Iterable[str | os.PathLike]) -> Iterator[list[str]]:
    """Yield one temporary path per output; on success all are fsynced, then renamed in order.

    Outputs that belong together are complete on disk before the first of them replaces its old
    version, so a full disk or an error while writing any of them changes none. On any error
    the temporary files are removed; a write error (full disk...) is one line naming the output.
    """
    paths = [os.fspath(p) for p in paths]
    pending: list[_PendingFile] = []
    try:
        for path in paths:
            pending.append(_PendingFile(path))
        if len({p.target for p in pending}) < len(pending):
            raise VggOnnxError(f"{' and '.join(paths)}: are the same file; each output needs its own name")
        try:
            yield [p.tmp for p in pending]
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            blamed = [p.path for p in pending if e.filename == p.tmp] or paths
            raise OutputWriteError(" and ".join(blamed), e) from None
        for current in pending:
            _settle(current, current.sync)
        for current in pending:
            _settle(current, current.commit)
    finally:
        for p in pending:
            p.discard()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    atomic_write_bytes(path, text.encode("utf-8"))
