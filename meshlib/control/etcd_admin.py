"""One admin token for every control service replica on an etcd store.

`security/admin` holds `{"hash": <hex SHA-256>}` of the token, never the token. It is created
once, by a create-if-absent transaction: the first replica to start on the prefix offers the
token of its data dir (an `admin.token` from before, or a new one written there 0600 first)
and, if its offer wins, prints a new token once as a single service does. Every other replica
takes the stored hash: the token of the first replica works on all of them, and a replica's
own data dir then holds no admin token (the operator passes it with --token or
$MESH_ADMIN_TOKEN). A data dir whose `admin.token` is not the store's is named in a WARNING
(never its content) and not used.

A new hash put under `security/admin` (an operator replacing the token: put the SHA-256 of a
new token there with etcdctl) reaches every replica through the security watch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from pathlib import Path

from meshlib.control.auth import ADMIN_PREFIX, TOKEN_FILE, AdminToken, digest, read_token
from meshlib.control.etcd_client import KeyValue
from meshlib.control.etcd_security import SharedSecurity
from meshlib.control.etcd_watch import WatchEvent
from meshlib.security.files import create_private

log = logging.getLogger("meshlib.control")


class SharedAdminToken:
    """The admin token of a store prefix; `auth` checks requests, `new_token` is the token this
    start created (to print once), or None."""

    def __init__(self, shared: SharedSecurity, data_dir: str | Path) -> None:
        self.key = shared.key("admin")
        self.new_token: str | None = None
        self._revision = 0
        path = Path(data_dir) / TOKEN_FILE
        loaded = shared.load(self.key)
        stored = loaded[0] if loaded else None
        if stored is None:
            stored = self._offer(shared, path)
        hash_ = _hash_of(stored)
        self._revision = stored.mod_revision
        self.auth = AdminToken.from_digest(hash_)
        if self.new_token is None and path.exists():
            try:
                local = read_token(path)
            except (OSError, ValueError):
                local = ""
            if not self.auth.matches(digest(local)):
                log.warning(
                    "%s is not the admin token of this store (%s); the token of the replica that "
                    "started first on it is",
                    path,
                    shared.options.prefix,
                )
        shared.attach(self)

    def _offer(self, shared: SharedSecurity, path: Path) -> KeyValue:
        """Create-if-absent: this data dir's token (made now if it has none) becomes the store's,
        unless another replica's got there first. The file is written before the offer, so a
        token that wins is never only in memory; one that loses is removed again."""
        made = False
        if path.exists():
            token = read_token(path)
        else:
            token = ADMIN_PREFIX + secrets.token_urlsafe(32)
            made = create_private(path, f"{token}\n".encode())
            if not made:  # another start on this data dir wrote one first
                token = read_token(path)
        value = json.dumps({"hash": digest(token)}).encode()
        stored = shared.create(self.key, value)
        if stored.value == value:
            if made:
                self.new_token = token
            log.info("the admin token of %s is the one in %s", shared.options.prefix, path)
        elif made:  # not the store's token: nobody should be handed it
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stored

    def reload(self, kvs: list[KeyValue]) -> None:
        for kv in kvs:
            self._take(kv)

    def apply(self, event: WatchEvent) -> None:
        if event.kind == "put":
            self._take(event.kv)
        else:  # kept: with no hash in etcd, nobody's token would be accepted, or anyone's
            log.warning("security: the admin token hash was deleted from etcd; keeping the one held")

    def _take(self, kv: KeyValue) -> None:
        if kv.mod_revision <= self._revision:
            return
        try:
            hash_ = _hash_of(kv)
            changed = not self.auth.matches(hash_)
            self.auth.replace(hash_)
        except ValueError as exc:
            log.warning("security: ignoring the admin token hash in etcd: %s", exc)
            return
        self._revision = kv.mod_revision
        if changed:
            log.info("security: the admin token was replaced")


def _hash_of(kv: KeyValue) -> str:
    try:
        value = json.loads(kv.value)["hash"]
    except (ValueError, KeyError, TypeError):
        raise ValueError('security/admin does not hold {"hash": ...}') from None
    if not isinstance(value, str):
        raise ValueError("security/admin: the hash is not a string")
    return value
