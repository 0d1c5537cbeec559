"""Join tokens in etcd, shared by every control service replica on one store prefix.

`security/tokens/<id>` holds a token's record as `tokens.json` holds it: the SHA-256 of the
token, its service, creation and expiry, never the token. A token with a TTL is written under
an etcd lease a second longer, so etcd deletes it once it has expired (the expiry itself is
checked here, to the millisecond, not left to the lease).

Checks read the in-memory copy, which the security watch (meshlib.control.etcd_security) keeps
up to date: a token created on one replica is accepted by every replica once the watch has
brought it (milliseconds), and a revoked one is refused as soon as its delete arrives. The
replica that creates or revokes a token changes its copy before it answers.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict

from meshlib.control.etcd_client import KeyValue
from meshlib.control.etcd_security import SharedSecurity
from meshlib.control.etcd_watch import WatchEvent
from meshlib.security.tokens import MAX_TOKENS, TokenInfo, TokenLookup, new_token, parse_record, valid_id

log = logging.getLogger("meshlib.security")

_FORGOTTEN = 4096  # deletions remembered, so that a late echo of an older put is not taken


class EtcdTokenStore(TokenLookup):
    """Join tokens under `security/tokens/` of a shared store prefix (see the module docstring)."""

    def __init__(self, shared: SharedSecurity, *, clock: Callable[[], float] = time.time) -> None:
        self.key = shared.key("tokens/")
        self._client = shared.client
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = {}
        self._revisions: dict[str, int] = {}  # id -> mod revision of the record held
        self._deleted: OrderedDict[str, int] = OrderedDict()  # id -> revision of its deletion
        self.reload(shared.load(self.key))
        shared.attach(self)

    # -- TokenStore ---------------------------------------------------------------------------

    def create(self, service: str, ttl: float | None = None) -> str:
        now = self._clock()
        token, info = new_token(service, ttl, now)
        if len(self._live(now)) >= MAX_TOKENS:
            raise ValueError(f"too many tokens ({MAX_TOKENS}): revoke some first")
        lease = 0
        if ttl is not None:
            lease, _ = self._client.grant(max(1, math.ceil(ttl) + 1))
        revision = self._client.put(self._key(info.id), json.dumps(asdict(info)).encode(), lease=lease)
        with self._lock:
            self._take(info.id, info, revision)
        log.info("join token %s created for service %s", info.id, service)
        return token

    def revoke(self, token_id: str) -> bool:
        if not valid_id(token_id):
            return False
        deleted, revision = self._client.delete(self._key(token_id))
        with self._lock:
            held = token_id in self._tokens
            self._take(token_id, None, revision)
        if deleted or held:
            log.info("join token %s revoked", token_id)
        return bool(deleted)

    # -- following etcd -----------------------------------------------------------------------

    def reload(self, kvs: list[KeyValue]) -> None:
        tokens, revisions = {}, {}
        for kv in kvs:
            info = self._parse(kv)
            if info is not None:
                tokens[info.id] = info
                revisions[info.id] = kv.mod_revision
        with self._lock:
            self._tokens, self._revisions = tokens, revisions

    def apply(self, event: WatchEvent) -> None:
        token_id = event.kv.key[len(self.key) :].decode("ascii", "replace")
        info = self._parse(event.kv) if event.kind == "put" else None
        if event.kind == "put" and info is None:
            return
        with self._lock:
            self._take(token_id, info, event.kv.mod_revision)

    # -- internals ----------------------------------------------------------------------------

    def _take(self, token_id: str, info: TokenInfo | None, revision: int) -> None:
        """Hold `info` (None: deleted) for `token_id`, unless what is held is newer. Under the lock."""
        known = max(self._revisions.get(token_id, 0), self._deleted.get(token_id, 0))
        if revision <= known:
            return
        if info is None:
            self._tokens = {k: v for k, v in self._tokens.items() if k != token_id}
            self._revisions.pop(token_id, None)
            self._deleted[token_id] = revision
            while len(self._deleted) > _FORGOTTEN:
                self._deleted.popitem(last=False)
        else:
            self._tokens = {**self._tokens, token_id: info}
            self._revisions[token_id] = revision

    def _parse(self, kv: KeyValue) -> TokenInfo | None:
        try:
            info = parse_record(json.loads(kv.value))
            if self._key(info.id) != kv.key:
                raise ValueError("stored under another id")
            return info
        except ValueError as exc:  # JSON errors included
            log.warning("security: ignoring the token record at %r: %s", kv.key[-40:], exc)
            return None

    def _key(self, token_id: str) -> bytes:
        return self.key + token_id.encode("ascii")
