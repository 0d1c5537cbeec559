"""A small etcd v3 client over etcd's JSON gateway (`/v3/...` on every member's client URL).

Why the gateway and not a gRPC client: docs/decisions.md, "Control service on etcd". It is
httpx, already a dependency, with TLS and client certificates through an `ssl.SSLContext`, and
etcd's own user/password authentication (a token in the Authorization header, fetched again
when etcd says it expired).

Several members may be named: a request goes to the member that answered last and moves on
to the next one when it cannot connect. What a caller must know about a failure is whether a
write may have been applied, so there are two errors: `EtcdUnavailable` (no member took the
request; nothing was applied) and `EtcdIndeterminate` (a write was sent and its outcome is
unknown: the member died or etcd timed the proposal out; it may still be applied later).

Keys and values are bytes; the gateway wants them base64-encoded and answers int64 fields as
strings, which `KeyValue` turns back into ints.
"""

from __future__ import annotations

import base64
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("meshlib.control.etcd")

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/meshlib/"


class EtcdError(Exception):
    """etcd refused a request (a bad argument, a permission, a request too large)."""


class EtcdUnavailable(EtcdError):
    """No etcd member took the request: nothing was applied."""


class EtcdIndeterminate(EtcdError):
    """A write reached etcd but its outcome is unknown: it may or may not be applied."""


# --------------------------------------------------------------------------------------------
# Where etcd is and how to talk to it


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach an etcd cluster: its members' URLs, TLS, authentication, the key prefix.

    `ca` verifies the members' certificates (None: the system's CAs); `cert`/`key` are the
    client certificate etcd may require (--client-cert-auth); `user`/`password` etcd's own
    authentication. The password is kept out of `repr` so it never reaches a log line."""

    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: at least one endpoint")
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd: a user needs a password and a password a user")
        if (self.cert is None) != (self.key is None):
            raise ValueError("etcd: a client certificate needs its key and a key its certificate")
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"etcd: the key prefix must start and end with '/', got {self.prefix!r}")

    @property
    def tls(self) -> bool:
        return self.endpoints[0].startswith("https://")


def parse_etcd_url(url: str, **options: Any) -> EtcdOptions:
    """`etcd://host:2379[,host:2379...][/prefix]` (`etcds://` for TLS) as EtcdOptions.

    Credentials are refused in the URL: it is printed and logged; they go in `options`
    (`user=`, `password=`, and `ca=`, `cert=`, `key=` for TLS)."""
    parts = urlsplit(url)
    scheme = {"etcd": "http", "etcds": "https"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"etcd: the URL must start with etcd:// or etcds://, got {parts.scheme or url!r}")
    if "@" in parts.netloc:
        raise ValueError(
            "etcd: no credentials in the URL (it ends up in logs); give the user and password separately"
        )
    if parts.query or parts.fragment:
        raise ValueError("etcd: the URL takes no query or fragment")
    endpoints = []
    for member in parts.netloc.split(","):
        host, port = _host_port(member)
        endpoints.append(f"{scheme}://{host}:{port}")
    prefix = parts.path.rstrip("/") + "/" if parts.path not in ("", "/") else DEFAULT_PREFIX
    if (options.get("ca") or options.get("cert")) and scheme == "http":
        raise ValueError("etcd: TLS options need an etcds:// URL")
    return EtcdOptions(endpoints=tuple(endpoints), prefix=prefix, **options)


def _host_port(member: str) -> tuple[str, int]:
    member = member.strip()
    if member.startswith("["):  # [v6]:port
        host, _, rest = member[1:].partition("]")
        host = f"[{host}]"
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"etcd: bad member address {member!r}")
    else:
        host, _, port_text = member.partition(":")
    if not host or host == "[]":
        raise ValueError(f"etcd: a member without a host in {member!r}")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"etcd: bad port in {member!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"etcd: bad port in {member!r}")
    return host, port


def ssl_context(options: EtcdOptions) -> ssl.SSLContext | bool:
    """The TLS context for `options` (True: httpx's default verification, for plain http)."""
    if not options.tls:
        return True
    ctx = ssl.create_default_context(cafile=str(options.ca) if options.ca is not None else None)
    if options.cert is not None and options.key is not None:
        ctx.load_cert_chain(str(options.cert), str(options.key))
    return ctx


# --------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key")),
            value=_unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the cluster's revision after the transaction
    responses: list[dict[str, Any]]

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each range operation in the branch that ran, in order."""
        return [
            [KeyValue.from_json(kv) for kv in r["response_range"].get("kvs", [])]
            for r in self.responses
            if "response_range" in r
        ]


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def range_op(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    op = {"key": _b64(key)}
    if range_end is not None:
        op["range_end"] = _b64(range_end)
    return {"request_range": op}


def compare_mod(key: bytes, revision: int) -> dict[str, Any]:
    """True when `key` was last modified at `revision` (0: the key does not exist)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


class EtcdClient:
    """Blocking etcd v3 requests over the JSON gateway; safe to use from several threads."""

    def __init__(self, options: EtcdOptions, *, transport: httpx.BaseTransport | None = None) -> None:
        self.options = options
        self._http = httpx.Client(
            verify=ssl_context(options),
            timeout=httpx.Timeout(options.timeout, connect=min(options.timeout, 1.0)),
            transport=transport,
        )
        self._lock = threading.Lock()
        self._current = 0  # index of the member that answered last
        self._token: str | None = None

    # -- KV -----------------------------------------------------------------------------------

    def get(self, key: bytes, *, timeout: float | None = None) -> KeyValue | None:
        kvs = self.range(key, timeout=timeout)
        return kvs[0] if kvs else None

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        keys_only: bool = False,
        timeout: float | None = None,
    ) -> list[KeyValue]:
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if keys_only:
            body["keys_only"] = True
        reply = self.call("/v3/kv/range", body, write=False, timeout=timeout)
        return [KeyValue.from_json(kv) for kv in reply.get("kvs", [])]

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write one key; the cluster's revision after it."""
        body = put_op(key, value, lease)["request_put"]
        return int(self.call("/v3/kv/put", body, write=True)["header"]["revision"])

    def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        reply = self.call("/v3/kv/txn", body, write=True, timeout=timeout)
        return TxnResult(
            succeeded=bool(reply.get("succeeded", False)),  # false is left out of the JSON
            revision=int(reply["header"]["revision"]),
            responses=reply.get("responses", []),
        )

    # -- leases -------------------------------------------------------------------------------

    def grant(self, ttl: int, *, timeout: float | None = None) -> tuple[int, int]:
        """A new lease of `ttl` seconds: (its id, the TTL etcd granted, which may be longer)."""
        reply = self.call("/v3/lease/grant", {"TTL": str(ttl)}, write=True, timeout=timeout)
        if reply.get("error"):
            raise EtcdError(f"etcd refused a lease: {reply['error']}")
        return int(reply["ID"]), int(reply["TTL"])

    def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew a lease once; its TTL again, 0 if it has expired (its keys are gone).

        One request per renewal (the gateway's keepalive is a stream; this sends one message
        and reads one answer): renewals are not raft writes in etcd, the leader answers them."""
        reply = self.call("/v3/lease/keepalive", {"ID": str(lease)}, write=False, timeout=timeout)
        result = reply.get("result", reply)
        return int(result.get("TTL", 0))

    def time_to_live(self, lease: int, *, timeout: float | None = None) -> int:
        """A lease's time left in whole seconds, truncated (etcd's LeaseTimeToLive); -1 once it
        has expired or was revoked."""
        reply = self.call("/v3/lease/timetolive", {"ID": str(lease)}, write=False, timeout=timeout)
        return int(reply.get("TTL", -1))

    def revoke(self, lease: int, *, timeout: float | None = None) -> None:
        """End a lease now, deleting its keys; a lease that is already gone is no error."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)}, write=True, timeout=timeout)
        except EtcdError as exc:
            if "requested lease not found" not in str(exc):
                raise

    def status(self) -> dict[str, Any]:
        """The answering member's status (its id, the leader's id, the raft term)."""
        return self.call("/v3/maintenance/status", {}, write=False)

    # -- transport ----------------------------------------------------------------------------

    def call(
        self, path: str, body: dict[str, Any], *, write: bool, timeout: float | None = None
    ) -> dict[str, Any]:
        """One request, on the first member that takes it (`timeout`: seconds for the whole
        call, whichever members it tries, at most the options' timeout; for a caller with a
        deadline: a member that hangs takes the time left, not the options' timeout each).

        A member that cannot be connected to is skipped. Once a write has been sent, a lost
        answer or an etcd timeout is EtcdIndeterminate (not retried here: the caller knows how
        to tell whether it landed); a read is retried on the next member."""
        endpoints = self.options.endpoints
        start = self._current
        last: Exception | None = None
        reauthenticated = False
        limit: httpx.Timeout | None = None
        end: float | None = None
        if timeout is not None:
            end = time.monotonic() + max(0.01, min(timeout, self.options.timeout))
        i = 0
        while i < len(endpoints):
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:  # the caller's time is up: no member took it in time
                    break
                limit = httpx.Timeout(left, connect=min(left, 1.0))
            index = (start + i) % len(endpoints)
            url = endpoints[index] + path
            try:
                headers = self._headers(index, limit)
                if limit is None:
                    reply = self._http.post(url, json=body, headers=headers)
                else:
                    reply = self._http.post(url, json=body, headers=headers, timeout=limit)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last, i = exc, i + 1  # never sent: any request may go elsewhere
                continue
            except httpx.TransportError as exc:
                if write:
                    self._move_on(index)
                    raise EtcdIndeterminate(f"etcd at {endpoints[index]}: {_describe(exc)}") from exc
                last, i = exc, i + 1
                continue
            if reply.status_code == 200:
                self._current = index
                return dict(reply.json())
            error = _error_message(reply)
            if reply.status_code == 401 and self.options.user is not None and not reauthenticated:
                self._token, reauthenticated = None, True  # expired token: once more with a new one
                continue
            if reply.status_code >= 500:  # no leader, leader changed, request timed out, ...
                if write and "no leader" not in error:
                    self._move_on(index)
                    raise EtcdIndeterminate(f"etcd at {endpoints[index]}: {error}")
                last, i = EtcdError(error), i + 1
                continue
            raise EtcdError(f"etcd at {endpoints[index]}: {error}")
        self._move_on(start)
        within = f" within {timeout:g} s" if timeout is not None else ""
        raise EtcdUnavailable(f"no etcd member answered{within} ({', '.join(endpoints)}): {_describe(last)}")

    def _move_on(self, index: int) -> None:
        self._current = (index + 1) % len(self.options.endpoints)

    def _headers(self, index: int, limit: httpx.Timeout | None = None) -> dict[str, str]:
        if self.options.user is None:
            return {}
        with self._lock:
            if self._token is None:
                self._token = self._authenticate(index, limit)
            return {"Authorization": self._token}

    def _authenticate(self, index: int, limit: httpx.Timeout | None = None) -> str:
        url = self.options.endpoints[index] + "/v3/auth/authenticate"
        credentials = {"name": self.options.user, "password": self.options.password}
        if limit is None:
            reply = self._http.post(url, json=credentials)
        else:
            reply = self._http.post(url, json=credentials, timeout=limit)
        if reply.status_code != 200:
            raise EtcdError(f"etcd refused user {self.options.user!r}: {_error_message(reply)}")
        return str(reply.json()["token"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def delete(self, key: bytes, range_end: bytes | None = None) -> tuple[int, int]:
        """Delete a key (or [key, range_end)): (how many were deleted, the revision after it)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        reply = self.call("/v3/kv/deleterange", body, write=True)
        return int(reply.get("deleted", 0)), int(reply["header"]["revision"])

    def range_at(self, key: bytes, range_end: bytes | None = None) -> tuple[list[KeyValue], int]:
        """`range`, with the cluster's revision the answer is from (a watch of later changes
        starts after it)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        reply = self.call("/v3/kv/range", body, write=False)
        return [KeyValue.from_json(kv) for kv in reply.get("kvs", [])], int(reply["header"]["revision"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _error_message(reply: httpx.Response) -> str:
    try:
        data = reply.json()
        return str(data.get("error") or data.get("message") or reply.status_code)
    except ValueError:
        return f"HTTP {reply.status_code}"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def compare_value(key: bytes, value: bytes) -> dict[str, Any]:
    """True when `key` holds `value`."""
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def delete_op(key: bytes) -> dict[str, Any]:
    """A transaction operation deleting one key."""
    return {"request_delete_range": {"key": _b64(key)}}
