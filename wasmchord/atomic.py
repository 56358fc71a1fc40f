"""Files that appear whole or not at all, and locks between processes.

A file is written to a temporary beside it, named for the writing process (`NAME.<pid>-<random>.partial`),
and renamed into place when complete. The writer holds an OS lock on its temporary (flock on POSIX,
msvcrt on Windows), which the OS releases when the process dies: a later writer of the same file
removes temporaries whose lock it can take, so a killed run leaves nothing behind for long. Files are
created with mode 0666 less the umask, as `open()` would create them.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".partial"
FRESH_S = 2.0  # a temporary younger than this may not be locked yet by the process that just created it


def _lock_fd(fd: int, *, blocking: bool) -> bool:
    """Take an exclusive lock on an open file; False when another process holds it (non-blocking)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        else:
            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if not blocking:
                        raise
                    time.sleep(0.1)
    except (BlockingIOError, PermissionError):
        return False
    except OSError:
        if blocking:
            raise
        return False
    return True


def temp_path(path: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """A name beside `path` that no other process (or call) uses."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def temporaries(path: Path, suffix: str = TEMP_SUFFIX) -> list[Path]:
    """The temporaries of `path` (from `temp_path`) that exist now, of any process."""
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.*-*{suffix}"))


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporaries of `path` whose writer is gone (their lock is free); returns them."""
    removed = []
    for p in temporaries(path):
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:  # gone already, or not ours to open
            continue
        try:
            stale = time.time() - os.fstat(fd).st_mtime > FRESH_S and _lock_fd(fd, blocking=False)
        finally:
            os.close(fd)  # before unlinking: Windows cannot remove an open file
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(p)
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write of %s", len(removed), path)
    return removed


def target(path: str | os.PathLike) -> Path:
    """Where writing `path` puts the content: the file a symbolic link points to (the link stays).

    Raises:
        FileExistsError: it exists and is not a regular file (a device, a pipe, a socket, a directory),
            which a write must not replace, whatever --force says."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{path} exists and is not a regular file: it is not replaced")
    return path


def _open_temp(path: Path) -> tuple[int, Path]:
    tmp = temp_path(path)
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
    except OSError as e:  # named for the file asked for, not our temporary
        raise OSError(e.errno, f"cannot write there: {e.strerror}", str(path)) from None


def check_writable(path: str | os.PathLike):
    """Raise the OSError (naming `path`) that writing it would meet: checked before long work, not after."""
    path = target(path)
    fd, tmp = _open_temp(path)
    os.close(fd)
    tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a binary file to write `path`'s content into; it replaces `path` (or the file a link at
    `path` points to) when the block ends without an exception, and is removed otherwise. Stale
    temporaries of `path` are removed first. An OSError names `path`, never the temporary."""
    path = target(path)
    remove_stale(path)
    fd, tmp = _open_temp(path)
    try:
        _lock_fd(fd, blocking=True)
        f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise
    try:
        with f:
            yield f
            f.flush()
            if fcntl is not None:  # POSIX renames an open file: the lock is held until it is in place
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.filename in (None, str(tmp)):  # a write or the rename (a full disk): say which file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, waiting: str | None = None):
    """Hold an exclusive lock on `path` (created if missing) for the block; `waiting` is logged when
    another process holds it first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _lock_fd(fd, blocking=False):
            if waiting:
                log.warning("%s", waiting)
            _lock_fd(fd, blocking=True)
        yield
    finally:
        os.close(fd)
