"""Security shared by control service replicas on etcd: a join token created on one replica
works on every replica and a revoked one is refused everywhere within a second, one admin token,
one CA (a certificate signed by one replica verifies against another's bundle; a rotation on one
reaches the others' bundles and subscribers), nothing secret in plaintext in etcd, and a restart
of every replica loses nothing. Real replicas over TLS on 127.0.0.1, a real 3-member etcd."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from meshlib.cli import main
from meshlib.control import ControlPlane, ControlSettings, create_app
from meshlib.control.etcd_client import EtcdClient, EtcdOptions, prefix_end
from meshlib.control.server_tls import uvicorn_tls_options
from meshlib.security import certificates as c
from meshlib.testing import RunningServer, serve
from tests.control import admin_token, wait_for
from tests.control.etcd_cluster import EtcdCluster
from tests.control.test_security_api import ORDERS, bearer, chain_verifies, trusting


class Replica:
    """A control service with security on, on an etcd store, over TLS from the shared CA."""

    def __init__(self, data_dir: Path, etcd: EtcdOptions, **options: Any) -> None:
        self.data_dir = data_dir
        self.app = create_app(ControlSettings(data_dir, security=True, ping=0.2, etcd=etcd, **options))
        self.plane: ControlPlane = self.app.state.control
        self.server: RunningServer = serve(self.app, lifespan="on", **uvicorn_tls_options(self.plane))
        self.url = f"https://127.0.0.1:{self.server.port}"
        self.http = self.client()
        self.admin = bearer(admin_token(self.plane))

    def client(self) -> httpx.Client:
        """A client trusting the bundle as it is now."""
        assert self.plane.ca is not None
        return httpx.Client(base_url=self.url, verify=trusting(self.plane.ca.bundle), timeout=10.0)

    def token(self, service: str, ttl: float | None = None) -> str:
        r = self.http.post("/v1/tokens", json={"service": service, "ttl": ttl}, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def sign(self, service: str, token: str, http: httpx.Client | None = None) -> httpx.Response:
        body = {"csr": c.make_csr(c.generate_key(), service).decode(), "service": service}
        return (http or self.http).post("/v1/ca/sign", json=body, headers=bearer(token))

    def ack(self, token: str, client: str = "c-1", service: str = "orders") -> int:
        body = {"client": client, "service": service, "revision": 0, "version": 0, "ok": True}
        return self.http.post("/v1/ack", json=body, headers=bearer(token)).status_code

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds until `predicate` is true (polled, never slept on blindly); fails past `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
def replicas(tmp_path: Path, etcd: EtcdOptions) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def start(name: str, **options: Any) -> Replica:
        started.append(Replica(tmp_path / name, etcd, **options))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def stored(etcd: EtcdOptions) -> dict[bytes, bytes]:
    with EtcdClient(etcd) as client:
        prefix = etcd.prefix.encode()
        return {kv.key[len(prefix) :]: kv.value for kv in client.range(prefix, prefix_end(prefix))}


# --------------------------------------------------------------------------------------------
# Join tokens


def test_a_token_created_on_one_replica_works_on_another_and_revoked_on_it_is_refused_everywhere(
    replicas: Callable[..., Replica],
) -> None:
    a, b, c3 = replicas("a"), replicas("b"), replicas("c")
    token = a.token("orders")
    poll(lambda: b.plane.tokens is not None and b.plane.tokens.check(token, "orders"), 1.0, "token on B")
    r = b.sign("orders", token)
    assert r.status_code == 200, r.text
    assert chain_verifies(r.json()["certificate"], r.json()["bundle"]) == [ORDERS]
    assert b.ack(token) == 204 and b.sign("payments", token).status_code == 403

    (info,) = b.http.get("/v1/tokens", headers=b.admin).json()
    assert b.http.delete(f"/v1/tokens/{info['id']}", headers=b.admin).status_code == 204
    assert b.sign("orders", token).status_code == 401  # at once on the replica that revoked it
    for other in (a, c3):
        assert other.plane.tokens is not None
        took = poll(lambda o=other: not o.plane.tokens.check(token, "orders"), 1.0, "revoked elsewhere")
        assert took < 1.0
        refused = other.sign("orders", token)
        assert refused.status_code == 401 and "unknown or revoked" in refused.json()["error"]
        assert other.http.get("/v1/tokens", headers=other.admin).json() == []
    assert b.http.delete(f"/v1/tokens/{info['id']}", headers=b.admin).status_code == 404


def test_expiry_is_honoured_on_every_replica(replicas: Callable[..., Replica], etcd: EtcdOptions) -> None:
    a, b = replicas("a"), replicas("b")
    token = a.token("orders", ttl=2)
    poll(lambda: b.plane.tokens is not None and len(b.plane.tokens) == 1, 1.0, "token on B")
    assert b.ack(token) == 204
    poll(lambda: b.ack(token) == 401, 4.0, "expired on B")
    assert a.ack(token) == 401
    # etcd drops the record with its lease, and the watch drops it from every replica
    poll(lambda: not any(k.startswith(b"security/tokens/") for k in stored(etcd)), 5.0, "lease ended")
    poll(lambda: b.plane.tokens is not None and len(b.plane.tokens) == 0, 1.0, "deleted on B")


def test_etcd_holds_hashes_never_a_token(replicas: Callable[..., Replica], etcd: EtcdOptions) -> None:
    a = replicas("a")
    tokens = [a.token("orders"), a.token("payments", ttl=600)]
    admin = admin_token(a.plane)
    at_rest = b"\n".join(k + b"=" + v for k, v in stored(etcd).items())
    for secret in (*tokens, admin):
        for part in (secret, secret[4:], secret[4:24], secret[-16:]):
            assert part.encode() not in at_rest
    records = {k: json.loads(v) for k, v in stored(etcd).items() if k.startswith(b"security/tokens/")}
    assert sorted(r["service"] for r in records.values()) == ["orders", "payments"]
    assert all(set(r) == {"id", "service", "created", "expires", "hash"} for r in records.values())
    assert set(json.loads(stored(etcd)[b"security/admin"])) == {"hash"}


# --------------------------------------------------------------------------------------------
# The admin token


def test_the_first_replicas_admin_token_works_on_every_replica(
    replicas: Callable[..., Replica], tmp_path: Path
) -> None:
    a = replicas("a")
    assert a.plane.new_admin_token is not None  # printed once by the CLI
    path = tmp_path / "a" / "admin.token"
    assert path.read_text().strip() == a.plane.new_admin_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = replicas("b")
    assert b.plane.new_admin_token is None and not (tmp_path / "b" / "admin.token").exists()
    token = bearer(a.plane.new_admin_token)
    for r in (a, b):
        assert r.http.get("/v1/tokens", headers=token).status_code == 200
        assert r.http.get("/v1/tokens", headers=bearer("mat_" + "x" * 43)).status_code == 401
    # a data dir holding another token (an old single service's) does not make that one an admin
    old = tmp_path / "c" / "admin.token"
    old.parent.mkdir()
    old.write_text("mat_an-old-token\n")
    old.chmod(0o600)
    c3 = replicas("c")
    assert c3.plane.new_admin_token is None
    assert c3.http.get("/v1/tokens", headers=bearer("mat_an-old-token")).status_code == 401
    assert c3.http.get("/v1/tokens", headers=token).status_code == 200


def test_the_cli_fails_over_to_another_replica_with_the_same_admin_token(
    replicas: Callable[..., Replica], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = replicas("a"), replicas("b")
    a.token("orders")
    where = ["--control", f"{a.url},{b.url}", "--data", str(tmp_path / "a")]  # A's token and bundle
    a.stop()
    code = main(["token", "list", *where])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "orders" in out and "trying the next" in err
    code = main(["token", "create", "--service", "payments", *where])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert b.plane.tokens is not None and b.plane.tokens.check(out.strip(), "payments")


# --------------------------------------------------------------------------------------------
# The CA


def test_one_ca_for_every_replica(replicas: Callable[..., Replica], tmp_path: Path) -> None:
    a, b = replicas("a"), replicas("b")
    assert a.plane.ca is not None and b.plane.ca is not None
    assert a.plane.ca.bundle == b.plane.ca.bundle
    assert b.http.get("/v1/ca/bundle").json()["bundle"] == a.plane.ca.bundle.decode()
    signed = a.sign("orders", a.token("orders")).json()["certificate"]
    assert chain_verifies(signed, b.http.get("/v1/ca/bundle").json()["bundle"]) == [ORDERS]
    # B's own TLS certificate chains to the same root: a client trusting A's bundle reaches B
    with httpx.Client(verify=trusting(a.plane.ca.bundle)) as http:
        assert http.get(f"{b.url}/healthz").status_code == 200
    for name in ("a", "b"):  # the CA key is in etcd, not in a data dir; what is written is private
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / name).iterdir()}
        assert "ca.key" not in files and "ca.crt" not in files
        assert files["control.key"] == files["control.crt"] == 0o600
        assert files.get("admin.token", 0o600) == 0o600


async def test_a_rotation_on_one_replica_reaches_the_others_bundle_and_subscribers(
    replicas: Callable[..., Replica],
) -> None:
    a, b = await asyncio.to_thread(replicas, "a"), await asyncio.to_thread(replicas, "b")
    assert a.plane.ca is not None and b.plane.ca is not None
    token = await asyncio.to_thread(a.token, "orders")
    old = b.plane.ca.bundle
    events: list[tuple[str, dict[str, Any]]] = []

    async def watch_b() -> None:
        async with (
            httpx.AsyncClient(verify=trusting(old), timeout=httpx.Timeout(10.0, read=None)) as http,
            aconnect_sse(
                http,
                "GET",
                f"{b.url}/v1/watch",
                params={"client": "w", "service": "orders"},
                headers=bearer(token),
            ) as source,
        ):
            async for sse in source.aiter_sse():
                events.append((sse.event, json.loads(sse.data)))

    await wait_for(lambda: b.plane.tokens is not None and len(b.plane.tokens) == 1, 2.0, "token on B")
    task = asyncio.create_task(watch_b())
    try:
        await wait_for(lambda: [d for k, d in events if k == "snapshot"], 5.0, "the snapshot")
        r = await asyncio.to_thread(a.http.post, "/v1/ca/rotate", json={"overlap": 600}, headers=a.admin)
        assert r.status_code == 200, r.text
        rotated = r.json()["bundle"].encode()
        assert rotated != old and rotated.endswith(old)  # the new root first, the old one kept
        pushed = await wait_for(lambda: [d for k, d in events if k == "bundle"], 2.0, "B's bundle event")
        assert pushed[0]["bundle"].encode() == rotated == b.plane.ca.bundle
        assert (b.data_dir / "ca-bundle.crt").read_bytes() == rotated
        # B now signs with the new root (and serves a certificate of it: a new client trusts it)
        with b.client() as http:
            signed = (await asyncio.to_thread(b.sign, "orders", token, http)).json()["certificate"]
        new_root = rotated[: len(rotated) - len(old)]
        assert chain_verifies(signed, new_root) == [ORDERS]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_concurrent_rotations_on_two_replicas_all_land(replicas: Callable[..., Replica]) -> None:
    """Three rotations on each of A and B at once: each a compare-and-set, so every replaced
    root stays in the bundle for its overlap (a lost rotation would drop one)."""
    a, b = replicas("a"), replicas("b")
    assert a.plane.shared_ca is not None and b.plane.shared_ca is not None
    first = a.plane.shared_ca.ca.root_pem
    threads = [
        threading.Thread(target=lambda s=r.plane.shared_ca: [s.rotate(600) for _ in range(3)]) for r in (a, b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    poll(lambda: a.plane.ca.bundle == b.plane.ca.bundle, 1.0, "one bundle")  # type: ignore[union-attr]
    roots = [c.cert_pem(r) for r in c.load_pem_chain(b.plane.shared_ca.ca.bundle)]
    assert len(set(roots)) == 7 and roots[0] == a.plane.shared_ca.ca.root_pem and first in roots


def test_an_operator_ca_is_given_to_every_replica_and_kept_out_of_etcd(
    replicas: Callable[..., Replica], tmp_path: Path, etcd: EtcdOptions
) -> None:
    root_pem, root_key = c.create_ca("mesh.local")
    (tmp_path / "root.crt").write_bytes(root_pem)
    (tmp_path / "root.key").write_bytes(root_key)
    files = {"ca_cert": tmp_path / "root.crt", "ca_key": tmp_path / "root.key"}
    a, b = replicas("a", **files), replicas("b", **files)
    token = a.token("orders")
    poll(lambda: b.plane.tokens is not None and len(b.plane.tokens) == 1, 1.0, "token on B")
    assert chain_verifies(b.sign("orders", token).json()["certificate"], root_pem) == [ORDERS]
    assert b"security/ca" not in stored(etcd)
    assert a.http.post("/v1/ca/rotate", headers=a.admin).status_code == 409


def test_a_single_services_ca_moves_onto_etcd(tmp_path: Path, etcd: EtcdOptions) -> None:
    """The first replica offers the CA already in its data dir: identities issued before stay valid."""
    single = ControlPlane(ControlSettings(tmp_path / "a", security=True))
    assert single.ca is not None
    before = single.ca.bundle
    single.close()
    first = ControlPlane(ControlSettings(tmp_path / "a", security=True, etcd=etcd))
    second = ControlPlane(ControlSettings(tmp_path / "b", security=True, etcd=etcd))
    try:
        assert first.ca is not None and second.ca is not None
        assert first.ca.bundle == second.ca.bundle == before
    finally:
        first.close()
        second.close()


def test_a_trust_domain_other_than_the_stored_cas_is_refused(tmp_path: Path, etcd: EtcdOptions) -> None:
    ControlPlane(ControlSettings(tmp_path / "a", security=True, etcd=etcd)).close()
    with pytest.raises(ValueError, match="trust domain"):
        ControlPlane(ControlSettings(tmp_path / "b", security=True, etcd=etcd, trust_domain="other.mesh"))


# --------------------------------------------------------------------------------------------
# Restarts


def test_a_restart_of_every_replica_keeps_tokens_admin_token_and_ca(
    tmp_path: Path, etcd: EtcdOptions
) -> None:
    a, b = Replica(tmp_path / "a", etcd), Replica(tmp_path / "b", etcd)
    try:
        assert a.plane.ca is not None
        token, admin, bundle = a.token("orders"), a.admin, a.plane.ca.bundle
    finally:
        a.stop()
        b.stop()
    # new machines: empty data dirs, the same etcd
    c3 = Replica(tmp_path / "c", etcd)
    try:
        assert c3.plane.ca is not None and c3.plane.ca.bundle == bundle
        assert c3.plane.new_admin_token is None
        assert c3.http.get("/v1/tokens", headers=admin).json()[0]["service"] == "orders"
        r = c3.sign("orders", token)
        assert r.status_code == 200 and chain_verifies(r.json()["certificate"], bundle) == [ORDERS]
    finally:
        c3.stop()


# --------------------------------------------------------------------------------------------
# etcd down, and logs


def test_with_etcd_down_what_is_held_keeps_working_and_changes_fail_cleanly(
    replicas: Callable[..., Replica], etcd_cluster: EtcdCluster
) -> None:
    a = replicas("a")
    token = a.token("orders")
    members = list(etcd_cluster.members)
    for m in members:
        m.kill()
    try:
        assert a.sign("orders", token).status_code == 200  # tokens and the CA are in memory
        assert a.http.get("/v1/tokens", headers=a.admin).status_code == 200
        r = a.http.post("/v1/tokens", json={"service": "orders"}, headers=a.admin)
        assert r.status_code == 503 and "etcd" in r.json()["error"]
        r = a.http.post("/v1/ca/rotate", json={"overlap": 60}, headers=a.admin)
        assert r.status_code == 503
    finally:
        for m in members:
            m.start()
        etcd_cluster.wait_healthy()
    assert a.token("payments").startswith("mjt_")


def test_no_secret_in_any_log_record(
    replicas: Callable[..., Replica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib")
    a, b = replicas("a"), replicas("b")
    token = a.token("orders")
    poll(lambda: b.plane.tokens is not None and len(b.plane.tokens) == 1, 1.0, "token on B")
    assert b.sign("orders", token).status_code == 200
    assert b.plane.ca is not None
    keys = [b.plane.ca.material().key_pem]
    assert b.http.post("/v1/ca/rotate", json={"overlap": 60}, headers=b.admin).status_code == 200
    keys.append(b.plane.ca.material().key_pem)
    (info,) = a.http.get("/v1/tokens", headers=a.admin).json()
    assert a.http.delete(f"/v1/tokens/{info['id']}", headers=a.admin).status_code == 204
    key_lines = [line for k in keys for line in k.decode().splitlines()[1:-1]]
    secrets_ = [token, token[4:], admin_token(a.plane), *key_lines]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "revoked" in text and info["id"] in text  # a token is named by its id
    assert not [s for s in secrets_ if s in text]


async def test_a_security_watch_that_lost_its_place_reads_everything_again(
    tmp_path: Path, etcd: EtcdOptions, caplog: pytest.LogCaptureFixture
) -> None:
    """The revision to watch from is compacted away: the replica reads every security key
    again (a token created and one revoked meanwhile) and watches on from there."""
    from meshlib.control import security_api

    caplog.set_level(logging.INFO, logger="meshlib.control.security")
    a = ControlPlane(ControlSettings(tmp_path / "a", security=True, etcd=etcd))
    planes, task = [a], None
    try:
        assert a.tokens is not None
        old = await asyncio.to_thread(a.tokens.create, "orders", None)
        c3 = ControlPlane(ControlSettings(tmp_path / "c", security=True, etcd=etcd))  # knows `old`
        planes.append(c3)
        assert c3.tokens is not None and c3.tokens.check(old, "orders")
        (info,) = a.tokens.list()
        assert await asyncio.to_thread(a.tokens.revoke, info.id)
        new = await asyncio.to_thread(a.tokens.create, "payments", None)
        with EtcdClient(etcd) as client:
            _, revision = client.range_at(b"/")
            client.call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, write=True)
        task = asyncio.create_task(security_api.run_shared(c3))
        await wait_for(lambda: c3.tokens.check(new, "payments"), 5.0, "the new token")  # type: ignore[union-attr]
        assert not c3.tokens.check(old, "orders")
        newer = await asyncio.to_thread(a.tokens.create, "orders", None)  # watched from there on
        await wait_for(lambda: c3.tokens.check(newer, "orders"), 2.0, "a later token")  # type: ignore[union-attr]
        assert "lost its place" in caplog.text
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for p in planes:
            p.close()


async def test_an_admin_token_replaced_in_etcd_is_taken_by_every_replica(
    tmp_path: Path, etcd: EtcdOptions
) -> None:
    """The documented way to replace the admin token: its SHA-256 put under security/admin."""
    from meshlib.control import security_api
    from meshlib.control.auth import digest

    planes = [ControlPlane(ControlSettings(tmp_path / n, etcd=etcd)) for n in "ab"]
    tasks = [asyncio.create_task(security_api.run_shared(p)) for p in planes]
    try:
        old = planes[0].new_admin_token
        assert old is not None and all(p.auth.check(f"Bearer {old}") for p in planes)
        new = "mat_" + uuid.uuid4().hex
        with EtcdClient(etcd) as client:
            await asyncio.to_thread(
                client.put,
                etcd.prefix.encode() + b"security/admin",
                json.dumps({"hash": digest(new)}).encode(),
            )
        await wait_for(lambda: all(p.auth.check(f"Bearer {new}") for p in planes), 2.0, "the new token")
        assert not any(p.auth.check(f"Bearer {old}") for p in planes)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in planes:
            p.close()


def test_replica_processes_share_the_admin_token_with_security_off(
    tmp_path: Path, etcd_cluster: EtcdCluster
) -> None:
    """`meshlib control --store etcd://...` as processes: the second replica writes no token of
    its own, says where the token is, and takes the first one's."""
    from tests.control import DESTINATION
    from tests.control.process import ControlProcess

    store = f"{etcd_cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"
    first = ControlProcess(tmp_path / "a", "--store", store)
    try:
        second = ControlProcess(tmp_path / "b", "--store", store)
        try:
            assert not (tmp_path / "b" / "admin.token").exists() and second.token == first.token
            assert "the first replica on this store printed" in second.log.read_text()
            headers = bearer(first.token)
            r = httpx.put(f"{second.url}/v1/config", json=[DESTINATION], headers=headers, timeout=10)
            assert r.status_code == 200, r.text
            r = httpx.put(f"{second.url}/v1/config", json=[DESTINATION], headers=bearer("mat_x"), timeout=10)
            assert r.status_code == 401
        finally:
            second.stop()
    finally:
        first.stop()
