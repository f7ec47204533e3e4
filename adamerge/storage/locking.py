"""One writer per directory: lock files that name their holder and die with it.

A run directory is locked for the whole run (``<run dir>/.adamerge.lock``): a second process started on it is
refused with the first one's pid, host and start time. A demo zoo being built is locked too
(``<cache>/.<zoo>.lock``): a second process waits for the first build and reuses it.

The lock itself is an advisory ``flock`` on the file, which the kernel releases when its holder exits however
it exits, so a lock left by a dead process (SIGKILL, a crashed node) is simply free: the next process takes it
over and says whose it was. The file's content (pid, host, start time) is only there to tell a refused user
who holds it. Holding is re-entrant within a process (the CLI takes a run's lock before Hydra writes into the
directory, and the run takes it again).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adamerge.errors import RunDirectoryError

RUN_LOCK = ".adamerge.lock"


class LockHeldError(RunDirectoryError):
    """Another live process holds the lock of a directory this process must write."""


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that left no details"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, "
            f"command: {holder.get('command')})")


class FileLock:
    """An exclusive ``flock`` on ``path``, recording this process as its holder while held."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.previous_holder: dict[str, Any] | None = None  # a dead holder's record found when taking the lock

    def read_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    return False
                raise
            # The holder before us may have removed the file after we opened it: a lock on a deleted inode
            # guards nothing, so start again on the file now at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        self.previous_holder = self.read_holder()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return True

    def acquire(self, poll_seconds: float = 0.2) -> None:
        """Wait for the lock (polling, so the wait can be interrupted by a signal)."""
        while not self.try_acquire():
            time.sleep(poll_seconds)

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, so a process that opened it meanwhile notices (see try_acquire).
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


_held_run_locks: dict[Path, tuple[FileLock, int]] = {}


def is_helper_rank() -> bool:
    """Whether this process is a non-zero rank that a distributed launcher (Lightning's DDP, torchrun) started."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "RANK", "NODE_RANK"))


def acquire_run_lock(run_dir: str | os.PathLike) -> None:
    """Lock ``run_dir`` for this process (re-entrant); refuse with the holder's details if another process
    holds it. A lock left by a process that died is taken over, and said so."""
    # Resolved, so that one directory spelled two ways (``runs/x/../y``, a symlink) is one lock: the CLI's guard and
    # the run acquire it from differently written paths, and an unresolved key made a run refuse its own lock.
    key = Path(run_dir).resolve()
    if is_helper_rank():  # a DDP worker that rank 0's run launched: it works for that run, which holds the lock
        return
    if key in _held_run_locks:
        lock, count = _held_run_locks[key]
        _held_run_locks[key] = (lock, count + 1)
        return
    lock = FileLock(key / RUN_LOCK)
    try:
        acquired = lock.try_acquire()
    except OSError as error:
        raise RunDirectoryError(f"cannot write to the run directory {key}: {error.strerror or error} "
                                "(set hydra.run.dir to a writable directory)") from error
    if not acquired:
        raise LockHeldError(f"the run directory {key} is in use by {describe_holder(lock.read_holder())}; "
                            "wait for that run to end (or stop it), or choose another run directory "
                            "(hydra.run.dir=...)")
    if lock.previous_holder:
        print(f"adamerge: taking over {lock.path}, left by {describe_holder(lock.previous_holder)}, "
              "which is no longer running", file=sys.stderr)
    _held_run_locks[key] = (lock, 1)


def release_run_lock(run_dir: str | os.PathLike) -> None:
    key = Path(run_dir).resolve()
    if key not in _held_run_locks:
        return
    lock, count = _held_run_locks.pop(key)
    if count > 1:
        _held_run_locks[key] = (lock, count - 1)
    else:
        lock.release()


@contextlib.contextmanager
def run_directory_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    acquire_run_lock(run_dir)
    try:
        yield
    finally:
        release_run_lock(run_dir)


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``path`` for a build of ``what``, waiting (and saying so) while another process builds it."""
    lock = FileLock(path)
    if not lock.try_acquire():
        print(f"adamerge: waiting for {describe_holder(lock.read_holder())}, which is building {what}",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
