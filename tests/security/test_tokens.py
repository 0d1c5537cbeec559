"""Join tokens: hashed at rest, bound to one service, expiring, compared in constant time."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from meshlib.security import tokens as tokens_module
from meshlib.security.tokens import TokenCheck, TokenStore


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_token_is_shown_once_and_stored_as_a_hash(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.create("orders", ttl=3600)
    assert token.startswith("mjt_") and len(token) > 40
    path = tmp_path / "tokens.json"
    text = path.read_text()
    assert token not in text and token[4:] not in text and token[4:20] not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    (record,) = json.loads(text)["tokens"]
    assert record["service"] == "orders" and len(record["hash"]) == 64
    assert record["expires"] == pytest.approx(record["created"] + 3600)
    # a new store on the same data dir knows it
    assert TokenStore(tmp_path).check(token, "orders") is TokenCheck.OK


def test_a_token_is_bound_to_its_service(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
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


def test_tokens_expire(tmp_path: Path) -> None:
    clock = Clock()
    store = TokenStore(tmp_path, clock=clock)
    token = store.create("orders", ttl=60)
    forever = store.create("orders", ttl=None)
    clock.now += 59
    assert store.check(token, "orders")
    clock.now += 2
    assert store.check(token, "orders") is TokenCheck.EXPIRED
    assert store.check(forever, "orders")
    assert [t.expires for t in store.list()] == [None]  # expired ones are not listed
    store.create("payments", 10)  # and are dropped from the file on the next change
    assert len(json.loads((tmp_path / "tokens.json").read_text())["tokens"]) == 2
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            store.create("orders", bad)


def test_revoke_and_list_show_no_secret(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.create("orders", None)
    (info,) = store.list()
    assert TokenStore.valid_id(info.id)
    public = info.public()
    assert set(public) == {"id", "service", "created", "expires"}
    assert token not in json.dumps(public)
    assert store.revoke(info.id)
    assert store.check(token, "orders") is TokenCheck.UNKNOWN
    assert not store.revoke(info.id)
    assert TokenStore(tmp_path).list() == []


def test_the_comparison_is_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TokenStore(tmp_path)
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


def test_a_corrupt_file_is_refused_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text('{"tokens": [{"id": "x"}]}')
    with pytest.raises(ValueError, match="not a valid tokens file"):
        TokenStore(tmp_path)
    (tmp_path / "tokens.json").write_text("nope")
    with pytest.raises(ValueError, match="not a valid tokens file"):
        TokenStore(tmp_path)
