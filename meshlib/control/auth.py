"""The admin token: one secret in the data dir that mutating config endpoints require.

`ensure_token(data_dir)` creates `admin.token` on first start, readable by its owner only, as
every secret is written (`meshlib.security.files.create_private`: mode 0600 from the start,
written in full under a temporary name and linked into place), so no reader ever sees an empty
or partial token and two starts racing cannot end up with different tokens. The CLI prints a new
token once to stderr; nothing here logs it.

Replicas on one etcd store share one admin token (meshlib.control.etcd_admin): etcd holds its
SHA-256 only, so `AdminToken` compares hashes, in constant time.
"""

from __future__ import annotations

import hashlib
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


def digest(token: str) -> str:
    """The hex SHA-256 of a token: what is kept where the token itself must not be."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class AdminToken:
    """Checks `Authorization: Bearer ...` header values against the admin token's hash.

    Made from the token, or from its hash alone (`from_digest`: a replica that never saw the
    token); `replace` takes a new hash (the shared one changed in etcd)."""

    __slots__ = ("_digest",)

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the admin token cannot be empty")
        self._digest = digest(token).encode("ascii")

    @classmethod
    def from_digest(cls, hex_digest: str) -> AdminToken:
        self = cls.__new__(cls)
        self.replace(hex_digest)
        return self

    def replace(self, hex_digest: str) -> None:
        if len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
            raise ValueError("an admin token hash is 64 lowercase hex digits")
        self._digest = hex_digest.encode("ascii")

    def matches(self, hex_digest: str) -> bool:
        return hmac.compare_digest(self._digest, hex_digest.encode("ascii", "replace"))

    def check(self, header_value: str | None) -> bool:
        """True when the header is `Bearer <the token>` (scheme case-insensitive)."""
        if not header_value:
            return False
        scheme, _, given = header_value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(digest(given.strip()).encode("ascii"), self._digest)

    def __repr__(self) -> str:
        return "AdminToken(<hidden>)"
