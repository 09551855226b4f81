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
    _replace(path, data, mode=mode, durable=True)


def write_new_durably(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist) with ``data`` and fsync it, without a rename.

    For files in a directory that becomes visible whole by a rename: fsync that directory
    (``fsync_dir``) once its files are written, then rename it and fsync its parent.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, rename), not fsynced.

    A reader sees the old or the new content, never a mix, and a process crash keeps
    whichever the rename left. A power loss may bring the old content back: only for
    state whose loss is harmless (it is redone, and the redo is idempotent).
    """
    _replace(path, data, mode=mode, durable=False)


def _replace(path: Path, data: bytes, *, mode: int, durable: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def rewrite_in_place(path: Path, data: bytes, *, sync: bool = False) -> bool:
    """Overwrite the start of the existing file ``path`` with ``data`` in one ``pwrite``,
    without creating a file; False (nothing written) if ``data`` is longer than the file.

    For small state files created at a fixed padded size (``pad``): one write of the
    whole content, so a process crash leaves the old or the new state. Unless ``sync``
    (then fdatasynced before this returns), a power loss may lose or tear it: only for
    state whose loss is harmless (it is redone, and the redo is idempotent), and whose
    reader treats an unreadable file as lost.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        if len(data) > os.fstat(fd).st_size:
            return False
        os.pwrite(fd, data, 0)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return True


def pad(data: bytes, block: int, filler: bytes = b" ") -> bytes:
    """``data`` padded with ``filler`` to a multiple of ``block`` bytes (at least one)."""
    size = max(block, -(-len(data) // block) * block)
    return data + filler * (size - len(data))
