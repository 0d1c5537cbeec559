"""Join tokens: the secret a new process shows the control service to get its first certificate.

A token is bound to one service: the CA signs a CSR for `orders` only with a token created for
`orders`. The secret is shown once, when it is created; at rest (`tokens.json` in the data dir,
mode 0600, replaced atomically) only its SHA-256 is kept, so reading the file does not let
anyone join. A token has 256 random bits, so a plain hash is enough (no slow KDF needed).

The token's id is the first 16 hex digits of its hash: it names the token in `list` and
`revoke` without revealing it, and finds its record in one lookup; the full hash is then
compared with `hmac.compare_digest`. Nothing here logs a token.

`TokenStore` is the interface; `FileTokenStore` keeps the tokens in the data dir (one control
service), meshlib.control.etcd_tokens.EtcdTokenStore in etcd (replicas sharing them). Both
check tokens against an in-memory copy (`TokenLookup`): a check never waits on a disk or etcd.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from meshlib.security.files import write_private

log = logging.getLogger("meshlib.security")

TOKENS_FILE = "tokens.json"
PREFIX = "mjt_"
ID_LENGTH = 16
MAX_TOKENS = 10_000
MAX_TOKEN_LENGTH = 200  # longer strings are not tokens: refused before hashing
_ID_RE = re.compile(r"^[0-9a-f]{16}$")


class TokenCheck(enum.Enum):
    """The outcome of a token check; only `OK` is true in a boolean context."""

    OK = "ok"
    UNKNOWN = "unknown or revoked token"
    EXPIRED = "the token has expired"
    WRONG_SERVICE = "the token was issued for another service"

    def __bool__(self) -> bool:
        return self is TokenCheck.OK

    @property
    def reason(self) -> str:
        return self.value


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: str
    service: str
    created: float
    expires: float | None  # unix seconds; None: until revoked
    hash: str  # hex SHA-256 of the token

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def public(self) -> dict[str, Any]:
        """The JSON shape of `GET /v1/tokens`: no secret, no hash."""
        return {"id": self.id, "service": self.service, "created": self.created, "expires": self.expires}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def valid_id(text: str) -> bool:
    """Whether `text` can be a token id (16 lowercase hex digits)."""
    return bool(_ID_RE.match(text))


def new_token(service: str, ttl: float | None, now: float) -> tuple[str, TokenInfo]:
    """A new secret for `service` and its record (which holds only the secret's hash)."""
    if not service or not isinstance(service, str):
        raise ValueError("a token needs a service")
    if ttl is not None and (not math.isfinite(ttl) or ttl <= 0):
        raise ValueError("ttl must be a positive number of seconds (or None)")
    token = PREFIX + secrets.token_urlsafe(32)
    digest = _digest(token)
    info = TokenInfo(
        id=digest[:ID_LENGTH],
        service=service,
        created=round(now, 3),
        expires=None if ttl is None else round(now + ttl, 3),
        hash=digest,
    )
    return token, info


def parse_record(item: Any) -> TokenInfo:
    """A stored record (a dict, as `asdict(TokenInfo)` wrote it); ValueError if it is not one."""
    try:
        info = TokenInfo(
            id=str(item["id"]),
            service=str(item["service"]),
            created=float(item["created"]),
            expires=None if item.get("expires") is None else float(item["expires"]),
            hash=str(item["hash"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a token record: {exc!r}") from None
    if not valid_id(info.id) or info.id != info.hash[:ID_LENGTH] or len(info.hash) != 64:
        raise ValueError(f"token record {info.id[:20]!r} is inconsistent")
    return info


@runtime_checkable
class TokenStore(Protocol):
    """Join tokens, wherever they are kept. `create` and `revoke` may block (run them off the
    event loop); `check`, `identify` and `list` read memory only."""

    def create(self, service: str, ttl: float | None = None) -> str:
        """A new token for `service`, valid `ttl` seconds (None: until revoked). The returned
        secret is not kept anywhere: show it to the operator once."""
        ...

    def check(self, token: str | None, service: str) -> TokenCheck:
        """Whether `token` lets its bearer act as `service` (truthy only for `TokenCheck.OK`)."""
        ...

    def identify(self, token: str | None) -> tuple[TokenInfo | None, TokenCheck]:
        """The record of a valid token (and OK), or None and the reason it is not valid."""
        ...

    def revoke(self, token_id: str) -> bool:
        """Forget a token by id; False if there is no such token."""
        ...

    def list(self) -> list[TokenInfo]:
        """Every token not yet expired, oldest first."""
        ...

    def __len__(self) -> int: ...


class TokenLookup:
    """The checks both stores share, over `_tokens` (id -> record), replaced whole on a change
    so that readers on other threads always see a consistent dict."""

    _tokens: dict[str, TokenInfo]
    _clock: Callable[[], float]

    def check(self, token: str | None, service: str) -> TokenCheck:
        info, result = self._find(token)
        if info is None:
            return result
        if not hmac.compare_digest(info.service.encode(), service.encode("utf-8", "surrogatepass")):
            return TokenCheck.WRONG_SERVICE
        return TokenCheck.OK

    def identify(self, token: str | None) -> tuple[TokenInfo | None, TokenCheck]:
        return self._find(token)

    def list(self) -> list[TokenInfo]:
        now = self._clock()
        return sorted((t for t in self._tokens.values() if not t.expired(now)), key=lambda t: t.created)

    def __len__(self) -> int:
        return len(self._tokens)

    def _find(self, token: str | None) -> tuple[TokenInfo | None, TokenCheck]:
        if not token or not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return None, TokenCheck.UNKNOWN
        digest = _digest(token)
        info = self._tokens.get(digest[:ID_LENGTH])
        # compared in full in constant time: the id lookup only narrows it down to one record
        if info is None or not hmac.compare_digest(info.hash.encode(), digest.encode()):
            return None, TokenCheck.UNKNOWN
        if info.expired(self._clock()):
            return None, TokenCheck.EXPIRED
        return info, TokenCheck.OK

    def _live(self, now: float) -> dict[str, TokenInfo]:
        """The tokens without the expired ones."""
        return {k: v for k, v in self._tokens.items() if not v.expired(now)}


class FileTokenStore(TokenLookup):
    """The join tokens of a data dir. Thread-safe; every change is written before it returns."""

    def __init__(self, data_dir: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(data_dir) / TOKENS_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = {}
        self._load()

    def create(self, service: str, ttl: float | None = None) -> str:
        now = self._clock()
        token, info = new_token(service, ttl, now)
        with self._lock:
            live = self._live(now)
            if len(live) >= MAX_TOKENS:
                raise ValueError(f"too many tokens ({MAX_TOKENS}): revoke some first")
            tokens = {**live, info.id: info}
            self._save(tokens)
            self._tokens = tokens
        log.info("join token %s created for service %s", info.id, service)
        return token

    def revoke(self, token_id: str) -> bool:
        with self._lock:
            if token_id not in self._tokens:
                return False
            tokens = {k: v for k, v in self._tokens.items() if k != token_id}
            self._save(tokens)
            self._tokens = tokens
        log.info("join token %s revoked", token_id)
        return True

    def _load(self) -> None:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        try:
            items = json.loads(raw)["tokens"]
            tokens = {}
            for item in items:
                info = parse_record(item)
                tokens[info.id] = info
        except (ValueError, KeyError, TypeError) as exc:
            # refuse to start rather than silently dropping every token (or accepting junk)
            raise ValueError(f"{self.path} is not a valid tokens file: {exc}") from None
        self._tokens = tokens

    def _save(self, tokens: dict[str, TokenInfo]) -> None:
        data = json.dumps({"tokens": [asdict(t) for t in tokens.values()]}, indent=1)
        write_private(self.path, data.encode("utf-8"))
