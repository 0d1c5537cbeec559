"""JWKS from a URL, served by a real uvicorn server on 127.0.0.1: fetched off the request path,
rotated keys picked up on an unknown key id (at most once per interval), the last good keys
kept through an outage with one WARNING, and the fetching thread gone with its rules."""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.rules import parse_documents
from meshlib.security import jwks as jwks_module
from meshlib.security.authentication import Authenticator, Failure, Verified, Wait
from meshlib.security.jwks import REFETCH_INTERVAL, REFRESH_MAX, REFRESH_MIN, JwksSource, refresh_after
from meshlib.telemetry.tracing import WSGI_HEADERS
from tests.clock import Clock
from tests.conftest import wait_until
from tests.security.issuer import jwks_server, request_authentication, rsa_key, server_tls, token

K1, K2 = rsa_key("k1"), rsa_key("k2")


def started(url: str, clock: Any = None) -> JwksSource:
    source = JwksSource(url, clock=clock) if clock is not None else JwksSource(url)
    source.start()
    assert source.wait(0, 5.0), "the first fetch did not finish"
    return source


def authenticator_on(source: JwksSource) -> Authenticator:
    """A compiled document on this test's source (its clock), made the process's for its URL."""
    jwks_module._sources[source.uri] = source
    doc = parse_documents([request_authentication(jwks_uri=source.uri)]).documents[0]
    auth = Authenticator(doc)  # type: ignore[arg-type]
    assert next(iter(auth.issuers.values())).source is source
    return auth


def check(auth: Authenticator, tok: str, may_wait: bool = True) -> Any:
    return auth.authenticate(WSGI_HEADERS, {"HTTP_AUTHORIZATION": f"Bearer {tok}"}, may_wait)


def settled(auth: Authenticator, tok: str) -> Any:
    """What a shell does: wait for the fetch a `Wait` names, then ask again without waiting."""
    outcome = check(auth, tok)
    if isinstance(outcome, Wait):
        assert outcome.source.wait(outcome.generation, 5.0)
        outcome = check(auth, tok, may_wait=False)
    return outcome


def test_max_age_sets_the_refresh_within_bounds() -> None:
    assert refresh_after(None) == jwks_module.REFRESH_DEFAULT
    assert refresh_after("public, max-age=600") == 600
    assert refresh_after("max-age=1") == REFRESH_MIN
    assert refresh_after("max-age=99999999") == REFRESH_MAX
    assert refresh_after("no-store") == jwks_module.REFRESH_DEFAULT


def test_the_keys_are_fetched_and_a_rotation_is_picked_up_on_its_new_key_id() -> None:
    with jwks_server(K1, cache_control="max-age=3600") as server:
        source = started(server.url)
        auth = authenticator_on(source)
        assert server.fetches == 1 and source.keys is not None
        assert isinstance(settled(auth, token(K1)), Verified)
        assert server.fetches == 1  # a known key id: no fetch
        server.keys = [K2]  # the issuer rotates: k1 out, k2 in
        outcome = check(auth, token(K2))
        assert isinstance(outcome, Wait)  # an unknown key id asks for a fetch and waits for it
        assert outcome.source.wait(outcome.generation, 5.0)
        assert isinstance(check(auth, token(K2), may_wait=False), Verified)
        assert server.fetches == 2
        assert settled(auth, token(K1)) == Failure("token key id is unknown")  # removed: refused


def test_unknown_key_ids_ask_for_a_fetch_at_most_once_per_interval() -> None:
    clock = Clock()
    with jwks_server(K1) as server:
        source = started(server.url, clock)
        auth = authenticator_on(source)
        first = settled(auth, token(K1, kid="random-0"))
        assert first == Failure("token key id is unknown")
        assert server.fetches == 2  # the unknown kid was worth one fetch
        for i in range(1, 50):  # an attacker's made-up key ids: refused at once, no fetch
            assert check(auth, token(K1, kid=f"random-{i}")) == Failure("token key id is unknown")
        assert server.fetches == 2
        clock.advance(REFETCH_INTERVAL + 1)
        assert isinstance(check(auth, token(K1, kid="random-x")), Wait)
        server.wait_fetches(3)


def test_an_outage_keeps_the_last_good_keys_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with jwks_server(K1) as server:
        source = started(server.url, clock)
        auth = authenticator_on(source)
        server.down = True
        caplog.set_level(logging.INFO, logger="meshlib.security.jwks")
        for _ in range(3):  # the refresh fails, and so do its retries
            source.fetch_now()
        assert source.error == "OSError: HTTP 503"
        assert isinstance(settled(auth, token(K1)), Verified)  # the last good keys still verify
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "keeping the last good keys" in warnings[0].getMessage()
        assert source.due_in() <= 4.0  # retried soon, not after the full refresh interval
        server.down = False
        server.keys = [K2]
        source.fetch_now()
        assert source.error is None
        assert isinstance(settled(auth, token(K2)), Verified)
        assert any("fetched again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_keys_over_https_are_fetched_from_an_issuer_the_process_trusts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ca, cert, key = server_tls(tmp_path)
    with jwks_server(K1, tls=(cert, key)) as server:
        assert server.url.startswith("https://")
        caplog.set_level(logging.WARNING, logger="meshlib.security.jwks")
        untrusted = started(server.url)  # its CA is in no bundle: the fetch fails, tokens are refused
        assert untrusted.keys is None and "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
        assert settled(authenticator_on(untrusted), token(K1)) == Failure(
            "keys of the token issuer are unavailable"
        )
        assert any("jwks" in r.getMessage().lower() for r in caplog.records)
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # as docs/security.md says: the issuer's CA
        trusted = started(server.url)
        assert isinstance(settled(authenticator_on(trusted), token(K1)), Verified)


def test_an_issuer_down_from_the_start_means_tokens_are_refused_not_waited_on_forever() -> None:
    with jwks_server(K1) as server:
        server.down = True
        source = started(server.url)
        auth = authenticator_on(source)
        assert source.keys is None
        assert settled(auth, token(K1)) == Failure("keys of the token issuer are unavailable")


def test_a_request_before_the_first_fetch_waits_for_it() -> None:
    gate = threading.Event()

    def slow_fetch(uri: str) -> tuple[bytes, str | None]:
        gate.wait(5.0)
        return jwks_module.http_get(uri)

    with jwks_server(K1) as server:
        source = JwksSource(server.url, fetch=slow_fetch)
        source.start()
        auth = authenticator_on(source)
        outcome = check(auth, token(K1))
        assert outcome == Wait(source, 0)
        gate.set()
        assert source.wait(0, 5.0)
        assert isinstance(check(auth, token(K1), may_wait=False), Verified)


def test_the_fetching_thread_ends_once_no_rules_use_the_url() -> None:
    with jwks_server(K1) as served:
        source = started(served.url)
        name = f"meshlib-jwks {served.url[:60]}"
        assert any(t.name == name for t in threading.enumerate())
        del source
        gc.collect()
        wait_until(lambda: not any(t.name == name for t in threading.enumerate()), 5.0, "the thread to end")


def test_rules_fetch_their_url_when_applied_and_stop_when_it_is_gone() -> None:
    with jwks_server(K1) as served, meshlib.Mesh("orders") as mesh:
        name = f"meshlib-jwks {served.url[:60]}"
        mesh.apply_rules(parse_documents([request_authentication(jwks_uri=served.url)]), "1")
        served.wait_fetches(1)  # at apply time, with no request yet
        assert any(t.name == name for t in threading.enumerate())
        mesh.apply_rules(parse_documents([]), "2")
        gc.collect()
        wait_until(lambda: not any(t.name == name for t in threading.enumerate()), 5.0, "the thread to end")
