"""Writing secrets and certificates to the data dir without ever exposing a partial or
world-readable file.

A private file is created with mode 0600 by `os.open` under a temporary name (its mode is
never widened, so there is no moment when it is readable by others), written in full and
fsynced, then renamed over the target: a reader sees the old file or the new one, never half
of one. `create_private` links instead of renaming, so that two processes racing to create the
same secret cannot both succeed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger("meshlib.security")


def _write_tmp(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` (replacing it) as a 0600 file, atomically."""
    tmp = _write_tmp(path, data, 0o600)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` as a 0600 file holding `data`; False (and nothing written) if it exists."""
    tmp = _write_tmp(path, data, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True


def write_public(path: Path, data: bytes) -> None:
    """Write a file anyone may read (certificates, bundles), atomically."""
    tmp = _write_tmp(path, data, 0o644)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def warn_if_readable(path: Path) -> None:
    """Log a warning when a secret file can be read by other users (its content is not logged)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s can be read by other users (mode %o); chmod 600 it", path, mode)
