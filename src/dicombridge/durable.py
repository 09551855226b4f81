"""Durable file writes: what is on disk after a crash is the old file or the new, whole.

POSIX makes a rename durable only once the directory is fsynced too; these helpers do
both. Every state file, key, outbox and spool entry is written through them.

A write that fails (a full disk above all: ENOSPC, or EDQUOT over a quota) removes its
temporary file before the error goes on, so a failed write neither leaves a truncated
file under the target's name nor keeps the space it had taken.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Final

# The errors a write gets when the file system (or the user's quota) has no room left.
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says that the disk (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def free_bytes(path: Path) -> int | None:
    """Bytes free for us on the file system holding ``path`` (or its nearest existing
    parent); ``None`` when even that cannot be asked."""
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            if candidate.exists():
                return shutil.disk_usage(candidate).free
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync dir.

    The temporary file is created with ``mode`` from its first byte (0600 for secrets);
    a leftover from an earlier crash is replaced, never appended to. If anything fails
    before the rename, the temporary file is removed and ``path`` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
