"""The control plane on an etcd store (`ControlSettings(etcd=...)`): the rules outlive the data
dir, and two replicas applying on one store lose nothing. Real control services on 127.0.0.1
over a real 3-member etcd cluster (tests/control/conftest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from meshlib.control.etcd_client import parse_etcd_url
from meshlib.control.etcd_store import EtcdStore
from tests.control import DESTINATION, ROUTE, Control
from tests.control.etcd_cluster import EtcdCluster

PAYMENTS = {"kind": "Destination", "service": "payments", "subsets": {"v1": {"version": "v1"}}}


def _etcd(cluster: EtcdCluster) -> str:
    return f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"


def test_rules_live_in_etcd_not_in_the_data_dir(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    url = _etcd(etcd_cluster)
    first = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    try:
        assert first.apply([DESTINATION, ROUTE]).json() == {"version": 1, "changed": True}
    finally:
        first.stop()
    assert not (tmp_path / "a" / "rules.db").exists()
    second = Control(tmp_path / "b", etcd=parse_etcd_url(url))  # another machine, same etcd
    try:
        assert second.plane.version == 1
        assert second.http.get("/v1/config", headers=second.admin).json()["version"] == 1
        assert sorted(d.kind for d in second.plane.rules.documents) == ["Destination", "Route"]
    finally:
        second.stop()


def test_two_replicas_applying_lose_no_change(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """B still holds version 0 when A commits version 1; B's apply is refused by the store,
    B takes version 1 (and pushes it to its own subscribers), then commits its change on top."""
    url = _etcd(etcd_cluster)
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    b = Control(tmp_path / "b", etcd=parse_etcd_url(url))
    try:
        assert a.apply([DESTINATION]).json() == {"version": 1, "changed": True}
        revision = b.plane.hub.revision
        assert b.apply([PAYMENTS]).json() == {"version": 2, "changed": True}
        assert sorted(d.service for d in b.plane.rules.documents) == ["orders", "payments"]
        assert b.plane.hub.revision == revision + 2  # version 1, then 2: each a `rules` event
        with EtcdStore(url) as store:
            version, rules = store.current()
            assert version == 2 and sorted(d.service for d in rules.documents) == ["orders", "payments"]
            assert [i.version for i in store.history()] == [2, 1, 0]
    finally:
        a.stop()
        b.stop()
