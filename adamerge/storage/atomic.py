"""Files that are either the old version or the new one: never torn by a crash, a kill or a full disk.

Every file a run must not lose (checkpoints, ``results.json``, summaries, sweep tables, reports) is written by
:func:`write_atomic`: the bytes go to a temporary file in the same directory, are flushed to disk (fsync), and
the temporary file is renamed over the target; the directory entry is flushed too. A full disk (ENOSPC, or a
quota: EDQUOT) while writing leaves the previous file untouched and no temporary file behind, and raises
:class:`DiskFullError` naming the path and how many bytes it needed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from adamerge.errors import AdamergeError

# The errors that mean "the device has no room for this", as opposed to a permission or a path problem.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# Temporary files being written right now: a hard exit (a second interrupt, adamerge.training.preemption) removes them,
# since it skips the cleanup below.
_in_flight: set[str] = set()


class DiskFullError(AdamergeError, OSError):
    """The device (or the user's quota) has no room for a file adamerge must write; nothing was replaced."""

    def __init__(self, path: str | os.PathLike, needed: int, cause: OSError, *, at_least: bool = False) -> None:
        self.path, self.needed = Path(path), int(needed)
        free = _free_bytes(self.path.parent)
        shown_free = f", {free:,} free" if free is not None else ""
        super().__init__(f"no space left to write {self.path}: it needs {'at least ' if at_least else ''}"
                         f"{self.needed:,} bytes{shown_free} ({os.strerror(cause.errno)}); the previous version is "
                         "untouched. Free space on that device or point the output elsewhere")
        self.errno = cause.errno


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and not isinstance(error, DiskFullError) and error.errno in DISK_FULL_ERRNOS


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` through a fsynced temporary file renamed over it."""
    path = Path(path)
    payload = memoryview(data.encode("utf-8") if isinstance(data, str) else data).cast("B")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        _in_flight.add(tmp)
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); results are meant to be shared
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFullError(path, len(payload), error) from error
        raise
    finally:
        _in_flight.discard(tmp)
    fsync_path(path.parent)
    return path


def remove_files_in_flight() -> None:
    """Delete the temporary files of writes still under way (for an exit that skips their own cleanup)."""
    for tmp in list(_in_flight):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _in_flight.clear()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (what makes a rename durable after a crash)."""
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
