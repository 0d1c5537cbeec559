"""EtcdStore where etcd differs from SQLite: lost answers, a member killed while replicas
commit, the whole cluster restarted, prefixes, etcd out of reach. Against a real 3-member
cluster (tests/control/conftest.py); the shared Store suite is tests/control/test_store.py."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from meshlib.control.etcd_client import EtcdClient, EtcdError, EtcdOptions, EtcdUnavailable, parse_etcd_url
from meshlib.control.etcd_store import EtcdStore
from meshlib.control.store import Store
from meshlib.rules import RuleSet, parse_documents
from tests.control import DESTINATION, ROUTE
from tests.control.etcd_cluster import EtcdCluster, free_port

RULES = parse_documents([DESTINATION])


def _url(cluster: EtcdCluster, rotate: int = 0) -> str:
    """The cluster under a prefix of this test's own, members listed from `rotate` on."""
    members = [f"127.0.0.1:{m.client_port}" for m in cluster.members]
    members = members[rotate:] + members[:rotate]
    return f"etcd://{','.join(members)}/test-{uuid.uuid4().hex[:12]}"


class LoseTxnAnswers(httpx.HTTPTransport):
    """A real transport that loses the answer of the next `n` transactions: etcd applies them,
    the client hears nothing (a member dying between commit and reply does this)."""

    def __init__(self, *, before: bool = False) -> None:
        super().__init__()
        self.n = 0
        self.before = before  # lose the request instead: etcd never sees it
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/kv/txn" and self.n > 0:
            self.n -= 1
            self.lost += 1
            if self.before:
                raise httpx.ReadError("the connection broke before the request was read", request=request)
            response = super().handle_request(request)
            response.read()
            response.close()
            raise httpx.ReadError("the connection broke before the answer", request=request)
        return super().handle_request(request)


@pytest.mark.parametrize("before", [False, True], ids=["applied", "not-applied"])
def test_a_commit_whose_answer_is_lost_lands_once(etcd_cluster: EtcdCluster, before: bool) -> None:
    options = parse_etcd_url(_url(etcd_cluster))
    transport = LoseTxnAnswers(before=before)
    with EtcdStore(options, client=EtcdClient(options, transport=transport)) as store:
        transport.n = 2  # the first two attempts, at most
        assert store.commit(RULES, "once") == 1
        # applied: the store reads version 1, finds its commit id there, and tries no more;
        # not applied: the next attempt is lost too, the third lands
        assert transport.lost == (2 if before else 1)
        assert store.current() == (1, RULES)
        assert [(i.version, i.message) for i in store.history()] == [(1, "once"), (0, "empty")]
        assert store.commit(parse_documents([DESTINATION, ROUTE]), "next") == 2


def test_commits_go_on_when_the_leader_is_killed(etcd_cluster: EtcdCluster) -> None:
    """Two replicas commit without pause; the etcd leader is killed under them. Every commit
    either returned its version (and history holds it there, once) or raised EtcdError (and
    history holds it at most once); versions stay consecutive; commits succeed after the
    election."""
    prefix_url = _url(etcd_cluster)
    stores = [EtcdStore(prefix_url), EtcdStore(_url_same_prefix(prefix_url, etcd_cluster, 1))]
    landed: dict[str, int] = {}
    failed: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()
    after_kill: dict[str, int] = {"r0": 0, "r1": 0}

    def replica(name: str, store: EtcdStore) -> None:
        deadline = time.monotonic() + 20
        i = 0
        while after_kill[name] < 5 and time.monotonic() < deadline:
            message = f"{name}-{i}"
            i += 1
            try:
                version = store.commit(RULES, message)
            except EtcdError:
                with lock:
                    failed.append(message)
                continue
            with lock:
                landed[message] = version
                if killed.is_set():
                    after_kill[name] += 1

    threads = [threading.Thread(target=replica, args=(f"r{n}", s)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(landed) >= 6, "commits before the kill")
        leader = etcd_cluster.leader()
        etcd_cluster.kill(leader)
        killed.set()
        for t in threads:
            t.join(30)
        assert after_kill == {"r0": 5, "r1": 5}, (after_kill, failed)
        etcd_cluster.restart(leader)
        assert etcd_cluster.leader() is not None
        history = {i.version: i.message for i in stores[0].history(limit=1000)}
        assert sorted(history) == list(range(len(history)))  # consecutive, from 0
        assert sorted(landed.values()) == sorted(set(landed.values()))  # no version returned twice
        for message, version in landed.items():
            assert history[version] == message
        messages = list(history.values())
        assert all(messages.count(m) <= 1 for m in failed)
        assert len(messages) == len(set(messages))
    finally:
        killed.set()
        for s in stores:
            s.close()
        etcd_cluster.wait_healthy()


def _url_same_prefix(url: str, cluster: EtcdCluster, rotate: int) -> str:
    prefix = url.rsplit("/", 1)[1]
    return _url(cluster, rotate).rsplit("/", 1)[0] + "/" + prefix


def test_restarting_every_member_loses_nothing(etcd_cluster: EtcdCluster) -> None:
    url = _url(etcd_cluster)
    with EtcdStore(url) as store:
        store.commit(RULES, "first")
        store.commit(parse_documents([DESTINATION, ROUTE]), "second")
    for m in etcd_cluster.members:
        m.kill()
    for m in etcd_cluster.members:
        m.start()
    etcd_cluster.wait_healthy()
    with EtcdStore(url) as store:
        assert store.current() == (2, parse_documents([DESTINATION, ROUTE]))
        assert [i.message for i in store.history()] == ["second", "first", "empty"]


def test_prefixes_are_separate_stores(etcd_cluster: EtcdCluster) -> None:
    with EtcdStore(_url(etcd_cluster)) as a, EtcdStore(_url(etcd_cluster)) as b:
        a.commit(RULES, "in a")
        assert b.current() == (0, RuleSet.EMPTY)
        assert [i.message for i in b.history()] == ["empty"]
        with pytest.raises(KeyError):
            b.get(1)


def test_the_epoch_is_one_per_prefix_and_heads_carry_their_commit_revision(etcd_cluster: EtcdCluster) -> None:
    """Every replica of one store names it alike in event ids (the epoch) and places a version
    at the etcd revision that committed it: the two halves of a resume on another replica."""
    url = _url(etcd_cluster)
    with EtcdStore(url) as a, EtcdStore(url) as b, EtcdStore(_url(etcd_cluster)) as other:
        assert a.epoch == b.epoch != other.epoch
        version, revision = a.commit_at(RULES, "first")
        head = b.head()
        assert (head.version, head.revision) == (version, revision) == (1, revision)
        assert head.watch_from > revision
        assert b.commit_at(RULES, "second")[1] > revision


def test_keys_are_laid_out_as_documented(etcd_cluster: EtcdCluster) -> None:
    url = _url(etcd_cluster)
    prefix = "/" + url.rsplit("/", 1)[1] + "/"
    with EtcdStore(url) as store:
        store.commit(RULES, "first")
        client = EtcdClient(store.options)
        keys = [kv.key.decode() for kv in client.range(prefix.encode(), (prefix[:-1] + "0").encode())]
        client.close()
    pad = "0" * 19
    assert keys == [
        f"{prefix}epoch",
        f"{prefix}rules/head",
        f"{prefix}rules/info/{pad}0",
        f"{prefix}rules/info/{pad}1",
        f"{prefix}rules/versions/{pad}0",
        f"{prefix}rules/versions/{pad}1",
    ]


def test_etcd_out_of_reach_fails_cleanly() -> None:
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        EtcdStore(f"etcd://127.0.0.1:{free_port()}", commit_timeout=0.5)
    assert time.monotonic() - started < 5


def test_members_that_never_answer_fail_the_opening_within_its_timeout() -> None:
    """A member that takes the connection and never answers costs a timeout per attempt: the
    last attempt gets only the time left, so the opening gives up at `commit_timeout` (it
    once ran a whole attempt over: 13 s against the 10 s the operations guide says)."""
    silent = socket.socket()  # listens, never accepts: the kernel takes the connection
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        options = EtcdOptions(endpoints=(f"http://127.0.0.1:{silent.getsockname()[1]}",), timeout=1.0)
        started = time.monotonic()
        with pytest.raises(EtcdError):
            EtcdStore(options, commit_timeout=1.5)
        took = time.monotonic() - started
        assert 1.4 < took < 1.8, f"gave up after {took:.2f} s"  # not 2.1 s: two full attempts
    finally:
        silent.close()


def test_a_commit_with_etcd_gone_raises_within_its_timeout(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path / "etcd", 1) as cluster:
        store: Store = EtcdStore(cluster.endpoints, commit_timeout=1.0)
        cluster.members[0].kill()
        started = time.monotonic()
        with pytest.raises(EtcdError, match="not confirmed within 1 s"):
            store.commit(RULES, "lost")
        assert time.monotonic() - started < 3
        cluster.members[0].start()
        cluster.wait_healthy()
        assert store.commit(RULES, "after") == 1  # the failed commit did not land
        assert [i.message for i in store.history()] == ["after", "empty"]
        store.close()  # type: ignore[attr-defined]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
