"""File edge: bounded reads, atomic writes, in-place replacement of hand-edited files, and an
advisory lock for hand edits."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: The most any text input is read into memory (config, pools, kubectl output, status.json).
MAX_READ_BYTES = 128 << 20


class UnreadableFileError(OSError):
    """A file that exists but cannot be used as text: not a regular file, too large, or not UTF-8.

    An OSError, so every caller that already handles unreadable files handles these too;
    `strerror` says what is wrong, `filename` which file.
    """


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def edit_target(path: Path) -> Path:
    """The file an edit of `path` must change: the end of its symlink chain (a link is kept, not replaced)."""
    return Path(os.path.realpath(path))


def replace_file(path: Path, text: str, new_mode: int = 0o640) -> Path:
    """Atomically replace a hand-edited file, keeping what the admin set up.

    A symlink stays a symlink (its target is rewritten); an existing file keeps its mode, owner
    and group; a new one gets `new_mode` and its directory's group (so /etc/lbappliance's group
    can read it). When the owner cannot be kept (not root, file of another user) nothing is
    written and PermissionError says so. Returns the file written.
    """
    target = edit_target(path)
    try:
        before = os.stat(target)
        mode, uid, gid, existed = stat.S_IMODE(before.st_mode), before.st_uid, before.st_gid, True
    except FileNotFoundError:
        mode, uid, gid, existed = new_mode, -1, os.stat(target.parent).st_gid, False
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            try:
                os.fchown(handle.fileno(), uid, gid)
            except PermissionError:
                if existed:  # for a new file the directory's group is a courtesy, not a promise
                    raise PermissionError(errno.EPERM, f"cannot keep owner {uid}:{gid} of {target} "
                                          "(run as root or as its owner); left unchanged", str(target)) from None
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete the `.<name>.*.tmp` files killed writes of `path` left behind. Call under `locked(path)`:
    then no write of it is in flight, so every such file is stale."""
    target = edit_target(path)
    removed = []
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.is_symlink() or leftover.is_file():
                leftover.unlink()
                removed.append(leftover)
    return removed


class LockTimeoutError(TimeoutError):
    """Another edit held the lock for longer than the timeout."""


@contextlib.contextmanager
def locked(path: Path, timeout: float = 10.0) -> Iterator[None]:
    """Serialise edits of `path` through a lock file beside its target (the file itself is replaced),
    so an edit through a symlink and one of the target itself exclude each other."""
    target = edit_target(path)
    lock_path = target.with_name(f".{target.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeoutError(f"{path}: another edit has held {lock_path} for more than "
                                           f"{timeout:g} s; try again") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_bytes(path: Path, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """A regular file's bytes, at most `max_bytes`; a directory, FIFO or device is refused without
    blocking on it (a FIFO named as pools.yaml would otherwise hang the reader forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > max_bytes:
            raise UnreadableFileError(errno.EFBIG, f"larger than {max_bytes} bytes ({info.st_size})", str(path))
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise UnreadableFileError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: Path, max_bytes: int = MAX_READ_BYTES) -> str:
    """UTF-8 text of a regular file; UnreadableFileError (an OSError) names the first byte that is not."""
    data = read_bytes(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UnreadableFileError(errno.EILSEQ, f"not UTF-8: byte 0x{data[exc.start]:02x} at line {line} "
                                  f"(offset {exc.start})", str(path)) from None
