"""The control service as three replica PROCESSES (`meshlib control --store etcd://...`) over a
real 3-member etcd cluster, with real Meshes as clients: an apply on one replica reaches the
subscribers of the others, a replica killed under load costs its clients no request (and they
come back to it), one gone silent loses its clients to the others, the etcd leader killed
mid-apply lands the apply once or fails it cleanly, two replicas applying at once both land in
order, a restart of every replica loses nothing, and etcd down stops changes, not traffic.

One etcd cluster and one set of replicas per module (tests/control/replicas.py); a test that
kills a replica or an etcd member starts it again before it ends. Versions are read, never
assumed: the tests share one store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.control.etcd_store import EtcdStore
from tests.conftest import Fleet, wait_until
from tests.control.etcd_cluster import EtcdCluster, Member, free_ports
from tests.control.replicas import Replicas


@pytest.fixture(scope="module")
def replicas(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    with Replicas(tmp_path_factory.mktemp("replicas"), etcd_cluster, 3) as r:
        yield r


@pytest.fixture(autouse=True)
def every_replica_up(replicas: Replicas, etcd_cluster: EtcdCluster) -> Iterator[None]:
    """Each test starts and leaves with every replica and every etcd member running."""
    yield
    for i in range(len(replicas)):
        replicas.thaw(i)
    for m in etcd_cluster.members:
        m.start()
    etcd_cluster.wait_healthy()
    replicas.start(*range(len(replicas)))


def destination(service: str, subset: str) -> dict[str, Any]:
    return {"kind": "Destination", "service": service, "subsets": {subset: {"version": subset}}}


def mesh(replicas: Replicas, tmp_path: Path, *order: int, name: str = "checkout") -> meshlib.Mesh:
    """A Mesh given every replica, preferring them in `order`."""
    return meshlib.Mesh(name, control=replicas.control(*order), cache_dir=tmp_path / f"cache-{name}")


def watching(m: meshlib.Mesh) -> str | None:
    assert m.link is not None and m.link.subscriber is not None
    return m.link.subscriber.watching


def states_applied(m: meshlib.Mesh) -> int:
    """States the Mesh's watch has applied: a resume that needs nothing applies none (a full
    resync, a snapshot, would be one more)."""
    assert m.link is not None and m.link.subscriber is not None
    return m.link.subscriber.applied


def version_in_force(m: meshlib.Mesh) -> int:
    assert m.link is not None
    return m.link.state.version if m.link.state is not None else -1


def documents_in_force(m: meshlib.Mesh) -> list[dict[str, Any]]:
    assert m.link is not None and m.link.state is not None
    return list(m.link.state.documents)


def acked(replicas: Replicas, i: int, client_id: str) -> int | None:
    for c in httpx.get(f"{replicas.url(i)}/v1/clients", timeout=5.0).json():
        if c["client"] == client_id:
            return c["version"]  # type: ignore[no-any-return]
    return None


def test_an_apply_on_one_replica_reaches_the_subscribers_of_the_others(
    replicas: Replicas, tmp_path: Path
) -> None:
    on_b, on_c = (
        mesh(replicas, tmp_path, 1, 2, 0, name="on-b"),
        mesh(replicas, tmp_path, 2, 0, 1, name="on-c"),
    )
    try:
        wait_until(lambda: watching(on_b) == replicas.url(1) and watching(on_c) == replicas.url(2))
        reply = replicas.apply(0, [destination("orders", "a1")])
        assert reply.status_code == 200, reply.text
        version = reply.json()["version"]
        wait_until(
            lambda: version_in_force(on_b) == version and version_in_force(on_c) == version,
            5.0,
            "the version applied on A in force on the subscribers of B and C",
        )
        assert on_b.snapshot.version == on_c.snapshot.version == str(version)
        assert on_b.link is not None and on_c.link is not None
        # each acked the replica it watches, and that replica is the one it talks to
        wait_until(lambda: acked(replicas, 1, on_b.link.client_id) == version, 5.0, "the ack on B")
        wait_until(lambda: acked(replicas, 2, on_c.link.client_id) == version, 5.0, "the ack on C")
        assert [replicas.version(i) for i in range(3)] == [version] * 3
        for i in range(3):  # a replica's log is about the mesh, not a line per etcd request
            assert "HTTP Request: POST" not in replicas.log(i)
    finally:
        on_b.close()
        on_c.close()


def test_a_replica_killed_under_load_costs_its_clients_no_request_there_and_back(
    replicas: Replicas, fleet: Fleet, tmp_path: Path
) -> None:
    _, server = fleet.start("orders-0", {"version": "v1"})
    endpoints = {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": server.address}]}
    assert replicas.apply(0, [endpoints, destination("orders", "v1")]).status_code == 200
    m = mesh(replicas, tmp_path, 1, 2, 0)
    served, failures = 0, []
    stop = threading.Event()

    def traffic() -> None:
        nonlocal served
        with m.sync_client(timeout=5) as client:
            while not stop.is_set():
                try:
                    reply = client.get("http://orders/whoami")
                    reply.raise_for_status()
                    served += 1
                except Exception as exc:  # every failure counts, whatever it is
                    failures.append(exc)

    worker = threading.Thread(target=traffic)
    try:
        wait_until(lambda: watching(m) == replicas.url(1) and version_in_force(m) == replicas.version(0))
        assert m.link is not None
        m.link.endpoints.return_after = (0.3, 0.6)  # back to the preferred replica sooner than 30 s
        worker.start()
        wait_until(lambda: served > 20, 5.0, "traffic")
        states = states_applied(m)
        replicas.kill(1)  # the replica this client watches, mid-traffic
        others = {replicas.url(0), replicas.url(2)}  # its order after the first is its own
        wait_until(lambda: watching(m) in others, 5.0, "the watch moved to another replica")
        assert states_applied(m) == states  # resumed where it was: no snapshot, no full resync
        before = served
        reply = replicas.apply(0, [destination("orders", "v2")])
        applied = time.monotonic()
        assert reply.status_code == 200, reply.text
        version = reply.json()["version"]
        wait_until(lambda: version_in_force(m) == version, 5.0, "the next apply in force on the moved client")
        took = time.monotonic() - applied
        assert took < 2.0, f"the next apply took {took:.2f} s to converge on the moved client"
        # the rules whole, however they came (a delta against the version it held, or whole)
        assert documents_in_force(m) == replicas.config(0)["documents"]
        wait_until(lambda: served > before + 20, 5.0, "traffic after the move")
        # the replica comes back: once healthy for a while (shortened here) its client returns
        replicas.start(1)
        wait_until(lambda: watching(m) == replicas.url(1), 10.0, "the client back on its preferred replica")
        back = served
        reply = replicas.apply(2, [destination("orders", "v3")])
        assert reply.status_code == 200, reply.text
        wait_until(
            lambda: version_in_force(m) == reply.json()["version"], 5.0, "an apply after the move back"
        )
        assert documents_in_force(m) == replicas.config(2)["documents"]
        wait_until(lambda: served > back + 20, 5.0, "traffic after the move back")
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(10)
        m.close()
    assert failures == [], f"{len(failures)} failed requests, the first: {failures[0]!r}"
    assert served > 40


def test_a_replica_gone_silent_loses_its_clients_to_the_others(
    replicas: Replicas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose machine is gone ends no stream: it goes silent. The first of the Mesh's
    loops whose request there times out (here its telemetry report) moves the process, and the
    watch follows at once rather than when its read timeout (45 s) gives up on the stream."""
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0.5")  # a report every 0.5 s, 1 s timeout
    m = mesh(replicas, tmp_path, 1, 0, 2)
    try:
        wait_until(lambda: watching(m) == replicas.url(1) and version_in_force(m) == replicas.version(0))
        replicas.freeze(1)
        reply = replicas.apply(0, [destination("orders", "silent")])
        assert reply.status_code == 200, reply.text
        version = reply.json()["version"]
        wait_until(lambda: version_in_force(m) == version, 10.0, "the apply, through another replica")
        assert watching(m) in {replicas.url(0), replicas.url(2)}
    finally:
        replicas.thaw(1)
        m.close()


def test_the_etcd_leader_killed_mid_apply_lands_each_apply_once_or_fails_it_cleanly(
    replicas: Replicas, etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """Applies in a loop, on every replica in turn, while the leader dies and the rest elect
    another: each answered 200 is in the history once, no apply is in it twice, a refused one
    says why (a 5xx naming the store, not "internal error"), and the next apply after the
    election lands and reaches every replica."""
    start = replicas.history(0, 1)[0]["version"]
    answers: list[tuple[str, int, dict[str, Any], float, float]] = []  # message, status, body, sent, answered
    stop = threading.Event()

    def applies() -> None:
        k = 0
        while not stop.is_set() and k < 200:
            message = f"leader-test {start} {k}"
            sent = time.monotonic()
            reply = replicas.apply(k % 3, [destination("leader", f"s{k}")], message=message)
            answers.append((message, reply.status_code, reply.json(), sent, time.monotonic()))
            k += 1

    worker = threading.Thread(target=applies)
    worker.start()
    try:
        wait_until(lambda: len(answers) >= 3, 10.0, "applies before the kill")
        leader = etcd_cluster.leader()
        leader.kill()
        killed = time.monotonic()
        etcd_cluster.leader()  # the survivors elected another (about half a second)
        elected = time.monotonic()
        after = len(answers)
        wait_until(lambda: len(answers) >= after + 3, 10.0, "applies after the election")
    finally:
        stop.set()
        worker.join(60)
    # at least one apply was under way while the cluster had no leader
    assert any(sent < elected and answered > killed for *_, sent, answered in answers), "none mid-election"
    history = [h for h in replicas.history(0, 1000) if h["version"] > start]
    messages = [h["message"] for h in history]
    assert len(messages) == len(set(messages)), f"an apply landed twice: {messages}"
    versions = sorted(h["version"] for h in history)
    assert versions == list(range(start + 1, start + 1 + len(versions))), "a gap in the versions"
    for message, status, body, _, _ in answers:
        if status == 200:
            assert messages.count(message) == 1 and body["changed"] is True
            assert next(h["version"] for h in history if h["message"] == message) == body["version"]
        else:  # refused: it says the store did not confirm it, and it is in the history at most once
            assert status == 503 and "etcd" in body["error"], (status, body)
    ok = sum(status == 200 for _, status, *_ in answers)
    assert ok >= len(answers) - 1, "an election failed more than the apply it interrupted"

    # the next apply, after the election, lands and every replica serves it
    reply = replicas.apply(1, [destination("leader", "after")], message=f"leader-test {start} after")
    assert reply.status_code == 200, reply.text
    version = reply.json()["version"]
    wait_until(lambda: all(replicas.version(i) == version for i in range(3)), 5.0, "every replica on it")


def test_two_replicas_applying_at_once_both_land_in_order(replicas: Replicas) -> None:
    start = replicas.history(0, 1)[0]["version"]
    rounds = 6
    results: dict[int, list[int]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def applies(i: int, service: str) -> None:
        for k in range(rounds):
            barrier.wait(10)  # both replicas commit at the same moment, every round
            reply = replicas.apply(i, [destination(service, f"s{k}")], message=f"{service} {k}")
            assert reply.status_code == 200, reply.text
            results[i].append(reply.json()["version"])

    threads = [threading.Thread(target=applies, args=(i, s)) for i, s in ((0, "alpha"), (1, "beta"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results[0]) == len(results[1]) == rounds
    # every apply is its own version, the versions run on without a gap, each replica's in order
    everything = sorted(results[0] + results[1])
    assert everything == list(range(start + 1, start + 1 + 2 * rounds))
    assert results[0] == sorted(results[0]) and results[1] == sorted(results[1])
    history = {h["version"]: h["message"] for h in replicas.history(2, 2 * rounds)}
    for i, service in ((0, "alpha"), (1, "beta")):
        assert [history[v] for v in results[i]] == [f"{service} {k}" for k in range(rounds)]
    last = everything[-1]
    wait_until(lambda: all(replicas.version(i) == last for i in range(3)), 5.0, "every replica on the last")
    for i in range(3):  # neither apply undid the other: both services' last subsets everywhere
        docs = {(d["kind"], d["service"]): d for d in replicas.config(i)["documents"]}
        assert docs[("Destination", "alpha")]["subsets"] == {f"s{rounds - 1}": {"version": f"s{rounds - 1}"}}
        assert docs[("Destination", "beta")]["subsets"] == {f"s{rounds - 1}": {"version": f"s{rounds - 1}"}}


def test_a_restart_of_every_replica_loses_no_rule_and_no_version(replicas: Replicas, tmp_path: Path) -> None:
    assert (
        replicas.apply(2, [destination("restart", "before")], message="before the restart").status_code == 200
    )
    m = mesh(replicas, tmp_path, 0, 1, 2)
    try:
        wait_until(lambda: version_in_force(m) == replicas.version(0), 5.0, "the Mesh in sync")
        history = replicas.history(0, 1000)
        config = replicas.config(0)
        states = states_applied(m)
        for i in range(3):
            replicas.kill(i)
        replicas.start(0, 1, 2)
        wait_until(lambda: watching(m) is not None, 10.0, "the watch back on a restarted replica")
        for i in range(3):
            assert replicas.history(i, 1000) == history
            assert replicas.config(i) == config
        # the Mesh kept its rules while every replica was down, resumed on a restarted one
        # without a snapshot (its position is the store's), and follows them
        assert version_in_force(m) == config["version"] and states_applied(m) == states
        reply = replicas.apply(1, [destination("restart", "after")], message="after the restart")
        assert reply.status_code == 200 and reply.json()["version"] == config["version"] + 1
        wait_until(lambda: version_in_force(m) == config["version"] + 1, 10.0, "the next apply on the Mesh")
    finally:
        m.close()


def test_etcd_down_stops_changes_not_traffic(
    replicas: Replicas, etcd_cluster: EtcdCluster, fleet: Fleet, tmp_path: Path
) -> None:
    """Every etcd member dead: the replicas keep serving the rules they hold, the Mesh keeps its
    rules and its requests, a change is refused with a 503 that says why (and lands nowhere),
    and once etcd is back the next apply reaches everyone."""
    from meshlib.control.etcd_client import parse_etcd_url
    from tests.control import Control

    _, server = fleet.start("orders-0", {"version": "v1"})
    endpoints = {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": server.address}]}
    reply = replicas.apply(0, [endpoints, destination("orders", "down")], message="before etcd went down")
    assert reply.status_code == 200, reply.text
    version = reply.json()["version"]
    (tmp_path / "in-process").mkdir()  # a replica of the same store: the same admin token
    (tmp_path / "in-process" / "admin.token").write_text(replicas.tokens[0] + "\n")
    admin = Control(tmp_path / "in-process", etcd=parse_etcd_url(replicas.store))  # to shorten its wait
    assert isinstance(admin.plane.store, EtcdStore)
    admin.plane.store.commit_timeout = 0.5  # 10 s by default: the same answer, sooner
    m = mesh(replicas, tmp_path, 1, 0, 2)
    try:
        wait_until(lambda: version_in_force(m) == version, 5.0, "the Mesh on the version")
        for member in etcd_cluster.members:
            member.kill()
        for i in range(3):
            assert replicas.config(i)["version"] == version  # every replica serves what it has
        history = httpx.get(f"{replicas.url(1)}/v1/history", timeout=10.0)
        assert history.status_code == 503 and "rules store is unavailable" in history.json()["error"]
        assert "check it" not in history.json()["error"]  # a read: no advice about a change
        refused = admin.apply([destination("orders", "while-down")], message="while etcd is down")
        assert refused.status_code == 503
        assert refused.json()["error"].startswith(
            "the rules store is unavailable (etcd: commit not confirmed"
        )
        assert "meshlib history" in refused.json()["error"]
        with m.sync_client(timeout=5) as client:  # traffic goes on with the rules in force
            assert all(client.get("http://orders/whoami").status_code == 200 for _ in range(20))
        assert version_in_force(m) == version and watching(m) == replicas.url(1)

        for member in etcd_cluster.members:
            member.start()
        etcd_cluster.wait_healthy()
        reply = replicas.apply(2, [destination("orders", "back")], message="etcd is back")
        assert reply.status_code == 200 and reply.json()["version"] == version + 1  # nothing landed
        wait_until(lambda: version_in_force(m) == version + 1, 10.0, "the next apply on the Mesh")
        assert "while etcd is down" not in [h["message"] for h in replicas.history(0, 5)]
    finally:
        m.close()
        admin.stop()


ETCDCTL = shutil.which("etcdctl")


@pytest.mark.skipif(ETCDCTL is None, reason="etcdctl is not installed (apt-get install etcd-client)")
def test_backup_and_restore_as_the_operations_guide_says(tmp_path: Path) -> None:
    """docs/operations.md, "Backup and restore", step by step with etcdctl on a cluster of its
    own: the restored history is the snapshot's, a Mesh that held a later version gets the
    restored one (a snapshot, under the new epoch), and the next apply reaches it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")} | {"ETCDCTL_API": "3"}

    def etcdctl(*args: str) -> None:
        done = subprocess.run(
            [ETCDCTL or "etcdctl", *args], capture_output=True, text=True, env=env, timeout=30
        )
        assert done.returncode == 0, done.stderr[-1000:]

    etcd = EtcdCluster(tmp_path / "etcd", 1)
    restored: list[Member] = []
    cluster = Replicas(tmp_path / "replicas", etcd, 2, prefix="mesh/prod")
    m: meshlib.Mesh | None = None
    try:
        assert cluster.apply(0, [destination("orders", "one")], message="one").status_code == 200
        assert cluster.apply(1, [destination("orders", "two")], message="two").status_code == 200
        snapshot = tmp_path / "backup.db"
        etcdctl("--endpoints", etcd.members[0].url, "snapshot", "save", str(snapshot))
        assert (
            cluster.apply(0, [destination("orders", "lost")], message="after the backup").status_code == 200
        )
        m = mesh(cluster, tmp_path, 0, 1)
        # the sink sets the state in force (and writes the cache) before the watch counts the
        # state applied: both are waited for, or the count read here may miss this one
        wait_until(
            lambda: version_in_force(m) == 3 and states_applied(m) > 0, 5.0, "the version after the backup"
        )
        states, epoch = states_applied(m), m.link.state.epoch  # type: ignore[union-attr]

        cluster.stop()  # stop every replica, restore into new data dirs, delete the epoch, start them
        etcd.stop()
        client, peer = free_ports(2)
        initial = f"m0=http://127.0.0.1:{peer}"
        data = tmp_path / "restored" / "m0"
        data.parent.mkdir(parents=True)
        etcdctl(
            "snapshot", "restore", str(snapshot), "--name", "m0", "--initial-cluster", initial,
            "--initial-cluster-token", "restored", "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}", "--data-dir", str(data),
        )  # fmt: skip
        restored.append(Member("m0", data, client, peer, initial))
        restored[0].start()
        etcd.members = restored
        etcd.wait_healthy()
        etcdctl("--endpoints", restored[0].url, "del", "/mesh/prod/epoch")
        cluster.store = f"{etcd.endpoints}/mesh/prod"
        cluster.start(0, 1)

        assert [(h["version"], h["message"]) for h in cluster.history(1)] == [
            (2, "two"),
            (1, "one"),
            (0, "empty"),
        ]
        wait_until(
            lambda: version_in_force(m) == 2 and states_applied(m) > states, 10.0, "the restored version"
        )
        # the restored state came as one snapshot under the new epoch
        assert m.link.state.epoch != epoch and states_applied(m) == states + 1  # type: ignore[union-attr]
        reply = cluster.apply(1, [destination("orders", "three")], message="after the restore")
        assert reply.status_code == 200 and reply.json()["version"] == 3
        wait_until(lambda: version_in_force(m) == 3, 10.0, "the next apply on the Mesh")
        assert [d["subsets"] for d in m.link.state.documents] == [{"three": {"version": "three"}}]  # type: ignore[union-attr]
    finally:
        if m is not None:
            m.close()
        cluster.stop()
        for member in restored:
            member.kill()
        etcd.stop()
