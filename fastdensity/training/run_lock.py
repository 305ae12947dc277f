"""One run at a time per output folder: the lock file ``OUT/.lock``.

Two runs writing to one folder would overwrite each other's checkpoints and metrics, interleave their
logs, and the second one's start-up clean-up would delete the first one's in-flight temporary files.
So a run (rank 0 of a distributed one) takes ``OUT/.lock`` before it touches anything in ``OUT`` and
removes it when it ends; a second run refuses to start, naming the running one.

The lock file records its holder: PID, host, and (on Linux) the process's start time, so that a PID the
system has since reused for another program is not mistaken for the run. Two mechanisms decide who holds
it:

* ``flock`` (POSIX): an exclusive, non-blocking lock on the file. The kernel releases it when the holder
  dies, however it dies, so a lock file left behind by ``kill -9`` is stale by construction and the next
  run takes it over (saying whose it was).
* The recorded PID, where the file system does not support ``flock`` (some network file systems): the
  lock is stale when its holder is on this host and no longer running. A holder on another host cannot
  be checked from here; the message then says to delete the file if that run is gone.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX: only the recorded PID decides
    fcntl = None

__all__ = ["LOCK_NAME", "OutputFolderInUse", "RunLock"]

LOCK_NAME = ".lock"

_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class OutputFolderInUse(RuntimeError):
    """Another run holds the output folder's lock; the message names it."""


def _start_time(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, with the boot's id), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22; the name in (...) may hold spaces


def _running(record: dict) -> bool:
    """Whether the process ``record`` names is still running (True when that cannot be checked from here)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    started = record.get("started")
    return started is None or _start_time(pid) in (None, started)


def _describe(record: Optional[dict]) -> str:
    if not record:
        return "a run that has not written its details yet"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
    return f"PID {record.get('pid')} on {record.get('host')}, started {when}"


class RunLock:
    """The lock of output folder ``folder``: :meth:`acquire` it before writing there, :meth:`release` after
    (or use ``with``). Not reentrant: a second RunLock on the same folder, even in this process, is refused."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock, or raise :class:`OutputFolderInUse`. Returns a note when it took over a stale lock
        (a run that ended without releasing it), else None. The folder must exist."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = self._try_flock(fd)
                record = self._read(fd)
                if locked is False or (locked is None and record and _running(record)):
                    manual = "" if locked is False else f" (if no run is using it, delete {self.path})"
                    raise OutputFolderInUse(f"output folder {self.folder!r} is in use by another run: "
                                            f"{_describe(record)}; wait for it to end or choose another --out"
                                            + manual)
                if locked and not self._still_named(fd):
                    os.close(fd)  # the previous holder removed the file as we opened it: try the new one
                    continue
                self._write(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if record and record.get("pid") is not None:
                return f"took over the lock of a run that ended without releasing it ({_describe(record)})"
            return None

    def release(self) -> None:
        """Remove the lock file and let go of it; a no-op when not held."""
        if self._fd is None:
            return
        try:
            if self._still_named(self._fd):
                os.remove(self.path)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- pieces ---------------------------------------------------------------------------------------

    @staticmethod
    def _try_flock(fd: int) -> Optional[bool]:
        """True: locked; False: someone else holds it; None: this file system (or OS) has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _NO_LOCKING:
                return None
            raise
        return True

    def _still_named(self, fd: int) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _read(fd: int) -> Optional[dict]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096)
        try:
            record = json.loads(text)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def _write(fd: int) -> None:
        pid = os.getpid()
        record = {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid), "time": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
