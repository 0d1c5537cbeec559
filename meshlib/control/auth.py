"""The admin token: one secret in the data dir that mutating config endpoints require.

`ensure_token(data_dir)` creates `admin.token` on first start, readable by its owner only, as
every secret is written (`meshlib.security.files.create_private`: mode 0600 from the start,
written in full under a temporary name and linked into place), so no reader ever sees an empty
or partial token and two starts racing cannot end up with different tokens. The CLI prints a new
token once to stderr; nothing here logs it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import stat
from pathlib import Path

from meshlib.security.files import create_private

log = logging.getLogger("meshlib.control")

TOKEN_FILE = "admin.token"
ADMIN_PREFIX = "mat_"


def read_token(path: str | Path) -> str:
    """The token in a token file; ValueError if the file holds none."""
    p = Path(path)
    token = p.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{p} is empty; delete it and restart to create a new admin token")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        log.warning("%s can be read by other users (mode %o); chmod 600 it", p, mode)
    return token


def ensure_token(data_dir: str | Path) -> tuple[str, bool]:
    """The admin token of a data dir, created if missing; also whether it was just created."""
    path = Path(data_dir) / TOKEN_FILE
    if path.exists():
        return read_token(path), False
    # The prefix keeps a token from starting with "-", which a command line would read as an option.
    token = ADMIN_PREFIX + secrets.token_urlsafe(32)
    if not create_private(path, f"{token}\n".encode()):  # another start created it first
        return read_token(path), False
    log.info("created a new admin token in %s", path)
    return token, True


class AdminToken:
    """Checks `Authorization: Bearer ...` header values against the admin token."""

    __slots__ = ("_secret",)

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the admin token cannot be empty")
        self._secret = token.encode("utf-8")

    def check(self, header_value: str | None) -> bool:
        """True when the header is `Bearer <the token>` (scheme case-insensitive)."""
        if not header_value:
            return False
        scheme, _, given = header_value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        candidate = given.strip().encode("utf-8", "surrogatepass")
        return hmac.compare_digest(candidate, self._secret)

    def __repr__(self) -> str:
        return "AdminToken(<hidden>)"
