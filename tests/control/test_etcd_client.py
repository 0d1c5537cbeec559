"""The etcd client over the v3 JSON gateway: URLs, members that are down, TLS with a client
certificate, etcd's user/password authentication. Against real etcd members."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlib.control.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdOptions,
    EtcdUnavailable,
    compare_mod,
    parse_etcd_url,
    prefix_end,
    put_op,
    range_op,
)
from meshlib.security import certificates as certs
from meshlib.security.ca import CertificateAuthority
from tests.control.etcd_cluster import AVAILABLE, EtcdCluster, EtcdTls, free_port

etcd_only = pytest.mark.skipif(not AVAILABLE, reason="etcd is not installed (apt-get install etcd-server)")


# -- URLs ----------------------------------------------------------------------------------------


def test_url_with_several_members_and_a_prefix() -> None:
    o = parse_etcd_url("etcd://10.0.0.1:2379,10.0.0.2,[::1]:32379/mesh/prod")
    assert o.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://[::1]:32379")
    assert o.prefix == "/mesh/prod/" and not o.tls
    assert parse_etcd_url("etcd://h").prefix == "/meshlib/"
    assert parse_etcd_url("etcd://h/").prefix == "/meshlib/"


def test_tls_url_and_options() -> None:
    o = parse_etcd_url("etcds://h:2379", ca="ca.pem", cert="c.pem", key="k.pem", user="u", password="secret")
    assert o.endpoints == ("https://h:2379",) and o.tls
    assert "secret" not in repr(o)


@pytest.mark.parametrize(
    ("url", "options", "reason"),
    [
        ("http://h:2379", {}, "etcd:// or etcds://"),
        ("etcd://user:pw@h:2379", {}, "no credentials in the URL"),
        ("etcd://h:99999", {}, "bad port"),
        ("etcd://h:x", {}, "bad port"),
        ("etcd://h,:2379", {}, "without a host"),
        ("etcd://h?x=1", {}, "no query"),
        ("etcd://h", {"ca": "ca.pem"}, "need an etcds:// URL"),
        ("etcd://h", {"user": "u"}, "needs a password"),
        ("etcds://h", {"cert": "c.pem"}, "needs its key"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, options: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_etcd_url(url, **options)


def test_prefix_end_selects_exactly_the_prefix() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


# -- real members --------------------------------------------------------------------------------


@etcd_only
def test_a_member_that_is_down_is_skipped(etcd_cluster: EtcdCluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with EtcdClient(EtcdOptions(endpoints=(dead, *etcd_cluster.urls), timeout=2.0)) as c:
        c.put(b"/client/a", b"1")
        assert c.get(b"/client/a") is not None
        assert c.get(b"/client/a").value == b"1"  # type: ignore[union-attr]
    with EtcdClient(EtcdOptions(endpoints=(dead,), timeout=1.0)) as c, pytest.raises(EtcdUnavailable):
        c.get(b"/client/a")


@etcd_only
def test_txn_compare_and_failure_branch(etcd_cluster: EtcdCluster) -> None:
    with EtcdClient(EtcdOptions(endpoints=tuple(etcd_cluster.urls))) as c:
        first = c.txn([compare_mod(b"/client/h", 0)], [put_op(b"/client/h", b"1")], [range_op(b"/client/h")])
        assert first.succeeded and first.ranges() == []
        again = c.txn([compare_mod(b"/client/h", 0)], [put_op(b"/client/h", b"2")], [range_op(b"/client/h")])
        assert not again.succeeded
        ((kv,),) = again.ranges()
        assert kv.value == b"1" and kv.mod_revision == first.revision
        keys = [kv.key for kv in c.range(b"/client/", prefix_end(b"/client/"))]
        assert b"/client/h" in keys and all(k.startswith(b"/client/") for k in keys)
        with pytest.raises(EtcdError, match="key is not provided"):
            c.put(b"", b"x")


@etcd_only
def test_leases_keep_keys_while_renewed(etcd_cluster: EtcdCluster) -> None:
    """What the registry's instance TTLs will stand on: a key under a lease lives while the
    lease is renewed, goes when it is not, and at once when it is revoked."""
    with EtcdClient(EtcdOptions(endpoints=tuple(etcd_cluster.urls))) as c:
        lease, ttl = c.grant(1)
        assert ttl >= 1
        c.put(b"/lease/a", b"1", lease=lease)
        assert c.get(b"/lease/a").lease == lease  # type: ignore[union-attr]
        renewed_until = time.monotonic() + 1.5 * ttl  # past the TTL: only the renewals keep it
        while time.monotonic() < renewed_until:
            assert c.keepalive(lease) >= 1
            assert c.get(b"/lease/a") is not None
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while c.get(b"/lease/a") is not None:  # not renewed: gone within a TTL and etcd's sweep
            assert time.monotonic() < deadline, "the lease did not expire"
            time.sleep(0.05)
        assert c.keepalive(lease) == 0  # expired
        with pytest.raises(EtcdError, match="requested lease not found"):
            c.put(b"/lease/b", b"1", lease=lease)
        lease, _ = c.grant(60)
        c.put(b"/lease/c", b"1", lease=lease)
        c.revoke(lease)
        assert c.get(b"/lease/c") is None
        c.revoke(lease)  # already gone: no error


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[EtcdCluster, EtcdTls]]:
    if not AVAILABLE:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server_credentials()
    key = certs.generate_key()
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    client_cert.write_bytes(ca.sign(certs.make_csr(key, "control"), "control"))
    client_key.write_bytes(certs.key_pem(key))
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    tls = EtcdTls(root, server.cert_file, server.key_file, client_cert, client_key)
    with EtcdCluster(tmp_path / "etcd", 1, tls=tls) as cluster:
        yield cluster, tls


def test_tls_with_a_client_certificate(tls_cluster: tuple[EtcdCluster, EtcdTls]) -> None:
    cluster, tls = tls_cluster
    url = cluster.endpoints
    assert url.startswith("etcds://")
    with EtcdClient(parse_etcd_url(url, ca=tls.ca, cert=tls.client_cert, key=tls.client_key)) as c:
        c.put(b"/tls/a", b"1")
        assert c.get(b"/tls/a").value == b"1"  # type: ignore[union-attr]
    # without a client certificate etcd closes the handshake: no member took the request
    with EtcdClient(parse_etcd_url(url, ca=tls.ca)) as c, pytest.raises(EtcdUnavailable):
        c.get(b"/tls/a")
    # a server whose certificate no configured CA signed is not trusted (the system CAs are not ours)
    with EtcdClient(parse_etcd_url(url)) as c, pytest.raises(EtcdUnavailable):
        c.get(b"/tls/a")


@pytest.fixture
def auth_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    if not AVAILABLE:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    with EtcdCluster(tmp_path / "etcd", 1) as cluster:
        cluster.call("/v3/auth/user/add", {"name": "root", "password": "root-pw"})
        cluster.call("/v3/auth/role/add", {"name": "root"})
        cluster.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        cluster.call("/v3/auth/user/add", {"name": "mesh", "password": "mesh-pw"})
        cluster.call("/v3/auth/role/add", {"name": "mesh"})
        key, end = b"/meshlib/", prefix_end(b"/meshlib/")
        grant = {"key": _b64(key), "range_end": _b64(end), "permType": "READWRITE"}
        cluster.call("/v3/auth/role/grant", {"name": "mesh", "perm": grant})
        cluster.call("/v3/auth/user/grant", {"user": "mesh", "role": "mesh"})
        cluster.call("/v3/auth/enable", {})
        yield cluster


def test_user_and_password(auth_cluster: EtcdCluster) -> None:
    url = auth_cluster.endpoints
    with EtcdClient(parse_etcd_url(url, user="mesh", password="mesh-pw")) as c:
        c.put(b"/meshlib/a", b"1")
        assert c.get(b"/meshlib/a").value == b"1"  # type: ignore[union-attr]
        with pytest.raises(EtcdError, match="permission denied"):
            c.put(b"/elsewhere", b"1")  # the role's range only
        c._token = "expired"  # as etcd's token TTL would leave it: the client logs in again
        assert c.get(b"/meshlib/a").value == b"1"  # type: ignore[union-attr]
    with (
        EtcdClient(parse_etcd_url(url, user="mesh", password="wrong")) as c,
        pytest.raises(EtcdError, match="refused user 'mesh'"),
    ):
        c.get(b"/meshlib/a")
    with EtcdClient(parse_etcd_url(url)) as c, pytest.raises(EtcdError, match="user name is empty"):
        c.get(b"/meshlib/a")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
