"""Fixtures of the control service tests that need a server of their own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from meshlib.control.etcd_client import EtcdOptions, parse_etcd_url
from tests.control.etcd_cluster import AVAILABLE, EtcdCluster


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster for a whole test module (it starts in about half a second).

    A test that kills members must leave every member running and healthy again."""
    if not AVAILABLE:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 3) as cluster:
        yield cluster


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> EtcdOptions:
    """The module's etcd cluster under a key prefix of this test's own."""
    return parse_etcd_url(f"{etcd_cluster.endpoints}/test-{uuid.uuid4().hex[:12]}")
