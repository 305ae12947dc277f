"""One way to write a file so that a crash never leaves half of it: checkpoints, metrics, plots and
the autotune timing cache all go through :func:`atomic_write`.

The bytes go to a temporary file beside the target, are flushed and fsynced, optionally checked
(``verify``), and the temporary file is renamed over the target (``os.replace``, atomic on POSIX); the
directory is then fsynced so the new name survives a power cut as well as the new bytes. A reader
therefore sees the old file or the new one, never a mixture, and a failing writer leaves the old file
and no temporary.

``keep_previous`` keeps one older copy: just before the new file takes the target's name, the old
target is linked (a second name for the same bytes, no copy) as ``keep_previous``. The target exists at
every moment; where the file system has no hard links the old file is renamed instead, which leaves a
moment with only ``keep_previous`` (readers that fall back to it, like checkpoint loading, are fine).

A full disk (``ENOSPC``, or a quota's ``EDQUOT``, anywhere in the chain of errors a writer raised) is
reported as one :class:`DiskFull` error that names the file and the space it needed, instead of the
two or three chained tracebacks of the serialiser.
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import BinaryIO, Callable, Optional

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_directory", "DiskFull", "disk_full_error", "TEMP_PREFIX",
           "format_bytes"]

#: Temporary files start with this, so a clean-up can tell them from real outputs.
TEMP_PREFIX = ".tmp-"

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFull(OSError):
    """A write ran out of disk space (or quota): one line naming the file, what it needed and what was free.

    ``needed`` is the size of the whole file when the writer knew it (``size_hint``), else the bytes it had
    written when the disk filled up (a lower bound, said as "at least"); ``free`` is what the file system
    reports free after the partial file was removed. ``note`` adds what was kept (e.g. the previous
    checkpoint)."""

    def __init__(self, path: str, needed: Optional[int], free: Optional[int], *, at_least: bool = False,
                 note: str = ""):
        self.path, self.needed, self.free, self.at_least, self.note = path, needed, free, at_least, note
        sizes = ([] if needed is None else [f"it needs {'at least' if at_least else 'about'} {format_bytes(needed)}"]) \
            + ([] if free is None else [f"{format_bytes(free)} free on that file system"])
        super().__init__(errno.ENOSPC, f"no space left on the device writing {path}"
                                       + (f" ({'; '.join(sizes)})" if sizes else "") + (f"; {note}" if note else ""))

    def __str__(self) -> str:
        return self.strerror

    def with_note(self, note: str) -> "DiskFull":
        return DiskFull(self.path, self.needed, self.free, at_least=self.at_least, note=note)


def format_bytes(n: float) -> str:
    """``n`` bytes for people: 512 B, 3.4 MB, 1.2 GB (powers of 1000, like ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _is_disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(directory: str) -> Optional[int]:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full_error(exc: BaseException, path: str, needed: Optional[int], *, at_least: bool = False
                    ) -> Optional[DiskFull]:
    """The :class:`DiskFull` to raise instead of ``exc`` when ``exc`` (or an error it chains) is a full
    disk while writing ``path``; None when it is some other failure."""
    if isinstance(exc, DiskFull):
        return exc
    if not _is_disk_full(exc):
        return None
    return DiskFull(os.fspath(path), needed, _free_bytes(os.path.dirname(os.path.abspath(path))), at_least=at_least)


def _open_exclusive(path: str) -> BinaryIO:
    """A new file at ``path``, opened for binary writing; FileExistsError if the name is taken.

    Mode 0o666 less the umask, the way ``open(path, "wb")`` creates files (``tempfile.mkstemp`` would
    make it 0o600, and the renamed file unreadable to anyone else)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 verify: Optional[Callable[[str], None]] = None, keep_previous: str | os.PathLike | None = None,
                 size_hint: Optional[int] = None) -> None:
    """Call ``write(f)`` on a binary file object, then put its bytes at ``path`` atomically.

    ``verify(temporary_path)``, when given, reads the written file back before it replaces anything; an
    error it raises leaves the old file in place. ``keep_previous`` names where the file being replaced
    is kept (see the module docstring). ``size_hint`` (bytes) is what a :class:`DiskFull` error reports
    as needed. Parent folders are created as needed.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = _temporary_name(path)
        try:
            f = _open_exclusive(tmp)
            break
        except FileExistsError:  # another writer's temporary name: draw again
            continue
    try:
        try:
            with f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as exc:
            written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
            _remove(tmp)
            full = disk_full_error(exc, path, size_hint or written, at_least=size_hint is None)
            if full is not None:
                raise full from None
            raise
        if verify is not None:
            verify(tmp)
        if keep_previous is not None and os.path.exists(path):
            _keep_previous(path, os.path.abspath(os.fspath(keep_previous)))
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of a bytes object (text: ``s.encode()``)."""
    atomic_write(path, lambda f: f.write(data), size_hint=len(data))


def _temporary_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}{os.path.basename(path)}-{os.urandom(6).hex()}")


def _keep_previous(path: str, previous: str) -> None:
    """Make ``previous`` name the bytes now at ``path`` (which keeps its name too, where links exist)."""
    link = _temporary_name(previous)
    try:
        os.link(path, link)
    except OSError:  # no hard links on this file system: move the old file aside instead
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    finally:
        _remove(link)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory's entries to disk (POSIX); best effort, as some file systems refuse it."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
