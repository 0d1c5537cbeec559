"""Rule versions in etcd: the `Store` protocol for control service replicas sharing one cluster.

Keys, under the prefix (`/meshlib/` by default):

    rules/head                 {"version": N, "commit": id}            the latest version
    rules/versions/<N, 20 digits>  {"version", "created", "message", "commit", "documents": [...]}
    rules/info/<N, 20 digits>      the same without the documents, their count instead

A commit is ONE transaction: if the head's mod revision is still the one read, put version
N+1, its info and the head; otherwise read the new head (the failure branch returns it) and try
again as N+2. So two replicas committing at once both land, one after the other, with
consecutive numbers, and no version is ever written twice. With `base`, a head that moved
past `base` is a StoreConflict instead (the same compare makes it exact).

A commit whose answer is lost (the member died, etcd timed the proposal out) may still have
been applied. Each commit carries a random id; the next attempt uses the same compare, so at
most one attempt can land, and when an attempt fails its compare the store reads the version
it tried to write: if that version carries its id, the earlier attempt landed and that is the
version returned. A commit therefore lands once and returns its version, or raises
`EtcdError` (after `commit_timeout` without an answer: then it may still land, once).

Version numbers are zero-padded so that a key range is a version range: `history` reads the
info keys of the last `limit` versions in one range request, never the documents.

`epoch` (a random value under the prefix, written once by whichever replica opens the prefix
first) names the store in the watch stream's event ids, and a version's etcd revision (the
commit's) is its position: the same on every replica, so a client resumes on any of them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlib.control.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdIndeterminate,
    EtcdOptions,
    EtcdUnavailable,
    KeyValue,
    compare_mod,
    parse_etcd_url,
    put_op,
    range_op,
)
from meshlib.control.store import MAX_VERSION, StoreConflict, VersionInfo
from meshlib.rules import RuleSet, parse_documents

log = logging.getLogger("meshlib.control")

_DIGITS = 20  # MAX_VERSION has 19


@dataclass(frozen=True)
class Head:
    """The latest version as read, with the etcd revision that committed it (its position in
    the store's history) and the revision a watch must start from to miss nothing after it."""

    version: int
    revision: int
    watch_from: int


class EtcdStore:
    """Rule versions in an etcd cluster; safe to use from threads and from several processes.

    `target` is an `etcd://host:2379[,host:2379...][/prefix]` URL (`etcds://` for TLS) or
    EtcdOptions; with a URL, `ca`, `cert`, `key`, `user` and `password` are its TLS and
    authentication options. Opening the store writes version 0 (empty) if the prefix holds
    none: a replica starting against a new cluster finds the same history SQLite starts with.
    """

    def __init__(
        self,
        target: str | EtcdOptions,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        commit_timeout: float = 10.0,
        client: EtcdClient | None = None,
    ) -> None:
        if isinstance(target, str):
            options = parse_etcd_url(target, ca=ca, cert=cert, key=key, user=user, password=password)
        else:
            options = target
        self.options = options
        self.commit_timeout = commit_timeout
        self._client = client if client is not None else EtcdClient(options)
        prefix = options.prefix.encode()
        self._head = prefix + b"rules/head"
        self._versions = prefix + b"rules/versions/"
        self._info = prefix + b"rules/info/"
        self._epoch = prefix + b"epoch"
        self._closed = False
        try:
            self._create_version_0()
            self.epoch = self._create_epoch()
        except BaseException:
            self._client.close()
            raise

    # -- Store --------------------------------------------------------------------------------

    def current(self) -> tuple[int, RuleSet]:
        version = self._head_version(self._client_().get(self._head))
        kv = self._client_().get(self._version_key(version))
        if kv is None:  # pragma: no cover - the head and its version are written together
            raise EtcdError(f"etcd: the head names version {version}, which is missing")
        return version, _rules(_load(kv)["documents"], version)

    def commit(self, rules: RuleSet, message: str, *, base: int | None = None) -> int:
        return self.commit_at(rules, message, base=base)[0]

    def commit_at(self, rules: RuleSet, message: str, *, base: int | None = None) -> tuple[int, int]:
        """`commit`, also returning the etcd revision the version was committed at."""
        documents = rules.to_dicts()
        commit_id = secrets.token_hex(8)
        deadline = time.monotonic() + self.commit_timeout
        tried: list[int] = []  # versions an attempt with no answer may have written
        head: KeyValue | None = None
        backoff = 0.05
        while True:
            try:
                if head is None:
                    head = self._client_().get(self._head)
                if tried and (landed := self._landed(tried, commit_id)) is not None:
                    return landed
                latest = self._head_version(head)
                if base is not None and latest != base:
                    raise StoreConflict(base, latest)
                version = latest + 1
                try:
                    result = self._client_().txn(
                        [compare_mod(self._head, head.mod_revision if head else 0)],
                        self._commit_ops(version, documents, message, commit_id),
                        [range_op(self._head)],
                    )
                except EtcdIndeterminate:
                    tried.append(version)
                    raise
            except (EtcdUnavailable, EtcdIndeterminate) as exc:
                if time.monotonic() + backoff > deadline:
                    raise EtcdError(
                        f"etcd: commit not confirmed within {self.commit_timeout:g} s: {exc}"
                    ) from exc
                log.debug("etcd: commit retried: %s", exc)
                time.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 0.5)
                head = None  # read it again: the cluster may have moved on meanwhile
                continue
            if result.succeeded:
                return version, result.revision
            (found,) = result.ranges()  # another replica committed first: its head
            head = found[0] if found else None

    def head(self) -> Head:
        """The latest version, its commit's revision, and where a watch of later ones starts."""
        reply = self._client_().call("/v3/kv/range", {"key": _b64(self._head)}, write=False)
        kvs = [KeyValue.from_json(kv) for kv in reply.get("kvs", [])]
        head = kvs[0] if kvs else None
        return Head(
            version=self._head_version(head),
            revision=head.mod_revision if head is not None else 0,
            watch_from=int(reply["header"]["revision"]) + 1,
        )

    @property
    def versions_prefix(self) -> bytes:
        """The keys of the versions with their documents: what a replica watches."""
        return self._versions

    def parse_version(self, kv: KeyValue, *, newer_than: int = -1) -> tuple[int, RuleSet] | None:
        """A watched version key's version and rules (RulesError if not valid rules today);
        None, without validating its documents, if it is not newer than `newer_than`."""
        record = _load(kv)
        version = int(record["version"])
        if version <= newer_than:
            return None
        return version, _rules(record["documents"], version)

    def history(self, limit: int = 100) -> list[VersionInfo]:
        limit = max(0, min(int(limit), MAX_VERSION))
        if limit == 0:
            return []
        last = self._head_version(self._client_().get(self._head))
        first = max(0, last - limit + 1)
        kvs = self._client_().range(self._info_key(first), self._info_key(last + 1))
        return [_info(_load(kv)) for kv in reversed(kvs)]

    def get(self, version: int) -> tuple[VersionInfo, RuleSet]:
        if not 0 <= version <= MAX_VERSION:
            raise KeyError(version)
        kv = self._client_().get(self._version_key(version))
        if kv is None:
            raise KeyError(version)
        record = _load(kv)
        documents = record["documents"]
        return _info({**record, "documents": len(documents)}), _rules(documents, version)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdStore({','.join(self.options.endpoints)!r}, prefix={self.options.prefix!r})"

    # -- internals ----------------------------------------------------------------------------

    def _client_(self) -> EtcdClient:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        return self._client

    def _create_version_0(self) -> None:
        """Version 0, the empty set, unless the prefix has a head already (create-if-absent)."""
        ops = self._commit_ops(0, [], "empty", secrets.token_hex(8))
        deadline = _Deadline(self.commit_timeout)
        while True:
            try:
                with deadline.attempt():
                    self._client.txn([compare_mod(self._head, 0)], ops, timeout=deadline.left())
                return
            except (EtcdUnavailable, EtcdIndeterminate) as exc:  # the same txn again is harmless
                if deadline.over(exc, pause=0.1):
                    raise
                time.sleep(0.1)

    def _create_epoch(self) -> str:
        """The store's epoch: created once (create-if-absent), then read by every replica."""
        mine = secrets.token_hex(8).encode()
        deadline = _Deadline(self.commit_timeout)
        while True:
            try:
                with deadline.attempt():
                    result = self._client.txn(
                        [compare_mod(self._epoch, 0)],
                        [put_op(self._epoch, mine)],
                        [range_op(self._epoch)],
                        timeout=deadline.left(),
                    )
                break
            except (EtcdUnavailable, EtcdIndeterminate) as exc:  # create-if-absent again is harmless
                if deadline.over(exc, pause=0.1):
                    raise
                time.sleep(0.1)
        if result.succeeded:
            return mine.decode()
        (found,) = result.ranges()
        return found[0].value.decode("ascii", "replace")

    def _commit_ops(
        self, version: int, documents: list[dict[str, Any]], message: str, commit_id: str
    ) -> list[dict[str, Any]]:
        meta = {"version": version, "created": time.time(), "message": message, "commit": commit_id}
        return [
            put_op(self._version_key(version), _dump({**meta, "documents": documents})),
            put_op(self._info_key(version), _dump({**meta, "documents": len(documents)})),
            put_op(self._head, _dump({"version": version, "commit": commit_id})),
        ]

    def _landed(self, tried: list[int], commit_id: str) -> tuple[int, int] | None:
        """The version (and revision) an earlier, unanswered attempt of this commit wrote, if one did."""
        for version in tried:
            kv = self._client_().get(self._info_key(version))
            if kv is not None and _load(kv).get("commit") == commit_id:
                log.info("etcd: commit of version %d landed although its answer was lost", version)
                return version, kv.mod_revision
        return None

    @staticmethod
    def _head_version(head: KeyValue | None) -> int:
        return int(_load(head)["version"]) if head is not None else 0

    def _version_key(self, version: int) -> bytes:
        return self._versions + f"{version:0{_DIGITS}d}".encode()

    def _info_key(self, version: int) -> bytes:
        return self._info + f"{version:0{_DIGITS}d}".encode()


class _Deadline:
    """Attempts within `seconds`, so that opening a store on a cluster out of reach gives up
    after `commit_timeout` (docs/operations.md), not that plus a round of timeouts: each
    attempt waits at most the time left, and after an attempt no member took (every member
    cost its connect timeout) none starts that would end late if it took as long again."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.last = 0.0  # how long the last attempt took

    def left(self) -> float:
        return max(0.01, self.end - time.monotonic())

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.last = time.monotonic() - start

    def over(self, failure: EtcdError, pause: float = 0.0) -> bool:
        """Time to give up after `failure`? A member that took the request and did not answer
        (EtcdIndeterminate) leaves the next attempt to another member: it gets the time left."""
        expected = self.last if isinstance(failure, EtcdUnavailable) else 0.0
        return time.monotonic() + pause + expected >= self.end


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _load(kv: KeyValue) -> dict[str, Any]:
    data = json.loads(kv.value)
    if not isinstance(data, dict):
        raise EtcdError(f"etcd: {kv.key!r} does not hold a JSON object")
    return data


def _info(record: dict[str, Any]) -> VersionInfo:
    return VersionInfo(
        version=int(record["version"]),
        created=float(record["created"]),
        message=str(record["message"]),
        documents=int(record["documents"]),
    )


def _rules(documents: list[Any], version: int) -> RuleSet:
    return parse_documents(documents, source=f"stored version {version}")
