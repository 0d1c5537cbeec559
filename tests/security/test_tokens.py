"""Join tokens: hashed at rest, bound to one service, expiring, compared in constant time.

One suite for both `TokenStore` implementations: `FileTokenStore` (the data dir) and
`EtcdTokenStore` (a real 3-member etcd cluster, each test under a prefix of its own).
`open_tokens()` opens the same tokens again: a restart of one service, or another replica.
The tests of the file itself (its mode, a corrupt one) are at the end.
"""

from __future__ import annotations

import json
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshlib.security import tokens as tokens_module
from meshlib.security.tokens import FileTokenStore, TokenCheck, TokenStore, valid_id
from tests.control.conftest import etcd_cluster  # noqa: F401  (the fixture, for the etcd runs)

OpenTokens = Callable[..., TokenStore]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["file", "etcd"])
def open_tokens(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenTokens]:
    """Opens the tokens of one data dir / one etcd prefix; `stored()` reads what is at rest."""
    closers: list[Callable[[], None]] = []
    if request.param == "file":

        def open_one(**kw: object) -> TokenStore:
            return FileTokenStore(tmp_path, **kw)  # type: ignore[arg-type]

        def stored() -> list[bytes]:
            path = tmp_path / "tokens.json"
            return [path.read_bytes()] if path.exists() else []

    else:
        from meshlib.control.etcd_client import EtcdClient, parse_etcd_url, prefix_end
        from meshlib.control.etcd_security import SharedSecurity
        from meshlib.control.etcd_tokens import EtcdTokenStore

        cluster = request.getfixturevalue("etcd_cluster")
        options = parse_etcd_url(f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}")

        def open_one(**kw: object) -> TokenStore:
            shared = SharedSecurity(options)
            closers.append(shared.close)
            return EtcdTokenStore(shared, **kw)  # type: ignore[arg-type]

        def stored() -> list[bytes]:
            with EtcdClient(options) as client:
                prefix = options.prefix.encode()
                return [kv.key + b"=" + kv.value for kv in client.range(prefix, prefix_end(prefix))]

    open_one.stored = stored  # type: ignore[attr-defined]
    yield open_one
    for close in closers:
        close()


def test_both_are_token_stores(open_tokens: OpenTokens) -> None:
    assert isinstance(open_tokens(), TokenStore)


def test_a_token_is_shown_once_and_stored_as_a_hash(open_tokens: OpenTokens) -> None:
    store = open_tokens()
    token = store.create("orders", ttl=3600)
    assert token.startswith("mjt_") and len(token) > 40
    at_rest = b"".join(open_tokens.stored())  # type: ignore[attr-defined]
    assert at_rest and b"orders" in at_rest
    for part in (token, token[4:], token[4:20], token[-16:]):
        assert part.encode() not in at_rest
    (info,) = store.list()
    assert info.service == "orders" and len(info.hash) == 64 and info.hash.encode() in at_rest
    assert info.expires == pytest.approx(info.created + 3600)
    # opened again (a restart, another replica), the store knows it
    assert open_tokens().check(token, "orders") is TokenCheck.OK


def test_a_token_is_bound_to_its_service(open_tokens: OpenTokens) -> None:
    store = open_tokens()
    orders = store.create("orders", None)
    payments = store.create("payments", None)
    assert store.check(orders, "orders") and store.check(payments, "payments")
    assert store.check(orders, "payments") is TokenCheck.WRONG_SERVICE
    assert not store.check(orders, "payments")  # only OK is true
    assert store.check(payments, "orders") is TokenCheck.WRONG_SERVICE
    for wrong in ("", None, "mjt_", orders + "x", orders[:-1], "x" * 100_000, "\ud800"):
        assert store.check(wrong, "orders") is TokenCheck.UNKNOWN  # type: ignore[arg-type]
    info, result = store.identify(orders)
    assert result is TokenCheck.OK and info is not None and info.service == "orders"


def test_tokens_expire(open_tokens: OpenTokens) -> None:
    clock = Clock()
    store = open_tokens(clock=clock)
    token = store.create("orders", ttl=60)
    forever = store.create("orders", ttl=None)
    clock.now += 59
    assert store.check(token, "orders")
    clock.now += 2
    assert store.check(token, "orders") is TokenCheck.EXPIRED
    assert store.check(forever, "orders")
    assert [t.expires for t in store.list()] == [None]  # expired ones are not listed
    assert open_tokens(clock=clock).check(token, "orders") is TokenCheck.EXPIRED  # opened again too
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            store.create("orders", bad)


def test_revoke_and_list_show_no_secret(open_tokens: OpenTokens) -> None:
    store = open_tokens()
    token = store.create("orders", None)
    (info,) = store.list()
    assert valid_id(info.id)
    public = info.public()
    assert set(public) == {"id", "service", "created", "expires"}
    assert token not in json.dumps(public)
    assert store.revoke(info.id)
    assert store.check(token, "orders") is TokenCheck.UNKNOWN
    assert not store.revoke(info.id)
    assert not store.revoke("0" * 16) and not store.revoke("not an id")
    assert open_tokens().list() == []
    assert all(info.hash.encode() not in r for r in open_tokens.stored())  # type: ignore[attr-defined]


def test_a_token_revoked_by_another_opening_is_gone_when_opened_again(open_tokens: OpenTokens) -> None:
    first = open_tokens()
    token = first.create("orders", None)
    second = open_tokens()
    (info,) = second.list()
    assert second.revoke(info.id)
    assert open_tokens().check(token, "orders") is TokenCheck.UNKNOWN


def test_the_comparison_is_constant_time(open_tokens: OpenTokens, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_tokens()
    token = store.create("orders", None)
    calls: list[tuple[bytes, bytes]] = []
    real = tokens_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", spy)
    assert store.check(token, "orders")
    assert any(len(a) == len(b) == 64 for a, b in calls)  # the full SHA-256 hex digests
    assert all(token.encode() not in (a, b) for a, b in calls)  # hashes, not the secret


# -- the file --------------------------------------------------------------------------------


def test_the_file_is_private_and_drops_expired_tokens(tmp_path: Path) -> None:
    clock = Clock()
    store = FileTokenStore(tmp_path, clock=clock)
    store.create("orders", ttl=60)
    store.create("orders", ttl=None)
    path = tmp_path / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    clock.now += 61
    store.create("payments", 10)  # expired ones are dropped from the file on the next change
    assert len(json.loads(path.read_text())["tokens"]) == 2


def test_a_corrupt_file_is_refused_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text('{"tokens": [{"id": "x"}]}')
    with pytest.raises(ValueError, match="not a valid tokens file"):
        FileTokenStore(tmp_path)
    (tmp_path / "tokens.json").write_text("nope")
    with pytest.raises(ValueError, match="not a valid tokens file"):
        FileTokenStore(tmp_path)
